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
the manifest section.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

KV_DTYPES = ("float32", "float16")


class ConfigBase:
    """`from_dict` for a dataclass built from one manifest section (subclasses are `@dataclass(kw_only=True)`)."""

    section: ClassVar[str] = "config"  # the manifest section, for error messages
    # other names a key has had in older manifests -> the field it fills (the field's own name wins)
    key_aliases: ClassVar[dict] = {}

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
        return cls(**kwargs)


@dataclass(kw_only=True)
class TextConfig(ConfigBase):
    """manifest["text_config"]: the decoder's shape (what the runtime sizes its KV cache by) and its KV dtype."""

    section: ClassVar[str] = "text_config"

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
