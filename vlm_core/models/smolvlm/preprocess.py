"""SmolVLM image preprocessing, NumPy + Pillow only.

Equal to transformers' SmolVLMImageProcessorPil (image_processing_pil_smolvlm.py), step for step:

1. the image as the processor sees it: `kernels.image.load_image` (paths/bytes: EXIF orientation and
   `.convert("RGB")`; PIL images: alpha composited onto white; greyscale and palette images to RGB);
2. `do_resize`: the longest edge to `size["longest_edge"]` (up *or* down), the other edge
   `int(longest / aspect)` rounded up to an even number, at least 1; then, if an edge is over
   MAX_IMAGE_SIZE (4096), scaled down below it (`int(...)`, no even rounding). A size given as
   {"height", "width"} resizes to exactly that;
3. `do_image_splitting`: `resize_for_vision_encoder` (the longer edge up to a multiple of the tile
   size T = `max_image_size["longest_edge"]`, the other edge `int(longer / aspect)` up to a multiple of
   T), then, if the result is larger than one tile, T x T crops in row-major order followed by the
   whole image resized to T x T (the "global image"); rows, cols = the crop grid. An image that fits
   in one tile is that one tile, rows = cols = 0. Without splitting: resized to T x T, rows = cols = 0;
4. rescale (float64 multiply, cast to float32) and normalize (float32), per tile.

Every resize is PIL's `Image.resize` with the configured filter (LANCZOS by default, reducing_gap None) on
the uint8 RGB image, as transformers' PIL backend does: its arrays stay uint8 until the rescale, and its
`resize` turns the uint8 CHW array into a PIL image (no rescale, lossless), resizes and converts back to
uint8, so no float round trip happens anywhere. A resize to the image's own size is PIL's copy.

Output: pixel_values float32 [total_tiles, 3, T, T] (an image's tiles contiguous, images in order) and
rows_cols int64 [n_images, 2].

transformers also returns `pixel_attention_mask` (1 = real pixel, 0 = padding). Padding only ever happens
when it stacks a batch of several samples with different tile counts (the missing tiles are whole zero
tiles, which the model drops: it keeps the images whose pixels are not all zero); every real tile is full
T x T, so for the tiles we produce the mask is all ones and the model's patch attention mask derived from it
is all true. The runtime therefore neither needs nor builds it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vlm_core.kernels.image import (
    ImageError,
    describe_source,
    load_image,
    normalize,
    rescale,
    to_chw,
)
from vlm_core.models.config import check_field_types

MAX_IMAGE_SIZE = 4096  # transformers' absolute limit on an edge after the longest-edge resize
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


@dataclass
class SmolVLMImageParams:
    """The image processor's settings (SmolVLMImageProcessorPil's defaults)."""

    size: dict = field(default_factory=lambda: {"longest_edge": 4 * 364})
    tile: int = 364  # max_image_size["longest_edge"]: the vision encoder's input size
    resample: int = 1  # PIL LANCZOS
    do_resize: bool = True
    do_image_splitting: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list = field(default_factory=lambda: list(IMAGENET_STANDARD_MEAN))
    image_std: list = field(default_factory=lambda: list(IMAGENET_STANDARD_STD))

    @classmethod
    def from_dict(cls, d: dict) -> "SmolVLMImageParams":
        """From a SmolVLM preprocessor_config.json or `to_dict()`'s output; unknown keys are ignored."""
        kwargs = {k: d[k] for k in ("do_resize", "do_image_splitting", "do_rescale", "rescale_factor",
                                    "do_normalize") if d.get(k) is not None}
        for k in ("image_mean", "image_std"):
            if d.get(k) is not None:
                kwargs[k] = [float(v) for v in d[k]] if np.ndim(d[k]) else [float(d[k])] * 3
        if d.get("resample") is not None:
            kwargs["resample"] = int(d["resample"])
        size = d.get("size")
        if size is not None:
            if isinstance(size, dict) and size.get("longest_edge"):
                kwargs["size"] = {"longest_edge": int(size["longest_edge"])}
            elif isinstance(size, dict) and size.get("height") and size.get("width"):
                kwargs["size"] = {"height": int(size["height"]), "width": int(size["width"])}
            else:
                raise ValueError(f"SmolVLM size must have 'longest_edge' or 'height' and 'width', got {size}")
        tile = d.get("max_image_size")
        if tile is not None:
            if isinstance(tile, dict):
                if not tile.get("longest_edge"):
                    raise ValueError(f"SmolVLM max_image_size must have 'longest_edge', got {tile}")
                tile = tile["longest_edge"]
            kwargs["tile"] = int(tile)
        elif d.get("tile") is not None:
            kwargs["tile"] = int(d["tile"])
        check_field_types(cls, kwargs, "preprocessing", {"resample": 0})
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """preprocessor_config.json-style keys (what `from_dict` reads back)."""
        return {"size": dict(self.size), "max_image_size": {"longest_edge": self.tile}, "resample": self.resample,
                "do_resize": self.do_resize, "do_image_splitting": self.do_image_splitting,
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std)}


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """transformers' _resize_output_size_rescale_to_max_len (min_len 1)."""
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        if height % 2 != 0:
            height += 1
    else:
        height = max_len
        width = int(height * aspect_ratio)
        if width % 2 != 0:
            width += 1
    return max(height, 1), max(width, 1)


