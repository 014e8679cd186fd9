"""NumPy reference versions of the models' layers: norms, rotary tables, attention, MLPs, whole blocks.

Short pure functions in the manner of picoGPT and llama2.c, each mirroring one transformers module
(named in its docstring), so that a layer can be read, checked against the checkpoint's own numbers
and run without torch. tests/test_reference_layers.py runs one decoder layer and one vision block of
each family's tiny checkpoint through them against transformers, and a whole text forward against
the exported decoder graph (SmolVLM: also a whole tile through the vision tower and connector against the
exported vision graph).

Conventions:
* one sequence, no batch axis: activations are [S, hidden]; heads come first, [heads, S, head_dim];
* weights as the checkpoint stores them (nn.Linear: weight [out, in]), passed as the nested dicts
  `nest` builds from checkpoint names, so calls read like the names: ``linear(x, **self_attn["q_proj"])``;
* float32 throughout, as transformers' float32 eager modules compute (norm statistics, softmax and
  rotary tables included). The one exception is the erf GELU: NumPy has no erf, so `gelu` evaluates
  `math.erf` in float64 and rounds the result to float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "nest", "linear", "rms_norm", "layer_norm", "silu", "gelu",
    "rope_inverse_frequencies", "rope_cos_sin", "mrope_cos_sin", "vision_rotary_cos_sin", "rotate_half",
    "apply_rotary", "causal_mask", "segment_mask", "attention", "LayerCache", "cached_attention",
    "swiglu_mlp", "gelu_mlp", "decoder_attention", "decoder_layer", "decoder_logits", "vit_attention",
    "vit_block", "patch_embeddings", "siglip_embeddings", "siglip_encoder_layer", "siglip_vision_tower",
    "pixel_shuffle", "smolvlm_connector", "smolvlm_image_embeds",
]


def nest(weights: dict, prefix: str) -> dict:
    """The tensors under `prefix` as nested dicts keyed by the parts of their dotted names.

    ``nest(state, "model.layers.0.")["self_attn"]["q_proj"]["weight"]`` is
    ``state["model.layers.0.self_attn.q_proj.weight"]``.
    """
    tree: dict = {}
    for name, tensor in weights.items():
        if not name.startswith(prefix):
            continue
        *path, leaf = name[len(prefix):].split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    if not tree:
        raise KeyError(f"no tensor name starts with {prefix!r}")
    return tree


# ----------------------------------------------------------------------------- elementwise and norms


def linear(x, weight, bias=None):  # [..., in], [out, in], [out] -> [..., out]
    """nn.Linear."""
    y = x @ weight.T
    return y if bias is None else y + bias


def rms_norm(x, weight, eps):  # [..., d], [d] -> [..., d]
    """LlamaRMSNorm / Qwen3VLTextRMSNorm: x / sqrt(mean(x^2) + eps) * weight."""
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return weight * (x / np.sqrt(variance + np.float32(eps)))


def layer_norm(x, weight, bias, eps):  # [..., d], [d], [d] -> [..., d]
    """nn.LayerNorm (biased variance)."""
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.mean(np.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + np.float32(eps)) * weight + bias


def silu(x):
    """x * sigmoid(x) (transformers' "silu")."""
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: the quotient is then -0, as it should be
        return x / (np.float32(1) + np.exp(-x))


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x, approximate: str = "none"):
    """GELU. approximate="tanh": transformers' "gelu_pytorch_tanh" (Qwen3-VL's ViT);
    "none": the exact erf form, "gelu" (BLIP-2 / EVA ViT), erf taken in float64 by `math.erf`, one Python
    call per element: exact, and slow on big activations (a NumPy backend would want a vectorized erf)."""
    if approximate == "tanh":
        inner = np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x * x * x)
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(inner))
    if approximate != "none":
        raise ValueError(f"gelu approximate={approximate!r}: expected 'none' or 'tanh'")
    erf = _erf(np.asarray(x, np.float64) / math.sqrt(2)).astype(np.float64)
    return (0.5 * np.asarray(x, np.float64) * (1 + erf)).astype(np.float32)


# ----------------------------------------------------------------------------- rotary tables


