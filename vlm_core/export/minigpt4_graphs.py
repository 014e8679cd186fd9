"""The vision graph of the MiniGPT-4 / BLIP-2-with-LLaMA family (its text decoder is export/llama_graph.py).

It reuses the checkpoint's own submodules (transformers' Blip2ForConditionalGeneration with a
LLaMA text model) and re-states only the attention control flow, as export/qwen3_vl_graphs.py does.
"""
from __future__ import annotations

from torch import nn

from vlm_core.export.graph_layers import attend as _attend


class MiniGPT4VisionGraph(nn.Module):
    """EVA ViT (BLIP-2 vision model) + ln_vision (post_layernorm) + Q-Former + linear projection.

    Inputs: pixel_values [n_images, 3, S, S]. Outputs: image_embeds [n_images, num_query_tokens, llm_hidden].
    """

    input_names = ["pixel_values"]
    output_names = ["image_embeds"]

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision = model.vision_model
        self.qformer = model.qformer
        self.query_tokens = model.query_tokens
        self.projection = model.language_projection

    def _vit_layer(self, layer, x):
        attn = layer.self_attn
        batch, n, dim = x.shape
        qkv = attn.qkv(layer.layer_norm1(x)).reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = x + attn.projection(_attend(qkv[0], qkv[1], qkv[2], attn.scale))
        return x + layer.mlp(layer.layer_norm2(x))

    @staticmethod
    def _heads(linear, x, head_dim):
        batch, n, _ = x.shape
        return linear(x).view(batch, n, -1, head_dim).transpose(1, 2)

    def _qformer_attention(self, block, hidden, context):
        att = block.attention
        d = att.attention_head_size
        out = _attend(self._heads(att.query, hidden, d), self._heads(att.key, context, d),
                      self._heads(att.value, context, d), att.scaling)
        return block.output(out, hidden)  # dense + residual + LayerNorm

    def forward(self, pixel_values):
        hidden = self.vision.embeddings(pixel_values)  # [n, 1 + patches, D]
        for layer in self.vision.encoder.layers:
            hidden = self._vit_layer(layer, hidden)
        image = self.vision.post_layernorm(hidden)  # MiniGPT-4's ln_vision
        query = self.qformer.layernorm(self.query_tokens.expand(image.shape[0], -1, -1))
        for layer in self.qformer.encoder.layer:
            query = self._qformer_attention(layer.attention, query, query)
            if layer.has_cross_attention:
                query = self._qformer_attention(layer.crossattention, query, image)
            query = layer.output_query(layer.intermediate_query(query), query)
        return self.projection(query)
