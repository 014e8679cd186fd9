"""Image loading and pixel kernels, pure NumPy + Pillow (no torch).

Everything here reproduces, call for call, what transformers' PIL image backend does
(`transformers.image_utils.load_image`, `image_transforms.convert_to_rgb`, `resize`, `rescale`,
`normalize`), so that a port built on it gives bit-identical `pixel_values`.

Two ways an image reaches transformers' processor, and they differ; `load_image` follows both:

* a path (what `apply_chat_template` and CLI users pass): `load_image` opens it, applies the EXIF
  orientation (`ImageOps.exif_transpose`) and calls `.convert("RGB")`. That conversion *drops* an
  alpha channel without compositing (transparent pixels keep whatever colour they store); only a
  palette/RGB/L image with a `transparency` colour key keeps that key in `info`, and the later
  `convert_to_rgb` step then paints those pixels white.
* a PIL image object: used as given, no EXIF orientation; `convert_to_rgb` composites any alpha
  (RGBA, LA, PA, P with transparency) onto white.

We treat `bytes` like a path (transformers itself does not take raw bytes).
"""

from __future__ import annotations

import io
import math
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from vlm_core.errors import ParameterError

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, Image.Image]


class ImageError(ParameterError):
    """An image could not be read or is unusable; the message names the image and the problem."""

    code = "invalid_image"


def describe_source(src: ImageSource) -> str:
    """A short name for an image source, for error messages (a long string, e.g. a data: URL, is cut)."""
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        return name if len(name) <= 80 else f"{name[:56]}... ({len(name)} characters)"
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.width}x{src.height}>"
    return f"<{type(src).__name__}>"


