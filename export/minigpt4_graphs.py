"""torch.nn.Module wrappers, one per ONNX graph, for the MiniGPT-4 / BLIP-2-with-LLaMA family.

Both reuse the checkpoint's own submodules (transformers' Blip2ForConditionalGeneration with a
LLaMA text model) and re-state only the attention control flow, as export/qwen3_vl_graphs.py does.
"""
from __future__ import annotations

import torch
from torch import nn

from . import qwen3_vl_graphs as _qwen
from .kv_dtype import round_trip, torch_dtype

_rotate_half = _qwen._rotate_half
_rms_norm = getattr(_qwen, "_rms_norm", None)  # the ORT-fusable RMSNorm pattern, when the Qwen module has it


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _rms_norm(norm, x) if _rms_norm is not None else norm(x)


def _attend(q, k, v, scaling):  # [B, h, Lq, d], [B, h, Lk, d] -> [B, Lq, h*d]
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, dim=-1)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


class MiniGPT4VisionGraph(nn.Module):
    """EVA ViT (BLIP-2 vision model) + ln_vision (post_layernorm) + Q-Former + linear projection.

    Inputs: pixel_values [n_images, 3, S, S]. Outputs: image_embeds [n_images, num_query_tokens, llm_hidden].
    """

    input_names = ["pixel_values"]
    output_names = ["image_embeds"]

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision = model.vision_model
        self.qformer = model.qformer
        self.query_tokens = model.query_tokens
        self.projection = model.language_projection

    def _vit_layer(self, layer, x):
        attn = layer.self_attn
        batch, n, dim = x.shape
        qkv = attn.qkv(layer.layer_norm1(x)).reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = x + attn.projection(_attend(qkv[0], qkv[1], qkv[2], attn.scale))
        return x + layer.mlp(layer.layer_norm2(x))

    @staticmethod
    def _heads(linear, x, head_dim):
        batch, n, _ = x.shape
        return linear(x).view(batch, n, -1, head_dim).transpose(1, 2)

    def _qformer_attention(self, block, hidden, context):
        att = block.attention
        d = att.attention_head_size
        out = _attend(self._heads(att.query, hidden, d), self._heads(att.key, context, d),
                      self._heads(att.value, context, d), att.scaling)
        return block.output(out, hidden)  # dense + residual + LayerNorm

    def forward(self, pixel_values):
        hidden = self.vision.embeddings(pixel_values)  # [n, 1 + patches, D]
        for layer in self.vision.encoder.layers:
            hidden = self._vit_layer(layer, hidden)
        image = self.vision.post_layernorm(hidden)  # MiniGPT-4's ln_vision
        query = self.qformer.layernorm(self.query_tokens.expand(image.shape[0], -1, -1))
        for layer in self.qformer.encoder.layer:
            query = self._qformer_attention(layer.attention, query, query)
            if layer.has_cross_attention:
                query = self._qformer_attention(layer.crossattention, query, image)
            query = layer.output_query(layer.intermediate_query(query), query)
        return self.projection(query)


class LlamaDecoderGraph(nn.Module):
    """LLaMA text decoder with the runtime's KV-cache contract (same as Qwen3VLDecoderGraph, minus M-RoPE,
    q/k norms and deepstack): past_key_values.{i}.key|value [B, kv, C, d] buffers, attention_mask int64
    [B, C + S] (filled slots and new tokens 1), position_ids int64 [B, S], inputs_embeds [B, S, H].
    Outputs logits [B, vocab] (last position) and present.{i}.key|value [B, kv, S, d] (new entries only);
    scores over past and new keys are computed apart, the cache is never concatenated. kv_dtype: the cache's
    dtype, as in Qwen3VLDecoderGraph (export/kv_dtype.py).
    """

    def __init__(self, causal_lm: nn.Module, kv_dtype: str = "float32"):
        super().__init__()
        self.kv_dtype = torch_dtype(kv_dtype)
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        config = causal_lm.config
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @property
    def input_names(self):
        return ["inputs_embeds", "attention_mask", "position_ids"] + _qwen.kv_names("past_key_values", self.num_layers)

    @property
    def output_names(self):
        return ["logits"] + _qwen.kv_names("present", self.num_layers)

    def _attention(self, attn, x, cos, sin, past_bias, new_bias, past_key, past_value):
        batch, seq, _ = x.shape
        shape = (batch, seq, -1, self.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)  # [B, heads, S, d]
        k = attn.k_proj(x).view(shape).transpose(1, 2)  # [B, kv, S, d]
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, present_key = round_trip(k, self.kv_dtype)  # attend with exactly what the cache will hold
        v, present_value = round_trip(v, self.kv_dtype)
        if past_key.dtype != q.dtype:  # a float16 cache: the matmuls run in float32
            past_key, past_value = past_key.to(q.dtype), past_value.to(q.dtype)
        groups = q.shape[1] // self.num_kv_heads  # grouped-query attention by broadcasting, no copies
        q = q.reshape(batch, self.num_kv_heads, groups, seq, self.head_dim) * attn.scaling
        past_scores = torch.matmul(q, past_key[:, :, None].transpose(-1, -2)) + past_bias  # [B, kv, g, S, C]
        new_scores = torch.matmul(q, k[:, :, None].transpose(-1, -2)) + new_bias  # [B, kv, g, S, S]
        capacity = past_key.shape[2]
        probs = torch.softmax(torch.cat([past_scores, new_scores], dim=-1).float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs[..., :capacity], past_value[:, :, None]) + torch.matmul(
            probs[..., capacity:], v[:, :, None])  # [B, kv, g, S, d]
        out = out.reshape(batch, -1, seq, self.head_dim).transpose(1, 2).reshape(batch, seq, -1)
        return attn.o_proj(out), present_key, present_value

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        model = self.model
        hidden = inputs_embeds
        seq = inputs_embeds.shape[1]
        capacity = past[0].shape[2]
        cos, sin = model.rotary_emb(hidden, position_ids)  # [B, S, d]
        cos, sin = cos[:, None], sin[:, None]
        lowest = torch.finfo(hidden.dtype).min
        mask = attention_mask.bool()
        past_bias = torch.where(mask[:, :capacity], 0.0, lowest).to(hidden.dtype)[:, None, None, None, :]
        positions = torch.arange(seq, device=hidden.device)
        causal = positions[None, :] <= positions[:, None]
        new_allowed = causal[None] & mask[:, None, capacity:]
        new_bias = torch.where(new_allowed, 0.0, lowest).to(hidden.dtype)[:, None, None]
        presents = []
        for index, layer in enumerate(model.layers):
            attn_out, key, value = self._attention(layer.self_attn, _norm(layer.input_layernorm, hidden), cos, sin,
                                                   past_bias, new_bias, past[2 * index], past[2 * index + 1])
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(_norm(layer.post_attention_layernorm, hidden))
            presents += [key, value]
        hidden = _norm(model.norm, hidden[:, -1:, :])  # [B, 1, H]
        logits = self.lm_head(hidden)[:, 0]
        return (logits, *presents)
