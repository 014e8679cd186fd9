"""The KV cache's storage dtype, chosen at export (`python -m vlm_core.export --kv-dtype float16|float32`).

float16 halves the cache's memory (the 2B shape: 229 KB -> 115 KB per token) and what each decode step
reads. The graph contract for float16 (float32 has no casts at all):

- `past_key_values.{i}.key|value` inputs and `present.{i}.key|value` outputs are float16;
- each layer's GroupQueryAttention op then takes q, k and v in float16 too and returns its output in
  float16 (ONNX Runtime's op has one type for all of them; its maths run in float32). A token's new
  key/value is stored before attention uses it, so a token attends over its own chunk with exactly the
  values later steps read from the cache: results do not depend on how a prompt is split into chunks or
  whether a prefix came from a cache;
- the presents are the buffers with those values written in.

The eager-PyTorch reference the export is checked against rounds the same way (`RoundingCache` for the
cache, `float16_attention` for q and the output), so the parity check stays exact for either dtype.
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




def rounding_cache(model, kv_dtype: str) -> dict:
    """Keyword arguments for `model(...)` / `model.generate(...)` that give it a transformers DynamicCache
    whose new keys/values are rounded to `kv_dtype` before attention sees them: eager PyTorch with the
    exported graph's cache. Empty for float32 (the model's own cache).

    For float16 it also switches `model`'s decoder self-attention to `float16_attention` (q and the output
    rounded too), which is what the graph's GroupQueryAttention computes with a float16 cache."""
    if kv_dtype == "float32":
        return {}
    import inspect

    from transformers import AttentionInterface, DynamicCache

    dtype = torch_dtype(kv_dtype)
    AttentionInterface.register(FLOAT16_ATTENTION, float16_attention)
    for module in model.modules():
        if hasattr(module, "k_proj") and hasattr(module, "num_key_value_groups"):  # a decoder self-attention
            module.config._attn_implementation = FLOAT16_ATTENTION

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


FLOAT16_ATTENTION = "vlm_float16_kv"


def float16_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with query, key, value and output rounded to float16 (the maths in float32):
    what ONNX Runtime's GroupQueryAttention computes when the cache, and so its inputs, are float16."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def rounded(x):
        return x.to(torch.float16).to(x.dtype)

    out, weights = sdpa_attention_forward(module, rounded(query), rounded(key), rounded(value), attention_mask,
                                          **kwargs)
    return rounded(out), weights
