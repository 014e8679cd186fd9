"""Chat messages, normalised once: the format transformers' processors take (plain strings, text / image /
video parts, OpenAI-style image_url / video_url parts), checked and turned into the messages the template
renders plus the images and videos in prompt order.

Every error is a ParameterError naming `messages` and the exact place (`messages[0].content[1]`).
Serve-time module: no torch, no transformers.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from vlm_core.errors import ParameterError
from vlm_core.models.media import VideoPart
from vlm_core.runtime.checks import check_text

__all__ = ["build_user_messages", "conversation", "message_error", "normalize_messages", "openai_image_part"]

# Part types a message's list content may hold (after normalization).
_TEXT_TYPES = ("text",)
_IMAGE_TYPES = ("image", "image_url")
_VIDEO_TYPES = ("video", "video_url")
# Keys a video part's source is read from (transformers' processors take "video", "url" and "path")
_VIDEO_SOURCE_KEYS = ("video", "url", "path", "base64")
# Keys transformers' processor reads an image block's source from, in its order
# (ProcessorMixin._multimodal_inputs_from_conversations).
_IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")



def _to_dicts(value: Any) -> Any:
    """Message objects (dataclasses, pydantic models) -> dicts; media left untouched."""
    if isinstance(value, Mapping):
        return {k: _to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _to_dicts(value.model_dump())
    return value



def conversation(messages: Any) -> list[dict]:
    messages = _to_dicts(getattr(messages, "messages", messages))
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise message_error(f"messages must be a list of message dicts, got {type(messages).__name__}")
    return messages


def openai_image_part(part: Mapping[str, Any]) -> dict:
    """``{"type": "image_url", "image_url": {"url": u}}`` -> ``{"type": "image", "url": u}``
    (exactly what ProcessorMixin._normalize_conversations does)."""
    info = part["image_url"]
    url = info.get("url", "") if isinstance(info, Mapping) else info
    return {"type": "image", "url": url}



def _where(i: int, j: int | None = None) -> str:
    return f"messages[{i}]" + (f".content[{j}]" if j is not None else "")


def message_error(text: str) -> ParameterError:
    """An error in the `messages` argument (a UserError and a ValueError); `text` says where and what."""
    return ParameterError(text, "messages")


def _image_source(part: Mapping[str, Any], where: str) -> Any:
    keys = [k for k in _IMAGE_SOURCE_KEYS if k in part]
    if not keys:
        raise message_error(
            f"{where}: image part has no image source; give one of "
            f"{', '.join(repr(k) for k in _IMAGE_SOURCE_KEYS)} (or 'image_url': {{'url': ...}})"
        )
    if len(keys) > 1:
        raise message_error(f"{where}: image part has several image sources ({', '.join(map(repr, keys))}); "
                           f"give exactly one")
    source = part[keys[0]]
    if isinstance(source, str) and not source:
        raise message_error(f"{where}: image part has an empty {keys[0]!r}")
    if keys[0] == "base64" and isinstance(source, str) and source[:5].lower() != "data:":
        source = "data:;base64," + source  # bare base64 (transformers decodes it too): one decoder for both
    return source


def _openai_video_url(part: Mapping[str, Any]) -> dict:
    """``{"type": "video_url", "video_url": {"url": u}}`` (vLLM's spelling) -> ``{"type": "video", "url": u}``."""
    info = part["video_url"]
    return {"type": "video", "url": info.get("url", "") if isinstance(info, Mapping) else info}


def _video_source(part: Mapping[str, Any], where: str) -> Any:
    keys = [k for k in _VIDEO_SOURCE_KEYS if k in part]
    if len(keys) != 1:
        raise message_error(
            f"{where}: video part needs exactly one source, one of {', '.join(repr(k) for k in _VIDEO_SOURCE_KEYS)} "
            f"(or 'video_url': {{'url': ...}})" + (f"; it has {keys}" if keys else ""))
    source = part[keys[0]]
    if isinstance(source, str) and not source:
        raise message_error(f"{where}: video part has an empty {keys[0]!r}")
    if isinstance(source, (list, tuple)) and not source:
        raise message_error(f"{where}: video part has an empty frame list")
    if keys[0] == "base64" and isinstance(source, str) and source[:5].lower() != "data:":
        source = "data:;base64," + source
    return source


def _part_type(part: Mapping[str, Any], where: str) -> str:
    ptype = part.get("type")
    if ptype is None:
        # The chat templates also recognize parts by key; infer the type the same way.
        found = [k for k in ("text", "image", "image_url", "video", "video_url") if k in part]
        if len(found) != 1:
            raise message_error(
                f"{where}: content part has no 'type' "
                + ("and no 'text'/'image'/'image_url' key" if not found else f"and is ambiguous (keys {found})")
            )
        ptype = found[0]
    if not isinstance(ptype, str):
        raise message_error(f"{where}: content part 'type' must be a string, got {ptype!r}")
    return ptype


def _check_message_text(message: Mapping[str, Any], i: int) -> None:
    """Refuse a lone surrogate in any text of a normalized message (role, content, text parts and other
    fields the template may render): the tokenizer cannot take one. Image parts are skipped (a file
    name may hold any bytes)."""

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str):
            check_text(value, where, param="messages")
        elif isinstance(value, Mapping):
            if value.get("type") in ("image", "video"):
                return
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, (list, tuple)):
            for k, item in enumerate(value):
                walk(item, f"{where}[{k}]")

    walk(message, _where(i))


