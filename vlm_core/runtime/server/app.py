"""The HTTP layer: a Starlette app serving OpenAI's chat-completions API and the chat page.

Routes parse (schema.py), fetch and check images (images.py) and videos (videos.py), submit the work to the
scheduler and turn its events into a JSON answer or server-sent events. Every error is an exception of a type
named by what went wrong; `ERRORS` maps each type to an HTTP status and OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``, applied in one place (`error_response`), for routes
and for errors in the middle of a stream alike.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import time
import traceback
import uuid

import anyio
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from vlm_core.errors import (
    AuthError,
    MethodNotAllowed,
    NotFound,
    ParameterError,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    UserError,
)
from vlm_core.kernels.video import MAX_FRAME_PIXELS
from vlm_core.runtime.request import compile_grammar
from vlm_core.runtime.server import images, metrics, schema, videos, worker
from vlm_core.runtime.server.config import ServeConfig
from vlm_core.runtime.server.scheduler import (
    Cancelled,
    GenerationTimeout,
    QueueFull,
    QueueTimeout,
    Scheduler,
    Ticket,
)

log = logging.getLogger("vlm_core.runtime.server")

# Bodies above this are parsed on a thread: a video data: URL is megabytes of JSON string.
LARGE_BODY_BYTES = 1 << 20
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PIXEL_FLAGS = {"min_pixels": "--min-pixels", "max_pixels": "--max-pixels"}


@dataclasses.dataclass(frozen=True)
class HTTPError:
    status: int
    type: str  # OpenAI's error "type"
    code: str | None = None  # used when the error carries none
    headers: dict = dataclasses.field(default_factory=dict)


# Error type -> how it is answered; the most specific class in an error's MRO wins.
ERRORS = {
    UserError: HTTPError(400, "invalid_request_error"),
    AuthError: HTTPError(401, "authentication_error", headers={"WWW-Authenticate": "Bearer"}),
    NotFound: HTTPError(404, "invalid_request_error"),
    MethodNotAllowed: HTTPError(405, "invalid_request_error"),
    RequestTimeout: HTTPError(408, "invalid_request_error", headers={"Connection": "close"}),
    PayloadTooLarge: HTTPError(413, "invalid_request_error"),
    UnsupportedMediaType: HTTPError(415, "invalid_request_error"),
    QueueFull: HTTPError(429, "rate_limit_error", "queue_full", {"Retry-After": "1"}),
    Cancelled: HTTPError(499, "cancelled", "cancelled"),  # nobody reads it: the client has gone
    QueueTimeout: HTTPError(503, "server_error", "timeout"),
    GenerationTimeout: HTTPError(504, "timeout", "timeout"),
}
INTERNAL = HTTPError(500, "server_error")


def error_answer(error: BaseException) -> tuple[HTTPError, dict]:
    """(how to answer, OpenAI error body) for any exception; unknown ones are logged and answered 500."""
    kind = next((ERRORS[cls] for cls in type(error).__mro__ if cls in ERRORS), None)
    if kind is None:
        log.error("unhandled error:\n%s", "".join(traceback.format_exception(error)))
        message = f"internal server error: {type(error).__name__}: {error}"
        return INTERNAL, {"error": {"message": message, "type": INTERNAL.type, "param": None, "code": None}}
    return kind, {"error": {"message": str(error), "type": kind.type,
                            "param": getattr(error, "param", None), "code": getattr(error, "code", None) or kind.code}}


def error_response(error: BaseException) -> JSONResponse:
    kind, body = error_answer(error)
    return JSONResponse(body, status_code=kind.status, headers=kind.headers)


async def starlette_error(request: Request, error: Exception) -> JSONResponse:
    """Starlette's exception handler for every error: routes raise, this answers."""
    if isinstance(error, HTTPException):  # no such route / method
        if error.status_code == 405:
            error = MethodNotAllowed(f"method {request.method} not allowed on {request.url.path}")
        elif error.status_code == 404:
            error = NotFound(f"no route {request.url.path}")
        else:
            return JSONResponse({"error": {"message": str(error.detail), "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=error.status_code)
    return error_response(error)


def check_auth(request: Request, api_key: str | None) -> None:
    """With an API key set, require ``Authorization: Bearer <key>`` (compared in constant time)."""
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise AuthError("missing or wrong API key: send 'Authorization: Bearer <key>'")


def check_json_body(request: Request) -> None:
    """Only ``Content-Type: application/json`` bodies, as OpenAI's API: a text/plain or form body is what a page
    on another site can make a browser send without a CORS preflight, starting generations unseen."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        given = f"got {request.headers['content-type'][:60]!r}" if "content-type" in request.headers else "got none"
        raise UnsupportedMediaType(f"the request body must be JSON, sent with 'Content-Type: application/json'; "
                                   f"{given}")


async def read_body(request: Request, limit: int, limit_mb: float, timeout: float) -> bytes:
    """The body, refused (413) from its Content-Length or, without one, as soon as reading passes `limit`; one that
    has not arrived within `timeout` seconds (a Content-Length larger than what is sent, a chunked body cut
    short) is a 408. A client that leaves while sending it is logged in one line and ends the request."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise UserError("invalid Content-Length header")
        if int(length) > limit:
            raise PayloadTooLarge(f"request body is {int(length)} bytes, over this server's limit of {limit} bytes "
                                  f"(--max-body-mb {limit_mb:g})")
    chunks, size = [], 0
    announced = f" of the {length} announced" if length is not None else ""
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is over this server's limit of {limit} bytes "
                                          f"(--max-body-mb {limit_mb:g})")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s (--body-timeout): {size} "
                             f"bytes came{announced}") from None
    except ClientDisconnect:
        client = f"{request.client[0]}:{request.client[1]}" if request.client else "a client"
        log.warning("%s disconnected while sending its request body (%d bytes%s received)", client, size, announced)
        raise Cancelled("the client disconnected while sending its request body") from None
    return b"".join(chunks)


class DisconnectAwareStreamingResponse(StreamingResponse):
    """Always watch for http.disconnect while streaming (whatever ASGI spec version the server reports),
    so a client that goes away cancels the body iterator and, through it, the generation."""

    async def __call__(self, scope, receive, send):
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


async def cancel_when_gone(request: Request, ticket: Ticket) -> None:
    """Cancel `ticket` when the client disconnects: ASGI's http.disconnect, awaited in a task of its own from
    submission on (the body has been read), so a client that leaves is seen at once whether its request is
    queued (it gives up its place), preparing or decoding, however fast tokens come. Polling between tokens
    never ran while tokens came less than 0.25 s apart, so a non-streamed request kept its slot to the end."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    ticket.cancel()


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens are prompt tokens whose KV came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class ChatServer:
    """The routes, over one loaded model and its scheduler."""

    def __init__(self, config: ServeConfig, vlm, scheduler: Scheduler):
        self.config, self.vlm, self.scheduler = config, vlm, scheduler
        self.model_name, self.created = config.name, int(time.time())
        self.metrics = None  # a metrics.ServerMetrics once installed (the 'metrics' extra)

    async def chat_completions(self, request: Request) -> Response:
        arrived = time.monotonic()
        check_auth(request, self.config.api_key)
        check_json_body(request)
        body = await read_body(request, self.config.max_body_bytes, self.config.max_body_mb, self.config.body_timeout)
        if len(body) > LARGE_BODY_BYTES:  # a video data: URL: ~0.1 s of JSON parsing per 40 MB, off the event loop
            body = await asyncio.to_thread(schema.parse_json, body)
        else:
            body = schema.parse_json(body)
        chat = schema.parse_chat_request(body, self.config.max_images, self.config.max_videos,
                                         self.vlm.generation_defaults, self.config.image_budget,
                                         self.vlm.family.check_pixel_budget)
        del body  # the request's JSON, video data: URLs included, is not kept while the answer is generated
        if chat.model is not None and chat.model != self.model_name:
            raise NotFound(f"model {chat.model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if chat.videos and not worker.reads_video(self.vlm):
            raise ParameterError(f"{chat.videos[0].param}: this model ({self.vlm.manifest['family']}) reads images "
                               f"only, not video; send frames as image_url parts, or use a Qwen3-VL model",
                               param=chat.videos[0].param, code="unsupported_media")
        encoded = [await self.fetch_image(image) for image in chat.images]
        clips = [await self.fetch_video(video) for video in chat.videos]
        if chat.options.response_format is not None or chat.options.tool_use is not None:
            # a schema, grammar or forced tool call compiles (cached by its text) before queueing, off the event loop
            chat = dataclasses.replace(chat, options=await asyncio.to_thread(
                compile_grammar, chat.options, self.vlm.grammars, self.vlm.tokenizer, schema.SERVER_NAMES))
        video = dataclasses.replace(self.config.video_options, **chat.video) if clips else None
        events = worker.run(self.vlm, chat, encoded, self.config.max_image_pixels, self.config.default_max_tokens,
                            clips, video)
        if self.metrics is not None:
            events = self.metrics.watch(events)
        ticket = self.scheduler.submit(events, arrived)
        watcher = asyncio.create_task(cancel_when_gone(request, ticket))
        try:
            prepared = await ticket.next()
            completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
            if chat.stream:
                watcher.cancel()  # the streaming response watches from here on, as it streams
                return DisconnectAwareStreamingResponse(
                    self.sse_events(ticket, completion_id, prepared.prompt_tokens, chat.include_usage,
                                    chat.options.logprobs, prepared.warnings),
                    media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await self.whole_answer(ticket, completion_id, prepared.prompt_tokens, chat.options.logprobs,
                                           prepared.warnings)
        except BaseException:
            ticket.cancel()  # an error, or the handler was cancelled (client gone, server stopping)
            raise
        finally:
            watcher.cancel()

    def logprobs_content(self, chunk) -> list:
        """OpenAI's logprobs.content entries for one streamed chunk: none for EOS, which is not in the text."""
        if chunk.logprobs is None or chunk.token_id in self.vlm.eos_token_ids:
            return []
        return [chunk.logprobs.to_dict()]

    async def fetch_image(self, image: schema.ImageURL) -> images.EncodedImage:
        """Bytes of one image_url (fetched off the event loop), header checked: cheap, before queueing."""
        data = await asyncio.to_thread(images.image_bytes, image.url, image.param, self.config.allow_remote_media,
                                       self.config.max_body_bytes, min(30.0, self.config.timeout))
        return images.check_image(data, self.config.max_image_pixels, image.param)

    async def fetch_video(self, video: schema.VideoURL) -> videos.EncodedVideo:
        """Bytes of one video (base64 decoded or fetched) and its container probed, off the event loop: a file
        that is not a video is refused before queueing. Frames are decoded on the worker, by `prepare`."""
        def fetch_and_probe():
            data = images.image_bytes(video.url, video.param, self.config.allow_remote_media,
                                      self.config.max_body_bytes, min(30.0, self.config.timeout), kind="video")
            return videos.check_video(data, self.config.max_image_pixels, video.param)

        return await asyncio.to_thread(fetch_and_probe)

    async def whole_answer(self, ticket: Ticket, completion_id: str, prompt_tokens: int,
                           logprobs: int | None = None, warnings: tuple = ()) -> JSONResponse:
        """The answer as one chat.completion; `warnings` (images scaled down to fit the context) go in a
        top-level "warnings" list, which OpenAI's clients ignore, when there are any."""
        pieces, content, calls = [], [], []
        while not isinstance(event := await ticket.next(), worker.Finished):
            pieces.append(event.text)
            content += self.logprobs_content(event)
            calls += event.tool_calls or []
        message = {"role": "assistant", "content": "".join(pieces)}
        if calls:  # OpenAI's shape: content null when the answer is only calls
            message = {"role": "assistant", "content": message["content"] or None,
                       "tool_calls": [call.to_dict() for call in calls]}
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
            "choices": [{"index": 0, "message": message,
                         "logprobs": None if logprobs is None else {"content": content, "refusal": None},
                         "finish_reason": event.finish_reason}],
            "usage": usage(prompt_tokens, event.completion_tokens, event.cached_tokens), "timings": event.timings,
            **({"warnings": list(warnings)} if warnings else {})})

    async def sse_events(self, ticket: Ticket, completion_id: str, prompt_tokens: int,
                         include_usage: bool, logprobs: int | None = None, warnings: tuple = ()):
        """The answer as chat.completion.chunk events, ending in ``data: [DONE]`` (or an error event); the chunk
        with the finish_reason carries the `warnings` (as whole_answer's "warnings") when there are any.

        With logprobs, each event carries the entries of the tokens whose text it brings (a token whose text
        is held back, such as part of a character, rides on the next event). A tool call is sent whole, when
        its block closes, as OpenAI's deltas: ``delta.tool_calls`` [{index, id, type, function: {name,
        arguments: ""}}], then [{index, function: {arguments}}]."""
        created = int(time.time())
        pending: list = []  # logprobs entries not yet sent
        calls = 0  # tool calls sent

        def event(choices: list, **extra) -> str:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": self.model_name, "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                payload["usage"] = None
            return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"

        def choice(delta: dict, finish=None) -> list:
            entries = None
            if logprobs is not None and ("content" in delta or "tool_calls" in delta or finish):
                entries = {"content": pending[:], "refusal": None}
                pending.clear()
            return [{"index": 0, "delta": delta, "logprobs": entries, "finish_reason": finish}]

        try:
            yield event(choice({"role": "assistant", "content": ""}))
            while not isinstance(item := await ticket.next(), worker.Finished):
                pending += self.logprobs_content(item)
                if item.text:
                    yield event(choice({"content": item.text}))
                for call in item.tool_calls or []:
                    yield event(choice({"tool_calls": [{"index": calls, "id": call.id, "type": "function",
                                                        "function": {"name": call.name, "arguments": ""}}]}))
                    yield event(choice({"tool_calls": [{"index": calls, "function": {"arguments": call.arguments}}]}))
                    calls += 1
            yield event(choice({}, item.finish_reason), **({"warnings": list(warnings)} if warnings else {}))
            if include_usage:
                yield event([], usage=usage(prompt_tokens, item.completion_tokens, item.cached_tokens), timings=item.timings)
            yield "data: [DONE]\n\n"
        except Cancelled:
            return
        except Exception as e:
            yield "data: " + json.dumps(error_answer(e)[1]) + "\n\n"
        finally:
            ticket.cancel()  # a no-op once it has ended; stops it if the client went away mid-stream

    async def models(self, request: Request) -> Response:
        check_auth(request, self.config.api_key)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model_info(self, request: Request) -> Response:
        check_auth(request, self.config.api_key)
        if request.path_params["model"] != self.model_name:
            raise NotFound(f"model {request.path_params['model']!r} is not served here", param="model",
                           code="model_not_found")
        return JSONResponse(self.model_card())

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "vlm-core",
                "max_context": self.vlm.max_context}

    async def health(self, request: Request) -> Response:
        engine = self.vlm.engine.stats() if hasattr(self.vlm, "engine") else None
        return JSONResponse({"status": "ok", "model": self.model_name, "parallel": self.scheduler.workers,
                             "active": self.scheduler.running, "queued": self.scheduler.queued,
                             "max_queue": self.scheduler.max_queue, "auth": bool(self.config.api_key),
                             "stats": self.scheduler.stats, "engine": engine})

    async def page(self, request: Request) -> Response:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})


