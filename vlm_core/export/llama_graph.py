"""The LLaMA-architecture text decoder (LLaMA, Vicuna, SmolLM2, ...) as one ONNX graph with the runtime's
KV-cache contract. It belongs to no family: MiniGPT-4 and SmolVLM both export their text model with it.
"""
from __future__ import annotations

import torch
from torch import nn

from vlm_core.export.fused_ops import rotary, rotary_tables, skip_rms_norm
from vlm_core.export.graph_layers import (
    decoder_input_names,
    example_logits_index,
    fuse_linears,
    kv_names,
    last_hidden,
    rms_norm,
)
from vlm_core.export.group_query_attention import example_lengths, group_query_attention
from vlm_core.export.kv_dtype import torch_dtype


class LlamaDecoderGraph(nn.Module):
    """LLaMA text decoder with the runtime's KV-cache contract (as Qwen3VLDecoderGraph, minus M-RoPE,
    q/k norms and deepstack).

    Inputs: inputs_embeds [B, S, H], position_ids int64 [B, S], seqlens_k int32 [B] and total_sequence_length
    int32 [] (export/group_query_attention.py), logits_index int64 [K] (graph_layers.last_hidden),
    past_key_values.{i}.key|value [B, kv, C, d] buffers the runtime owns. Outputs: logits [B, K, vocab] (the
    positions logits_index names) and present.{i}.key|value [B, kv, C, d]: the past buffers
    with the new entries written in (in place when the runtime binds one buffer to both).
    kv_dtype: the cache's dtype (export/kv_dtype.py).
    """

    def __init__(self, text_model: nn.Module, lm_head: nn.Module, kv_dtype: str = "float32"):
        """text_model: transformers' LlamaModel (embed_tokens, layers, norm, rotary_emb); lm_head: its Linear."""
        super().__init__()
        self.kv_dtype = torch_dtype(kv_dtype)
        self.model = text_model
        self.lm_head = lm_head
        config = text_model.config
        self.num_layers = config.num_hidden_layers
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # One MatMul for q/k/v and one for gate/up per layer, as in the Qwen3-VL graph (and ONNX Runtime GenAI's
        # builder): 4 weight MatMuls a layer instead of 7, fewer and larger GEMVs at decode time. The fused
        # weights replace the originals in place (no second copy; the streamed export follows their keys).
        self.qkv = nn.ModuleList(fuse_linears([layer.self_attn, "q_proj", "k_proj", "v_proj"])
                                 for layer in text_model.layers)
        self.gate_up = nn.ModuleList(fuse_linears([layer.mlp, "gate_proj", "up_proj"]) for layer in text_model.layers)

    @property
    def input_names(self):
        return decoder_input_names(["inputs_embeds", "position_ids"], self.num_layers)

    @property
    def output_names(self):
        return ["logits"] + kv_names("present", self.num_layers)

    def _attention(self, index, attn, x, tables, lengths, past_key, past_value):
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv[index](x).split([self.num_heads * self.head_dim, kv_size, kv_size], -1)
        q = rotary(q, tables, self.num_heads)  # [B, S, heads*d]
        k = rotary(k, tables, self.num_kv_heads)  # [B, S, kv*d]
        out, present_key, present_value = group_query_attention(
            q, k, v, past_key, past_value, *lengths, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, scale=attn.scaling)
        return attn.o_proj(out), present_key, present_value

    def forward(self, inputs_embeds, position_ids, seqlens_k, total_sequence_length, logits_index, *past):
        model = self.model
        tables = rotary_tables(*model.rotary_emb(inputs_embeds, position_ids))  # cos/sin of this call's tokens
        lengths = (seqlens_k, total_sequence_length)
        # residual adds happen inside the next norm (SkipSimplifiedLayerNormalization: export/fused_ops.py)
        hidden = inputs_embeds
        x = rms_norm(model.layers[0].input_layernorm, hidden)
        presents = []
        for index, layer in enumerate(model.layers):
            attn_out, key, value = self._attention(index, layer.self_attn, x, tables, lengths, past[2 * index],
                                                   past[2 * index + 1])
            x, hidden = skip_rms_norm(layer.post_attention_layernorm, hidden, attn_out)
            gate, up = self.gate_up[index](x).chunk(2, dim=-1)
            mlp_out = layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
            presents += [key, value]
            if index + 1 < len(model.layers):
                x, hidden = skip_rms_norm(model.layers[index + 1].input_layernorm, hidden, mlp_out)
        # [B, K, H]: a MatMul (not a Gemm) for the quantizers
        hidden, _ = skip_rms_norm(model.norm, last_hidden(hidden, logits_index), last_hidden(mlp_out, logits_index))
        return (self.lm_head(hidden), *presents)


def llama_decoder_example(graph: LlamaDecoderGraph, hidden_size: int) -> tuple[tuple, tuple]:
    """Example inputs and dynamic shapes to trace `graph` with (sizes >= 2 so no axis is specialised)."""
    import torch
    from torch.export import Dim

    batch, seq, capacity = 2, 3, 4
    kv_shape = (batch, graph.num_kv_heads, capacity, graph.head_dim)
    args = (torch.randn(batch, seq, hidden_size), torch.arange(seq).repeat(batch, 1),
            *example_lengths(batch, seq, capacity), example_logits_index(seq),
            *[torch.zeros(kv_shape, dtype=graph.kv_dtype) for _ in range(2 * graph.num_layers)])
    b, s, c = Dim("batch"), Dim("sequence"), Dim("past_capacity")
    dynamic = ({0: b, 1: s}, {0: b, 1: s}, {0: b}, None, {0: Dim("logits")}, tuple({0: b, 2: c} for _ in range(2 * graph.num_layers)))
    return args, dynamic


def llama_text_config(text) -> dict:
    """manifest["text_config"] of a LLaMA-architecture text model (transformers' LlamaConfig)."""
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {"model_type": text.model_type, "num_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads, "num_kv_heads": text.num_key_value_heads,
            "head_dim": head_dim, "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
            "max_context": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
            "rope_parameters": dict(getattr(text, "rope_parameters", None) or {})}


def random_pixels(model, count: int, seed: int) -> torch.Tensor:
    """`count` random square images at the vision tower's size (tracing and parity inputs), seeded."""
    size = model.config.vision_config.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export_llama_decoder(model, graph: LlamaDecoderGraph, path: str) -> list[str]:
    """Trace and write the LLaMA decoder `graph` of a spliced-vision family (MiniGPT-4, SmolVLM) to `path`."""
    from vlm_core.export.onnx_io import export_graph

    args, dynamic = llama_decoder_example(graph, model.config.text_config.hidden_size)
    return export_graph(graph, args, path, dynamic)
