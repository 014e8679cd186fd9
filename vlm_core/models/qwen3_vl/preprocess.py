"""Qwen3-VL image preprocessing: images -> (pixel_values, image_grid_thw), NumPy + Pillow only.

Reference: transformers 5.24, where `AutoProcessor` for Qwen3-VL builds the Qwen2-VL image
processor. Its config says `"image_processor_type": "Qwen2VLImageProcessorFast"`, which resolves
to the torchvision backend (`Qwen2VLImageProcessor`) when torchvision is installed and to the PIL
backend (`Qwen2VLImageProcessorPil`) when it is not. This module reproduces the PIL backend
bit for bit; per image:

1. load: `kernels.image.load_image` (EXIF orientation + RGB for paths; alpha onto white for PIL).
2. resize to `smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels)` with PIL's
   filter (BICUBIC) on the uint8 image.
3. rescale: float64 x * rescale_factor -> float32; normalize: (x - mean) / std in float32.
4. patchify: the frame is repeated `temporal_patch_size` times and cut into P x P patches listed
   in spatial-merge-block order: rows of [merge_size x merge_size] blocks, row-major inside a block;
   each patch flattened as (C, T, P, P).

The torchvision backend (what most transformers users get, since they have torchvision) is not
bit-identical to this; measured with torchvision 0.29.1 on the scikit-image photos used in the
tests: it decodes paths with torchvision.io (alpha dropped like here, but a palette transparency
key is ignored instead of painted white), resizes with torch's antialiased uint8 bicubic (10-16%
of values differ from PIL's, mostly by 1/255, up to 11/255 at sharp edges), and fuses
rescale+normalize as (x - 255 mean) / (255 std) (about 1 ulp apart when no resize happens).
Without torchvision, as in this project's environment, transformers uses the PIL backend, which
is what this module reproduces exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from vlm_core.errors import ParameterError
from vlm_core.kernels.image import (
    ImageError,
    ImageSource,
    describe_source,
    load_image,
    normalize,
    open_image,
    rescale,
    resize,
    smart_resize,
    to_chw,
)
from vlm_core.models.config import check_field_types

# Defaults are transformers' Qwen2VLImageProcessor class defaults (what an empty config gives);
# Qwen3-VL checkpoints override them with patch_size 16, mean/std 0.5, size 65536..16777216.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def channel_list(value) -> list[float]:
    """A config's image_mean / image_std: one number per channel (a single number is used for all three)."""
    return [float(v) for v in value] if np.ndim(value) else [float(value)] * 3


@dataclass
class PixelSteps:
    """Which of the processor's steps run (the same switches in the image and the video processor)."""

    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True


