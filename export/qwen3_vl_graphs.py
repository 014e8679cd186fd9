"""torch.nn.Module wrappers, one per ONNX graph, for Qwen3-VL.

Both wrappers reuse the checkpoint's own submodules (so the weights and the per-layer maths are
transformers'), and re-state only the control flow that does not export: the ViT's per-image
attention split and the decoder's cache object. Every grid-dependent table comes in as an input
computed by models.qwen3_vl.positions.
"""
from __future__ import annotations

import torch
from torch import nn

from .kv_dtype import round_trip, torch_dtype


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm written as x / sqrt(mean(x²) + eps) * w, the pattern ONNX Runtime fuses
    into one SimplifiedLayerNormalization kernel (rsqrt-then-multiply is left as six ops)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return norm.weight * (x.float() / torch.sqrt(variance + norm.variance_epsilon)).to(x.dtype)


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """The KV-cache graph inputs (prefix past_key_values) or outputs (present): {prefix}.{i}.key|value."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _fuse_linears(spec) -> nn.Linear:
    """[module, name, name, ...] -> one Linear whose output is the named Linears' outputs concatenated.

    The named Linears are removed from `module` (their weights now live only in the fused one).
    """
    module, names = spec[0], spec[1:]
    parts = [getattr(module, name) for name in names]
    has_bias = parts[0].bias is not None
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=has_bias,
                      device="meta", dtype=parts[0].weight.dtype)
    fused.weight = nn.Parameter(torch.cat([p.weight.data for p in parts]), requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.data for p in parts]), requires_grad=False)
    for name in ("weight",) + (("bias",) if has_bias else ()):  # checkpoint sources, for the streamed export
        keys = [getattr(getattr(p, name), "_stream_key", None) for p in parts]
        if all(isinstance(k, str) for k in keys):
            getattr(fused, name)._stream_key = keys
    for name in names:
        delattr(module, name)
    return fused


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
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
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
    """Text decoder with a pre-allocated KV cache and deepstack injection; last-position logits.

    The cache is a buffer the runtime owns: past_key_values.{i}.key|value [B, kv_heads, C, head_dim]
    hold C slots of which the first ones are filled; attention_mask int64 [B, C + S] marks the filled
    slots (1) and the new tokens (1). The graph returns only the new entries, present.{i}.key|value
    [B, kv_heads, S, head_dim], which the runtime writes into its buffer: no step copies the cache,
    and attention never concatenates it (scores over past and new keys are computed apart).

    Other inputs: inputs_embeds [B, S, H], position_ids int64 [3, B, S] (M-RoPE),
    deepstack_embeds [K, B, S, H] (zero off image positions). Outputs: logits [B, vocab].

    kv_dtype: the cache's dtype (past and present); float16 rounds each new key/value before attention
    uses it and casts the past to float32 for the matmuls (export/kv_dtype.py).
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
        self.qkv = nn.ModuleList(_fuse_linears([layer.self_attn, "q_proj", "k_proj", "v_proj"])
                                 for layer in language_model.layers)
        self.gate_up = nn.ModuleList(_fuse_linears([layer.mlp, "gate_proj", "up_proj"])
                                     for layer in language_model.layers)

    @property
    def input_names(self):
        return ["inputs_embeds", "attention_mask", "position_ids", "deepstack_embeds"] + kv_names(
            "past_key_values", self.num_layers)

    @property
    def output_names(self):
        return ["logits"] + kv_names("present", self.num_layers)

    def _attention(self, index, attn, x, cos, sin, past_bias, new_bias, past_key, past_value):
        batch, seq, _ = x.shape
        shape = (batch, seq, -1, self.head_dim)
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv[index](x).split([attn.config.num_attention_heads * self.head_dim, kv_size, kv_size], -1)
        q = _rms_norm(attn.q_norm, q.reshape(shape)).transpose(1, 2)  # [B, heads, S, d]
        k = _rms_norm(attn.k_norm, k.reshape(shape)).transpose(1, 2)  # [B, kv, S, d]
        v = v.reshape(shape).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, present_key = round_trip(k, self.kv_dtype)  # attend with exactly what the cache will hold
        v, present_value = round_trip(v, self.kv_dtype)
        if past_key.dtype != q.dtype:  # a float16 cache: the matmuls run in float32
            past_key, past_value = past_key.to(q.dtype), past_value.to(q.dtype)
        # Grouped-query attention by broadcasting the K/V heads instead of copying them.
        groups = q.shape[1] // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, groups, seq, self.head_dim) * attn.scaling
        past_scores = torch.matmul(q, past_key[:, :, None].transpose(-1, -2)) + past_bias  # [B, kv, g, S, C]
        new_scores = torch.matmul(q, k[:, :, None].transpose(-1, -2)) + new_bias  # [B, kv, g, S, S]
        capacity = past_key.shape[2]
        probs = torch.softmax(torch.cat([past_scores, new_scores], dim=-1).float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs[..., :capacity], past_value[:, :, None]) + torch.matmul(
            probs[..., capacity:], v[:, :, None])  # [B, kv, g, S, d]
        out = out.reshape(batch, -1, seq, self.head_dim).transpose(1, 2).reshape(batch, seq, -1)
        return attn.o_proj(out), present_key, present_value

    def forward(self, inputs_embeds, attention_mask, position_ids, deepstack_embeds, *past):
        model = self.language_model
        hidden = inputs_embeds
        seq = inputs_embeds.shape[1]
        capacity = past[0].shape[2]
        cos, sin = model.rotary_emb(hidden, position_ids)  # [B, S, d]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, d], broadcast over heads
        lowest = torch.finfo(hidden.dtype).min
        mask = attention_mask.bool()
        past_bias = torch.where(mask[:, :capacity], 0.0, lowest).to(hidden.dtype)[:, None, None, None, :]
        positions = torch.arange(seq, device=hidden.device)
        causal = positions[None, :] <= positions[:, None]  # [S, S]
        new_allowed = causal[None] & mask[:, None, capacity:]  # [B, S, S]
        new_bias = torch.where(new_allowed, 0.0, lowest).to(hidden.dtype)[:, None, None]
        presents = []
        for index, layer in enumerate(model.layers):
            attn_out, key, value = self._attention(index, layer.self_attn, _rms_norm(layer.input_layernorm, hidden),
                                                   cos, sin, past_bias, new_bias, past[2 * index], past[2 * index + 1])
            hidden = hidden + attn_out
            gate, up = self.gate_up[index](_rms_norm(layer.post_attention_layernorm, hidden)).chunk(2, dim=-1)
            hidden = hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
            if index < self.num_deepstack:
                hidden = hidden + deepstack_embeds[index]
            presents += [key, value]
        hidden = _rms_norm(model.norm, hidden[:, -1:, :])  # [B, 1, H]: a MatMul (not a Gemm) for the quantizers
        logits = self.lm_head(hidden)[:, 0]  # [B, vocab]
        return (logits, *presents)