def rope_inverse_frequencies(dim: int, theta: float) -> np.ndarray:  # -> float32 [dim // 2]
    """1 / theta^(2i / dim), i < dim / 2: the default rotary init (`compute_default_rope_parameters`)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1) / np.power(np.float32(theta), exponents)).astype(np.float32)


def rope_cos_sin(positions, head_dim: int, theta: float):  # [S] -> [S, head_dim], [S, head_dim]
    """1-D rotary table, as LlamaRotaryEmbedding: angles position * inverse frequency, repeated over both halves."""
    angles = np.asarray(positions, np.float32)[:, None] * rope_inverse_frequencies(head_dim, theta)  # [S, d/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [S, d]
    return np.cos(angles), np.sin(angles)


def mrope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section, interleaved: bool = True):
    """M-RoPE table from 3-D (t, h, w) positions [3, S] -> cos, sin [S, head_dim].

    Every rotary frequency takes its angle from one of the three axes. Interleaved (Qwen3VLTextRotaryEmbedding,
    which always interleaves): frequency i takes h when i % 3 == 1 and i < 3 * mrope_section[1], w when
    i % 3 == 2 and i < 3 * mrope_section[2], t otherwise. Not interleaved (Qwen2-VL / Qwen2.5-VL): the first
    mrope_section[0] frequencies take t, the next mrope_section[1] take h, the last mrope_section[2] take w.
    """
    half = head_dim // 2
    if sum(mrope_section) != half:
        raise ValueError(f"mrope_section {list(mrope_section)} must add up to head_dim / 2 = {half}")
    if interleaved:
        axis = np.zeros(half, dtype=np.int64)
        axis[1:3 * mrope_section[1]:3] = 1
        axis[2:3 * mrope_section[2]:3] = 2
    else:
        axis = np.repeat(np.arange(3), mrope_section)
    angles = np.asarray(position_ids, np.float32)[:, :, None] * rope_inverse_frequencies(head_dim, theta)  # [3, S, d/2]
    angles = angles[axis, :, np.arange(half)].T  # [S, d/2]: frequency i from axis[i]
    angles = np.concatenate([angles, angles], axis=-1)  # [S, d]
    return np.cos(angles), np.sin(angles)


def vision_rotary_cos_sin(patch_positions, head_dim: int, theta: float = 10000.0):  # [N, 2] -> [N, head_dim] x 2
    """2-D rotary table over (row, column) patch coordinates, as Qwen3VLVisionRotaryEmbedding ("axial"):
    head_dim / 4 frequencies of a head_dim / 2 table, the row's angles then the column's, repeated."""
    inverse = rope_inverse_frequencies(head_dim // 2, theta)  # [d/4]
    angles = np.asarray(patch_positions, np.float32)[:, :, None] * inverse  # [N, 2, d/4]
    angles = angles.reshape(len(angles), -1)  # [N, d/2]: row angles, then column angles
    angles = np.concatenate([angles, angles], axis=-1)  # [N, d]
    return np.cos(angles), np.sin(angles)


def rotate_half(x):  # [..., d] -> [..., d]
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):  # [heads, S, d], [S, d], [S, d] -> [heads, S, d]
    """transformers' apply_rotary_pos_emb, on one of q or k."""
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- attention


def causal_mask(query_count: int, key_count: int, past: int = 0):  # -> bool [query_count, key_count]
    """Query i (at position past + i) may see keys 0 .. past + i: True where attention is allowed."""
    return np.arange(key_count)[None, :] <= past + np.arange(query_count)[:, None]


def segment_mask(segment_ids):  # [N] -> bool [N, N]
    """Tokens see only tokens of their own segment (image frame): the block mask transformers' cu_seqlens make."""
    segment_ids = np.asarray(segment_ids)
    return segment_ids[:, None] == segment_ids[None, :]


