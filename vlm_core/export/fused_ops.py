"""ONNX Runtime's fused decoder ops other than attention, each emitted as one node under `torch.onnx.export`
and computed by its torch twin when run eagerly.

A decode step is a few large 4-bit MatMuls and many tiny ops; with one token per row the tiny ops cost
mostly their launch (a profile of the format_version 1 graph put 16% of kernel time in small ops and 11%
of the step between kernels). Two patterns make up most of them:
- rotary (q and k each: split, negate, concat, two multiplies, an add) -> `RotaryEmbedding`. The op
  gathers cos/sin rows by position id from a table; we hand it this call's own table (one row per
  token, computed once per call from whatever positions the family uses: Qwen3-VL's 3-D M-RoPE too)
  and the positions 0..B*S-1, so it works for any rotary layout whose cos/sin repeat over the two
  halves (`cat(freqs, freqs)`, transformers' convention);
- the residual add before an RMSNorm -> `SkipSimplifiedLayerNormalization`, which returns the norm and
  the sum.
"""
from __future__ import annotations

import torch

from vlm_core.export.graph_layers import apply_rotary, rms_norm


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor):
    """cos/sin [B, S, d] (transformers' rotary output) -> what `rotary` takes: (cos, sin) for the eager
    twin, ([B*S, d/2] halves, positions [B, S]) for the op."""
    batch, seq, dim = cos.shape
    positions = torch.arange(batch * seq, dtype=torch.long, device=cos.device).view(batch, seq)
    return {"cos": cos, "sin": sin, "positions": positions,
            "cos_half": cos[..., : dim // 2].reshape(batch * seq, dim // 2),
            "sin_half": sin[..., : dim // 2].reshape(batch * seq, dim // 2)}


def rotary(x: torch.Tensor, tables: dict, num_heads: int) -> torch.Tensor:
    """Rotary on x [B, S, heads*d] (rotate-half convention) with `rotary_tables`' tables; same shape out."""
    batch, seq, width = x.shape
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            "com.microsoft::RotaryEmbedding", [x, tables["positions"], tables["cos_half"], tables["sin_half"]],
            {"num_heads": num_heads, "interleaved": 0}, dtype=x.dtype, shape=x.shape, version=1)
    heads = x.view(batch, seq, num_heads, width // num_heads)
    return apply_rotary(heads, tables["cos"][:, :, None], tables["sin"][:, :, None]).reshape(batch, seq, width)


def skip_rms_norm(norm, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + skip), x + skip) with transformers' RMSNorm module `norm` (weight, variance_epsilon)."""
    if torch.onnx.is_in_onnx_export():
        stats = (*x.shape[:-1], 1)
        normed, _, _, total = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::SkipSimplifiedLayerNormalization", [x, skip, norm.weight],
            {"epsilon": float(norm.variance_epsilon)}, dtypes=[x.dtype, torch.float32, torch.float32, x.dtype],
            shapes=[x.shape, stats, stats, x.shape], version=1)
        return normed, total
    total = x + skip
    return rms_norm(norm, total), total
