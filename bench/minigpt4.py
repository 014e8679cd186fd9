"""MiniGPT-4 (BLIP-2 layout, LLaMA text model) against eager PyTorch bfloat16, same image and prompt.

    python -m bench.minigpt4 --checkpoint checkpoints/minigpt4-7b-random --export bench-out/minigpt4-7b-int4

Runs our exported folder through `python -m vlm_core.runtime.generate --json` (its own process: load, vision,
prefill, decode, peak RSS) and then eager transformers (Blip2ForConditionalGeneration, bfloat16) in
another process on the very input ids and pixels our runtime built (`--dump-inputs`), greedy, N new
tokens each, medians of --runs. Prints a table and writes JSON. `--prepare-tokenizer` writes a
LLaMA-sized (32,000-token) BPE vocabulary into a random checkpoint (SmolLM2's real tokenizer cut to
its first 32,000 ids: merges whose result is cut go too), since random checkpoints carry none.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "Describe this image in detail."


def prepare_tokenizer(checkpoint: str, vocab_size: int) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import minigpt4_helpers

    with tempfile.TemporaryDirectory() as scratch:
        minigpt4_helpers.smol_tokenizer_json(scratch)
        with open(os.path.join(scratch, "tokenizer.json"), encoding="utf-8") as f:
            tok = json.load(f)
        with open(os.path.join(scratch, "tokenizer_config.json"), encoding="utf-8") as f:
            tok_config = json.load(f)
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if i < vocab_size}
    merges = []
    for merge in tok["model"]["merges"]:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(merge)
    tok["model"]["vocab"], tok["model"]["merges"] = vocab, merges
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < vocab_size]
    with open(os.path.join(checkpoint, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    with open(os.path.join(checkpoint, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f)


def run_ours(export: str, image: str, tokens: int, threads: int, dump: str) -> dict:
    cmd = [sys.executable, "-m", "vlm_core.runtime.generate", "-m", export, "--image", image, "-p", PROMPT, "--greedy",
           "--max-new-tokens", str(tokens), "--min-new-tokens", str(tokens), "--threads", str(threads), "--json",
           "--dump-inputs", dump]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: result[k] for k in ("load_s", "vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s",
                                    "peak_rss_mb", "prompt_tokens")} | {"token_ids": result["token_ids"]}


def eager_worker(checkpoint: str, dump: str, tokens: int, threads: int) -> dict:
    """In its own process: eager bfloat16 generate on the dumped inputs, timed with a streamer."""
    import resource

    import numpy as np
    import torch
    from transformers import Blip2ForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16,
                                                          attn_implementation="eager").eval()
    if model.config.image_token_index is None:
        model.config.image_token_index = 0
    load_s = time.perf_counter() - start
    input_ids = torch.from_numpy(np.load(os.path.join(dump, "input_ids.npy"))).reshape(1, -1)
    pixel_values = torch.from_numpy(np.load(os.path.join(dump, "pixel_values.npy"))).to(torch.bfloat16)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first put is the prompt
                self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=clock)
    ttft = clock.times[0] - start
    decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    ids = out[0].tolist()
    ids = ids[input_ids.shape[1]:] if len(ids) > tokens else ids
    return {"load_s": load_s, "ttft_s": ttft, "decode_tokens_per_s": decode,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "token_ids": ids}


def run_eager(checkpoint: str, dump: str, tokens: int, threads: int) -> dict:
    code = ("import json, sys; from bench.minigpt4 import eager_worker; "
            f"print(json.dumps(eager_worker({checkpoint!r}, {dump!r}, {tokens}, {threads})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.minigpt4", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="BLIP-2-layout checkpoint folder (eager reference)")
    parser.add_argument("--export", help="our exported folder of that checkpoint")
    parser.add_argument("--image", default=os.path.join("assets", "astronaut.jpg"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", default="bench-out/minigpt4.json")
    parser.add_argument("--prepare-tokenizer", type=int, metavar="VOCAB",
                        help="write a VOCAB-token BPE tokenizer into --checkpoint and exit")
    args = parser.parse_args(argv)
    if args.prepare_tokenizer:
        prepare_tokenizer(args.checkpoint, args.prepare_tokenizer)
        return 0
    dump = tempfile.mkdtemp(prefix="minigpt4-inputs-")
    ours, eager = [], []
    for i in range(args.runs):
        ours.append(run_ours(args.export, args.image, args.tokens, args.threads, dump))
        print(f"ours run {i + 1}: {json.dumps({k: v for k, v in ours[-1].items() if k != 'token_ids'})}",
              file=sys.stderr, flush=True)
    for i in range(args.runs):
        eager.append(run_eager(args.checkpoint, dump, args.tokens, args.threads))
        print(f"eager run {i + 1}: {json.dumps({k: v for k, v in eager[-1].items() if k != 'token_ids'})}",
              file=sys.stderr, flush=True)
    rows = []
    for name, runs in (("eager PyTorch bf16", eager), ("ours (" + os.path.basename(args.export) + ")", ours)):
        rows.append({"config": name, **{k: round(median(runs, k), 3) for k in
                                        ("load_s", "ttft_s", "decode_tokens_per_s", "peak_rss_mb")}})
    same = sum(a == b for a, b in zip(ours[0]["token_ids"], eager[0]["token_ids"]))
    print("| config | load s | TTFT s (vision + prefill) | decode tok/s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['load_s']:.2f} | {r['ttft_s']:.2f} | {r['decode_tokens_per_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} |")
    base, us = rows[0], rows[1]
    print(f"ratios (eager / ours): TTFT {base['ttft_s'] / us['ttft_s']:.2f}x, decode "
          f"{us['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x, peak RSS "
          f"{base['peak_rss_mb'] / us['peak_rss_mb']:.2f}x; greedy tokens equal at {same}/{args.tokens} positions")
    os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "ours_runs": ours, "eager_runs": eager, "prompt_tokens": ours[0]["prompt_tokens"],
                   "new_tokens": args.tokens, "threads": args.threads, "same_tokens": same}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
