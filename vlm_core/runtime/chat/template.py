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

from vlm_core.errors import ModelFolderError
from vlm_core.runtime.chat.messages import (
    conversation,
    message_error,
    openai_image_part,
)

__all__ = [
    "compile_chat_template",
    "render_chat",
    "special_tokens_from_config",
]

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
    """Compile `template` in a transformers-compatible sandbox (cached per template string).

    Raises:
        ModelFolderError: the template is not valid Jinja (the line and jinja2's reason in the message; the
            model folder's loader names the file).
    """
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
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelFolderError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


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



def _template_messages(messages: Any) -> list[dict]:
    """What the processor hands to the template: None-valued keys dropped, OpenAI image_url
    parts converted; no validation (see `normalize_messages` for that)."""
    out = []
    for message in conversation(messages):
        if not isinstance(message, Mapping):
            raise message_error(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [
                openai_image_part(p) if isinstance(p, Mapping) and p.get("type") == "image_url" and "image_url" in p else p
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