def _decode(fp, name: str) -> Image.Image:
    """Open, fully decode, EXIF-rotate and convert to RGB, as transformers' `load_image` does."""
    try:
        image = Image.open(fp)
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (unknown or unsupported format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None
    return _finish_decode(image, name)


def _finish_decode(image: Image.Image, name: str) -> Image.Image:
    """An opened (header-only) image -> fully decoded, EXIF-rotated, RGB (`load_image`'s steps for a path)."""
    try:
        image.load()  # force the whole decode now, so truncation is reported here
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None


class ImageTooLarge(ImageError):
    """The image has more pixels than the caller allows (found from its header, before decoding)."""

    code = "image_too_large"


# Common raster formats (Pillow plugin names): what a caller holding untrusted bytes may restrict opening to,
# so no EPS/PDF/etc. decoder ever sees them.
RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO", "TGA")


def open_bytes_checked(data: bytes, max_pixels: int | None = None, formats: tuple | None = None,
                       name: str | None = None) -> Image.Image:
    """Open encoded bytes reading only the header, and refuse them if they are not an image or too large.

    No pixel is decoded, so this is cheap and safe on untrusted input (a few KB of PNG can claim 400 M pixels).

    Args:
        data: encoded image bytes.
        max_pixels: most width x height allowed; None for no limit of ours (Pillow's own
            `Image.MAX_IMAGE_PIXELS` guard still applies).
        formats: Pillow format names to try (e.g. RASTER_FORMATS); None for every format Pillow knows.
        name: what to call the image in messages (default: "<N bytes>").
    Returns:
        the lazily opened PIL image (decode it with `decode_bytes_checked`, or call `.load()`).
    Raises:
        ImageTooLarge: more than `max_pixels` pixels.
        ImageError: not an image, an unsupported format, a corrupt header, or zero pixels.
    """
    name = name or describe_source(data)
    try:
        image = Image.open(io.BytesIO(bytes(data)), formats=formats)
    except Image.UnidentifiedImageError:
        accepted = f"; accepted formats: {', '.join(formats)}" if formats else ""
        raise ImageError(f"{name}: not an image file (unknown or unsupported format{accepted})") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: image has too many pixels to decode safely ({e})") from None
    except Exception as e:  # Pillow's plugins raise many types on hostile headers
        raise ImageError(f"{name}: corrupt image header ({e})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{name}: image is {width}x{height} = {width * height} pixels, over the limit of "
                            f"{max_pixels}")
    return image


def decode_bytes_checked(data: bytes, max_pixels: int | None = None, formats: tuple | None = None,
                         name: str | None = None) -> Image.Image:
    """Encoded bytes -> the RGB image `load_image(bytes)` gives, with `open_bytes_checked`'s checks first.

    The pixel limit is checked from the header before any pixel is decoded; then the same steps as for a
    path (full decode, EXIF orientation, `.convert("RGB")`).

    Raises:
        ImageTooLarge, ImageError: as `open_bytes_checked`, or a corrupt/truncated image body.
    """
    name = name or describe_source(data)
    return _finish_decode(open_bytes_checked(data, max_pixels, formats, name), name)


def open_image(src: ImageSource) -> Image.Image:
    """Decode an image source the way transformers' processor receives it, before `convert_to_rgb`.

    Paths, bytes and data: URLs: decoded, EXIF orientation applied, `.convert("RGB")` (alpha dropped).
    PIL images: returned as given (decoded in full so errors surface here). http(s) URLs are refused
    here: a caller that allows fetching them passes the fetched bytes (see kernels/image_url.py).

    Raises:
        ImageError: missing file, not an image, truncated/corrupt data, bad data: URL, unsupported type.
    """
    from vlm_core.kernels.image_url import (
        resolve_image_url,  # (image_url imports ImageError from this module)
    )

    name = describe_source(src)
    if isinstance(src, Image.Image):
        try:
            src.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{name}: corrupt or truncated image ({e})") from None
        return src
    data = resolve_image_url(src) if isinstance(src, str) else src  # a data: URL -> its bytes
    if isinstance(data, (bytes, bytearray)):
        return _decode(io.BytesIO(bytes(data)), name)
    if isinstance(src, (str, os.PathLike)):
        if os.path.isdir(src):
            raise ImageError(f"{name}: is a directory, not an image file")
        if not os.path.isfile(src):
            raise ImageError(f"{name}: image file not found")
        try:
            with open(src, "rb") as f:
                return _decode(f, name)
        except PermissionError:
            raise ImageError(f"{name}: permission denied") from None
    raise ImageError(f"{name}: unsupported image input; pass a file path, a data: URL, bytes or a PIL image")


def peek_size(src: ImageSource) -> tuple[int, int] | None:
    """(height, width) of an image source from its header alone (no pixel decoded), or None when the header
    cannot be read: the full load (`open_image`) then reports why, naming the source.

    The EXIF orientation is not applied: a rotated photo's edges are swapped, which a caller planning an area
    budget may ignore (smart_resize's area is the same either way)."""
    from vlm_core.kernels.image_url import is_data_url, is_remote_url, resolve_image_url

    try:
        if isinstance(src, Image.Image):
            return src.height, src.width
        if isinstance(src, str) and (is_remote_url(src) or (is_data_url(src) and not os.path.isfile(src))):
            src = resolve_image_url(src)  # a data: URL's bytes (a remote one is refused: None)
        opened = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray)) else src
        with Image.open(opened) as image:
            width, height = image.size
    except Exception:  # any failure is the full load's to explain
        return None
    return (height, width) if height > 0 and width > 0 else None


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`, compositing transparency onto white (transformers' `convert_to_rgb`)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(src: ImageSource) -> Image.Image:
    """Load any supported source as an RGB PIL image, exactly as transformers' processor sees it.

    Args:
        src: file path (str / PathLike), encoded bytes, or a PIL image.
    Returns:
        PIL image in mode "RGB".
    Raises:
        ImageError: with a one-line message naming the source and the problem.
    """
    return convert_to_rgb(open_image(src))


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """Target (height, width), both multiples of `factor`, area within [min_pixels, max_pixels].

    Same arithmetic as transformers' Qwen2-VL `smart_resize` (Python's round-half-even included).

    Raises:
        ImageError (a ValueError): aspect ratio above 200, as transformers raises ValueError.
    """
    if max(height, width) / min(height, width) > 200:
        raise ImageError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
            f" (image is {width}x{height} pixels, width x height)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize(image: Image.Image, height: int, width: int, resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """Resize with a PIL filter on the uint8 image, as transformers' PIL backend does.

    Returns: uint8 [C, H, W].
    """
    resized = image.resize((width, height), resample=resample)
    return to_chw(resized)


def to_chw(image: Image.Image) -> np.ndarray:
    """PIL image -> uint8 [C, H, W] (a greyscale image gets C = 1)."""
    array = np.asarray(image)  # [H, W, C] or [H, W]
    if array.ndim == 2:
        return array[None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """image * scale, computed in float64 then cast to float32 (transformers' `rescale`)."""
    return (image.astype(np.float64) * scale).astype(np.float32)  # [C, H, W]


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """(image - mean) / std per channel in float32 (transformers' `normalize`). [C, H, W] -> same."""
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    channels = image.shape[0]
    mean = np.asarray(_per_channel(mean, channels), dtype=image.dtype)[:, None, None]
    std = np.asarray(_per_channel(std, channels), dtype=image.dtype)[:, None, None]
    return (image - mean) / std


def _per_channel(value, channels: int) -> list[float]:
    """A scalar or one value per channel -> a list of `channels` values."""
    if np.ndim(value) == 0:
        return [float(value)] * channels
    values = [float(v) for v in value]
    if len(values) != channels:
        raise ValueError(f"expected {channels} per-channel values, got {len(values)}")
    return values
