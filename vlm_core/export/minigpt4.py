"""Export of the MiniGPT-4 family (BLIP-2 layout with a LLaMA / Vicuna text model): graphs, manifest
sections and the eager-PyTorch reference case (transformers' Blip2ForConditionalGeneration); the
export-family contract: export/family_defaults.py. It reads no video (the contract's default)."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.export import Dim

from vlm_core.export.errors import ExportError
from vlm_core.export.family_defaults import video_preprocessing_params  # noqa: F401  (no video: the contract's default)
from vlm_core.export.kv_dtype import rounding_cache
from vlm_core.export.llama_graph import (
    LlamaDecoderGraph,
    export_llama_decoder,
    llama_decoder_example,
    llama_text_config,
    random_pixels,
)
from vlm_core.export.minigpt4_graphs import MiniGPT4VisionGraph
from vlm_core.export.onnx_io import export_graph
from vlm_core.export.streamed import empty_model
from vlm_core.models.minigpt4.prompt import TEMPLATES, chat_template

FAMILY = "minigpt4"
PROMPT_FILE = "minigpt4_prompt.json"  # optional sidecar in a checkpoint folder: {"template": "vicuna_v0" | "llama2"}
DEFAULT_PLACEHOLDER_ID = 0  # LLaMA's <unk>: any id works, its embedding row is overwritten by the query embeddings


def load_model(source: str, dtype=torch.float32, empty: bool = False):
    """Blip2ForConditionalGeneration with a LLaMA text model, eager attention, eval mode (empty: parameters on
    the meta device, for the streamed export)."""
    from transformers import Blip2ForConditionalGeneration

    if empty:
        model = empty_model(Blip2ForConditionalGeneration, source, dtype)
    else:
        model = Blip2ForConditionalGeneration.from_pretrained(source, dtype=dtype, attn_implementation="eager")
    text_type = model.config.text_config.model_type
    if text_type != "llama":
        raise ExportError(f"{source!r}: a BLIP-2 checkpoint with a {text_type!r} text model; the minigpt4 family "
                          f"serves BLIP-2-layout models whose text model is LLaMA / Vicuna (model_type 'llama')")
    if model.config.image_token_index is None:  # MiniGPT-4 marks no image token; a placeholder id marks the slots
        model.config.image_token_index = DEFAULT_PLACEHOLDER_ID
    return model.eval()


def manifest_sections(model) -> dict:
    config = model.config
    text, vision, qformer = config.text_config, config.vision_config, config.qformer_config
    return {
        "text_config": llama_text_config(text),
        "vision_config": {
            "image_size": vision.image_size, "patch_size": vision.patch_size, "hidden_size": vision.hidden_size,
            "num_layers": vision.num_hidden_layers, "num_heads": vision.num_attention_heads,
            "qformer_hidden_size": qformer.hidden_size, "qformer_layers": qformer.num_hidden_layers,
            "num_query_tokens": config.num_query_tokens, "out_hidden_size": text.hidden_size,
        },
        "special_tokens": {"image_token_id": int(config.image_token_index), "bos_token_id": text.bos_token_id},
    }


def export_vision(model, path: str) -> list[str]:
    """EVA ViT + ln_vision + Q-Former + projection -> image_embeds [n_images, 32, llm_hidden]."""
    graph = MiniGPT4VisionGraph(model).eval()
    return export_graph(graph, (random_pixels(model, 2, 0),), path, ({0: Dim("images")},))


def decoder_graph(model, kv_dtype: str = "float32") -> LlamaDecoderGraph:
    return LlamaDecoderGraph(model.language_model.model, model.language_model.lm_head, kv_dtype=kv_dtype).eval()


def export_decoder(model, path: str, kv_dtype: str = "float32") -> list[str]:
    return export_llama_decoder(model, decoder_graph(model, kv_dtype), path)


def decoder_example(model, graph) -> tuple[tuple, tuple]:
    """Example inputs and dynamic shapes to trace the decoder graph with."""
    return llama_decoder_example(graph, model.config.text_config.hidden_size)


def embedding_table(model) -> np.ndarray:
    return model.language_model.get_input_embeddings().weight.detach().float().numpy()


def reference_case(model, new_tokens: int = 8, kv_dtype: str = "float32") -> dict:
    """Two images in one MiniGPT-4-style prompt: BOS, text, 32 query slots, text, 32 slots, text (the KV cache
    rounded to `kv_dtype`, as the graphs round it)."""
    config = model.config
    pixel_values = random_pixels(model, 2, 1)
    placeholder, queries = int(config.image_token_index), config.num_query_tokens
    rng = np.random.default_rng(0)
    vocab = config.text_config.vocab_size
    text = lambda n: [int(i) for i in rng.integers(3, vocab, n) if i != placeholder]  # noqa: E731
    bos = config.text_config.bos_token_id
    ids = ([bos] if bos is not None else []) + text(5) + [placeholder] * queries + text(3) \
        + [placeholder] * queries + text(4)
    input_ids = torch.tensor([ids])
    model_pixels = pixel_values.to(model.dtype)  # a bfloat16 reference (big checkpoints) takes bfloat16 pixels
    with torch.no_grad():
        image_embeds = model.get_image_features(model_pixels).pooler_output.float().numpy()
        first_logits = model(pixel_values=model_pixels, input_ids=input_ids,
                             **rounding_cache(model, kv_dtype)).logits[0, -1].float().numpy()
        generated = model.generate(pixel_values=model_pixels, input_ids=input_ids,
                                   attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, **rounding_cache(model, kv_dtype))
    tokens = generated[0].tolist()
    if len(tokens) == len(ids) + new_tokens:  # decoder-only generate returns the prompt ids too
        tokens = tokens[len(ids):]
    return {"vision_feeds": {"pixel_values": pixel_values.numpy()}, "vision_outputs": {"image_embeds": image_embeds},
            "input_ids": np.array(ids, dtype=np.int64),
            "pixel_values": pixel_values.numpy(), "image_grid_thw": None, "first_logits": first_logits,
            "tokens": tokens, "kv_dtype": kv_dtype}


def preprocessing_params(raw: dict, manifest: dict) -> dict:
    """BlipImageProcessor settings (CLIP mean/std, bicubic, square image_size); size checked against the ViT."""
    from vlm_core.models.minigpt4.preprocess import BlipImageParams

    size = manifest["vision_config"]["image_size"]
    params = BlipImageParams.from_dict(raw) if raw else BlipImageParams(image_size=size)
    if params.image_size != size:
        raise ValueError(f"preprocessor_config.json resizes to {params.image_size} but the vision model takes "
                         f"{size}x{size} images; fix the checkpoint's preprocessor_config.json")
    return params.to_dict()


def extra_assets(folder: str, staging: str, manifest: dict) -> dict:
    """MiniGPT-4's conversation template as chat_template.jinja (replacing any checkpoint template: the
    family splits prompts at <ImageHere>), and the prompt section of the manifest."""
    name = "vicuna_v0"
    sidecar = os.path.join(folder, PROMPT_FILE)
    if os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as f:
            name = json.load(f).get("template", name)
    if name not in TEMPLATES:
        raise ExportError(f"{sidecar}: unknown MiniGPT-4 prompt template {name!r}; known: {', '.join(TEMPLATES)}")
    with open(os.path.join(staging, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(chat_template(name))
    return {"chat_template": "chat_template.jinja",
            "prompt": {"template": name, "image_placeholder": "<ImageHere>", "stop_strings": TEMPLATES[name]["stop"]}}
