"""Chat-template rendering without transformers.

`render_chat` renders a Hugging Face chat template (``chat_template.jinja`` /
``chat_template.json``) with jinja2 exactly the way transformers 5.x
``ProcessorMixin.apply_chat_template(..., tokenize=False)`` does
(``transformers/utils/chat_template_utils.py``):

* ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
  extensions=[<generation tag>, jinja2.ext.loopcontrols])`` (``keep_trailing_newline``
  left at jinja2's default, False);
* the ``tojson`` filter is replaced by plain ``json.dumps`` (``ensure_ascii=False``, no
  HTML escaping, ``indent`` / ``separators`` / ``sort_keys`` options);
* globals ``raise_exception`` (raises ``jinja2.TemplateError``), ``strftime_now``,
  a restricted ``dict`` and an underscore-rejecting ``namespace``;
* ``{% generation %}...{% endgeneration %}`` blocks render their body unchanged;
* the template is called with ``messages``, ``tools``, ``documents``,
  ``add_generation_prompt`` and any extra variables (transformers passes the
  tokenizer's ``special_tokens_map`` -- ``eos_token``, ``pad_token``, ``bos_token``... --
  followed by the user's kwargs, e.g. ``add_vision_id=True``);
* the conversation is first normalized like the processor does: keys whose value is
  ``None`` are dropped, OpenAI ``{"type": "image_url", "image_url": {"url": u}}`` parts
  become ``{"type": "image", "url": u}``, everything is rebuilt from plain JSON types
  (images and arrays become inert ``"<Image>"`` / ``"<ndarray>"`` placeholders -- the
  templates only test the keys), and a message's reasoning given as
  ``reasoning_content`` / ``thinking`` / ``reasoning`` is copied under the first two names.

Compiled templates are cached per template string.

Serve-time module: depends on jinja2 and numpy only (no torch, no transformers).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlm_core.models.media import VideoPart

from vlm_core.runtime.checks import check_text
from vlm_core.runtime.errors import ParameterError

__all__ = [
    "build_user_messages",
    "compile_chat_template",
    "load_chat_template",
    "normalize_messages",
    "render_chat",
    "special_tokens_from_config",
]

# Part types a message's list content may hold (after normalization).
_TEXT_TYPES = ("text",)
_IMAGE_TYPES = ("image", "image_url")
_VIDEO_TYPES = ("video", "video_url")
# Keys a video part's source is read from (transformers' processors take "video", "url" and "path")
_VIDEO_SOURCE_KEYS = ("video", "url", "path", "base64")
# Keys transformers' processor reads an image block's source from, in its order
# (ProcessorMixin._multimodal_inputs_from_conversations).
_IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")
# Names a message's reasoning is passed under; the first is what templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Special-token attributes transformers exposes to templates via `special_tokens_map`.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# --------------------------------------------------------------------------------------
# jinja2 environment (mirrors transformers' _cached_compile_jinja_template)
# --------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}body{% endgeneration %}`` renders ``body`` (transformers' AssistantTracker
    only records the character span, which we do not need)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes (<, >, &, '); transformers replaces it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - name used by templates
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` for templates, without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2 `namespace` that refuses underscore-prefixed attributes (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile `template` in a transformers-compatible sandbox (cached per template string)."""
    if not isinstance(template, str):
        raise TypeError(f"chat template must be a str, got {type(template).__name__}")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def load_chat_template(path: str) -> str:
    """Read a chat template from ``chat_template.jinja`` (raw text) or ``chat_template.json`` /
    ``tokenizer_config.json`` / ``processor_config.json`` (the ``"chat_template"`` key).

    A json ``chat_template`` that is a list of ``{"name", "template"}`` entries yields the one
    named ``"default"``.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not str(path).endswith(".json"):
        return text
    data = json.loads(text)
    template = data.get("chat_template") if isinstance(data, dict) else None
    if template is None:
        raise ValueError(f"{path}: no 'chat_template' key")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{path}: several chat templates ({', '.join(map(str, named))}) and none is 'default'")
        template = named["default"]
    if not isinstance(template, str):
        raise ValueError(f"{path}: 'chat_template' is not a string")
    return template


def special_tokens_from_config(tokenizer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The template variables transformers derives from the tokenizer (`special_tokens_map`):
    ``bos_token``, ``eos_token``, ``pad_token``, ... as strings, for those set (not null) in a
    ``tokenizer_config.json`` dict. AddedToken dicts (``{"content": ...}``) are reduced to their content.
    """
    out: dict[str, Any] = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = tokenizer_config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if value is not None:
            out[key] = str(value)
    return out


