"""The peers' side of `python -m bench.peers`, run as a script by the peers' interpreter (`--genai-python`).

    PYTHON bench/peers_genai.py checkpoint OUT SHAPE_JSON   # random-weight Qwen3ForCausalLM (torch, transformers)
    PYTHON bench/peers_genai.py run SPEC_JSON               # one timed ONNX Runtime GenAI generation

Self-contained (standard library + the packages named above): it is run with the interpreter of a
separate virtual environment, never imported by the repository's own code. `run` prints one line
`BENCH-RESULT {json}` (the same protocol as bench/worker.py) with this process's peak RSS (VmHWM).
"""
from __future__ import annotations

import json
import sys
import time

RESULT_PREFIX = "BENCH-RESULT "


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (VmHWM from /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def write_checkpoint(out: str, shape: dict, seed: int = 0) -> str:
    """A random-weight Qwen3ForCausalLM with `shape` (Qwen3Config fields), saved as bf16 safetensors in `out`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**shape)
    model = Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16)  # N(0, 0.02) weights, norms 1
    model.save_pretrained(out, safe_serialization=True)
    return out


def run_genai(spec: dict) -> dict:
    """spec: folder (a model builder output), prompt_ids, new_tokens, threads, warmup.

    prefill_s: append_tokens(prompt) (the whole prompt through the model); ttft_s: that plus the first
    generate_next_token (which samples from the prompt's logits); decode rate: (new_tokens - 1) model
    steps from the first token to the last, as bench/ours.py counts ours."""
    start = time.perf_counter()
    import onnxruntime_genai as og

    import_s = time.perf_counter() - start
    if hasattr(og, "disable_telemetry_events"):
        og.disable_telemetry_events()
    start = time.perf_counter()
    config = og.Config(spec["folder"])
    threads = int(spec["threads"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - start
    ids, n = [int(i) for i in spec["prompt_ids"]], int(spec["new_tokens"])

    def generate(prompt_ids: list, new_tokens: int) -> tuple[dict, list]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + new_tokens, min_length=len(prompt_ids) + new_tokens,
                                  do_sample=False, batch_size=1)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt_ids)
        t1 = time.perf_counter()
        tokens, first, last = [], None, None
        while len(tokens) < new_tokens and not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            last = time.perf_counter()
            first = first or last
        steps = len(tokens) - 1
        return {"prefill_s": t1 - t0, "ttft_s": first - t0, "decode_steps": steps, "decode_s": last - first}, tokens

    cold_ttft_s = None
    if spec.get("warmup", 1):  # one-time allocations, as bench/ours.py's warm-up does for ours
        cold_ttft_s = generate(ids, 2)[0]["ttft_s"]
    timings, tokens = generate(ids, n)
    rate = timings["decode_steps"] / timings["decode_s"] if timings["decode_s"] > 0 else None
    return {"import_s": import_s, "load_s": load_s, "prefill_s": timings["prefill_s"], "ttft_s": timings["ttft_s"],
            "decode_tokens_per_s": rate, "cold_ttft_s": cold_ttft_s, "token_ids": tokens,
            "prompt_tokens": len(ids), "genai_version": getattr(og, "__version__", None)}


def main(argv=None) -> int:
    """Command line: `checkpoint OUT SHAPE_JSON` or `run SPEC_JSON`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["checkpoint"] and len(argv) == 3:
        write_checkpoint(argv[1], json.loads(argv[2]))
        return 0
    if argv[:1] == ["run"] and len(argv) == 2:
        result = run_genai(json.loads(argv[1]))
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
