"""Qwen3-VL prompt construction: image placeholder expansion and tokenization.

Mirrors what ``Qwen3VLProcessor.__call__`` (transformers 5.x) does to the text after the chat
template has rendered it:

1. ``ProcessorMixin.validate_inputs``: the number of ``<|image_pad|>`` in the text must equal the
   number of images (``ValueError`` otherwise);
2. ``ProcessorMixin.get_text_with_replacements`` + ``Qwen3VLProcessor.replace_image_token``: the
   i-th ``<|image_pad|>`` (in text order) becomes ``image_grid_thw[i].prod() // merge_size**2``
   copies of ``<|image_pad|>``. Nothing else in the text changes for images: the surrounding
   ``<|vision_start|>`` / ``<|vision_end|>`` come from the chat template, and no timestamps or
   extra markers are added (Qwen3-VL only adds ``<t seconds>`` text and per-frame
   vision_start/end around *video* placeholders, which are not handled here);
3. ``tokenizer(text)`` with the default ``add_special_tokens=True`` -- the processor only turns it
   off when a BOS token is defined and the prompt starts with it. Qwen has no BOS token and its
   ``tokenizer.json`` post-processor is plain ``ByteLevel`` (adds nothing), so the ids are those of
   ``Tokenizer.encode(text)``.

Serve-time module: numpy + tokenizers only.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

__all__ = ["IMAGE_PAD", "VIDEO_PAD", "expand_image_pads", "expand_media_pads", "num_image_tokens", "tokenize_prompt"]

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


def _grid_array(image_grid_thw: Any) -> np.ndarray:
    grid = np.asarray(image_grid_thw)
    if grid.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must have shape (num_images, 3), got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        if not np.all(np.equal(np.mod(grid, 1), 0)):
            raise ValueError(f"image_grid_thw must hold integers, got {grid.tolist()}")
        grid = grid.astype(np.int64)
    if np.any(grid <= 0):
        raise ValueError(f"image_grid_thw entries must be positive, got {grid.tolist()}")
    return grid.astype(np.int64, copy=False)


def num_image_tokens(image_grid_thw: Any, merge_size: int) -> list[int]:
    """LLM tokens per image: ``t * h * w // merge_size**2`` for each (t, h, w) row."""
    if not isinstance(merge_size, (int, np.integer)) or merge_size <= 0:
        raise ValueError(f"merge_size must be a positive integer, got {merge_size!r}")
    grid = _grid_array(image_grid_thw)
    return [int(n) for n in grid.prod(axis=1) // (int(merge_size) ** 2)]


def expand_image_pads(text: str, image_grid_thw: Any, merge_size: int, image_pad: str = IMAGE_PAD) -> str:
    """Replace the i-th `image_pad` in `text` with ``prod(image_grid_thw[i]) // merge_size**2``
    copies of it, exactly as ``Qwen3VLProcessor`` does.

    Raises ``ValueError`` when the number of `image_pad` occurrences in `text` differs from the
    number of rows of `image_grid_thw` (the processor's "number of <|image_pad|> tokens ... should be
    the same as the number of images" check), or when the grid is malformed.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not image_pad:
        raise ValueError("image_pad must be a non-empty string")
    counts = num_image_tokens(image_grid_thw, merge_size)
    pieces = text.split(image_pad)  # non-overlapping, left to right: same as the processor's regex
    n_pads = len(pieces) - 1
    if n_pads != len(counts):
        raise ValueError(
            f"The prompt has {n_pads} {image_pad} placeholder(s) but {len(counts)} image(s) were given; "
            "each image needs exactly one placeholder (the chat template emits one per image part)"
        )
    if not counts:
        return text
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        out.append(image_pad * count)
        out.append(piece)
    return "".join(out)


def video_placeholder(grid_thw: Any, timestamps: list, merge_size: int) -> str:
    """What ``Qwen3VLProcessor.replace_video_token`` writes for one clip: per frame group (t of them)
    ``<{seconds:.1f} seconds>`` + vision_start + h*w/merge_size**2 video pads + vision_end."""
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(3))
    if len(timestamps) != t:
        raise ValueError(f"a clip of {t} frame groups needs {t} timestamps, got {len(timestamps)}")
    frame = VISION_START + VIDEO_PAD * (h * w // merge_size ** 2) + VISION_END
    return "".join(f"<{seconds:.1f} seconds>" + frame for seconds in timestamps)


def expand_media_pads(text: str, media: Any, merge_size: int) -> str:
    """Expand every ``<|image_pad|>`` and ``<|video_pad|>`` of the rendered prompt, left to right, as the
    processor does: the i-th image pad takes the i-th image's token run (`expand_image_pads`), the j-th
    video pad the j-th clip's timestamped frame groups (`video_placeholder`). `media` is a
    models.media.MediaInputs (items in prompt order). Raises ValueError when the pads and items disagree."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    images = [i for i, kind in enumerate(media.kinds) if kind == "image"]
    videos = [i for i, kind in enumerate(media.kinds) if kind == "video"]
    if videos:
        # The chat template wraps each video pad in vision_start/vision_end, and every frame group brings its own
        # pair: the processor collapses the template's outer pair (transformers >= 5.x,
        # Qwen3VLProcessor.get_text_with_replacements), so the prompt has no extra start/end around all frames.
        text = text.replace(VISION_START + VIDEO_PAD + VISION_END, VIDEO_PAD)
    pieces = re.split(f"({re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)})", text)
    n_image_pads, n_video_pads = pieces[1::2].count(IMAGE_PAD), pieces[1::2].count(VIDEO_PAD)
    if (n_image_pads, n_video_pads) != (len(images), len(videos)):
        raise ValueError(f"The prompt has {n_image_pads} {IMAGE_PAD} and {n_video_pads} {VIDEO_PAD} placeholder(s) "
                         f"but {len(images)} image(s) and {len(videos)} video(s) were given; each needs exactly one "
                         "placeholder (the chat template emits one per image or video part)")
    grid = np.asarray(media.grid_thw)
    next_image, next_video = iter(images), iter(videos)
    out = [pieces[0]]
    for pad, piece in zip(pieces[1::2], pieces[2::2]):
        if pad == IMAGE_PAD:
            out.append(IMAGE_PAD * num_image_tokens(grid[next(next_image)][None], merge_size)[0])
        else:
            index = next(next_video)
            out.append(video_placeholder(grid[index], media.timestamps[index], merge_size))
        out.append(piece)
    return "".join(out)


def tokenize_prompt(tokenizer: Any, text: str, add_special_tokens: bool = True) -> np.ndarray:
    """Token ids (1-D int64) of the expanded prompt, as the processor's ``tokenizer(text)`` gives.

    `tokenizer` is a ``tokenizers.Tokenizer`` (loaded from the model's ``tokenizer.json``).
    ``add_special_tokens=True`` is what the processor uses; it is a no-op for Qwen (no BOS, and the
    ByteLevel post-processor adds nothing). Special tokens in `text` (``<|im_start|>``,
    ``<|image_pad|>``, ...) are matched as single tokens.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    encoding = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return np.asarray(encoding.ids, dtype=np.int64)
