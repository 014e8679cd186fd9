"""The chat-completions request schema: a JSON body -> a typed ChatRequest, in one place.

Every refusal is a ParameterError whose `param` names the JSON field at fault, as a path
(``messages[0].content[1].image_url``), so the client sees what to fix. Nothing here touches HTTP,
images' bytes or the model, except `make_sampling`, which merges the request's sampling fields over
the model's generation_config defaults.

    chat = parse_chat_request(parse_json(body_bytes), max_images=8, max_videos=4)
    chat.images          # [ImageURL(url, param)], in the order they appear
    chat.videos          # [VideoURL(url, param)]: video_url parts and transformers' {"type": "video", "video": url}
    chat.engine_messages(decoded_images, video_bytes)   # the engine's message format, media in place
"""
from __future__ import annotations

import dataclasses
import json
import math

from vlm_core.errors import ParameterError, UserError

MAX_STOP_STRINGS = 4
MAX_JSON_DEPTH = 64  # a chat request needs 6; a response_format JSON schema a few more per nesting level
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
# --max-images / --max-videos bound a request's new turn; a whole conversation, resent, may hold this many times more
HISTORY_MEDIA_FACTOR = 8


@dataclasses.dataclass(frozen=True)
class ImageURL:
    """An image_url value from the request, not yet fetched or decoded."""

    url: str
    param: str  # where it is in the body, for error messages


@dataclasses.dataclass(frozen=True)
class VideoURL:
    """A video_url value (or a video part's URL) from the request, not yet fetched or probed."""

    url: str
    param: str