def attention(q, k, v, mask=None, scale=None):  # [heads, Sq, d], [kv_heads, Sk, d] x 2, [Sq, Sk] -> [heads, Sq, d]
    """Scaled dot-product attention (transformers' eager_attention_forward) with grouped query heads.

    Query head h reads key/value head h // (heads / kv_heads) (repeat_kv). `mask`: True where a query may
    attend; every query must be allowed at least one key. `scale` defaults to head_dim ** -0.5.
    """
    groups = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, groups, axis=0), np.repeat(v, groups, axis=0)  # [heads, Sk, d]
    scale = np.float32(q.shape[-1] ** -0.5 if scale is None else scale)
    scores = (q @ k.transpose(0, 2, 1)) * scale  # [heads, Sq, Sk]
    if mask is not None:
        scores = np.where(mask, scores, np.float32(-np.inf))
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (scores / scores.sum(axis=-1, keepdims=True)) @ v  # [heads, Sq, d]


@dataclass
class LayerCache:
    """One layer's keys and values, preallocated: key, value [kv_heads, capacity, head_dim], the first
    `length` slots filled (llama2.c's run state, per layer). Slots past `length` are masked, never read."""

    key: np.ndarray
    value: np.ndarray
    length: int = 0

    @classmethod
    def empty(cls, kv_heads: int, capacity: int, head_dim: int) -> "LayerCache":
        return cls(np.zeros((kv_heads, capacity, head_dim), np.float32),
                   np.zeros((kv_heads, capacity, head_dim), np.float32))


def cached_attention(q, k, v, cache: LayerCache, scale=None):  # [heads, S, d], [kv_heads, S, d] x 2 -> [heads, S, d]
    """Append the S new keys/values at cache.length (in place, advancing it) and attend causally over the
    filled slots: query i sees cache slots 0 .. length + i, and no slot past them."""
    start, end = cache.length, cache.length + q.shape[1]
    if end > cache.key.shape[1]:
        raise ValueError(f"cache of {cache.key.shape[1]} slots holds {start}; {q.shape[1]} more do not fit")
    cache.key[:, start:end], cache.value[:, start:end] = k, v
    cache.length = end
    mask = causal_mask(q.shape[1], cache.key.shape[1], past=start)  # [S, capacity]
    return attention(q, cache.key, cache.value, mask, scale)


# ----------------------------------------------------------------------------- MLPs


def swiglu_mlp(x, gate_proj, up_proj, down_proj):  # [S, H] -> [S, H]
    """LlamaMLP / Qwen3VLTextMLP: down(silu(gate(x)) * up(x)), no biases."""
    return linear(silu(linear(x, **gate_proj)) * linear(x, **up_proj), **down_proj)


def gelu_mlp(x, fc1, fc2, approximate: str = "none"):  # [N, D] -> [N, D]
    """Blip2MLP / Qwen3VLVisionMLP: fc2(gelu(fc1(x))), with biases."""
    return linear(gelu(linear(x, **fc1), approximate), **fc2)


# ----------------------------------------------------------------------------- text decoder


def _heads(x, head_dim: int):  # [S, heads * d] -> [heads, S, d]
    return x.reshape(x.shape[0], -1, head_dim).transpose(1, 0, 2)


def _merge_heads(x):  # [heads, S, d] -> [S, heads * d]
    return x.transpose(1, 0, 2).reshape(x.shape[1], -1)


def decoder_attention(x, cos, sin, q_proj, k_proj, v_proj, o_proj, head_dim: int, eps: float,
                      q_norm=None, k_norm=None, cache: LayerCache | None = None):  # [S, H] -> [S, H]
    """LlamaAttention / Qwen3VLTextAttention. q_norm, k_norm (Qwen3): RMSNorm over each head before rotary.

    cache None: causal attention over the S tokens alone; a LayerCache: they are appended and attend over it.
    """
    q = _heads(linear(x, **q_proj), head_dim)  # [heads, S, d]
    k = _heads(linear(x, **k_proj), head_dim)  # [kv_heads, S, d]
    v = _heads(linear(x, **v_proj), head_dim)  # [kv_heads, S, d]
    if q_norm is not None:
        q, k = rms_norm(q, q_norm["weight"], eps), rms_norm(k, k_norm["weight"], eps)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is None:
        out = attention(q, k, v, causal_mask(len(x), len(x)))
    else:
        out = cached_attention(q, k, v, cache)
    return linear(_merge_heads(out), **o_proj)


