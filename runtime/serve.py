"""`python -m runtime.serve -m OUT`: an OpenAI-compatible HTTP server and a chat page for one exported model.

Endpoints: ``POST /v1/chat/completions`` (JSON or server-sent events with ``"stream": true``),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` and the chat page at ``/``
(plain HTML + JS + CSS from runtime/static/, nothing from a CDN).

Needs the optional ``serve`` extra (Starlette + uvicorn); the runtime itself stays numpy, onnxruntime,
tokenizers, pillow and jinja2 only. Never imports torch or transformers.

Design
------
* **One model, a bounded number of generation workers (default 1).** The model is loaded once. Each
  generation (image decoding, preprocessing, vision encoder, prefill, decode) runs on one worker thread
  from a pool of ``--workers`` threads. ONNX Runtime already spreads one generation over all the cores
  given with ``--threads``; on a small CPU host (2 cores) a second concurrent generation only splits
  the same cores, doubles the live KV caches and activations, and makes both answers slower. So the
  default serves one generation at a time and queues the rest; raise ``--workers`` on a large host
  (and lower ``--threads`` so workers x threads <= cores).
* **A bounded queue.** At most ``--max-queue`` requests wait for a worker; one more is answered
  ``429`` (type ``rate_limit_error``, code ``queue_full``) at once, with a ``Retry-After`` header.
* **Per-request timeout** (``--timeout``, seconds from arrival, queueing included): a request still
  queued then gets ``503``; a generation still running is stopped between tokens and answered ``504``
  (non-streamed) or with an error event (streamed).
* **Disconnects.** A client that goes away (or aborts a stream) sets its job's cancel flag; the worker
  stops at the next token, closes the engine's generator (dropping the KV cache) and frees its slot.
* **Limits, checked before the work they guard:** request body (``--max-body-mb``, from
  Content-Length and while reading), number of images (``--max-images``), decoded image pixels
  (``--max-image-pixels``, checked from the image header before any pixel is decoded; PIL's own
  ``Image.MAX_IMAGE_PIXELS`` is set to the same number as a second guard), prompt + max tokens within
  the model's context. Each gives a 4xx in OpenAI's error shape naming the problem.
* **Images come only from the request bytes.** ``data:`` URLs are decoded here and the image is
  decoded here (a fixed list of raster formats); the engine is handed a PIL image, never a string, so
  no path or URL from a request is ever opened by ``load_image``. ``http(s)://`` URLs are refused
  unless ``--allow-remote-images`` (then fetched with a size cap and a timeout, redirects only to
  http(s)); every other string (a local path, ``file://``) is refused.
* **Auth.** With ``--api-key KEY`` every ``/v1/`` route needs ``Authorization: Bearer KEY`` (compared
  in constant time); ``/`` and ``/health`` stay open (the page asks for the key and keeps it in the
  browser). Binding a non-loopback host without ``--api-key`` is refused unless
  ``--insecure-no-auth`` is given (then a warning is printed).
* **Sampling.** ``temperature: 0`` is greedy (argmax) and gives the same tokens as
  ``python -m runtime.generate --greedy``. Fields not given take the model's generation_config
  defaults, as the CLI does. ``top_p``, ``seed``, ``stop`` (string or up to 4 strings) are OpenAI's;
  ``top_k``, ``min_p``, ``repetition_penalty`` and ``min_tokens`` are accepted as extensions.
  ``presence_penalty`` / ``frequency_penalty`` other than 0, ``n`` other than 1, ``logprobs``,
  ``tools`` and non-text ``response_format`` are refused with a 400 naming the field.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import dataclasses
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid

from kernels.image import ImageError

from .errors import ContextLengthError, UserError

log = logging.getLogger("runtime.serve")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# Raster formats an uploaded image may be in (Pillow plugin names); no EPS/PDF/etc. decoders.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO", "TGA")
MAX_STOP_STRINGS = 4


# --------------------------------------------------------------------------------------------------
# Configuration and errors
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_remote_images: bool = False
    threads: int | None = None
    workers: int = 1
    max_queue: int = 8
    timeout: float = 600.0
    max_body_mb: float = 32.0
    max_images: int = 8
    max_image_pixels: int = 40_000_000
    default_max_tokens: int = 512
    model_name: str | None = None
    insecure_no_auth: bool = False
    log_level: str = "info"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def name(self) -> str:
        return self.model_name or os.path.basename(os.path.normpath(self.model))


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------
# Request parsing: OpenAI chat-completions body -> engine messages + generation options
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChatRequest:
    messages: list  # engine messages; images as ("bytes", data) placeholders until decoded
    images: list  # encoded image bytes, in order
    stream: bool
    include_usage: bool
    max_tokens: int | None
    min_tokens: int
    stop: list
    sampling: dict  # explicit sampling fields
    model: str | None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _get(body: dict, name: str, check, expected: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise bad_request(f"'{name}' must be {expected}, got {json.dumps(value)[:80]}", param=name)
    return value


def parse_data_url(url: str, param: str) -> bytes:
    """``data:[<type>][;base64],<payload>`` -> bytes (base64 only)."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise bad_request("malformed data URL: no ',' after the media type", param=param, code="invalid_image_url")
    meta = header[len("data:"):].split(";")
    if "base64" not in [m.strip().lower() for m in meta[1:]]:
        raise bad_request("data URL must be base64-encoded (data:image/png;base64,...)", param=param,
                          code="invalid_image_url")
    media = meta[0].strip().lower()
    if media and not (media.startswith("image/") or media == "application/octet-stream"):
        raise bad_request(f"data URL media type {media!r} is not an image type", param=param, code="invalid_image")
    payload = "".join(urllib.parse.unquote(payload).split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"data URL has invalid base64 data ({e})", param=param, code="invalid_image_url") from None