def _scale_below_upper_bound(height: int, width: int, max_len: int = MAX_IMAGE_SIZE) -> tuple[int, int]:
    """transformers' _resize_output_size_scale_below_upper_bound."""
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def resized_size(height: int, width: int, params: SmolVLMImageParams) -> tuple[int, int]:
    """(height, width) after step 2 (the `do_resize` step)."""
    if not params.do_resize:
        return height, width
    if params.size.get("longest_edge"):
        height, width = _rescale_to_max_len(height, width, int(params.size["longest_edge"]))
        return _scale_below_upper_bound(height, width)
    return int(params.size["height"]), int(params.size["width"])


def vision_encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder target: both edges multiples of `tile`."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect_ratio)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect_ratio)
        width = math.ceil(width / tile) * tile
    return height, width


def tile_count(rows: int, cols: int) -> int:
    return rows * cols + 1 if rows or cols else 1


def _resize(image: Image.Image, height: int, width: int, resample: int, name: str) -> Image.Image:
    if height < 1 or width < 1:  # transformers fails inside PIL here; say why
        raise ImageError(f"{name}: {image.width}x{image.height} image would be resized to {width}x{height} "
                         "pixels (aspect ratio too extreme for SmolVLM's tiling)")
    return image.resize((width, height), resample=resample)


def image_tiles(image: Image.Image, params: SmolVLMImageParams, name: str = "image") -> tuple[list, int, int]:
    """One RGB image -> (list of uint8 [3, T, T] tiles in transformers' order, rows, cols)."""
    tile = params.tile
    if params.do_resize:
        image = _resize(image, *resized_size(image.height, image.width, params), params.resample, name)
    if not params.do_image_splitting:
        return [to_chw(_resize(image, tile, tile, params.resample, name))], 0, 0
    image = _resize(image, *vision_encoder_size(image.height, image.width, tile), params.resample, name)
    if image.height <= tile and image.width <= tile:
        return [to_chw(image)], 0, 0
    array = to_chw(image)
    rows = (image.height - tile) // tile + 1
    cols = (image.width - tile) // tile + 1
    tiles = [array[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    tiles.append(to_chw(_resize(image, tile, tile, params.resample, name)))
    return tiles, rows, cols


def preprocess_images(images, params: SmolVLMImageParams) -> tuple[np.ndarray, np.ndarray]:
    """Images (paths, bytes, data: URLs or PIL images) -> (pixel_values float32 [total_tiles, 3, T, T],
    rows_cols int64 [n_images, 2])."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    out, grid = [], []
    for src in images:
        tiles, rows, cols = image_tiles(load_image(src), params, describe_source(src))
        grid.append((rows, cols))
        for array in tiles:
            pixels = rescale(array, params.rescale_factor) if params.do_rescale else array.astype(np.float32)
            if params.do_normalize:
                pixels = normalize(pixels, params.image_mean, params.image_std)
            out.append(pixels.astype(np.float32, copy=False))
    pixel_values = np.stack(out) if out else np.zeros((0, 3, params.tile, params.tile), np.float32)
    return pixel_values, np.asarray(grid, dtype=np.int64).reshape(-1, 2)
