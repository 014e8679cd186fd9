"""Images from a request: an image_url value -> encoded bytes -> a checked, decoded PIL image.

Images (and videos: `image_bytes(..., kind="video")`, see videos.py) come only from the request's bytes:
``data:`` URLs are decoded here; ``http(s)://`` URLs are fetched only when the server allows remote media
(``--allow-remote-media``; size cap, timeout, redirects only to http(s)); every other string (a local path,
``file://``) is refused, so no path from a request is ever opened.
Opening is `kernels.image`'s: restricted to raster formats, the pixel limit checked from the header
before any pixel is decoded. This module turns its ImageError into a ParameterError naming the field.
"""
from __future__ import annotations

import contextlib
import dataclasses
import urllib.parse

from vlm_core.errors import ParameterError, PayloadTooLarge
from vlm_core.kernels.image import (
    RASTER_FORMATS,
    ImageError,
    ImageTooLarge,
    decode_bytes_checked,
    open_bytes_checked,
)
from vlm_core.kernels.image_url import decode_data_url
from vlm_core.kernels.image_url import fetch_remote_image as fetch_url


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """An image's bytes as the request gave them (header already checked), and where it was in the body."""

    data: bytes
    param: str


# What a data: URL's media type may say, by kind of part; empty and application/octet-stream are accepted too
# (a browser's FileReader gives the latter for a file type it does not know).
DATA_URL_TYPES = {"image": ("image/",), "video": ("video/", "image/gif", "image/webp")}


def parse_data_url(url: str, param: str, kind: str = "image") -> bytes:
    """``data:image/...;base64,<payload>`` -> bytes. Stricter than kernels.image_url (which decodes any
    data: URL): a request must send base64 and a media type of its kind (`kind` "image", or "video": video/*
    or an animated image/gif or image/webp)."""
    header, sep, _ = url.partition(",")
    example = "data:image/png;base64,..." if kind == "image" else "data:video/mp4;base64,..."
    if not sep:
        raise ParameterError("malformed data URL: no ',' after the media type", param=param,
                           code=f"invalid_{kind}_url")
    meta = header[len("data:"):].split(";")
    if "base64" not in [m.strip().lower() for m in meta[1:]]:
        raise ParameterError(f"data URL must be base64-encoded ({example})", param=param, code=f"invalid_{kind}_url")
    media = meta[0].strip().lower()
    if media and not (media.startswith(DATA_URL_TYPES[kind]) or media == "application/octet-stream"):
        raise ParameterError(f"data URL media type {media!r} is not {'an image' if kind == 'image' else 'a video'} "
                           f"type", param=param, code=f"invalid_{kind}")
    try:
        return decode_data_url(url)
    except ImageError as e:
        raise ParameterError(str(e), param=param, code=f"invalid_{kind}_url") from None


def fetch_remote_image(url: str, max_bytes: int, timeout: float, param: str, kind: str = "image") -> bytes:
    """GET an http(s) URL (blocking; kernels.image_url's fetch): at most `max_bytes`, redirects only to http(s)."""
    try:
        return fetch_url(url, timeout=timeout, max_bytes=max_bytes, kind=kind)
    except ImageTooLarge:
        raise PayloadTooLarge(f"the {kind} at the URL is larger than {max_bytes} bytes (--max-body-mb)", param=param,
                              code=f"{kind}_too_large") from None
    except ImageError as e:
        raise ParameterError(f"could not fetch the {kind} URL: {e}", param=param, code=f"invalid_{kind}_url") from None


def image_bytes(url: str, param: str, allow_remote: bool, max_bytes: int, timeout: float,
                kind: str = "image") -> bytes:
    """An image_url (or, with `kind` "video", a video_url) value -> the encoded bytes (blocking when it fetches).
    Never opens a local path."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url else ""
    example = "data:image/png;base64,..." if kind == "image" else "data:video/mp4;base64,..."
    if url[:5].lower() == "data:":
        return parse_data_url(url, param, kind)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise ParameterError(f"remote {kind} URLs are disabled on this server (start it with "
                               f"--allow-remote-media); send the {kind} inline as a data: URL ({example})",
                               param=param, code=f"remote_{kind}s_disabled")
        return fetch_remote_image(url, max_bytes, timeout, param, kind)
    raise ParameterError(f"{'image_url' if kind == 'image' else 'a video URL'} must be a data: URL ({example})"
                       + (" or an http(s) URL" if allow_remote else "")
                       + "; file paths and other schemes are never read", param=param, code=f"invalid_{kind}_url")


def check_image(data: bytes, max_pixels: int, param: str) -> EncodedImage:
    """Refuse what is not an image or is too large, reading only the header (cheap: before queueing)."""
    with _as_request_error(param):
        open_bytes_checked(data, max_pixels, RASTER_FORMATS, name=param)
    return EncodedImage(data, param)


def decode_image(image: EncodedImage, max_pixels: int):
    """EncodedImage -> the RGB PIL image `kernels.image.load_image(path)` gives for the same file."""
    with _as_request_error(image.param):
        return decode_bytes_checked(image.data, max_pixels, RASTER_FORMATS, name=image.param)


@contextlib.contextmanager
def _as_request_error(param: str):
    """kernels.image's ImageError -> ParameterError for the field `param`."""
    try:
        yield
    except ImageTooLarge as e:
        raise ParameterError(f"{e} (--max-image-pixels); send a smaller image", param=param,
                           code="image_too_large") from None
    except ImageError as e:
        raise ParameterError(str(e), param=param, code="invalid_image") from None
