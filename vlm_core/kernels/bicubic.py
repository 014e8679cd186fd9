"""torch's uint8 antialiased bicubic resize (what transformers' video processor uses), in NumPy, bit-identical.

`resize_frames` resizes a clip's frames; `antialias_bicubic_weights` is the separable filter, computed in
torch's own operation order (aten/src/ATen/native/UpSample.h) so the uint8 results match exactly.
"""
from __future__ import annotations

import math

import numpy as np


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic (a = -0.5) in torch's operation order (HelperInterpCubic::aa_filter, UpSample.h)."""
    a = -0.5
    x = np.abs(x)
    out = np.zeros_like(x)
    near, far = x < 1.0, (x >= 1.0) & (x < 2.0)
    x1, x2 = x[near], x[far]
    out[near] = ((a + 2) * x1 - (a + 3)) * x1 * x1 + 1
    out[far] = ((a * x2 - 5 * a) * x2 + 8 * a) * x2 - 4 * a
    return out


def antialias_bicubic_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis of torch's uint8 antialiased bicubic resize -> (source indices, int16 weights, precision).

    As aten/src/ATen/native/cpu/UpSampleKernel.cpp computes them for uint8 (align_corners=False, no scale
    factor): `_compute_indices_min_size_weights_aa` (Pillow's support and centring, weights in float64
    normalised to sum 1), then `_compute_index_ranges_int16_weights` (rounded to integers at the largest
    precision that keeps the biggest weight under 2**15).

    Returns:
        indices: int64 [out_size, taps], source index of each tap (clamped; the weight is 0 past the end);
        weights: int32 [out_size, taps]; precision: fixed-point bits of the weights.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # interp_size 4 for cubic, times 0.5
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - first, 0, taps)
    tap = np.arange(taps)
    weights = _keys_cubic(((tap[None, :] + first[:, None]).astype(np.float64) - center[:, None] + 0.5) * invscale)
    weights[tap[None, :] >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for j in range(taps):  # summed in tap order, as the C loop does
        total = total + weights[:, j]
    nonzero = total != 0.0
    weights[nonzero] /= total[nonzero, None]
    wt_max = float(weights[nonzero].max()) if nonzero.any() else 0.0
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    integer = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    indices = np.minimum(first[:, None] + tap[None, :], in_size - 1)
    return indices, integer, precision


def _resample_rows(rows: np.ndarray, plan: tuple) -> np.ndarray:
    """One separable pass along axis 0 of uint8 [in, M] -> uint8 [out, M]: integer dot products over the
    taps, plus half, >> precision, clamped to 0..255 (basic_loop_aa_* <uint8_t> / the AVX kernels)."""
    indices, weights, precision = plan
    acc = np.full((len(indices), rows.shape[1]), 1 << (precision - 1), dtype=np.int32)
    product = np.empty_like(acc)
    for j in range(weights.shape[1]):
        if weights[:, j].any():  # gathering whole rows keeps the copies contiguous
            np.multiply(rows[indices[:, j]], weights[:, j, None], out=product, dtype=np.int32, casting="unsafe")
            acc += product
    np.right_shift(acc, precision, out=acc)
    return np.clip(acc, 0, 255, out=acc).astype(np.uint8)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [..., H, W] -> uint8 [..., height, width], bit-identical to torch's CPU
    `interpolate(uint8, mode="bicubic", antialias=True)` (what torchvision's `resize(BICUBIC)` runs on uint8).

    Width first, then height, each pass rounding to uint8 (UpSampleKernelAVXAntialias.h); a pass whose
    size does not change is skipped. One plane at a time, so the int32 sums stay small (and in cache).
    """
    if frames.dtype != np.uint8:
        raise TypeError(f"resize_frames takes uint8 frames, got {frames.dtype}")
    *lead, old_height, old_width = frames.shape
    if (old_height, old_width) == (height, width):
        return frames
    across = antialias_bicubic_weights(old_width, width) if width != old_width else None
    down = antialias_bicubic_weights(old_height, height) if height != old_height else None
    planes = frames.reshape(-1, old_height, old_width)
    out = np.empty((len(planes), height, width), dtype=np.uint8)
    for k, plane in enumerate(planes):
        if across is not None:  # along the width: resample the transposed plane's rows
            plane = _resample_rows(np.ascontiguousarray(plane.T), across).T
        if down is not None:
            plane = _resample_rows(np.ascontiguousarray(plane), down)
        out[k] = plane
    return out.reshape(*lead, height, width)
