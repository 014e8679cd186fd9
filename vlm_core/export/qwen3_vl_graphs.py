"""torch.nn.Module wrappers, one per ONNX graph, for Qwen3-VL.

Both wrappers reuse the checkpoint's own submodules (so the weights and the per-layer maths are
transformers'), and re-state only the control flow that does not export: the ViT's per-image
attention split and the decoder's cache object. Every grid-dependent table comes in as an input
computed by models.qwen3_vl.positions.
"""
from __future__ import annotations

import torch
from torch import nn

from vlm_core.export.fused_ops import rotary, rotary_tables, skip_rms_norm
from vlm_core.export.graph_layers import (
    apply_rotary,
    decoder_input_names,
    fuse_linears,
    kv_names,
    last_hidden,
    rms_norm,
)
from vlm_core.export.group_query_attention import group_query_attention
from vlm_core.export.kv_dtype import torch_dtype


class Qwen3VLVisionGraph(nn.Module):
    """ViT + patch merger + deepstack mergers.

    Inputs: pixel_values [N, C*T*P*P], pos_embed_indices int64 [N, 4], pos_embed_weights [N, 4],
    vision_position_ids int64 [N, 2], segment_ids int64 [N].
    Outputs: image_embeds [N / merge², text_hidden], deepstack_embeds [K, N / merge², text_hidden].
    """

    input_names = ["pixel_values", "pos_embed_indices", "pos_embed_weights", "vision_position_ids", "segment_ids"]
    output_names = ["image_embeds", "deepstack_embeds"]

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.deepstack_layers = list(visual.deepstack_visual_indexes)

    def _attention(self, attn, x, cos, sin, bias):  # [N, D] -> [N, D]
        n = x.shape[0]
        qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 2, 0, 3)  # [3, heads, N, d]
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling + bias  # [heads, N, N]
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(0, 1).reshape(n, -1)  # [N, heads*d]
        return attn.proj(out)

    def forward(self, pixel_values, pos_embed_indices, pos_embed_weights, vision_position_ids, segment_ids):
        visual = self.visual
        hidden = visual.patch_embed(pixel_values)  # [N, D]
        pos = (visual.pos_embed(pos_embed_indices) * pos_embed_weights[:, :, None]).sum(1)
        hidden = hidden + pos.to(hidden.dtype)
        cos, sin = visual.rotary_pos_emb(hidden, vision_position_ids)  # [N, d]
        cos, sin = cos[None].to(hidden.dtype), sin[None].to(hidden.dtype)
        same_image = segment_ids[:, None] == segment_ids[None, :]
        bias = torch.where(same_image, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)[None]
        deepstack = []
        for index, block in enumerate(visual.blocks):
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, bias)
            hidden = hidden + block.mlp(block.norm2(hidden))
            if index in self.deepstack_layers:
                merger = visual.deepstack_merger_list[self.deepstack_layers.index(index)]
                deepstack.append(merger(hidden))
        image_embeds = visual.merger(hidden)
        if deepstack:
            deepstack_embeds = torch.stack(deepstack)
        else:
            deepstack_embeds = image_embeds.new_zeros((0,) + tuple(image_embeds.shape))
        return image_embeds, deepstack_embeds