def parse_messages(raw, max_images: int) -> tuple[list, list]:
    """OpenAI messages -> (engine messages with image placeholders, list of image URL strings)."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list of message objects", param="messages")
    messages, image_urls = [], []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"{where}.role must be 'system', 'developer', 'user' or 'assistant', got "
                              f"{json.dumps(role)[:40]} (tool messages are not supported)", param=f"{where}.role")
        if message.get("tool_calls") or message.get("function_call"):
            raise bad_request(f"{where}: tool calls are not supported", param=f"{where}.tool_calls")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise bad_request(f"{pwhere} must be an object with a 'type'", param=pwhere)
            ptype = part.get("type")
            if ptype == "text":
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"{pwhere}.text must be a string", param=f"{pwhere}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif ptype == "image_url":
                if role != "user":
                    raise bad_request(f"{pwhere}: images are only accepted in user messages", param=pwhere)
                info = part.get("image_url")
                url = info.get("url") if isinstance(info, dict) else info
                if not isinstance(url, str) or not url:
                    raise bad_request(f"{pwhere}.image_url.url must be a non-empty string", param=f"{pwhere}.image_url")
                image_urls.append((url, f"{pwhere}.image_url"))
                if len(image_urls) > max_images:
                    raise bad_request(f"too many images: at most {max_images} per request (--max-images)",
                                      param="messages", code="too_many_images")
                parts.append({"type": "image", "image": len(image_urls) - 1})  # index, replaced by a PIL image
            else:
                raise bad_request(f"{pwhere}.type must be 'text' or 'image_url', got {json.dumps(ptype)[:40]}",
                                  param=f"{pwhere}.type")
        messages.append({"role": role, "content": parts})
    return messages, image_urls


def parse_chat_request(body, max_images: int) -> tuple[ChatRequest, list]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages, image_urls = parse_messages(body.get("messages"), max_images)
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = bool(options.get("include_usage", False))
    max_tokens = _get(body, "max_completion_tokens", _is_int, "an integer", None)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", _is_int, "an integer", None)
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    min_tokens = _get(body, "min_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0", 0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(f"'min_tokens' ({min_tokens}) is larger than 'max_tokens' ({max_tokens})", param="min_tokens")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' holds {len(stop)} strings; at most {MAX_STOP_STRINGS}", param="stop")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _get(body, name, _is_number, "a number", 0)
        if value != 0:
            raise bad_request(f"'{name}' is not supported by this server (only 0); use 'repetition_penalty' "
                              f"(> 1 discourages repeats) instead", param=name, code="unsupported_parameter")
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise bad_request(f"'n' must be 1 (one answer per request), got {n}", param="n", code="unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad_request("'logprobs' is not supported", param="logprobs", code="unsupported_parameter")
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools / function calling are not supported", param="tools", code="unsupported_parameter")
    if body.get("logit_bias"):
        raise bad_request("'logit_bias' is not supported", param="logit_bias", code="unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and not (isinstance(response_format, dict) and response_format.get("type") == "text"):
        raise bad_request("only response_format {'type': 'text'} is supported", param="response_format",
                          code="unsupported_parameter")
    sampling = {}
    checks = {"temperature": (_is_number, "a number"), "top_p": (_is_number, "a number"),
              "top_k": (lambda v: _is_int(v) and v >= -1, "an integer"), "min_p": (_is_number, "a number"),
              "repetition_penalty": (_is_number, "a number"), "seed": (_is_int, "an integer")}
    for name, (check, expected) in checks.items():
        value = _get(body, name, check, expected, None)
        if value is not None:
            sampling[name] = value
    if sampling.get("top_k") == -1:  # vLLM's "off"
        sampling["top_k"] = 0
    model = _get(body, "model", lambda v: isinstance(v, str), "a string", None)
    return ChatRequest(messages, [], stream, include_usage, max_tokens, min_tokens, stop, sampling, model), image_urls


def make_sampling(explicit: dict, defaults: dict):
    """Request fields over the model's generation_config defaults, as the CLI does; temperature 0 is greedy."""
    from kernels.sampling import SamplingParams

    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    wants_sampling = defaults.get("do_sample", False) or any(k in explicit for k in ("temperature", "top_k", "top_p",
                                                                                     "min_p"))
    values = {k: defaults[k] for k in names if k in defaults}
    values.update({k: explicit[k] for k in names if k in explicit})
    greedy = not wants_sampling or values.get("temperature", 1.0) == 0
    seed = explicit.get("seed")
    if seed is not None:
        seed = seed % (2 ** 63)  # OpenAI allows any integer; the sampler wants a non-negative one
    params = SamplingParams(greedy=greedy, seed=seed, **values)
    try:
        return params.validate()
    except ValueError as e:
        flag = str(e).split(" ", 1)[0].lstrip("-").replace("-", "_")
        raise bad_request(str(e).replace("--", "", 1), param=flag) from None