# Request fields of the video budget -> models.media.VideoOptions fields.
VIDEO_FIELDS = {"video_fps": "fps", "video_max_frames": "max_frames", "video_max_pixels": "max_pixels"}
# Request fields of the image budget (each image's area after resizing; `vlm.prepare`'s arguments of the same names).
PIXEL_FIELDS = ("min_pixels", "max_pixels")


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request: the media to fetch, the messages, and the API's GenerationOptions.

    `messages` are in the engine's format (``{"role", "content": str | [parts]}``) with each image (video)
    part holding the index of its entry in `images` (`videos`) until `engine_messages` puts them in place.
    """

    messages: list
    images: list  # [ImageURL]
    videos: list = dataclasses.field(default_factory=list)  # [VideoURL]
    # the request's video budget: the VideoOptions fields it gave (fps, max_frames, max_pixels); the server's
    # --video-* defaults fill the others
    video: dict = dataclasses.field(default_factory=dict)
    # the image budget in force: min_pixels / max_pixels, the request's over the server's --min/--max-pixels
    # (absent: the model's own)
    image_budget: dict = dataclasses.field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    # the generation options, checked (runtime/request.py); max_new_tokens None: the server's default within the
    # context. The app compiles their grammar before queueing.
    options: object = None

    def engine_messages(self, images: list, videos: list = ()) -> list:
        """The messages with image indices replaced by `images` (decoded, in `self.images` order) and video
        indices by `videos` (their bytes, in `self.videos` order)."""
        media = {"image": images, "video": videos}
        messages = []
        for message in self.messages:
            content = message["content"]
            if isinstance(content, list):
                content = [{"type": p["type"], p["type"]: media[p["type"]][p[p["type"]]]} if p["type"] in media
                           else p for p in content]
            messages.append({**message, "content": content})
        return messages


def parse_json(body: bytes):
    """The request body's bytes -> a JSON value whose every string is valid Unicode, at most MAX_JSON_DEPTH deep.

    Bytes that are not UTF-8 are decoded as lone surrogates (``surrogateescape``) so that, like a JSON
    escape of a lone surrogate (``"\\ud800"``), they are refused by the field they are in rather than
    reaching the tokenizer. Raises ParameterError (a 400) for all of it, never RecursionError.
    """
    text = body.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # the C decoder recurses once per level
        raise UserError(f"the request body's JSON is nested too deeply (more than {MAX_JSON_DEPTH} levels)",
                           code="json_too_deep") from None
    check_json(value)
    return value


def check_json(value) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings that are not valid Unicode, naming where.

    Iterative, so no depth can exhaust the stack here."""
    stack = [(value, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise ParameterError(f"the request body's JSON is nested too deeply (more than {MAX_JSON_DEPTH} levels, "
                               f"at {path or 'the top'})", param=path or None, code="json_too_deep")
        if isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
            continue
        for key, item in value.items():
            field = f"{path}.{key}" if path else key
            if not _is_unicode(key):
                raise ParameterError(f"a key in {path or 'the request body'} is not valid UTF-8 text (invalid "
                                   f"bytes or a lone surrogate); send UTF-8", param=path or None,
                                   code="invalid_text")
            stack.append((item, field, depth + 1))


def _is_unicode(text: str) -> bool:
    """False when `text` holds a lone surrogate (a JSON escape like \\ud800, or an invalid byte decoded)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(text: str, param: str) -> None:
    if not _is_unicode(text):
        at = next(i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff")
        raise ParameterError(f"{param or 'the request body'} is not valid UTF-8 text: invalid bytes or a lone "
                           f"surrogate (such as \\ud800) at character {at}; send UTF-8 text", param=param or None,
                           code="invalid_text")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _get(body: dict, name: str, check, expected: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise ParameterError(f"'{name}' must be {expected}, got {json.dumps(value)[:80]}", param=name)
    return value


def parse_messages(raw, max_images: int, max_videos: int = 4) -> tuple[list, list, list]:
    """OpenAI messages -> (engine messages with image and video indices, [ImageURL], [VideoURL]).

    A chat client resends a conversation's earlier images and videos with each turn (the prefix and image-feature
    caches hold their work), so `max_images` / `max_videos` bound the new turn, the messages after the last
    assistant message, and the whole conversation may hold HISTORY_MEDIA_FACTOR times more."""
    if not isinstance(raw, list) or not raw:
        raise ParameterError("'messages' must be a non-empty list of message objects", param="messages")
    messages, images, videos = [], [], []
    earlier = (0, 0)  # images and videos before the new turn
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if isinstance(message, dict) and message.get("role") == "assistant":
            earlier = (len(images), len(videos))
        if not isinstance(message, dict):
            raise ParameterError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise ParameterError(f"{where}.role must be 'system', 'developer', 'user', 'assistant' or 'tool', got "
                               f"{json.dumps(role)[:40]}", param=f"{where}.role")
        if message.get("function_call"):
            raise ParameterError(f"{where}.function_call (the deprecated form) is not supported; use 'tool_calls'",
                               param=f"{where}.function_call", code="unsupported_parameter")
        extra = _tool_fields(message, role, where)
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise ParameterError(f"{where}.name must be a string, got {json.dumps(message['name'])[:40]}",
                                 param=f"{where}.name")
        content = message.get("content")
        if role == "user" and content in (None, "", []):
            raise ParameterError(f"{where}.content is {json.dumps(content)}: a user message needs text, an image or "
                                 f"a video", param=f"{where}.content")
        if content is None:
            content = ""
        if isinstance(content, str):
            messages.append({"role": role, "content": content, **extra})
            continue
        if not isinstance(content, list):
            raise ParameterError(f"{where}.content must be a string or a list of content parts",
                               param=f"{where}.content")
        parts = [_parse_part(part, f"{where}.content[{j}]", role, images, videos,
                             HISTORY_MEDIA_FACTOR * max_images, HISTORY_MEDIA_FACTOR * max_videos)
                 for j, part in enumerate(content)]
        messages.append({"role": role, "content": parts, **extra})
    for kind, items, before, most in (("image", images, earlier[0], max_images),
                                      ("video", videos, earlier[1], max_videos)):
        if len(items) - before > most:
            raise ParameterError(f"too many {kind}s: {len(items) - before} in the new messages, at most {most} per "
                                 f"request (--max-{kind}s); send fewer at once", param="messages",
                                 code=f"too_many_{kind}s")
    return messages, images, videos


def _tool_fields(message: dict, role: str, where: str) -> dict:
    """An assistant message's `tool_calls` (OpenAI's shape, arguments a JSON string) or a tool message's
    `tool_call_id`, checked; passed to the chat template as given."""
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise ParameterError(f"{where}.tool_call_id must be a string: the id of the assistant's tool call this "
                                 f"message answers", param=f"{where}.tool_call_id")
        return {"tool_call_id": call_id}
    calls = message.get("tool_calls")
    if not calls:
        return {}
    if role != "assistant" or not isinstance(calls, list):
        raise ParameterError(f"{where}.tool_calls must be a list, in an assistant message", param=f"{where}.tool_calls")
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), (str, dict))):
            raise ParameterError(f"{where}.tool_calls[{k}] must be {{\"id\", \"type\": \"function\", \"function\": "
                               f"{{\"name\", \"arguments\"}}}}", param=f"{where}.tool_calls[{k}]")
    return {"tool_calls": calls}


def _parse_part(part, where: str, role: str, images: list, videos: list, most_images: int, most_videos: int) -> dict:
    """One content part -> the engine's part; an image (video) part is appended to `images` (`videos`) and refers
    to it by index. A conversation may hold `most_images` (`most_videos`) in all."""
    if not isinstance(part, dict):
        raise ParameterError(f"{where} must be an object with a 'type'", param=where)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ParameterError(f"{where}.text must be a string", param=f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        if role != "user":
            raise ParameterError(f"{where}: images are only accepted in user messages", param=where)
        info = part.get("image_url")
        url = info.get("url") if isinstance(info, dict) else info
        if not isinstance(url, str) or not url:
            raise ParameterError(f"{where}.image_url.url must be a non-empty string", param=f"{where}.image_url")
        images.append(ImageURL(url, f"{where}.image_url"))
        _check_history_count("image", len(images), most_images, where)
        return {"type": "image", "image": len(images) - 1}
    if kind in ("video_url", "video"):
        if role != "user":
            raise ParameterError(f"{where}: videos are only accepted in user messages", param=where)
        videos.append(_video_url(part, kind, where))
        _check_history_count("video", len(videos), most_videos, where)
        return {"type": "video", "video": len(videos) - 1}
    raise ParameterError(f"{where}.type must be 'text', 'image_url', 'video_url' or 'video', got "
                       f"{json.dumps(kind)[:40]}", param=f"{where}.type")


def _check_history_count(kind: str, count: int, most: int, where: str) -> None:
    """Refuse the conversation's `count`-th image or video past `most` (HISTORY_MEDIA_FACTOR x the flag)."""
    if count > most:
        raise ParameterError(f"too many {kind}s: the conversation holds more than {most} ({HISTORY_MEDIA_FACTOR} x "
                             f"--max-{kind}s); start a new conversation (the chat page's 'new chat')", param=where,
                             code=f"too_many_{kind}s")