class Qwen3VLDecoderGraph(nn.Module):
    """Text decoder with a pre-allocated KV cache and deepstack injection; logits at the positions asked for.

    The cache is a buffer the runtime owns: past_key_values.{i}.key|value [B, kv_heads, C, head_dim]
    hold C slots; row b's first seqlens_k[b] + 1 - S are filled (seqlens_k int32 [B], with
    total_sequence_length int32 [] the longest row's length after the call). Each layer's attention is one
    GroupQueryAttention op (export/group_query_attention.py) that writes the new entries into the buffer and
    returns it as present.{i}.key|value [B, kv_heads, C, head_dim]: bound to the same memory as the past
    (IO binding), no step copies the cache.

    Other inputs: inputs_embeds [B, S, H], position_ids int64 [3, B, S] (M-RoPE, applied before the op),
    deepstack_embeds [K, B, S, H] (zero off image positions), logits_index int64 [N] (graph_layers.last_hidden).
    Outputs: logits [B, N, vocab] (the positions logits_index names).

    kv_dtype: the cache's dtype (past and present); the op then takes q/k/v in it too (export/kv_dtype.py).
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, num_deepstack: int,
                 kv_dtype: str = "float32"):
        super().__init__()
        self.kv_dtype = torch_dtype(kv_dtype)
        self.language_model = language_model
        self.lm_head = lm_head
        self.num_deepstack = num_deepstack
        config = language_model.config
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        # One MatMul for q/k/v and one for gate/up per layer: fewer, larger GEMVs at decode time
        # (what ONNX Runtime GenAI's builder does). The fused weights replace the originals in
        # place, so exporting the 2B model needs no second copy of them.
        self.qkv = nn.ModuleList(fuse_linears([layer.self_attn, "q_proj", "k_proj", "v_proj"])
                                 for layer in language_model.layers)
        self.gate_up = nn.ModuleList(fuse_linears([layer.mlp, "gate_proj", "up_proj"])
                                     for layer in language_model.layers)

    @property
    def input_names(self):
        return decoder_input_names(["inputs_embeds", "position_ids", "deepstack_embeds"], self.num_layers)

    @property
    def output_names(self):
        return ["logits"] + kv_names("present", self.num_layers)

    def _attention(self, index, attn, x, tables, lengths, past_key, past_value):
        batch, seq, _ = x.shape
        shape = (batch, seq, -1, self.head_dim)
        num_heads = attn.config.num_attention_heads
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv[index](x).split([num_heads * self.head_dim, kv_size, kv_size], -1)
        q = rotary(rms_norm(attn.q_norm, q.reshape(shape)).reshape(batch, seq, -1), tables, num_heads)  # [B, S, heads*d]
        k = rotary(rms_norm(attn.k_norm, k.reshape(shape)).reshape(batch, seq, -1), tables, self.num_kv_heads)
        out, present_key, present_value = group_query_attention(
            q, k, v, past_key, past_value, *lengths, num_heads=num_heads, num_kv_heads=self.num_kv_heads,
            scale=attn.scaling)
        return attn.o_proj(out), present_key, present_value

    def forward(self, inputs_embeds, position_ids, deepstack_embeds, seqlens_k, total_sequence_length, logits_index,
                *past):
        model = self.language_model
        # M-RoPE's cos/sin for this call's tokens, once; each layer's RotaryEmbedding ops read them
        tables = rotary_tables(*model.rotary_emb(inputs_embeds, position_ids))
        lengths = (seqlens_k, total_sequence_length)
        # The residual stream, and the last block's output not yet added to it: the add happens inside the
        # next norm (SkipSimplifiedLayerNormalization), except after deepstack layers (a second add).
        hidden, pending = inputs_embeds, None
        presents = []
        for index, layer in enumerate(model.layers):
            if pending is None:
                x = rms_norm(layer.input_layernorm, hidden)
            else:
                x, hidden = skip_rms_norm(layer.input_layernorm, hidden, pending)
            attn_out, key, value = self._attention(index, layer.self_attn, x, tables, lengths,
                                                   past[2 * index], past[2 * index + 1])
            x, hidden = skip_rms_norm(layer.post_attention_layernorm, hidden, attn_out)
            gate, up = self.gate_up[index](x).chunk(2, dim=-1)
            pending = layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
            if index < self.num_deepstack:
                hidden, pending = hidden + pending + deepstack_embeds[index], None
            presents += [key, value]
        if pending is None:  # [B, N, H]: a MatMul (not a Gemm) for the quantizers
            hidden = rms_norm(model.norm, last_hidden(hidden, logits_index))
        else:
            hidden, _ = skip_rms_norm(model.norm, last_hidden(hidden, logits_index), last_hidden(pending, logits_index))
        return (self.lm_head(hidden), *presents)  # logits [B, N, vocab]
