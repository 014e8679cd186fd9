"""Graph layers every family's export shares: written once, in the forms ONNX Runtime fuses or runs well.

Torch code traced by the ONNX exporter; it belongs to no family (a family's graph file imports from here,
never from another family's). The NumPy twins of these layers, for checking, are in kernels/reference.py.
"""
from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [-x2, x1]: the rotary pair swap (transformers' rotate_half)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with cos/sin broadcast over the heads."""
    return x * cos + rotate_half(x) * sin


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm written as x / sqrt(mean(x²) + eps) * w, the pattern ONNX Runtime fuses
    into one SimplifiedLayerNormalization kernel (rsqrt-then-multiply is left as six ops)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return norm.weight * (x.float() / torch.sqrt(variance + norm.variance_epsilon)).to(x.dtype)


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """The KV-cache graph inputs (prefix past_key_values) or outputs (present): {prefix}.{i}.key|value."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def decoder_input_names(family_inputs: list[str], num_layers: int) -> list[str]:
    """A decoder graph's inputs: the family's own (embeddings, positions, ...), then the lengths the
    GroupQueryAttention ops take (export/group_query_attention.py), then `logits_index` (which positions of
    the call get logits: `last_hidden`), then the cache buffers."""
    return (family_inputs + ["seqlens_k", "total_sequence_length", "logits_index"]
            + kv_names("past_key_values", num_layers))


def last_hidden(hidden: torch.Tensor, logits_index: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H] -> [B, K, H]: the positions `logits_index` (int64 [K]) names, the only ones the lm_head
    runs on. A prompt chunk asks for its last position ([S - 1]); a jump-forward chunk for all of them
    (runtime/engine/jump_forward.py), whose logits check each forced token against what sampling would pick."""
    return torch.index_select(hidden, 1, logits_index)


def example_logits_index(seq: int) -> torch.Tensor:
    """logits_index for tracing: two positions (a size of 1 would be specialised)."""
    return torch.arange(seq - 2, seq, dtype=torch.long)


def fuse_linears(spec) -> nn.Linear:
    """[module, name, name, ...] -> one Linear whose output is the named Linears' outputs concatenated.

    The named Linears are removed from `module` (their weights now live only in the fused one), so a
    fused graph needs no second copy of them. Checkpoint keys are carried along for the streamed export.
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


def attend(q, k, v, scaling, bias=None):
    """Bidirectional attention: [B, h, Lq, d], [B, h, Lk, d] -> [B, Lq, h*d] (softmax in float32)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
