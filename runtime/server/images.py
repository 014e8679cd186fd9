"""Images from a request: an image_url value -> encoded bytes -> a checked, decoded PIL image.

Images come only from the request's bytes: ``data:`` URLs are decoded here; ``http(s)://`` URLs are
fetched only when the server allows remote images (size cap, timeout, redirects only to http(s));
every other string (a local path, ``file://``) is refused, so no path from a request is ever opened.
Opening is `kernels.image`'s: restricted to raster formats, the pixel limit checked from the header
before any pixel is decoded. This module turns its ImageError into a RequestError naming the field.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import urllib.error
import urllib.parse
import urllib.request

from kernels.image import RASTER_FORMATS, ImageError, ImageTooLarge, decode_bytes_checked, open_bytes_checked

from .errors import PayloadTooLarge, RequestError


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """An image's bytes as the request gave them (header already checked), and where it was in the body."""

    data: bytes
    param: str


def parse_data_url(url: str, param: str) -> bytes:
    """``data:[<type>][;base64],<payload>`` -> bytes (base64 only)."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise RequestError("malformed data URL: no ',' after the media type", param=param, code="invalid_image_url")
    meta = header[len("data:"):].split(";")
    if "base64" not in [m.strip().lower() for m in meta[1:]]:
        raise RequestError("data URL must be base64-encoded (data:image/png;base64,...)", param=param,
                           code="invalid_image_url")
    media = meta[0].strip().lower()
    if media and not (media.startswith("image/") or media == "application/octet-stream"):
        raise RequestError(f"data URL media type {media!r} is not an image type", param=param, code="invalid_image")
    payload = "".join(urllib.parse.unquote(payload).split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"data URL has invalid base64 data ({e})", param=param, code="invalid_image_url") from None


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL refused: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_remote_image(url: str, max_bytes: int, timeout: float, param: str) -> bytes:
    """GET an http(s) URL (blocking): at most `max_bytes`, redirects only to http(s)."""
    opener = urllib.request.OpenerDirector()  # http(s) handlers only: no file:, ftp: or data: opening
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    _HTTPOnlyRedirects(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "vlm-core"}), timeout=timeout) as r:
            data = r.read(max_bytes + 1)
    except Exception as e:  # network errors of every kind: the client's URL, a 400
        raise RequestError(f"could not fetch the image URL: {e}", param=param, code="invalid_image_url") from None
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image at the URL is larger than {max_bytes} bytes", param=param,
                              code="image_too_large")
    return data


def image_bytes(url: str, param: str, allow_remote: bool, max_bytes: int, timeout: float) -> bytes:
    """An image_url value -> encoded image bytes (blocking when it fetches). Never opens a local path."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url else ""
    if url[:5].lower() == "data:":
        return parse_data_url(url, param)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise RequestError("remote image URLs are disabled on this server (start it with "
                               "--allow-remote-images); send the image inline as a data: URL "
                               "(data:image/png;base64,...)", param=param, code="remote_images_disabled")
        return fetch_remote_image(url, max_bytes, timeout, param)
    raise RequestError("image_url must be a data: URL (data:image/...;base64,...)"
                       + (" or an http(s) URL" if allow_remote else "")
                       + "; file paths and other schemes are never read", param=param, code="invalid_image_url")


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
    """kernels.image's ImageError -> RequestError for the field `param`."""
    try:
        yield
    except ImageTooLarge as e:
        raise RequestError(f"{e} (--max-image-pixels); send a smaller image", param=param,
                           code="image_too_large") from None
    except ImageError as e:
        raise RequestError(str(e), param=param, code="invalid_image") from None