def _video_url(part: dict, kind: str, where: str) -> VideoURL:
    """A video part's URL: ``{"type": "video_url", "video_url": {"url": U}}`` (vLLM's spelling, also a bare
    string) or transformers' ``{"type": "video", "video": U}`` (or ``"url": U``). Local paths (``"path"``) and
    frame lists are refused: a request's media come only from its own bytes."""
    if kind == "video_url":
        info = part.get("video_url")
        url, field = (info.get("url") if isinstance(info, dict) else info), "video_url"
    else:
        keys = [k for k in ("video", "url", "path") if k in part]
        if keys == ["path"]:
            raise ParameterError(f"{where}.path: file paths are never read; send the video inline as a data: URL "
                               f"(data:video/mp4;base64,...)", param=f"{where}.path", code="invalid_video_url")
        if len(keys) != 1:
            raise ParameterError(f"{where} must hold the video's URL in 'video' (or 'url')", param=where)
        url, field = part[keys[0]], keys[0]
    if not isinstance(url, str) or not url:
        expected = "video_url.url" if kind == "video_url" else field
        raise ParameterError(f"{where}.{expected} must be a non-empty string: a data: URL (data:video/mp4;base64,...)",
                           param=f"{where}.{field}")
    return VideoURL(url, f"{where}.{field}")


