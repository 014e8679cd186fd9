"""Export of the Qwen3-VL family: graphs, manifest sections and the eager-PyTorch reference case
(the export-family contract: export/family_defaults.py)."""
from __future__ import annotations

import numpy as np
import torch
from torch.export import Dim

from vlm_core.export.family_defaults import extra_assets  # noqa: F401  (no files of its own: the contract's default)
from vlm_core.export.graph_layers import example_logits_index
from vlm_core.export.group_query_attention import example_lengths
from vlm_core.export.kv_dtype import rounding_cache
from vlm_core.export.onnx_io import export_graph
from vlm_core.export.qwen3_vl_graphs import Qwen3VLDecoderGraph, Qwen3VLVisionGraph
from vlm_core.export.streamed import empty_model
from vlm_core.models.qwen3_vl import positions

FAMILY = "qwen3_vl"
# Two images of different aspect ratios (and so different grids) for tracing and for parity.
EXAMPLE_GRIDS = np.array([[1, 4, 6], [1, 6, 4]], dtype=np.int64)
PARITY_GRIDS = np.array([[1, 6, 10], [1, 8, 4]], dtype=np.int64)


def load_model(source: str, dtype=torch.float32, empty: bool = False):
    """Qwen3VLForConditionalGeneration from a local folder or hub id, eager attention, eval mode
    (empty: parameters on the meta device, for the streamed export)."""
    from transformers import Qwen3VLForConditionalGeneration

    if empty:
        return empty_model(Qwen3VLForConditionalGeneration, source, dtype)
    model = Qwen3VLForConditionalGeneration.from_pretrained(source, dtype=dtype, attn_implementation="eager")
    return model.eval()


def manifest_sections(model) -> dict:
    """The family-specific parts of manifest.json (configs and token ids)."""
    config = model.config
    text, vision = config.text_config, config.vision_config
    return {
        "text_config": {
            "num_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
            "num_kv_heads": text.num_key_value_heads, "head_dim": text.head_dim,
            "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
            "max_context": text.max_position_embeddings,
            "num_deepstack": len(vision.deepstack_visual_indexes),
            "rope_parameters": dict(text.rope_parameters or {}), "rms_norm_eps": text.rms_norm_eps,
        },
        "vision_config": {
            "depth": vision.depth, "hidden_size": vision.hidden_size, "num_heads": vision.num_heads,
            "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
            "spatial_merge_size": vision.spatial_merge_size, "in_channels": vision.in_channels,
            "out_hidden_size": vision.out_hidden_size, "num_position_embeddings": vision.num_position_embeddings,
            "deepstack_visual_indexes": list(vision.deepstack_visual_indexes),
        },
        "special_tokens": {
            "image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
            "vision_start_token_id": config.vision_start_token_id, "vision_end_token_id": config.vision_end_token_id,
        },
    }


def _vision_args(model, grids: np.ndarray, seed: int = 0):
    vision = model.config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(int(grids.prod(-1).sum()), patch_dim, generator=generator)
    feeds = positions.vision_inputs(grids, vision.num_position_embeddings, vision.spatial_merge_size)
    feeds["pixel_values"] = pixel_values.numpy()
    args = tuple(torch.from_numpy(feeds[name]) for name in Qwen3VLVisionGraph.input_names)
    return args, feeds


def export_vision(model, path: str) -> list[str]:
    """Write the vision graph (ViT + merger + deepstack mergers) to `path`."""
    graph = Qwen3VLVisionGraph(model.model.visual).eval()
    args, _ = _vision_args(model, EXAMPLE_GRIDS)
    patches = Dim("patches")
    dynamic = tuple({0: patches} for _ in args)
    return export_graph(graph, args, path, dynamic)


def decoder_graph(model, kv_dtype: str = "float32") -> Qwen3VLDecoderGraph:
    num_deepstack = len(model.config.vision_config.deepstack_visual_indexes)
    return Qwen3VLDecoderGraph(model.model.language_model, model.lm_head, num_deepstack, kv_dtype=kv_dtype).eval()


def export_decoder(model, path: str, kv_dtype: str = "float32") -> list[str]:
    """Write the decoder graph (KV cache of `kv_dtype`, M-RoPE, deepstack inputs, logits at `logits_index`) to `path`."""
    graph = decoder_graph(model, kv_dtype)
    args, dynamic = decoder_example(model, graph)
    return export_graph(graph, args, path, dynamic)


