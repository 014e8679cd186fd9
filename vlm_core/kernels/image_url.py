"""Images given as URLs: ``data:`` URLs decoded here, ``http(s)://`` URLs fetched only when the caller allows it.

transformers' processor takes both in an image part (``{"type": "image", "url": ...}`` or OpenAI's
``image_url``). A ``data:`` URL needs no network and is always decoded (RFC 2397: base64 or
percent-encoded). Fetching a remote URL is off unless the caller turns it on
(``VisionLanguageModel(..., allow_remote_images=True)``): a program handing user-supplied messages to the
model should not make requests on the user's behalf by default. Only http and https are followed, also
through redirects (never ``file:``).

Error messages never echo a whole URL (a data URL is tens of kilobytes): `describe_source` cuts it.

    resolve_image_url("data:image/png;base64,iVBORw0KGgo...")  # -> the PNG's bytes
    resolve_image_url("cat.jpg")                               # -> "cat.jpg" (not a URL: unchanged)
"""
from __future__ import annotations

import base64
import binascii
import os
import urllib.error
import urllib.parse
import urllib.request

from vlm_core.kernels.image import ImageError, ImageTooLarge, describe_source

# Most bytes read from a remote image URL (a larger body is refused, not truncated).
MAX_REMOTE_IMAGE_BYTES = 64 * 1024 * 1024
MAX_REMOTE_VIDEO_BYTES = 256 * 1024 * 1024  # a few minutes of 720p
REMOTE_TIMEOUT_S = 30.0


def is_data_url(src) -> bool:
    """True for a str starting with ``data:`` (any case)."""
    return isinstance(src, str) and src[:5].lower() == "data:"


def is_remote_url(src) -> bool:
    """True for a str starting with ``http://`` or ``https://`` (any case)."""
    return isinstance(src, str) and src.split(":", 1)[0].lower() in ("http", "https") and "://" in src[:8]


def decode_data_url(url: str) -> bytes:
    """``data:[<media type>][;base64],<payload>`` -> the bytes it holds (RFC 2397).

    A base64 payload may be percent-encoded or hold whitespace (both are removed first); without
    ``;base64`` the payload is percent-decoded. The media type is not checked: the image decoder
    tells what the bytes are.

    Raises:
        ImageError: no ``,`` after the media type, or invalid base64; the message shows the URL shortened.
    """
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageError(f"{describe_source(url)}: malformed data: URL (no ',' after the media type)")
    params = [p.strip().lower() for p in header[len("data:"):].split(";")[1:]]
    if "base64" not in params:
        return urllib.parse.unquote_to_bytes(payload)
    payload = "".join(urllib.parse.unquote(payload).split())
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{describe_source(url)}: data: URL holds invalid base64 ({e})") from None


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL refused: {describe_source(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_remote_image(url: str, timeout: float = REMOTE_TIMEOUT_S, max_bytes: int | None = None,
                       kind: str = "image") -> bytes:
    """GET an http(s) URL and return its body (at most `max_bytes`; default by `kind`, "image" or "video").

    Raises:
        ImageError: any network or HTTP error; ImageTooLarge (an ImageError): a body over `max_bytes`.
    """
    if max_bytes is None:
        max_bytes = MAX_REMOTE_VIDEO_BYTES if kind == "video" else MAX_REMOTE_IMAGE_BYTES
    opener = urllib.request.OpenerDirector()  # http(s) handlers only: no file:, ftp: or data: opening
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    _HTTPOnlyRedirects(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "vlm-core"}), timeout=timeout) as r:
            data = r.read(max_bytes + 1)
    except Exception as e:  # network errors come in many types (URLError, HTTPError, timeouts, bad URLs)
        raise ImageError(f"{describe_source(url)}: could not fetch the {kind} ({e})") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{describe_source(url)}: the {kind} is larger than {max_bytes} bytes")
    return data


def resolve_image_url(src, allow_remote: bool = False):
    """An image source -> bytes when it is a URL, else `src` unchanged (a path, bytes, a PIL image...).

    Args:
        src: any image source.
        allow_remote: fetch ``http(s)://`` URLs; when False they are refused.
    Raises:
        ImageError: a malformed data: URL, a remote URL while `allow_remote` is False, or a failed fetch.
    """
    if is_data_url(src) and not os.path.isfile(src):  # a file may be called "data:..." (transformers checks too)
        return decode_data_url(src)
    if is_remote_url(src):
        if not allow_remote:
            raise ImageError(f"{describe_source(src)}: remote image URLs are not fetched unless enabled "
                             f"(VisionLanguageModel(..., allow_remote_images=True)); or pass a path, bytes, "
                             f"a PIL image or a data: URL")
        return fetch_remote_image(src)
    return src
