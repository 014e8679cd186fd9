"""Model families: the only place that knows one family's prompt layout, preprocessing and positions.

Families are found by name, by convention: family NAME is the module `models.NAME` (imported with
`importlib`, as mlx-lm and mlx-vlm do), whose `Family(manifest)` follows models/contract.py. Adding a
family is a new folder plus its checkpoints' model_types in MODEL_TYPES; there is no other table and
no if/elif chain on architecture names.
"""
from __future__ import annotations

import importlib

# The alias table: a checkpoint's config.json `model_type` -> the family (folder under models/) that serves it.
MODEL_TYPES = {"qwen3_vl": "qwen3_vl", "blip-2": "minigpt4", "smolvlm": "smolvlm", "idefics3": "smolvlm"}


def known_families() -> list[str]:
    """The family names the alias table serves, sorted."""
    return sorted(set(MODEL_TYPES.values()))


def get_family(name: str):
    """Import and return the family module `models.<name>` (the manifest's "family").

    Raises KeyError naming the known families when `name` is not one of them."""
    if name not in known_families():
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(known_families())}")
    return importlib.import_module(f"{__name__}.{name}")


def family_for_model_type(model_type: str) -> str:
    """The family name that serves a config.json `model_type` (KeyError naming the supported ones otherwise)."""
    if model_type not in MODEL_TYPES:
        raise KeyError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}")
    return MODEL_TYPES[model_type]