def decoder_example(model, graph) -> tuple[tuple, tuple]:
    """Example inputs and dynamic shapes to trace the decoder graph with."""
    text = model.config.text_config
    batch, seq, capacity = 2, 3, 4  # sizes >= 2 so no axis is specialised to 0/1
    kv_shape = (batch, text.num_key_value_heads, capacity, text.head_dim)
    args = (torch.randn(batch, seq, text.hidden_size), torch.zeros(3, batch, seq, dtype=torch.long),
            torch.zeros(graph.num_deepstack, batch, seq, text.hidden_size), *example_lengths(batch, seq, capacity),
            example_logits_index(seq),
            *[torch.zeros(kv_shape, dtype=graph.kv_dtype) for _ in range(2 * graph.num_layers)])
    b, s, c = Dim("batch"), Dim("sequence"), Dim("past_capacity")
    dynamic = ({0: b, 1: s}, {1: b, 2: s}, {1: b, 2: s}, {0: b}, None, {0: Dim("logits")},
               tuple({0: b, 2: c} for _ in range(2 * graph.num_layers)))
    return args, dynamic


def embedding_table(model) -> np.ndarray:
    """The token-embedding table, float32 [vocab, hidden]."""
    return model.model.language_model.embed_tokens.weight.detach().float().numpy()


# --- parity --------------------------------------------------------------------------------------

def reference_case(model, new_tokens: int = 8, kv_dtype: str = "float32") -> dict:
    """Inputs and eager-PyTorch outputs the exported graphs are checked against (with the KV cache rounded
    to `kv_dtype`, as the graphs round it).

    Computed before export so the eager model can be freed before the ONNX sessions load.
    """
    config = model.config
    merge = config.vision_config.spatial_merge_size
    vision_args, vision_feeds = _vision_args(model, PARITY_GRIDS, seed=1)
    pixel_values = vision_args[0]
    grid = torch.from_numpy(PARITY_GRIDS)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values, grid)
        vision_outputs = {"image_embeds": torch.cat(features.pooler_output).float().numpy()}
        if features.deepstack_features:
            vision_outputs["deepstack_embeds"] = np.stack([torch.cat(f).float().numpy()
                                                           for f in features.deepstack_features])
    # A prompt with both images between text tokens (ids below any special token).
    rng = np.random.default_rng(0)
    vocab_text = min(config.text_config.vocab_size, config.vision_start_token_id)
    text = lambda n: rng.integers(0, vocab_text, n).tolist()  # noqa: E731
    ids = text(5)
    for t, h, w in PARITY_GRIDS.tolist():
        ids += [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // merge ** 2)
        ids += [config.vision_end_token_id] + text(3)
    input_ids = torch.tensor([ids])
    mm_token_type_ids = (input_ids == config.image_token_id).long()
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
                    mm_token_type_ids=mm_token_type_ids, **rounding_cache(model, kv_dtype))
        first_logits = out.logits[0, -1].float().numpy()
        generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
                                   mm_token_type_ids=mm_token_type_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   **rounding_cache(model, kv_dtype))
    return {"vision_feeds": vision_feeds, "vision_outputs": vision_outputs,
            "input_ids": np.array(ids, dtype=np.int64), "pixel_values": pixel_values.numpy(),
            "image_grid_thw": PARITY_GRIDS, "first_logits": first_logits,
            "tokens": generated[0, len(ids):].tolist(), "kv_dtype": kv_dtype}


def preprocessing_params(raw: dict, manifest: dict) -> dict:
    """preprocessor_config.json normalised for the runtime; patch geometry checked against the ViT."""
    from vlm_core.models.qwen3_vl.preprocess import ImageProcessorParams

    vision = manifest["vision_config"]
    if not raw:  # no preprocessor_config.json: the ViT's own geometry with transformers' other defaults
        raw = {"patch_size": vision["patch_size"], "temporal_patch_size": vision["temporal_patch_size"],
               "merge_size": vision["spatial_merge_size"]}
    params = ImageProcessorParams.from_dict(raw)
    for key, vision_key in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                            ("merge_size", "spatial_merge_size")):
        if getattr(params, key) != vision[vision_key]:
            raise ValueError(f"preprocessor_config.json has {key}={getattr(params, key)} but the vision model "
                             f"has {vision_key}={vision[vision_key]}; fix the checkpoint's preprocessor_config.json")
    return params.to_dict()


def video_preprocessing_params(raw: dict, manifest: dict) -> dict:
    """video_preprocessor_config.json normalised for the runtime (manifest "video_preprocessing"); without
    one, what transformers' video processor then reads: the image config, on the ViT's geometry."""
    from vlm_core.models.qwen3_vl.video import VideoProcessorParams

    vision = manifest["vision_config"]
    if not raw:
        return VideoProcessorParams.from_image_params(manifest["preprocessing"], vision).to_dict()
    params = VideoProcessorParams.from_dict(raw)
    for key, vision_key in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                            ("merge_size", "spatial_merge_size")):
        if getattr(params, key) != vision[vision_key]:
            raise ValueError(f"video_preprocessor_config.json has {key}={getattr(params, key)} but the vision model "
                             f"has {vision_key}={vision[vision_key]}; fix the checkpoint's "
                             "video_preprocessor_config.json")
    return params.to_dict()
