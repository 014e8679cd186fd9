"""Qwen3-VL's grid-dependent index work, in NumPy.

Everything here depends on `image_grid_thw` and so is data-dependent: computing it in NumPy and
feeding it to the vision graph as inputs is what keeps the graph free of baked-in image sizes
(see EXPORT-NOTES.md). Each function mirrors one transformers helper and names it.
"""
from __future__ import annotations

import numpy as np


def _patch_rows_cols(grid_thw: np.ndarray, merge_size: int):
    """Row and column of every patch, in spatial-merge-block order, with its image's (h, w).

    Returns (row, col, height, width), each int64 [n_patches].
    """
    rows, cols, heights, widths = [], [], [], []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist():
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge_size, merge_size, w // merge_size, merge_size)
        r = r.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        c = c.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        rows.append(np.tile(r, t))
        cols.append(np.tile(c, t))
        heights.append(np.full(t * h * w, h, dtype=np.int64))
        widths.append(np.full(t * h * w, w, dtype=np.int64))
    return (np.concatenate(rows), np.concatenate(cols), np.concatenate(heights), np.concatenate(widths))


def vision_position_ids(grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
    """(h, w) coordinates of each patch for the ViT's 2-D rotary embedding.

    Mirrors transformers.vision_utils.get_vision_position_ids. Returns int64 [n_patches, 2].
    """
    row, col, _, _ = _patch_rows_cols(grid_thw, merge_size)
    return np.stack([row, col], axis=-1)


def _bilinear_taps(index: np.ndarray, size: np.ndarray, side: int):
    """Two taps and weights per target position, align_corners=True. -> int64 [n, 2], float32 [n, 2]."""
    index = index.astype(np.float32)
    src = index * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    weights = np.maximum(np.float32(1) - distance, 0).astype(np.float32)
    return taps, weights


def position_embedding_taps(grid_thw: np.ndarray, num_position_embeddings: int, merge_size: int):
    """Indices into the learned square position table and bilinear weights, per patch.

    Mirrors transformers.vision_utils.get_vision_interpolation_indices_and_weights with
    mode="bilinear", align_corners=True (what Qwen3-VL's ViT uses).
    Returns (indices int64 [n_patches, 4], weights float32 [n_patches, 4]).
    """
    side = int(num_position_embeddings ** 0.5)
    row, col, height, width = _patch_rows_cols(grid_thw, merge_size)
    h_taps, h_weights = _bilinear_taps(row, height, side)
    w_taps, w_weights = _bilinear_taps(col, width, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices, weights.astype(np.float32)


def attention_segment_ids(grid_thw: np.ndarray) -> np.ndarray:
    """Which attention block each patch belongs to: one block per image frame.

    Equivalent to transformers' cu_seqlens (each frame attends only to itself). Returns int64 [n_patches].
    """
    segments, next_id = [], 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist():
        segments.append(np.repeat(np.arange(next_id, next_id + t), h * w))
        next_id += t
    return np.concatenate(segments) if segments else np.zeros(0, dtype=np.int64)


def vision_inputs(grid_thw: np.ndarray, num_position_embeddings: int, merge_size: int) -> dict:
    """All grid-dependent inputs of the vision graph, by graph input name."""
    indices, weights = position_embedding_taps(grid_thw, num_position_embeddings, merge_size)
    return {
        "pos_embed_indices": indices,
        "pos_embed_weights": weights,
        "vision_position_ids": vision_position_ids(grid_thw, merge_size),
        "segment_ids": attention_segment_ids(grid_thw),
    }


def get_rope_index(input_ids: np.ndarray, image_grid_thw: np.ndarray | None, image_token_id: int,
                   merge_size: int, video_grid_thw: np.ndarray | None = None,
                   video_token_id: int | None = None) -> tuple[np.ndarray, int]:
    """3-D M-RoPE position ids for one prompt, and the delta decode steps add to their position.

    Mirrors Qwen3VLModel.get_rope_index: text runs count up on all three axes; an image run takes
    (t, h, w) grid coordinates offset by the running position; the next text starts at
    max(h, w) / merge + the run's start. A clip's grid (t, h, w) is split into t frame groups of
    (1, h, w), each its own run (timestamps and vision_start/end separate them in the prompt); image
    runs take the image grids in order, video runs the frame groups in order.
    input_ids: int [S]. Returns (position_ids int64 [3, S], rope_delta int).
    """
    input_ids = np.asarray(input_ids).reshape(-1)
    kind = np.zeros(len(input_ids), dtype=np.int8)  # 0 text, 1 image, 2 video (transformers' mm_token_type_ids)
    kind[input_ids == image_token_id] = 1
    frame_groups = []
    if video_grid_thw is not None:
        if video_token_id is None:
            raise ValueError("video_grid_thw needs video_token_id")
        kind[input_ids == video_token_id] = 2
        for t, h, w in np.asarray(video_grid_thw, dtype=np.int64).tolist():
            frame_groups += [(1, h, w)] * t
    grids = {1: iter(np.asarray(image_grid_thw, dtype=np.int64).tolist() if image_grid_thw is not None else []),
             2: iter(frame_groups)}
    pieces, current, start = [], 0, 0
    length = len(input_ids)
    while start < length:
        end = start + 1
        while end < length and kind[end] == kind[start]:
            end += 1
        if not kind[start]:
            pieces.append(np.arange(end - start)[None, :].repeat(3, axis=0) + current)
            current += end - start
        else:
            what = "image" if kind[start] == 1 else "video frame-group"
            try:
                t, h, w = next(grids[int(kind[start])])
            except StopIteration:
                raise ValueError(f"the prompt has more {what} token runs than were given") from None
            gh, gw = h // merge_size, w // merge_size
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            block = np.stack([tt, hh + current, ww + current]).reshape(3, -1)
            block[0] += current
            if block.shape[1] != end - start:
                raise ValueError(f"{what} run of {end - start} tokens does not match its grid {t}x{h}x{w}")
            pieces.append(block)
            current += max(h, w) // merge_size
        start = end
    position_ids = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
    delta = int(position_ids.max()) + 1 - length if length else 0
    return position_ids.astype(np.int64), delta
