"""Export of the SmolVLM family (transformers' SmolVLMForConditionalGeneration, and the Idefics3 layout it
shares): SigLIP + pixel-shuffle vision graph, the generic LLaMA decoder graph, manifest sections and the
eager-PyTorch reference case."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.export import Dim

from vlm_core.export.assets import read_json
from vlm_core.export.errors import ExportError
from vlm_core.export.family_defaults import video_preprocessing_params  # noqa: F401  (SmolVLM2's video is not served: no video section)
from vlm_core.export.kv_dtype import rounding_cache
from vlm_core.export.llama_graph import (
    LlamaDecoderGraph,
    export_llama_decoder,
    llama_decoder_example,
    llama_text_config,
    random_pixels,
)
from vlm_core.export.onnx_io import export_graph
from vlm_core.export.smolvlm_graphs import SmolVLMVisionGraph
from vlm_core.models.smolvlm.preprocess import tile_count

FAMILY = "smolvlm"
# The strings transformers' SmolVLMProcessor writes around image tokens (its defaults; a checkpoint's
# tokenizer may name others, see extra_assets).
PROMPT_TOKENS = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                 "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
# Two images for parity: one split into 1 x 2 tiles (+ its global view), one left whole (4 tiles: the
# reference runs the vision tower three times, which is minutes on 512-pixel tiles of a real SigLIP).
PARITY_ROWS_COLS = np.array([[1, 2], [0, 0]], dtype=np.int64)


def _model_class(folder: str):
    from transformers import (
        AutoConfig,
        Idefics3ForConditionalGeneration,
        SmolVLMForConditionalGeneration,
    )

    model_type = AutoConfig.from_pretrained(folder).model_type
    return Idefics3ForConditionalGeneration if model_type == "idefics3" else SmolVLMForConditionalGeneration


def load_model(source: str, dtype=torch.float32, empty: bool = False):
    """SmolVLMForConditionalGeneration (or Idefics3's) from a local folder, eager attention, eval mode (empty:
    parameters on the meta device, for the streamed export)."""
    load_class = _model_class(source)
    if empty:
        from vlm_core.export.streamed import empty_model

        return empty_model(load_class, source, dtype)
    model = load_class.from_pretrained(source, dtype=dtype, attn_implementation="eager").eval()
    text_type = model.config.text_config.model_type
    if text_type != "llama":
        raise ExportError(f"{source!r}: a SmolVLM checkpoint with a {text_type!r} text model; the smolvlm family "
                          f"exports LLaMA-architecture text models (SmolLM2, model_type 'llama')")
    return model


def tokens_per_tile(config) -> int:
    """Image tokens one tile becomes: (image_size / patch_size)² patches / scale_factor²."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor ** 2


def manifest_sections(model) -> dict:
    """The family-specific parts of manifest.json (configs and token ids)."""
    config = model.config
    text, vision = config.text_config, config.vision_config
    return {
        "text_config": llama_text_config(text),
        "vision_config": {
            "num_layers": vision.num_hidden_layers, "hidden_size": vision.hidden_size,
            "num_heads": vision.num_attention_heads, "patch_size": vision.patch_size,
            "image_size": vision.image_size, "scale_factor": config.scale_factor,
            "tokens_per_tile": tokens_per_tile(config), "out_hidden_size": text.hidden_size,
        },
        "special_tokens": {"image_token_id": int(config.image_token_id), "bos_token_id": text.bos_token_id},
    }


def export_vision(model, path: str) -> list[str]:
    """SigLIP + connector -> image_embeds [n_tiles, tokens_per_tile, text_hidden]."""
    graph = SmolVLMVisionGraph(model).eval()
    return export_graph(graph, (random_pixels(model, 2, 0),), path, ({0: Dim("tiles")},))


def decoder_graph(model, kv_dtype: str = "float32") -> LlamaDecoderGraph:
    return LlamaDecoderGraph(model.model.text_model, model.lm_head, kv_dtype=kv_dtype).eval()


def export_decoder(model, path: str, kv_dtype: str = "float32") -> list[str]:
    return export_llama_decoder(model, decoder_graph(model, kv_dtype), path)


def decoder_example(model, graph) -> tuple[tuple, tuple]:
    """Example inputs and dynamic shapes to trace the decoder graph with."""
    return llama_decoder_example(graph, model.config.text_config.hidden_size)


def embedding_table(model) -> np.ndarray:
    """The token-embedding table, float32 [vocab, hidden]."""
    return model.model.text_model.embed_tokens.weight.detach().float().numpy()


