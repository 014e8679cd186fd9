"""Constrained decoding's cost: decode tokens/s with and without a JSON schema, and compile times.

    python -m bench.structured --export bench-out/int4 [--tokens 48] [--repeats 3] [--out docs/bench-structured.json]

The same prompt is answered greedily (a) free, (b) with a JSON schema whose answers are long enough to
measure (an array of objects), each repetition in the same loaded model, medians reported; plus the
one-time llguidance tokenizer build and the schema compile time. Both decode step by step (jump-forward off:
its gain is bench.jump_forward's to measure). Torch is not needed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from . import machine
from .report import write_json

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 40, "maxItems": 40,
                                                     "items": {"type": "integer", "minimum": 0, "maximum": 9}}},
          "required": ["items"], "additionalProperties": False}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True)
    p.add_argument("--tokens", type=int, default=48, help="tokens per answer (default 48)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench-out/structured.json")
    args = p.parse_args(argv)
    from vlm_core.kernels.sampling import SamplingParams
    from vlm_core.runtime.model import VisionLanguageModel

    vlm = VisionLanguageModel(args.export, threads=args.threads, cache_mb=0)
    messages = [{"role": "user", "content": "List forty digits as JSON."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "digits", "schema": SCHEMA}}
    start = time.perf_counter()
    vlm.grammars.tokenizer()
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    vlm.grammars.compile(response_format)
    compile_s = time.perf_counter() - start
    runs = {"free": [], "json_schema": []}
    for _ in range(args.repeats):
        for name, fmt in (("free", None), ("json_schema", response_format)):
            # step by step: this measures the grammar's own cost per token (bench.jump_forward measures the gain)
            result = vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=args.tokens,
                                  min_new_tokens=args.tokens if fmt is None else 0, response_format=fmt,
                                  jump_forward=False)
            runs[name].append({"tokens": len(result.token_ids),
                               "decode_tokens_per_s": result.timings["decode_tokens_per_s"]})
    medians = {name: statistics.median(r["decode_tokens_per_s"] for r in rs) for name, rs in runs.items()}
    result = {"machine": machine.describe(), "export": os.path.abspath(args.export),
              "tokenizer_build_s": round(tokenizer_s, 3), "schema_compile_s": round(compile_s, 4),
              "decode_tokens_per_s": medians, "slowdown": round(1 - medians["json_schema"] / medians["free"], 4),
              "runs": runs}
    write_json(args.out, result)
    print("| answer | decode tok/s (median) |\n|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} |")
    print(f"slowdown with the schema: {100 * result['slowdown']:.1f}%; llguidance tokenizer build "
          f"{tokenizer_s:.2f} s (once per model), schema compile {1000 * compile_s:.1f} ms")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