def decoder_layer(x, cos, sin, input_layernorm, self_attn, post_attention_layernorm, mlp, head_dim: int,
                  eps: float, cache: LayerCache | None = None):  # [S, H], [S, head_dim] x 2 -> [S, H]
    """LlamaDecoderLayer / Qwen3VLTextDecoderLayer (pre-norm; Qwen3's q_norm/k_norm used when self_attn holds
    them). The weights are `nest(state, "...layers.{i}.")`'s entries; cos, sin from rope_cos_sin / mrope_cos_sin."""
    x = x + decoder_attention(rms_norm(x, eps=eps, **input_layernorm), cos, sin, **self_attn, head_dim=head_dim,
                              eps=eps, cache=cache)
    return x + swiglu_mlp(rms_norm(x, eps=eps, **post_attention_layernorm), **mlp)


def decoder_logits(inputs_embeds, cos, sin, layers, norm, lm_head, head_dim: int, eps: float,
                   caches=None):  # [S, H] -> [vocab]
    """The text model's last-position logits: layers, final RMSNorm, LM head (lm_head: [vocab, H], the
    embedding table when tied). `layers`: one nested weight dict per layer; `caches`: one LayerCache each."""
    x = inputs_embeds
    for index, layer in enumerate(layers):
        x = decoder_layer(x, cos, sin, **layer, head_dim=head_dim, eps=eps,
                          cache=None if caches is None else caches[index])
    return linear(rms_norm(x[-1], eps=eps, **norm), lm_head)


# ----------------------------------------------------------------------------- vision


def vit_attention(x, qkv, proj, num_heads: int, mask=None, cos=None, sin=None):  # [N, D] -> [N, D]
    """Qwen3VLVisionAttention / Blip2Attention: one fused qkv projection, optional 2-D rotary on q and k,
    bidirectional attention within `mask` (e.g. segment_mask: one block per image frame)."""
    q, k, v = linear(x, **qkv).reshape(len(x), 3, num_heads, -1).transpose(1, 2, 0, 3)  # 3 x [heads, N, d]
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return linear(_merge_heads(attention(q, k, v, mask)), **proj)


def vit_block(x, norm1, qkv, proj, norm2, fc1, fc2, num_heads: int, eps: float, mask=None, cos=None, sin=None,
              approximate: str = "none"):  # [N, D] -> [N, D]
    """A pre-norm ViT block (Qwen3VLVisionBlock, Blip2EncoderLayer): x + attn(LN(x)), then x + MLP(LN(x)).

    Each weight argument is a {"weight", "bias"} dict; the families name them differently (Qwen3-VL:
    norm1, attn.qkv, attn.proj, norm2, mlp.linear_fc1/2; BLIP-2: layer_norm1, self_attn.qkv,
    self_attn.projection, layer_norm2, mlp.fc1/2), so the caller picks them out.
    """
    x = x + vit_attention(layer_norm(x, eps=eps, **norm1), qkv, proj, num_heads, mask, cos, sin)
    return x + gelu_mlp(layer_norm(x, eps=eps, **norm2), fc1, fc2, approximate)


# ----------------------------------------------------------------------------- vision: SigLIP + connector (SmolVLM)


def patch_embeddings(pixel_values, weight, bias):  # [C, H, W], [D, C, p, p], [D] -> [(H / p) * (W / p), D]
    """nn.Conv2d with stride = kernel = patch size p, then flatten(2).transpose(1, 2), as SiglipVisionEmbeddings'
    patch_embedding: each p x p patch (row-major over the patch grid) is one matmul row, its pixels in the
    weight's (channel, row, column) order."""
    channels, height, width = pixel_values.shape
    size = weight.shape[-1]
    rows, columns = height // size, width // size
    patches = pixel_values.reshape(channels, rows, size, columns, size).transpose(1, 3, 0, 2, 4)  # [r, c, C, p, p]
    return linear(patches.reshape(rows * columns, -1), weight.reshape(len(weight), -1), bias)


