"""Which decoder calls one decode step makes: exact tokens for the requests that ask, the fastest kernels for
the rest.

Attention never couples rows (GroupQueryAttention reads only a row's own filled slots: decoder_call.py), but
ONNX Runtime's quantized MatMuls can:
- 4-bit MatMulNBits (int4, and mixed's decoder) computes one row (M = 1) with another kernel than several, so a
  lone row whose request asked for invariance is run with a padding row (its output dropped): alone or batched,
  it is then always computed by the M > 1 kernel;
- dynamic int8 MatMulInteger quantizes its input with one scale for the whole tensor, which couples the rows
  of a call: a row that asked runs in a call of its own, and every other row runs together in one call.
Float weights batch freely. A request that did not ask (the default, as in vLLM and SGLang) takes whatever is
fastest: one row by the one-row kernel, int8 rows together, at the price of float-level differences between
its answer alone and batched.

The engine keeps its batch rows in the order plan_decode reads: rows whose request did not ask first, then the
ones that did (step_loop.py's `_join` / `_leave`), so each call is a contiguous slice of the KV buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

# quantization methods (manifest "quantization.method") whose decoder runs 4-bit MatMulNBits
NBITS_METHODS = ("int4", "mixed")


@dataclass(frozen=True)
class DecoderCall:
    """One decoder call of a decode step: batch rows [start, stop), run as `width` rows (more than stop - start:
    padding rows, in unused rows of the buffers after `stop`, whose outputs are dropped)."""

    start: int
    stop: int
    width: int


def plan_decode(method: str, invariant: list) -> list:
    """The decoder calls for one decode step -> [DecoderCall] in row order.

    Args:
        method: the decoder's quantization ("none", "int8", "int4", "mixed").
        invariant: per batch row, whether its request asked for batch invariance; rows that did not ask come
            first.
    """
    rows = len(invariant)
    free = sum(not flag for flag in invariant)
    if any(invariant[:free]):
        raise ValueError(f"rows that asked for batch invariance must come last, got {invariant}")
    if method == "int8":  # one quantization scale per call: each row that asked in a call of its own
        together = [DecoderCall(0, free, free)] if free else []
        return together + [DecoderCall(r, r + 1, 1) for r in range(free, rows)]
    padded = method in NBITS_METHODS and rows == 1 and invariant[0]  # never the one-row kernel for it
    return [DecoderCall(0, rows, 2 if padded else rows)]