# --------------------------------------------------------------------------------------------------
# Images: bytes only, size checked from the header before decoding
# --------------------------------------------------------------------------------------------------


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL refused: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_remote_image(url: str, max_bytes: int, timeout: float, param: str) -> bytes:
    opener = urllib.request.OpenerDirector()  # http(s) handlers only: no file:, ftp: or data: opening
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    _HTTPOnlyRedirects(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "vlm-core"}), timeout=timeout) as r:
            data = r.read(max_bytes + 1)
    except Exception as e:  # network errors of every kind: the client's URL, a 400
        raise bad_request(f"could not fetch the image URL: {e}", param=param, code="invalid_image_url") from None
    if len(data) > max_bytes:
        raise APIError(413, f"the image at the URL is larger than {max_bytes} bytes", "invalid_request_error", param,
                       "image_too_large")
    return data


def image_bytes(url: str, config: ServeConfig, param: str) -> bytes:
    """An image_url value from a request -> encoded image bytes. Never opens a local path."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url else ""
    if url[:5].lower() == "data:":
        return parse_data_url(url, param)
    if scheme in ("http", "https"):
        if not config.allow_remote_images:
            raise bad_request("remote image URLs are disabled on this server (start it with --allow-remote-images); "
                              "send the image inline as a data: URL (data:image/png;base64,...)", param=param,
                              code="remote_images_disabled")
        return fetch_remote_image(url, config.max_body_bytes, min(30.0, config.timeout), param)
    raise bad_request("image_url must be a data: URL (data:image/...;base64,...)"
                      + (" or an http(s) URL" if config.allow_remote_images else "")
                      + "; file paths and other schemes are never read", param=param, code="invalid_image_url")


def _open_checked(data: bytes, max_pixels: int, param: str):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.UnidentifiedImageError:
        raise bad_request(f"{param}: not an image (or an unsupported format; use PNG, JPEG, WebP, GIF, BMP or TIFF)",
                          param=param, code="invalid_image") from None
    except Image.DecompressionBombError:
        raise bad_request(f"{param}: image has too many pixels (limit {max_pixels}, --max-image-pixels)",
                          param=param, code="image_too_large") from None
    except Exception as e:
        raise bad_request(f"{param}: corrupt image header ({e})", param=param, code="invalid_image") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise bad_request(f"{param}: image has no pixels ({width}x{height})", param=param, code="invalid_image")
    if width * height > max_pixels:
        raise bad_request(f"{param}: image is {width}x{height} = {width * height} pixels, over this server's limit of "
                          f"{max_pixels} (--max-image-pixels); send a smaller image", param=param,
                          code="image_too_large")
    return image


def check_image(data: bytes, max_pixels: int, param: str) -> None:
    """Refuse what is not an image or is too large, reading only the header (no pixel is decoded)."""
    _open_checked(data, max_pixels, param)


def decode_image(data: bytes, max_pixels: int, param: str):
    """Encoded bytes -> the RGB PIL image that `kernels.image.load_image(path)` would give for the same file.

    Same steps as kernels.image._decode (full decode, EXIF orientation, .convert("RGB")), but restricted to
    raster formats and with the pixel limit checked from the header first."""
    from PIL import Image, ImageOps

    image = _open_checked(data, max_pixels, param)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except Image.DecompressionBombError:
        raise bad_request(f"{param}: image has too many pixels (--max-image-pixels)", param=param,
                          code="image_too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise bad_request(f"{param}: corrupt or truncated image ({e})", param=param, code="invalid_image") from None


# --------------------------------------------------------------------------------------------------
# Scheduling: bounded workers + bounded queue
# --------------------------------------------------------------------------------------------------


class QueueFull(Exception):
    pass


class Scheduler:
    """`workers` slots and at most `max_queue` waiters, on the event loop; slots are freed from worker threads."""

    def __init__(self, workers: int, max_queue: int):
        self.workers, self.max_queue = workers, max_queue
        self.free = workers
        self.waiters: collections.deque = collections.deque()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stats = collections.Counter()

    @property
    def active(self) -> int:
        return self.workers - self.free

    @property
    def queued(self) -> int:
        return sum(1 for w in self.waiters if not w.done())

    async def acquire(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        if self.free > 0 and not self.queued:
            self.free -= 1
            return
        if self.queued >= self.max_queue:
            self.stats["rejected"] += 1
            raise QueueFull()
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
            raise
        finally:
            try:
                self.waiters.remove(waiter)
            except ValueError:
                pass

    def release(self) -> None:
        """Hand the slot to the next live waiter, or mark it free. Event-loop thread only."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1

    def release_threadsafe(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.release)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass


@dataclasses.dataclass
class Job:
    request: ChatRequest
    images: list  # encoded bytes
    deadline: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)

    def emit(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))


class GenerationTimeout(Exception):
    pass


def run_job(vlm, config: ServeConfig, job: Job) -> None:
    """Worker thread: decode images, prepare, check the context, generate; report through the job's queue.

    Items: ("prepared", prompt_tokens), ("chunk", GenerationChunk), ("done", (finish_reason, timings,
    completion_tokens)), ("error", APIError). The generator is always closed, so a cancelled or failed
    generation drops its KV cache before the slot is released."""
    request = job.request
    gen = None
    try:
        if job.cancel.is_set():
            raise asyncio.CancelledError()
        images = [decode_image(data, config.max_image_pixels, param) for data, param in job.images]
        messages = []
        for message in request.messages:
            content = message["content"]
            if isinstance(content, list):
                content = [{"type": "image", "image": images[p["image"]]} if p["type"] == "image" else p
                           for p in content]
            messages.append({"role": message["role"], "content": content})
        try:
            prompt = vlm.prepare(messages)
        except (ImageError, ValueError, UserError) as e:
            raise bad_request(str(e), param="messages") from None
        prompt_tokens = int(len(prompt.input_ids))
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = min(config.default_max_tokens, vlm.max_context - prompt_tokens)
            if max_tokens < 1:
                max_tokens = config.default_max_tokens  # let check_context explain
        if request.min_tokens > max_tokens:
            raise bad_request(f"'min_tokens' ({request.min_tokens}) is larger than max_tokens ({max_tokens})",
                              param="min_tokens")
        try:
            vlm.check_context(prompt_tokens, max_tokens)
        except ContextLengthError:
            raise bad_request(
                f"this model's context is {vlm.max_context} tokens; the messages take {prompt_tokens} tokens and "
                f"max_tokens is {max_tokens}: together {prompt_tokens + max_tokens}. Shorten the messages, send "
                f"fewer or smaller images, or lower max_tokens", param="messages",
                code="context_length_exceeded") from None
        sampling = make_sampling(request.sampling, vlm.generation_defaults)
        job.emit("prepared", prompt_tokens)
        timings: dict = {}
        completion_tokens, finish = 0, "length"
        gen = vlm.stream_generate(prompt, sampling, max_tokens, request.min_tokens, request.stop, timings)
        for chunk in gen:
            if job.cancel.is_set():
                raise asyncio.CancelledError()
            if time.monotonic() > job.deadline:
                raise GenerationTimeout()
            if chunk.token_id is not None:
                completion_tokens += 1
            finish = chunk.finish_reason or finish
            job.emit("chunk", chunk)
        from .engine import summarize_timings

        summary = summarize_timings(timings, 0.0)
        summary.pop("load_s", None)
        job.emit("done", (finish, summary, completion_tokens))
    except asyncio.CancelledError:
        job.emit("cancelled")
    except GenerationTimeout:
        job.emit("error", APIError(504, f"the generation did not finish within the server's timeout of "
                                        f"{config.timeout:g} s (--timeout); ask for fewer max_tokens", "timeout",
                                   None, "timeout"))
    except APIError as e:
        job.emit("error", e)
    except Exception as e:  # a bug or an engine failure: log it, answer 500
        log.error("generation failed:\n%s", traceback.format_exc())
        job.emit("error", APIError(500, f"internal error during generation: {type(e).__name__}: {e}", "server_error"))
    finally:
        if gen is not None:
            gen.close()  # runs the engine's generator cleanup; its KV cache becomes garbage now
        del gen


