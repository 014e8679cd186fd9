"""vlm-core: a torch-free inference core for small vision-language models.

The embedding API, where people look for it first (as ``from vllm import LLM, SamplingParams``)::

    from vlm_core import VisionLanguageModel, SamplingParams

Subpackages keep their roles: ``vlm_core.export`` (checkpoint -> ONNX, needs the ``export`` extra and torch),
``vlm_core.runtime`` (serving: numpy + onnxruntime + tokenizers + pillow + jinja2, never torch),
``vlm_core.kernels`` (torch-free numerics: images, sampling, video) and ``vlm_core.models`` (one folder per family).
Inside the package every import is absolute (``from vlm_core.runtime.model import ...``).
"""
from __future__ import annotations

__version__ = "0.1.0"

# Imported on first use, so that `import vlm_core.export` or `python -m vlm_core.export --help` does not load
# the runtime (onnxruntime, tokenizers) first.
_EXPORTS = {
    "VisionLanguageModel": "vlm_core.runtime.model",
    "SamplingParams": "vlm_core.kernels.sampling",
}

__all__ = ["SamplingParams", "VisionLanguageModel", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
