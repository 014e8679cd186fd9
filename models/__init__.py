"""Model families: the only place that knows one family's prompt layout, preprocessing and positions.

Families are looked up by name (the manifest's "family", or a checkpoint's config.json model_type),
never by an if/elif chain: adding a family is a new folder and one line here.
"""
from __future__ import annotations

import importlib

# family name -> module path; config.json model_type -> family name
FAMILIES = {"qwen3_vl": "models.qwen3_vl", "minigpt4": "models.minigpt4", "smolvlm": "models.smolvlm"}
MODEL_TYPES = {"qwen3_vl": "qwen3_vl", "blip-2": "minigpt4", "smolvlm": "smolvlm", "idefics3": "smolvlm"}


def get_family(name: str):
    """Import and return the family module for `name` (raises KeyError with the known names)."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name])


def family_for_model_type(model_type: str) -> str:
    """The family name that serves a config.json `model_type`."""
    if model_type not in MODEL_TYPES:
        raise KeyError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}")
    return MODEL_TYPES[model_type]
