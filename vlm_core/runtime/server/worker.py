"""A typed request + its images and videos -> the events of one generation, run on a scheduler worker thread.

    events = run(vlm, chat, encoded_images, max_image_pixels=40_000_000, default_max_tokens=512,
                 videos=encoded_videos, video=VideoOptions(fps=2))
    # Prepared(prompt_tokens), GenerationChunk..., Finished(finish_reason, completion_tokens, timings)

`generate` is the boundary a batched engine plugs into: it receives decoded images and videos' bytes, drives
`vlm.prepare` (which samples and decodes the frames: CPU work, here on the worker thread), submits the prompt
with the request's checked options (`vlm.submit`) and reads the sequence's chunks; everything before it
(parsing, fetching, header checks) ran off the worker, and everything after it (HTTP, SSE) reads the events.
The scheduler closes the generator when a job is cancelled or times out, which cancels the sequence: the
engine frees its KV row at its next step.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from vlm_core.errors import ContextLengthError, ParameterError, UserError
from vlm_core.kernels.image import describe_source
from vlm_core.models.media import UnsupportedMedia
from vlm_core.runtime.output.result import ResultAccumulator, summarize_timings
from vlm_core.runtime.server.images import EncodedImage, decode_image
from vlm_core.runtime.server.schema import ChatRequest
from vlm_core.runtime.server.videos import EncodedVideo, as_request_error


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The prompt is ready and fits the context: the first event, before any token."""

    prompt_tokens: int
    # what was done to the input that the client should know (images scaled down to fit the context)
    warnings: tuple = ()


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event: why the answer ended, how many tokens it has, and its timings (seconds, tokens/s)."""

    finish_reason: str
    completion_tokens: int
    timings: dict
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


def reads_video(vlm) -> bool:
    """Whether the model's family reads clips (its `reads_video`: Qwen3-VL does, MiniGPT-4 reads single images)."""
    return bool(vlm.family.reads_video)


def run(vlm, request: ChatRequest, images: list[EncodedImage], max_image_pixels: int,
        default_max_tokens: int, videos: list[EncodedVideo] = (), video=None) -> Iterator:
    """Decode the request's images (here, on the worker thread: decoding is CPU work), then `generate` (whose
    `prepare` decodes the videos' frames)."""
    decoded = [decode_image(image, max_image_pixels) for image in images]
    yield from generate(vlm, request, decoded, default_max_tokens, videos, video)


def generate(vlm, request: ChatRequest, images: list, default_max_tokens: int, videos: list[EncodedVideo] = (),
             video=None) -> Iterator:
    """Prepare the prompt, fit max_tokens to it, and stream the answer. The request's options were checked by
    the schema and their grammar compiled by the app: nothing here checks them again.

    Args:
        vlm: the loaded VisionLanguageModel.
        request: the validated request.
        images: decoded RGB PIL images, in `request.images` order.
        default_max_tokens: max_tokens when the request gives none (cut to what the context leaves).
        videos: the videos' bytes (container already probed), in `request.videos` order.
        video: the clips' budget (models.media.VideoOptions), or None for the model's defaults.
    Yields:
        Prepared, then GenerationChunk (the engine's text deltas), then Finished.
    Raises:
        ParameterError: the prompt cannot be built or does not fit the context; a video error names the
            video's field when it can tell which (code invalid_video).
    """
    try:
        prompt = _prepare(vlm, request, images, videos, video)
    except UnsupportedMedia as e:  # the app refuses video for a family without it first; this is the backstop
        raise ParameterError(str(e), param=request.videos[0].param if request.videos else "messages",
                             code="unsupported_media") from None
    except (UserError, ValueError) as e:  # an image the family cannot take, a template error: about the messages
        raise _about_the_messages(e, request, images) from None
    prompt_tokens = int(len(prompt.input_ids))
    options = dataclasses.replace(request.options, max_new_tokens=_max_tokens(vlm, request, prompt_tokens,
                                                                               default_max_tokens))
    yield Prepared(prompt_tokens, tuple(prompt.warnings))

    answer, sequence = ResultAccumulator(), vlm.submit(prompt, options)
    try:
        for chunk in sequence.chunks():  # the engine's outbox, read here directly
            answer.add(chunk)
            yield chunk
    finally:
        sequence.cancel()  # closed early (client gone, timeout): the engine frees the row at its next step
    summary = summarize_timings(sequence.timings, 0.0)
    summary.pop("load_s", None)
    yield Finished(answer.finish_reason, answer.completion_tokens, summary, sequence.cached_tokens)


def _about_the_messages(error: Exception, request: ChatRequest, images: list) -> ParameterError:
    """A prompt-building error as a ParameterError about the messages: naming the image part it is about when
    its message begins with that image's name (kernels.image.describe_source, ``<PIL image RGB 4000x2>: ...``)
    and no other image has that name; else the messages field the error names, else ``messages``."""
    message, param = str(error), getattr(error, "param", None)
    if not (param and param.startswith("messages")):
        param = "messages"
    names = [describe_source(image) for image in images]
    for name, source in zip(names, request.images):
        if message.startswith(name + ": ") and names.count(name) == 1:
            message, param = f"{source.param}: {message.removeprefix(name + ': ')}", source.param
    return ParameterError(message, param=param, code=getattr(error, "code", None))


def _prepare(vlm, request: ChatRequest, images: list, videos: list[EncodedVideo], video):
    """`vlm.prepare` on the request's messages with its media in place. With videos, frames are sampled within
    `video` and clips that cannot fit the context with max_tokens (or one token, when the server picks
    max_tokens) are refused before decoding. Without a max_pixels (the request's or --max-pixels), images that
    would not fit the context beside the text and max_tokens (or the model's ANSWER_ROOM) are scaled down, and
    the prompt's warnings say so."""
    messages = request.engine_messages(images, [v.data for v in videos])
    tools = request.options.tools
    if not videos:
        return vlm.prepare(messages, tools=tools, **request.image_budget,
                           max_new_tokens=request.options.max_new_tokens or 0)
    with as_request_error(list(videos)):
        return vlm.prepare(messages, tools=tools, video=video, **request.image_budget,
                           max_new_tokens=request.options.max_new_tokens or max(request.options.min_new_tokens, 1))


def _max_tokens(vlm, request: ChatRequest, prompt_tokens: int, default_max_tokens: int) -> int:
    """The request's max_tokens (or the default, within the context); refuses what cannot fit."""
    max_tokens = request.options.max_new_tokens
    if max_tokens is None:
        max_tokens = min(default_max_tokens, vlm.max_context - prompt_tokens)
        if max_tokens < 1:
            max_tokens = default_max_tokens  # let check_context explain
    if request.options.min_new_tokens > max_tokens:  # only when the server picked max_tokens
        raise ParameterError(f"'min_tokens' ({request.options.min_new_tokens}) is larger than max_tokens "
                             f"({max_tokens})", param="min_tokens")
    try:
        vlm.check_context(prompt_tokens, max_tokens)
    except ContextLengthError:
        media = " or shorter videos (video_fps, video_max_frames, video_max_pixels)" if request.videos else ""
        raise ParameterError(
            f"this model's context is {vlm.max_context} tokens; the messages take {prompt_tokens} tokens and "
            f"max_tokens is {max_tokens}: together {prompt_tokens + max_tokens}. Shorten the messages, send "
            f"fewer or smaller images (max_pixels){media}, or lower max_tokens", param="messages",
            code="context_length_exceeded") from None
    return max_tokens