@dataclass
class ImageProcessorParams(PixelSteps):
    """The image fields of a Qwen2/3-VL `preprocessor_config.json`."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, d: Mapping) -> ImageProcessorParams:
        """Build from a preprocessor_config.json dict; unknown keys are ignored.

        Pixel bounds come from `size: {shortest_edge, longest_edge}` (legacy `size: {min_pixels,
        max_pixels}` is read too); top-level `min_pixels` / `max_pixels` win, as in transformers.
        """
        names = {f.name for f in fields(cls)} - {"min_pixels", "max_pixels"}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
        if "resample" in kwargs:
            kwargs["resample"] = int(kwargs["resample"])
        size = d.get("size") or {}
        min_pixels = d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        max_pixels = d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        if min_pixels is not None:
            kwargs["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kwargs["max_pixels"] = int(max_pixels)
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                kwargs[key] = channel_list(kwargs[key])
        check_field_types(cls, kwargs, "preprocessing", {"resample": 0})
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """preprocessor_config.json form (pixel bounds under `size`)."""
        d = asdict(self)
        d["size"] = {"shortest_edge": d.pop("min_pixels"), "longest_edge": d.pop("max_pixels")}
        return d


def check_pixel_budget(params: ImageProcessorParams, min_pixels, max_pixels, max_tokens: int,
                       names: dict | None = None) -> None:
    """Refuse per-image pixel bounds (overrides of `params`' min_pixels / max_pixels; None keeps the model's) that
    cannot work, before any image is resized: not a positive integer, a maximum below one image token's
    pixels ((patch_size x merge_size)², where smart_resize would still give one token), a bound above
    `max_tokens` image tokens' worth (the context: --min-pixels 10^12 grew an image to 22 GB), or a minimum
    above the maximum in force. ParameterError naming the bound as `names` spells it (the CLI's flags)."""
    names = {"min_pixels": "min_pixels", "max_pixels": "max_pixels", **(names or {})}
    factor = params.patch_size * params.merge_size
    limit = max_tokens * factor * factor
    for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is None:
            continue
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
            raise ParameterError(f"{names[key]} must be a positive integer, got {value!r:.40}", names[key])
        if value > limit:
            raise ParameterError(f"{names[key]} must be at most {limit} ({max_tokens} image tokens, this model's "
                                 f"context, of {factor}x{factor} pixels each), got {value}", names[key])
    if max_pixels is not None and max_pixels < factor * factor:
        raise ParameterError(f"{names['max_pixels']} must be at least {factor * factor}, the pixels of one image "
                             f"token ({factor}x{factor}), got {max_pixels}", names["max_pixels"])
    if min_pixels is not None and min_pixels > (params.max_pixels if max_pixels is None else max_pixels):
        most = (f"this model's max_pixels ({params.max_pixels}); lower it or raise {names['max_pixels']}"
                if max_pixels is None else f"{names['max_pixels']} ({max_pixels})")
        raise ParameterError(f"{names['min_pixels']} ({min_pixels}) is larger than {most}", names["min_pixels"])


def image_tokens_under(params: ImageProcessorParams, sizes, min_pixels: int | None, max_pixels: int) -> int:
    """Prompt tokens that images of `sizes` ((height, width) each) take together when resized under
    `max_pixels` (smart_resize, as preprocess_images does; an image whose size cannot be resized counts 0)."""
    factor = params.patch_size * params.merge_size
    low = params.min_pixels if min_pixels is None else min_pixels
    total = 0
    for height, width in sizes:
        try:
            resized_h, resized_w = smart_resize(height, width, factor, low, max_pixels)
        except ImageError:  # an aspect ratio past 200: preprocess_images refuses it, naming the image
            continue
        total += (resized_h // factor) * (resized_w // factor)
    return total


def fit_pixel_budget(params: ImageProcessorParams, sizes, token_limit: int, min_pixels: int | None = None):
    """The largest max_pixels under which images of `sizes` take at most `token_limit` prompt tokens together,
    or None when the checkpoint's own max_pixels already fits them, or when none does (the context check then says
    what does not fit: scaling the images to nothing would not help). Searched over whole image tokens
    ((patch_size x merge_size)² pixels each, smart_resize's unit) from one token (or `min_pixels`, below which
    smart_resize would grow the images again) up to the checkpoint's max_pixels."""
    if image_tokens_under(params, sizes, min_pixels, params.max_pixels) <= token_limit:
        return None
    unit = (params.patch_size * params.merge_size) ** 2
    low = max(1, -(-(min_pixels or 0) // unit))  # in tokens' worth of pixels
    high = max(low, params.max_pixels // unit)
    if image_tokens_under(params, sizes, min_pixels, low * unit) > token_limit:
        return None
    while low < high:  # the fewer pixels allowed, the fewer tokens: the largest allowance that fits
        middle = (low + high + 1) // 2
        if image_tokens_under(params, sizes, min_pixels, middle * unit) <= token_limit:
            low = middle
        else:
            high = middle - 1
    return low * unit


def preprocess_images(
    images: ImageSource | Iterable[ImageSource],
    params: ImageProcessorParams,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images -> model inputs, equal to transformers' Qwen2-VL image processor (PIL backend).

    Args:
        images: one image or a list; each a path, encoded bytes or a PIL image.
        params: the checkpoint's preprocessing parameters.
        min_pixels, max_pixels: overrides of the pixel bounds (the CLI's --min-pixels/--max-pixels).
    Returns:
        pixel_values: float32 [n_patches, C * T * P * P], the images' patches one after the other.
        image_grid_thw: int64 [n_images, 3], rows (1, H / P, W / P).
    Raises:
        ImageError: an image cannot be loaded, or its aspect ratio exceeds 200.
    """
    if isinstance(images, (str, bytes, bytearray)) or not isinstance(images, Iterable):
        images = [images]
    images = list(images)
    if not images:
        raise ImageError("no images given")
    min_pixels = params.min_pixels if min_pixels is None else min_pixels
    max_pixels = params.max_pixels if max_pixels is None else max_pixels
    all_patches, grids = [], []
    for src in images:
        pixels = _map_values(_load_and_resize(src, params, min_pixels, max_pixels), params)  # float32 [C, H, W]
        patches, grid_h, grid_w = patchify(pixels, params.patch_size, params.merge_size, params.temporal_patch_size)
        all_patches.append(patches)  # [grid_h * grid_w, C * T * P * P]
        grids.append([1, grid_h, grid_w])
    pixel_values = all_patches[0] if len(all_patches) == 1 else np.concatenate(all_patches, axis=0)
    return pixel_values, np.array(grids, dtype=np.int64)


def _load_and_resize(src: ImageSource, params: ImageProcessorParams, min_pixels: int, max_pixels: int) -> np.ndarray:
    """Load one image and resize it to its smart_resize size -> uint8 [C, H, W]."""
    name = describe_source(src)
    image = load_image(src) if params.do_convert_rgb else open_image(src)
    if image.mode != "RGB":
        raise ImageError(f"{name}: mode {image.mode} is not RGB and do_convert_rgb is off")
    if not params.do_resize:
        return to_chw(image)
    factor = params.patch_size * params.merge_size
    try:
        height, width = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None
    return resize(image, height, width, params.resample)


def rescale_and_normalize(pixels: np.ndarray, params: ImageProcessorParams) -> np.ndarray:
    """Rescale and normalize as the params say, same float ops as transformers. [C, ...] -> float32."""
    if params.do_rescale:
        pixels = rescale(pixels, params.rescale_factor)
    if params.do_normalize:
        pixels = normalize(pixels, params.image_mean, params.image_std)
    return np.asarray(pixels, dtype=np.float32)


def _map_values(pixels: np.ndarray, params: ImageProcessorParams) -> np.ndarray:
    """uint8 [C, H, W] -> float32 [C, H, W] through a 256-entry table per channel.

    rescale/normalize act on each value alone, so tabulating `rescale_and_normalize` over the 256
    uint8 values gives bit-identical results while doing the float work 256 times, not per pixel.
    """
    channels = len(pixels)
    values = np.tile(np.arange(256, dtype=np.uint8), (channels, 1, 1))  # [C, 1, 256]
    table = rescale_and_normalize(values, params)[:, 0]  # [C, 256]
    out = np.empty(pixels.shape, dtype=np.float32)
    for c in range(channels):
        np.take(table[c], pixels[c], out=out[c])
    return out


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int):
    """One frame -> (patches [grid_h * grid_w, C * T * P * P], grid_h, grid_w).

    The frame is repeated T times (a still image is a clip of T identical frames); patches come
    in spatial-merge-block order so that each run of merge_size**2 rows is one merged token.
    """
    channels, height, width = image.shape
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ImageError(f"image size {width}x{height} is not a multiple of patch_size * merge_size; enable do_resize")
    grid_h, grid_w = height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    patches = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
    patches = np.broadcast_to(
        patches[:, :, :, :, :, None], (*patches.shape[:5], temporal_patch_size, p, p)
    )  # [gh/m, gw/m, m, m, C, T, P, P]
    return patches.reshape(grid_h * grid_w, channels * temporal_patch_size * p * p), grid_h, grid_w


def num_image_tokens(grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
    """LLM placeholder tokens per image: t * h * w / merge_size**2. [..., 3] -> int64 [...]."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64)
    return grid_thw.prod(axis=-1) // (merge_size**2)
