"""The KV cache's storage dtype, chosen at export (`python -m export --kv-dtype float16|float32`).

float16 halves the cache's memory (the 2B shape: 229 KB -> 115 KB per token) and what each decode step
reads. The graph contract for float16 (float32 is today's graph, with no casts at all):

- `past_key_values.{i}.key|value` inputs and `present.{i}.key|value` outputs are float16;
- inside the graph the past buffers are cast to float32 for the matmuls, and a token's new key/value
  is rounded to float16 and back *before* attention uses it (`round_trip`), so a token attends over its
  own chunk with exactly the values later steps read from the cache: results do not depend on how a
  prompt is split into chunks or whether a prefix came from a cache;
- the presents are those rounded values, in float16.

The eager-PyTorch reference the export is checked against rounds the same way (`RoundingCache`), so
the parity check stays exact (1e-4) for either dtype.
"""
from __future__ import annotations

import torch

KV_DTYPES = ("float16", "float32")


def default_kv_dtype(quantize: str) -> str:
    """float32 for unquantized exports (exact to eager PyTorch), float16 for quantized ones (whose weights
    already differ from float32 by far more than the cache's rounding)."""
    return "float32" if quantize == "none" else "float16"


def torch_dtype(kv_dtype: str) -> torch.dtype:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
    return getattr(torch, kv_dtype)


def round_trip(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x rounded to `dtype` and back to x's dtype, the same values in `dtype`): what attention uses and
    what the cache stores. No op at all when `dtype` is x's own."""
    if dtype == x.dtype:
        return x, x
    stored = x.to(dtype)
    return stored.to(x.dtype), stored


def rounding_cache(model, kv_dtype: str) -> dict:
    """Keyword arguments for `model(...)` / `model.generate(...)` that give it a transformers DynamicCache
    whose new keys/values are rounded to `kv_dtype` before attention sees them: eager PyTorch with the
    exported graph's cache. Empty for float32 (the model's own cache)."""
    if kv_dtype == "float32":
        return {}
    import inspect

    from transformers import DynamicCache

    dtype = torch_dtype(kv_dtype)

    class RoundingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states.to(dtype).to(key_states.dtype),
                                  value_states.to(dtype).to(value_states.dtype), layer_idx, *args, **kwargs)

    # transformers 5.x renamed past_key_values to cache (the old name warns until it is removed); BLIP-2's
    # forward passes it on to its language model in **kwargs
    forwards = [model.forward] + ([model.language_model.forward] if hasattr(model, "language_model") else [])
    renamed = any("cache" in inspect.signature(f).parameters for f in forwards)
    name = "cache" if renamed else "past_key_values"
    return {name: RoundingCache()}