def create_app(config: ServeConfig, vlm=None) -> Starlette:
    """The Starlette app for `config`; loads the model unless `vlm` is given."""
    if vlm is None:
        from vlm_core.runtime.model import VisionLanguageModel

        vlm = VisionLanguageModel(config.model, threads=config.threads, parallel=config.parallel,
                                  prefill_chunk=config.prefill_chunk, cache_mb=config.cache_mb,
                                  batch_invariant=config.batch_invariant, jump_forward=config.jump_forward,
                                  prepacked_cache=config.prepacked_cache)
    vlm.family.check_pixel_budget(config.min_pixels, config.max_pixels, PIXEL_FLAGS)  # against the model's context
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice that. Our own header checks (--max-image-pixels for
    # images, MAX_FRAME_PIXELS for video frames) must come first, with their messages naming the size, so PIL's
    # process-wide guard is never set below either.
    Image.MAX_IMAGE_PIXELS = max(config.max_image_pixels, MAX_FRAME_PIXELS)
    scheduler = Scheduler(config.workers, config.max_queue, config.timeout)
    server = ChatServer(config, vlm, scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model_info, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    handlers = {error_type: starlette_error for error_type in (*ERRORS, HTTPException, Exception)}
    middleware = [] if not config.cors_origins else [  # CORS: none unless asked for (--cors-origin)
        Middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                   allow_headers=["Authorization", "Content-Type"])]
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan, middleware=middleware)
    app.state.vlm, app.state.scheduler, app.state.config = vlm, scheduler, config
    app.state.metrics = metrics.install(app, server)  # /metrics
    return app