def reference_case(model, new_tokens: int = 8, kv_dtype: str = "float32") -> dict:
    """Two images (1 x 2 tiles + global view; one whole tile) between text tokens, through transformers'
    model: image features, first-step logits and greedy tokens (KV cache rounded to `kv_dtype`)."""
    config = model.config
    per_tile = tokens_per_tile(config)
    pixel_values = random_pixels(model, sum(tile_count(r, c) for r, c in PARITY_ROWS_COLS.tolist()), 1)
    image = int(config.image_token_id)
    rng = np.random.default_rng(0)
    vocab = config.text_config.vocab_size
    text = lambda n: [int(i) for i in rng.integers(3, vocab, n) if i != image]  # noqa: E731
    ids = text(5)
    for rows, cols in PARITY_ROWS_COLS.tolist():
        for _ in range(rows * cols + 1 if rows or cols else 1):  # a marker token, then one tile's tokens
            ids += text(1) + [image] * per_tile
        ids += text(3)
    input_ids = torch.tensor([ids])
    model_pixels = pixel_values.to(model.dtype)[None]  # [batch 1, tiles, 3, S, S], the processor's layout
    with torch.no_grad():
        features = model.model.get_image_features(model_pixels).pooler_output
        image_embeds = torch.cat(features).float().reshape(len(pixel_values), per_tile, -1).numpy()
        first_logits = model(input_ids=input_ids, pixel_values=model_pixels,
                             **rounding_cache(model, kv_dtype)).logits[0, -1].float().numpy()
        generated = model.generate(input_ids=input_ids, pixel_values=model_pixels,
                                   attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, **rounding_cache(model, kv_dtype))
    tokens = generated[0].tolist()[len(ids):]
    return {"vision_feeds": {"pixel_values": pixel_values.numpy()}, "vision_outputs": {"image_embeds": image_embeds},
            "input_ids": np.array(ids, dtype=np.int64), "pixel_values": pixel_values.numpy(),
            "image_grid_thw": PARITY_ROWS_COLS, "first_logits": first_logits, "tokens": tokens, "kv_dtype": kv_dtype}


def preprocessing_params(raw: dict, manifest: dict) -> dict:
    """preprocessor_config.json normalised for the runtime; the tile size checked against the vision model."""
    from vlm_core.models.smolvlm.preprocess import SmolVLMImageParams

    size = manifest["vision_config"]["image_size"]
    # Without a preprocessor_config.json: transformers' defaults (longest edge 4 tiles) on the model's tile size.
    params = SmolVLMImageParams.from_dict(raw) if raw else SmolVLMImageParams(size={"longest_edge": 4 * size},
                                                                              tile=size)
    if params.tile != size:
        raise ValueError(f"preprocessor_config.json cuts {params.tile}-pixel tiles (max_image_size) but the "
                         f"vision model takes {size}x{size} images; fix the checkpoint's preprocessor_config.json")
    return params.to_dict()


def extra_assets(folder: str, staging: str, manifest: dict) -> dict:
    """The prompt section (the processor's image strings and tokens per tile, checked against the model) and
    <end_of_utterance> as an end-of-answer token: SmolVLM's chat template closes every turn with it."""
    per_tile = manifest["vision_config"]["tokens_per_tile"]
    processor = read_json(os.path.join(folder, "processor_config.json"))
    seq_len = processor.get("image_seq_len", per_tile)
    if seq_len != per_tile:
        raise ExportError(f"{folder}/processor_config.json has image_seq_len={seq_len} but the vision model gives "
                          f"{per_tile} tokens per tile ((image_size / patch_size)² / scale_factor²); fix "
                          f"processor_config.json")
    tokenizer_config = read_json(os.path.join(folder, "tokenizer_config.json"))
    prompt = {key: tokenizer_config.get(key) if isinstance(tokenizer_config.get(key), str) else default
              for key, default in PROMPT_TOKENS.items()}
    prompt["image_seq_len"] = per_tile
    generation = dict(manifest["generation"])
    from tokenizers import Tokenizer

    end = Tokenizer.from_file(os.path.join(staging, manifest["tokenizer"])).token_to_id(prompt["end_of_utterance_token"])
    if end is not None and end not in generation["eos_token_ids"]:
        generation["eos_token_ids"] = list(generation["eos_token_ids"]) + [int(end)]
    return {"prompt": prompt, "generation": generation}