# --------------------------------------------------------------------------------------------------
# The ASGI app
# --------------------------------------------------------------------------------------------------


def create_app(config: ServeConfig, vlm=None):
    """The Starlette app; loads the model unless `vlm` is given."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from PIL import Image

    if vlm is None:
        from .engine import VisionLanguageModel

        vlm = VisionLanguageModel(config.model, threads=config.threads)
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; our own check (header size) comes first.
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    scheduler = Scheduler(config.workers, config.max_queue)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="generate")
    created = int(time.time())
    model_name = config.name

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    class DisconnectAwareStreamingResponse(StreamingResponse):
        """Always watch for http.disconnect while streaming (whatever ASGI spec version the server reports),
        so a client that goes away cancels the body iterator and, through it, the generation."""

        async def __call__(self, scope, receive, send):
            import anyio

            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()

    def check_auth(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request):
        limit = config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise bad_request("invalid Content-Length header")
            if int(length) > limit:
                raise APIError(413, f"request body is {int(length)} bytes, over this server's limit of {limit} bytes "
                                    f"(--max-body-mb {config.max_body_mb:g})", "invalid_request_error", None,
                               "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over this server's limit of {limit} bytes "
                                    f"(--max-body-mb {config.max_body_mb:g})", "invalid_request_error", None,
                               "request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON ({e})") from None

    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        try:
            check_auth(request)
            body = await read_json(request)
            chat, image_urls = parse_chat_request(body, config.max_images)
            if chat.model is not None and chat.model != model_name:
                raise APIError(404, f"model {chat.model!r} is not served here; this server serves {model_name!r}",
                               "invalid_request_error", "model", "model_not_found")
            images = []
            for url, param in image_urls:
                data = await asyncio.to_thread(image_bytes, url, config, param)
                check_image(data, config.max_image_pixels, param)  # header only: cheap, before queueing
                images.append((data, param))
            make_sampling(chat.sampling, vlm.generation_defaults)  # sampling errors before queueing
        except APIError as e:
            return error_response(e)
        return await dispatch(request, chat, images, arrived)

    async def dispatch(request, chat: ChatRequest, images: list, arrived: float) -> Response:
        deadline = arrived + config.timeout
        try:
            await scheduler.acquire(max(0.0, deadline - time.monotonic()))
        except QueueFull:
            return error_response(APIError(
                429, f"the server is busy: {config.workers} generation(s) running and {config.max_queue} waiting "
                     f"(--max-queue); retry shortly", "rate_limit_error", None, "queue_full",
                headers={"Retry-After": "1"}))
        except asyncio.TimeoutError:
            scheduler.stats["timeouts"] += 1
            return error_response(APIError(503, f"no worker became free within the server's timeout of "
                                                f"{config.timeout:g} s (--timeout)", "server_error", None, "timeout"))
        loop = asyncio.get_running_loop()
        job = Job(chat, images, deadline, loop, asyncio.Queue())
        scheduler.stats["started"] += 1
        future = executor.submit(run_job, vlm, config, job)
        future.add_done_callback(lambda _: scheduler.release_threadsafe())  # the slot frees when the thread is done

        last_poll = [time.monotonic()]

        async def next_item(poll_disconnect: bool):
            """The worker's next report; while no response has started, also notice a client that went away."""
            while True:
                if poll_disconnect and time.monotonic() - last_poll[0] > 0.25:
                    last_poll[0] = time.monotonic()
                    if await request.is_disconnected():
                        job.cancel.set()
                try:
                    return await asyncio.wait_for(job.queue.get(), 0.25 if poll_disconnect else None)
                except asyncio.TimeoutError:
                    pass

        try:
            kind, value = await next_item(True)
            if kind == "error":
                scheduler.stats["failed"] += 1
                return error_response(value)
            if kind == "cancelled":
                scheduler.stats["cancelled"] += 1
                return Response(status_code=499)
            prompt_tokens = value
            completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
            if chat.stream:
                return DisconnectAwareStreamingResponse(
                    sse_events(job, next_item, completion_id, prompt_tokens, chat.include_usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            pieces = []
            while True:
                kind, value = await next_item(True)
                if kind == "chunk":
                    pieces.append(value.text)
                elif kind == "done":
                    finish, timings, completion_tokens = value
                    break
                elif kind == "cancelled":
                    scheduler.stats["cancelled"] += 1
                    return Response(status_code=499)
                else:
                    scheduler.stats["failed"] += 1
                    return error_response(value)
            scheduler.stats["completed"] += 1
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage(prompt_tokens, completion_tokens), "timings": timings})
        except BaseException:
            job.cancel.set()  # the handler was cancelled (client gone, server stopping)
            raise

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def sse_events(job: Job, next_item, completion_id: str, prompt_tokens: int, include_usage: bool):
        created_at = int(time.time())

        def event(choices: list, **extra) -> str:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created_at,
                       "model": model_name, "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                payload["usage"] = None
            return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"

        def choice(delta: dict, finish=None) -> list:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        finished = False
        try:
            yield event(choice({"role": "assistant", "content": ""}))
            while True:
                kind, value = await next_item(False)
                if kind == "chunk":
                    if value.text:
                        yield event(choice({"content": value.text}))
                elif kind == "done":
                    finish, timings, completion_tokens = value
                    yield event(choice({}, finish))
                    if include_usage:
                        yield event([], usage=usage(prompt_tokens, completion_tokens), timings=timings)
                    yield "data: [DONE]\n\n"
                    scheduler.stats["completed"] += 1
                    finished = True
                    return
                elif kind == "cancelled":
                    scheduler.stats["cancelled"] += 1
                    finished = True
                    return
                else:
                    scheduler.stats["failed"] += 1
                    yield "data: " + json.dumps(value.body()) + "\n\n"
                    finished = True
                    return
        finally:
            if not finished:  # the client went away (or the server is stopping): stop the generation
                job.cancel.set()
                scheduler.stats["cancelled"] += 1

    async def models(request: Request) -> Response:
        try:
            check_auth(request)
        except APIError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [model_card()]})

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "vlm-core",
                "max_context": vlm.max_context}

    async def model_info(request: Request) -> Response:
        try:
            check_auth(request)
            if request.path_params["model"] != model_name:
                raise APIError(404, f"model {request.path_params['model']!r} is not served here", "invalid_request_error",
                               "model", "model_not_found")
        except APIError as e:
            return error_response(e)
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "workers": scheduler.workers,
                             "active": scheduler.active, "queued": scheduler.queued, "max_queue": scheduler.max_queue,
                             "auth": bool(config.api_key), "stats": dict(scheduler.stats)})

    async def page(request: Request) -> Response:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
        return error_response(APIError(status, message.get(status, str(getattr(exc, "detail", exc))),
                                       "invalid_request_error", None, {404: "not_found", 405: "method_not_allowed"}.get(status)))

    async def server_error(request: Request, exc) -> Response:
        log.error("unhandled error:\n%s", "".join(traceback.format_exception(exc)))
        return error_response(APIError(500, f"internal server error: {type(exc).__name__}", "server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model_info, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: server_error},
                    lifespan=lifespan)
    app.state.vlm, app.state.scheduler, app.state.config = vlm, scheduler, config
    return app


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve",
                                description="OpenAI-compatible HTTP server (and a chat page at /) for an exported model.")
    p.add_argument("-m", "--model", required=True, help="exported model folder (from `python -m export`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("VLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $VLM_API_KEY, else none)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without --api-key (anyone who reaches the port can use it)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let requests name http(s) image URLs, fetched by the server (off: data: URLs only)")
    p.add_argument("--model-name", help="the model id clients use (default: the folder's name)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per generation (default: all cores)")
    p.add_argument("--workers", type=int, default=1, help="generations run at once (default 1; see the module doc)")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait for a worker (default 8); "
                                                            "more get 429")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queueing included "
                                                                "(default 600)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    p.add_argument("--max-images", type=int, default=8, help="most images in one request (default 8)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="most pixels (width x height) of an uploaded image, checked before decoding (default 40M)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="max_tokens when a request gives none (default 512, within the context)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def check_config(config: ServeConfig) -> None:
    positive = {"workers": config.workers, "max-images": config.max_images, "max-image-pixels": config.max_image_pixels,
                "default-max-tokens": config.default_max_tokens}
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if config.threads is not None and config.threads < 1:
        raise UserError(f"--threads must be at least 1, got {config.threads}")
    if config.max_queue < 0:
        raise UserError(f"--max-queue must be 0 or more, got {config.max_queue}")
    if not config.timeout > 0 or not config.max_body_mb > 0:
        raise UserError("--timeout and --max-body-mb must be positive")
    if not 0 <= config.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {config.port}")
    if not is_loopback(config.host) and not config.api_key:
        if not config.insecure_no_auth:
            raise UserError(f"refusing to listen on {config.host!r} (reachable from other machines) without "
                            f"--api-key; give --api-key KEY, or --insecure-no-auth if you really mean it")
        print(f"warning: listening on {config.host} with no API key: anyone who can reach this port can use the "
              f"model", file=sys.stderr)
    if not os.path.isdir(config.model):
        raise UserError(f"model folder {config.model!r} does not exist")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    try:
        check_config(config)
        try:
            import starlette  # noqa: F401
            import uvicorn
        except ImportError:
            raise UserError("the server needs the 'serve' extra: pip install -e '.[serve]' (starlette, uvicorn)") \
                from None
        logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s: %(message)s")
        app = create_app(config)
    except (UserError, ImageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           http="h11", ws="none", lifespan="on", timeout_graceful_shutdown=5))
    original_startup = server.startup

    async def startup(sockets=None):  # print the bound address (with --port 0, the one picked)
        await original_startup(sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                print(f"serving {config.name!r} on http://{host}:{port}/ (OpenAI API at /v1)", flush=True)

    server.startup = startup
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