# --------------------------------------------------------------------------------------
# Conversation normalization
# --------------------------------------------------------------------------------------


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


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON types; anything else becomes ``"<TypeName>"``
    (transformers' ``_plain_template_data``)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        # e.g. np.bool_(False) would otherwise become a truthy placeholder string
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _conversation(messages: Any) -> list[dict]:
    messages = _to_dicts(getattr(messages, "messages", messages))
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise _bad_message(f"messages must be a list of message dicts, got {type(messages).__name__}")
    return messages


def _openai_image_url(part: Mapping[str, Any]) -> dict:
    """``{"type": "image_url", "image_url": {"url": u}}`` -> ``{"type": "image", "url": u}``
    (exactly what ProcessorMixin._normalize_conversations does)."""
    info = part["image_url"]
    url = info.get("url", "") if isinstance(info, Mapping) else info
    return {"type": "image", "url": url}


def _template_messages(messages: Any) -> list[dict]:
    """What the processor hands to the template: None-valued keys dropped, OpenAI image_url
    parts converted; no validation (see `normalize_messages` for that)."""
    out = []
    for message in _conversation(messages):
        if not isinstance(message, Mapping):
            raise _bad_message(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [
                _openai_image_url(p) if isinstance(p, Mapping) and p.get("type") == "image_url" and "image_url" in p else p
                for p in content
            ]
        out.append(message)
    return out


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _where(i: int, j: int | None = None) -> str:
    return f"messages[{i}]" + (f".content[{j}]" if j is not None else "")


def _bad_message(text: str) -> ParameterError:
    """An error in the `messages` argument (a UserError and a ValueError); `text` says where and what."""
    return ParameterError("messages", text)


def _image_source(part: Mapping[str, Any], where: str) -> Any:
    keys = [k for k in _IMAGE_SOURCE_KEYS if k in part]
    if not keys:
        raise _bad_message(
            f"{where}: image part has no image source; give one of "
            f"{', '.join(repr(k) for k in _IMAGE_SOURCE_KEYS)} (or 'image_url': {{'url': ...}})"
        )
    if len(keys) > 1:
        raise _bad_message(f"{where}: image part has several image sources ({', '.join(map(repr, keys))}); "
                           f"give exactly one")
    source = part[keys[0]]
    if isinstance(source, str) and not source:
        raise _bad_message(f"{where}: image part has an empty {keys[0]!r}")
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
        raise _bad_message(
            f"{where}: video part needs exactly one source, one of {', '.join(repr(k) for k in _VIDEO_SOURCE_KEYS)} "
            f"(or 'video_url': {{'url': ...}})" + (f"; it has {keys}" if keys else ""))
    source = part[keys[0]]
    if isinstance(source, str) and not source:
        raise _bad_message(f"{where}: video part has an empty {keys[0]!r}")
    if isinstance(source, (list, tuple)) and not source:
        raise _bad_message(f"{where}: video part has an empty frame list")
    if keys[0] == "base64" and isinstance(source, str) and source[:5].lower() != "data:":
        source = "data:;base64," + source
    return source


def _part_type(part: Mapping[str, Any], where: str) -> str:
    ptype = part.get("type")
    if ptype is None:
        # The chat templates also recognize parts by key; infer the type the same way.
        found = [k for k in ("text", "image", "image_url", "video", "video_url") if k in part]
        if len(found) != 1:
            raise _bad_message(
                f"{where}: content part has no 'type' "
                + ("and no 'text'/'image'/'image_url' key" if not found else f"and is ambiguous (keys {found})")
            )
        ptype = found[0]
    if not isinstance(ptype, str):
        raise _bad_message(f"{where}: content part 'type' must be a string, got {ptype!r}")
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
    chat = _conversation(messages)
    if len(chat) == 0:
        raise _bad_message("messages is empty; give at least one message")
    out_messages: list[dict] = []
    images: list[Any] = []
    for i, message in enumerate(chat):
        if not isinstance(message, Mapping):
            raise _bad_message(f"{_where(i)}: a message must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        if "role" not in message:
            raise _bad_message(f"{_where(i)}: message has no 'role' (keys: {sorted(map(str, message))})")
        if not isinstance(message["role"], str) or not message["role"]:
            raise _bad_message(f"{_where(i)}: 'role' must be a non-empty string, got {message['role']!r}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            out_messages.append(message)
            continue
        if isinstance(content, Mapping) or not isinstance(content, (list, tuple)):
            raise _bad_message(
                f"{_where(i)}: 'content' must be a string or a list of parts, got {type(content).__name__}"
            )
        parts = []
        for j, part in enumerate(content):
            where = _where(i, j)
            if not isinstance(part, Mapping):
                raise _bad_message(f"{where}: a content part must be a dict like {{'type': 'text', 'text': ...}}, got {part!r:.80}")
            part = {k: v for k, v in part.items() if v is not None}
            ptype = _part_type(part, where)
            if ptype in _TEXT_TYPES:
                if not isinstance(part.get("text"), str):
                    raise _bad_message(f"{where}: text part needs a string 'text', got {part.get('text')!r}")
                part["type"] = "text"
            elif ptype == "image_url":
                if "image_url" in part:
                    part = _openai_image_url(part)
                    if not part["url"]:
                        raise _bad_message(f"{where}: image_url part has no 'url'")
                else:
                    part["type"] = "image"
                images.append(_image_source(part, where))
            elif ptype == "image":
                if "image_url" in part and not any(k in part for k in _IMAGE_SOURCE_KEYS):
                    part = _openai_image_url(part)
                part["type"] = "image"
                images.append(_image_source(part, where))
            elif ptype in _VIDEO_TYPES:
                if "video_url" in part and not any(k in part for k in _VIDEO_SOURCE_KEYS):
                    part = _openai_video_url(part)
                    if not part["url"]:
                        raise _bad_message(f"{where}: video_url part has no 'url'")
                part["type"] = "video"
                images.append(VideoPart(_video_source(part, where)))
            else:
                raise _bad_message(f"{where}: unknown content part type {ptype!r} (expected 'text', 'image', "
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
        raise ParameterError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
    check_text(prompt, "prompt")
    if isinstance(images, (str, bytes)):
        images = [images]
    messages: list[dict] = []
    if system is not None:
        if not isinstance(system, str):
            raise ParameterError("system", f"system must be a string, got {type(system).__name__}")
        check_text(system, "system")
        messages.append({"role": "system", "content": system})
    content = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": prompt})
    messages.append({"role": "user", "content": content})
    return messages


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def render_chat(
    template: str,
    messages: Any,
    add_generation_prompt: bool = True,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render `messages` with the chat `template` as ``processor.apply_chat_template(messages,
    add_generation_prompt=..., tokenize=False, **extra)`` does.

    `extra` are further template variables; pass the tokenizer's special tokens here to match
    transformers exactly (it passes ``{**tokenizer.special_tokens_map, **kwargs}``; see
    `special_tokens_from_config`), plus template options such as ``add_vision_id=True``.
    `tools` must be JSON-schema dicts (transformers also converts Python functions; we don't).
    """
    compiled = compile_chat_template(template)
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise ValueError(f"tools must be JSON-schema dicts, got {type(tool).__name__}")
        tools = list(tools)
    if documents is not None:
        for document in documents:
            if not isinstance(document, Mapping):
                raise ValueError("documents must be a list of dicts with 'title' and 'text' keys")
        documents = list(documents)
    chat = _alias_reasoning(_plain(_template_messages(messages)))
    return compiled.render(
        messages=chat,
        tools=_plain(tools),
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
        **_plain(extra),
    )