def siglip_embeddings(pixel_values, patch_embedding, position_embedding):  # [C, T, T] -> [N, D]
    """SmolVLMVisionEmbeddings on one whole tile (every patch real): patch embeddings plus learned positions.

    A whole T x T tile's bucketed position ids are 0 .. N - 1 (SmolVLM's processor makes every tile whole);
    the fractional bucketing of partly padded images is not mirrored here."""
    embeds = patch_embeddings(pixel_values, **patch_embedding)  # [N, D]
    table = position_embedding["weight"]  # [num_positions, D]
    if len(embeds) != len(table):
        raise ValueError(f"a tile of {len(embeds)} patches; the position table has {len(table)}: "
                         f"pass one whole tile of image_size pixels")
    return embeds + table


def siglip_encoder_layer(x, layer_norm1, self_attn, layer_norm2, mlp, num_heads: int, eps: float, mask=None,
                         approximate: str = "tanh"):  # [N, D] -> [N, D]
    """SmolVLMEncoderLayer / SiglipEncoderLayer: vit_block with separate q/k/v projections (biased), which it
    stacks into one qkv projection, and out_proj; no rotary, no mask within a tile. The weights are
    `nest(state, "...encoder.layers.{i}.")`'s entries; approximate="tanh": "gelu_pytorch_tanh"."""
    qkv = {name: np.concatenate([self_attn[part][name] for part in ("q_proj", "k_proj", "v_proj")])
           for name in ("weight", "bias")}  # [3 D, D], [3 D]
    return vit_block(x, layer_norm1, qkv, self_attn["out_proj"], layer_norm2, mlp["fc1"], mlp["fc2"], num_heads,
                     eps, mask, approximate=approximate)


def siglip_vision_tower(pixel_values, embeddings, encoder, post_layernorm, num_heads: int, eps: float,
                        approximate: str = "tanh"):  # [C, T, T] -> [N, D]
    """SmolVLMVisionTransformer on one whole tile: embeddings, every encoder layer, post_layernorm. The
    weights are `nest(state, "model.vision_model.")`'s entries."""
    x = siglip_embeddings(pixel_values, **embeddings)
    for index in sorted(encoder["layers"], key=int):
        x = siglip_encoder_layer(x, **encoder["layers"][index], num_heads=num_heads, eps=eps, approximate=approximate)
    return layer_norm(x, eps=eps, **post_layernorm)


def pixel_shuffle(x, scale_factor: int):  # [N, D] -> [N / s^2, D * s^2]
    """SmolVLMConnector.pixel_shuffle on one tile's sqrt(N) x sqrt(N) patch grid: each s x s block of patches
    becomes one token (blocks row-major), its features ordered (row in block, column in block, D)."""
    count, dim = x.shape
    side = math.isqrt(count)
    if side * side != count or side % scale_factor:
        raise ValueError(f"pixel shuffle of {count} patches: need a square grid whose side divides by {scale_factor}")
    s = scale_factor
    x = x.reshape(side, side // s, dim * s)  # s neighbouring columns merged
    x = x.transpose(1, 0, 2).reshape(side // s, side // s, dim * s * s)  # then s neighbouring rows
    return x.transpose(1, 0, 2).reshape(count // (s * s), dim * s * s)  # [block row, block column] -> tokens


def smolvlm_connector(x, modality_projection, scale_factor: int):  # [N, D] -> [N / s^2, text_hidden]
    """SmolVLMConnector: pixel shuffle, then modality_projection.proj (no bias)."""
    return linear(pixel_shuffle(x, scale_factor), **modality_projection["proj"])


def smolvlm_image_embeds(pixel_values, vision_model, connector, num_heads: int, eps: float, scale_factor: int,
                         approximate: str = "tanh"):  # [C, T, T] -> [tokens_per_tile, text_hidden]
    """One tile's image embeddings (SmolVLMModel.get_image_features for a whole tile; the exported vision
    graph's image_embeds row): `nest(state, "model.vision_model.")`, `nest(state, "model.connector.")`."""
    hidden = siglip_vision_tower(pixel_values, **vision_model, num_heads=num_heads, eps=eps, approximate=approximate)
    return smolvlm_connector(hidden, **connector, scale_factor=scale_factor)