# The generation parameters by their JSON fields (errors name what the client sent).
SERVER_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop": "stop",
                "logprobs": "top_logprobs", "response_format": "response_format", "tools": "tools",
                "batch_invariant": "batch_invariant", "jump_forward": "jump_forward"}


def parse_chat_request(body, max_images: int, max_videos: int = 4, generation_defaults: dict | None = None,
                       image_budget: dict | None = None, check_pixel_budget=None) -> ChatRequest:
    """A parsed JSON body -> ChatRequest, checked once: its `options` are the API's GenerationOptions (sampling
    over the model's generation_config `generation_defaults`), so nothing downstream checks them again; only
    the grammar is compiled later, by the app (it needs the model). Refuses unsupported OpenAI fields by name.

    `image_budget` is the server's ({"min_pixels", "max_pixels"}, from --min-pixels / --max-pixels), and
    `check_pixel_budget(min_pixels, max_pixels)` the model family's check of the budget in force."""
    from vlm_core.runtime.request import check_options

    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    messages, images, videos = parse_messages(body.get("messages"), max_images, max_videos)
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    stream_options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ParameterError(f"'stream_options.include_usage' must be true or false, got "
                             f"{json.dumps(include_usage)[:40]}", param="stream_options.include_usage")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ParameterError("give 'max_completion_tokens' or 'max_tokens' (its older name), not both",
                             param="max_tokens")
    length_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, length_field, _is_int, "an integer", None)
    min_tokens = _get(body, "min_tokens", _is_int, "an integer", 0)
    _refuse_unsupported(body)
    # an extension field: this request's tokens must not depend on its batch (None: the server's --batch-invariant)
    invariant = _get(body, "batch_invariant", lambda v: isinstance(v, bool), "true or false", None)
    # an extension field: false decodes the tokens a grammar forces one step each (None: the server's default)
    jump = _get(body, "jump_forward", lambda v: isinstance(v, bool), "true or false", None)
    video = _parse_video_budget(body)
    if video and not videos:
        name = next(name for name, field in VIDEO_FIELDS.items() if field in video)
        raise ParameterError(f"'{name}' is set but the request holds no video; leave it out, or add a video part",
                             param=name)
    pixels = _parse_image_budget(body, images, image_budget or {}, check_pixel_budget)
    options = check_options(
        make_sampling(_parse_sampling(body), generation_defaults or {}), max_tokens, min_tokens,
        _parse_stop(body.get("stop")), _parse_logprobs(body), body.get("response_format"), body.get("tools"),
        body.get("tool_choice"),
        _get(body, "parallel_tool_calls", lambda v: isinstance(v, bool), "true or false", True),
        batch_invariant=invariant, names={**SERVER_NAMES, "max_new_tokens": length_field}, jump_forward=jump)
    return ChatRequest(messages=messages, images=images, videos=videos, video=video, image_budget=pixels,
                       stream=stream, include_usage=include_usage,
                       model=_get(body, "model", lambda v: isinstance(v, str), "a string", None), options=options)


def _parse_video_budget(body: dict) -> dict:
    """video_fps, video_max_frames, video_max_pixels (extensions; each optional) -> the VideoOptions fields given.
    A value that is not a positive number (a whole one for frames and pixels) is refused naming its field."""
    from vlm_core.models.media import VideoOptions

    budget = {}
    for name, field in VIDEO_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        try:
            VideoOptions(**{field: value}).check({field: f"'{name}'"})
        except ValueError as e:
            raise ParameterError(str(e), param=name) from None
        budget[field] = value if field == "fps" else int(value)
    return budget


