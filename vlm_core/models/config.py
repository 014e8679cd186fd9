"""The manifest's model configs as dataclasses: `text_config` and `vision_config`, read the same way by
every family and the runtime. Torch-free.

As mlx-lm's `BaseModelArgs`: `from_dict` keeps the keys a class declares and ignores the rest, so a
manifest may carry more than a reader needs (and a family reads more by subclassing):

    text = TextConfig.from_dict(manifest["text_config"])
    text.num_layers, text.kv_dtype          # 28, "float16"

    @dataclass(kw_only=True)
    class MyVisionConfig(VisionConfig):     # a family's own fields
        spatial_merge_size: int

A missing field takes its default; a missing field without one raises ValueError naming the key and
the manifest section, and so does a value of the wrong type or out of range (an int field must be a
positive integer unless `minimums` lowers its floor, a float field a finite number > 0), so a broken
manifest is refused when the folder is opened rather than when a prompt first uses the value.
"""
from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

KV_DTYPES = ("float32", "float16")


class ConfigBase:
    """`from_dict` for a dataclass built from one manifest section (subclasses are `@dataclass(kw_only=True)`)."""

    section: ClassVar[str] = "config"  # the manifest section, for error messages
    # other names a key has had in older manifests -> the field it fills (the field's own name wins)
    key_aliases: ClassVar[dict] = {}
    # int fields that may be below 1 -> their smallest value (every other int field must be >= 1)
    minimums: ClassVar[dict] = {}

    @classmethod
    def from_dict(cls, d: Mapping):
        """Build from the manifest section `d`: declared fields only, unknown keys ignored.

        Raises ValueError naming the key and the section when a field without a default is missing."""
        if not isinstance(d, Mapping):
            raise ValueError(f"manifest {cls.section!r} must be an object, got {type(d).__name__}; re-export the model")
        values = {field_name: d[key] for key, field_name in cls.key_aliases.items() if key in d}
        kwargs = {}
        for f in fields(cls):
            if f.name in d:
                kwargs[f.name] = d[f.name]
            elif f.name in values:
                kwargs[f.name] = values[f.name]
            elif f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"manifest {cls.section!r} lacks {f.name!r}; re-export the model")
        check_field_types(cls, kwargs, cls.section, cls.minimums)
        return cls(**kwargs)


def check_field_types(cls, values: Mapping, section: str, minimums: Mapping | None = None) -> None:
    """Raise ValueError naming `section`.field for a value in `values` that does not fit the type hint of the
    dataclass `cls`'s field of that name: an int must be >= 1 (or its `minimums` entry), a float finite and > 0;
    str, bool, dict, list and `X | None` are checked by type; other hints are not checked."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve outside its class's scope: fields not checked
        hints = {}
    for name, value in values.items():
        expected = _unmet(value, hints.get(name), (minimums or {}).get(name, 1))
        if expected is not None:
            raise ValueError(f"manifest {section}.{name} is {value!r:.60}; it must be {expected}; "
                             f"re-export the model")


def _unmet(value, hint, minimum: int) -> str | None:
    """What `value` must be when it does not fit the type `hint` (int >= `minimum`, float finite > 0, str, bool,
    dict, list, or `X | None`), else None. Other hints are not checked."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        unmet = [_unmet(value, option, minimum) for option in options]
        return None if None in unmet else " or ".join(unmet) + " or null"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        return None if ok else ("a positive integer" if minimum == 1 else f"an integer >= {minimum}")
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
        return None if ok else "a finite number > 0"
    hint = typing.get_origin(hint) or hint  # list[float] -> list
    names = {str: "a string", bool: "true or false", dict: "an object", list: "a list"}
    if hint in names:
        return None if isinstance(value, Mapping if hint is dict else hint) else names[hint]
    return None


@dataclass(kw_only=True)
class TextConfig(ConfigBase):
    """manifest["text_config"]: the decoder's shape (what the runtime sizes its KV cache by) and its KV dtype."""

    section: ClassVar[str] = "text_config"
    minimums: ClassVar[dict] = {"num_deepstack": 0}

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int  # prompt + answer tokens at most
    rms_norm_eps: float
    rope_parameters: dict = field(default_factory=dict)
    model_type: str = ""  # the text model's config.json model_type where the family records it ("llama")
    kv_dtype: str = "float32"  # the KV cache's dtype, "float32" or "float16" (exports before the option: float32)
    num_deepstack: int = 0  # decoder layers that take vision features besides the input (Qwen3-VL's deepstack)

    def __post_init__(self):
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"manifest 'text_config' has kv_dtype {self.kv_dtype!r}; this runtime reads "
                             f"{' or '.join(KV_DTYPES)}; re-export the model")


@dataclass(kw_only=True)
class VisionConfig(ConfigBase):
    """manifest["vision_config"]: the fields every family's vision tower has; families subclass it for theirs."""

    section: ClassVar[str] = "vision_config"
    key_aliases: ClassVar[dict] = {"depth": "num_layers"}  # Qwen3-VL's manifests say depth (its config.json's name)

    num_layers: int
    hidden_size: int
    num_heads: int
    patch_size: int
    out_hidden_size: int  # width of the features handed to the decoder
    image_size: int | None = None  # fixed input side where the tower has one (MiniGPT-4: 224)
