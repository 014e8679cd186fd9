"""The vision graph of the SmolVLM family (Idefics3 layout): SigLIP encoder + pixel-shuffle connector.

Its text decoder is the generic LLaMA graph (export/llama_graph.py). The wrapper reuses the checkpoint's own
submodules (transformers' SmolVLMForConditionalGeneration / Idefics3ForConditionalGeneration) and re-states
only what does not export well: the NaViT position lookup (torch.bucketize over a patch mask) becomes the
constant it is for full tiles, and attention is written out (no mask: every tile is a full image).
"""
from __future__ import annotations

import torch
from torch import nn

from vlm_core.export.graph_layers import attend, fuse_linears


def tile_position_ids(embeddings: nn.Module, tile_size: int) -> torch.Tensor:
    """The position ids transformers' vision embeddings use for a full tile_size x tile_size tile [P].

    Computed by running the embeddings module itself on one tile with an all-ones patch mask and reading
    the ids it looks up, so the bucketize arithmetic (float32 fractions against float32 boundaries) is
    exactly transformers'; every tile the preprocessing makes is full, so the ids are one constant."""
    patches = tile_size // embeddings.patch_size
    seen = {}
    table = embeddings.position_embedding

    class _Record(nn.Module):
        def forward(self, ids):
            seen["ids"] = ids
            return table(ids)

    embeddings.position_embedding = _Record()
    try:
        with torch.no_grad():
            pixels = torch.zeros(1, embeddings.patch_embedding.in_channels, tile_size, tile_size,
                                 dtype=embeddings.patch_embedding.weight.dtype)
            embeddings(pixels, torch.ones(1, patches, patches, dtype=torch.bool))
    finally:
        embeddings.position_embedding = table
    return seen["ids"][0].clone()


class SmolVLMVisionGraph(nn.Module):
    """SigLIP ViT + post-LayerNorm + pixel shuffle + modality projection.

    Inputs: pixel_values [n_tiles, 3, T, T] (T = the vision config's image_size).
    Outputs: image_embeds [n_tiles, (T / patch)² / scale², text_hidden].
    """

    input_names = ["pixel_values"]
    output_names = ["image_embeds"]

    def __init__(self, model: nn.Module):
        super().__init__()
        inner = model.model
        self.vision = inner.vision_model
        self.connector = inner.connector
        config = model.config.vision_config
        self.num_heads = config.num_attention_heads
        self.scale_factor = model.config.scale_factor
        self.register_buffer("position_ids", tile_position_ids(self.vision.embeddings, config.image_size),
                             persistent=False)
        # One MatMul for q/k/v per layer (the originals are removed: no second copy of the weights).
        self.qkv = nn.ModuleList(fuse_linears([layer.self_attn, "q_proj", "k_proj", "v_proj"])
                                 for layer in self.vision.encoder.layers)

    def _attention(self, index, attn, x):  # [n, P, D] -> [n, P, D]
        n, length, dim = x.shape
        qkv = self.qkv[index](x).reshape(n, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return attn.out_proj(attend(qkv[0], qkv[1], qkv[2], attn.scale))

    def _pixel_shuffle(self, x):  # transformers' SmolVLMConnector.pixel_shuffle with static sizes
        n, length, dim = x.shape
        side, s = int(round(length ** 0.5)), self.scale_factor
        x = x.reshape(n, side, side // s, dim * s).permute(0, 2, 1, 3)
        x = x.reshape(n, side // s, side // s, dim * s * s).permute(0, 2, 1, 3)
        return x.reshape(n, length // (s * s), dim * s * s)

    def forward(self, pixel_values):
        embeddings = self.vision.embeddings
        hidden = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [n, P, D]
        hidden = hidden + embeddings.position_embedding(self.position_ids)[None]
        for index, layer in enumerate(self.vision.encoder.layers):
            hidden = hidden + self._attention(index, layer.self_attn, layer.layer_norm1(hidden))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        hidden = self.vision.post_layernorm(hidden)
        return self.connector.modality_projection(self._pixel_shuffle(hidden))