def _parse_image_budget(body: dict, images: list, server: dict, check) -> dict:
    """min_pixels / max_pixels (extensions, as the CLI's --min-pixels / --max-pixels: each image's area after
    resizing) over the server's budget -> the budget in force. A request may lower the server's --max-pixels,
    never raise it; `check` (the family's check_pixel_budget) refuses what the model cannot take."""
    given = {name: _get(body, name, lambda v: _is_int(v) and v >= 1, "a positive integer", None)
             for name in PIXEL_FIELDS}
    given = {name: value for name, value in given.items() if value is not None}
    if given and not images:
        name = next(iter(given))
        raise ParameterError(f"'{name}' is set but the request holds no image; leave it out, or add an image part",
                             param=name)
    most = server.get("max_pixels")
    if most is not None and given.get("max_pixels", 0) > most:
        raise ParameterError(f"'max_pixels' may lower this server's --max-pixels ({most}), not raise it; got "
                             f"{given['max_pixels']}", param="max_pixels")
    budget = {name: value for name, value in {**server, **given}.items() if value is not None}
    if given and check is not None:
        check(budget.get("min_pixels"), budget.get("max_pixels"))
    return budget


def _parse_logprobs(body: dict) -> int | None:
    """logprobs (true/false) and top_logprobs (0-20, only with logprobs) -> the top count, or None when off."""
    logprobs = _get(body, "logprobs", lambda v: isinstance(v, bool), "true or false", False)
    top = _get(body, "top_logprobs", _is_int, f"an integer from 0 to {MAX_TOP_LOGPROBS}", None)
    if top is not None and not logprobs:
        raise ParameterError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if logprobs else None


def _parse_stop(stop):
    """`stop` as given, its count bounded (the texts themselves are checked with the other options)."""
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise ParameterError(f"'stop' holds {len(stop)} strings; at most {MAX_STOP_STRINGS}", param="stop")
    return stop


def _refuse_unsupported(body: dict) -> None:
    """OpenAI fields this server does not implement: refused by name rather than silently ignored."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = _get(body, name, _is_number, "a number", 0)
        if value != 0:
            raise ParameterError(f"'{name}' is not supported by this server (only 0); use 'repetition_penalty' "
                               f"(> 1 discourages repeats) instead", param=name, code="unsupported_parameter")
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise ParameterError(f"'n' must be 1 (one answer per request), got {n}", param="n",
                           code="unsupported_parameter")
    if body.get("functions") or body.get("function_call"):
        name = "functions" if body.get("functions") else "function_call"
        raise ParameterError(f"'{name}' (the deprecated form of function calling) is not supported; use 'tools' and "
                           f"'tool_choice'", param=name, code="unsupported_parameter")
    if body.get("logit_bias"):
        raise ParameterError("'logit_bias' is not supported", param="logit_bias", code="unsupported_parameter")


SAMPLING_FIELDS = {
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "top_k": (_is_int, "an integer (0 or -1: off)"),
    "min_p": (_is_number, "a number"),
    "repetition_penalty": (_is_number, "a number"),
    "seed": (_is_int, "an integer"),
}


def _parse_sampling(body: dict) -> dict:
    """The sampling fields the request gave (types checked; ranges are SamplingParams', checked by make_sampling)."""
    sampling = {}
    for name, (check, expected) in SAMPLING_FIELDS.items():
        value = _get(body, name, check, expected, None)
        if value is not None:
            sampling[name] = value
    if sampling.get("top_k") == -1:  # vLLM's "off"
        sampling["top_k"] = 0
    return sampling


def make_sampling(explicit: dict, defaults: dict):
    """Request fields over the model's generation_config defaults, as the CLI does; temperature 0 is greedy.

    Returns: a validated kernels.sampling.SamplingParams. Raises ParameterError naming the field out of range.
    """
    from vlm_core.runtime.request import sampling_over_defaults

    try:
        return sampling_over_defaults(explicit, defaults, seed=explicit.get("seed"))
    except ValueError as e:  # names the field, as a SamplingParams field or a CLI flag ("--top-p ...")
        param = getattr(e, "param", None) or str(e).split(" ", 1)[0].lstrip("-").replace("-", "_")
        raise ParameterError(str(e).replace("--", "", 1), param=param) from None