def normalize_messages(messages: Any) -> tuple[list[dict], list[Any]]:
    """Validate a conversation and split out its images, the way transformers' processor does.

    Accepts messages ``{"role": str, "content": str | list[part] | None, ...}`` whose parts are
    ``{"type": "text", "text": str}`` or an image given as ``{"type": "image", "image": <path, URL,
    PIL image or array>}``, ``{"type": "image", "url": ...}``, ``{"type": "image", "path": ...}``,
    ``{"type": "image", "base64": ...}`` or OpenAI-style ``{"type": "image_url", "image_url":
    {"url": ...}}`` (or ``"image_url": "..."``). A part without ``"type"`` is typed by its key.

    A video is ``{"type": "video", "video" | "path" | "url" | "base64": ...}`` (a file, a data: URL,
    a list of frames or a [T, H, W, 3] array) or ``{"type": "video_url", "video_url": {"url": ...}}``.

    Returns ``(messages_for_template, media_sources)``: deep-copied messages with ``None``-valued
    keys dropped, parts typed, and image_url parts rewritten to ``{"type": "image", "url": u}``
    (as the processor does before rendering; video_url parts likewise to ``{"type": "video", ...}``);
    and the image sources in conversation order, i.e. the order of the placeholders the template
    emits, each video's source wrapped in a ``models.media.VideoPart``.

    A bare ``base64`` string is passed on as a ``data:`` URL; the engine decodes ``data:`` URLs.

    Raises ``ParameterError`` (a UserError and a ValueError, ``param == "messages"``) naming the
    offending message/part for: an empty conversation, a non-dict message, a missing or non-string
    role, content that is neither a string nor a list, a part that is not a dict, an unknown part
    type, a text part without a string ``text``, an image or video part without exactly one source, and text holding a lone surrogate (not valid Unicode).
    """
    chat = conversation(messages)
    if len(chat) == 0:
        raise message_error("messages is empty; give at least one message")
    out_messages: list[dict] = []
    images: list[Any] = []
    for i, message in enumerate(chat):
        if not isinstance(message, Mapping):
            raise message_error(f"{_where(i)}: a message must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        if "role" not in message:
            raise message_error(f"{_where(i)}: message has no 'role' (keys: {sorted(map(str, message))})")
        if not isinstance(message["role"], str) or not message["role"]:
            raise message_error(f"{_where(i)}: 'role' must be a non-empty string, got {message['role']!r}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            out_messages.append(message)
            continue
        if isinstance(content, Mapping) or not isinstance(content, (list, tuple)):
            raise message_error(
                f"{_where(i)}: 'content' must be a string or a list of parts, got {type(content).__name__}"
            )
        parts = []
        for j, part in enumerate(content):
            where = _where(i, j)
            if not isinstance(part, Mapping):
                raise message_error(f"{where}: a content part must be a dict like {{'type': 'text', 'text': ...}}, got {part!r:.80}")
            part = {k: v for k, v in part.items() if v is not None}
            ptype = _part_type(part, where)
            if ptype in _TEXT_TYPES:
                if not isinstance(part.get("text"), str):
                    raise message_error(f"{where}: text part needs a string 'text', got {part.get('text')!r}")
                part["type"] = "text"
            elif ptype == "image_url":
                if "image_url" in part:
                    part = openai_image_part(part)
                    if not part["url"]:
                        raise message_error(f"{where}: image_url part has no 'url'")
                else:
                    part["type"] = "image"
                images.append(_image_source(part, where))
            elif ptype == "image":
                if "image_url" in part and not any(k in part for k in _IMAGE_SOURCE_KEYS):
                    part = openai_image_part(part)
                part["type"] = "image"
                images.append(_image_source(part, where))
            elif ptype in _VIDEO_TYPES:
                if "video_url" in part and not any(k in part for k in _VIDEO_SOURCE_KEYS):
                    part = _openai_video_url(part)
                    if not part["url"]:
                        raise message_error(f"{where}: video_url part has no 'url'")
                part["type"] = "video"
                images.append(VideoPart(_video_source(part, where)))
            else:
                raise message_error(f"{where}: unknown content part type {ptype!r} (expected 'text', 'image', "
                                   f"'image_url', 'video' or 'video_url')")
            parts.append(part)
        message["content"] = parts
        out_messages.append(message)
    for i, message in enumerate(out_messages):
        _check_message_text(message, i)
    return out_messages, images


def build_user_messages(prompt: str, images: Sequence[Any] = (), system: str | None = None) -> list[dict]:
    """Messages for the CLI's ``-p TEXT --image A --image B [--system S]``: an optional system
    message (only when `system` is given), then one user turn holding the images in the order
    given, followed by the text. Raises ParameterError naming `prompt` or `system` for a value that is
    not a str or holds a lone surrogate."""
    if not isinstance(prompt, str):
        raise ParameterError(f"prompt must be a string, got {type(prompt).__name__}", "prompt")
    check_text(prompt, "prompt")
    if isinstance(images, (str, bytes)):
        images = [images]
    messages: list[dict] = []
    if system is not None:
        if not isinstance(system, str):
            raise ParameterError(f"system must be a string, got {type(system).__name__}", "system")
        check_text(system, "system")
        messages.append({"role": "system", "content": system})
    content = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": prompt})
    messages.append({"role": "user", "content": content})
    return messages


