"""Jump-forward's gain on JSON answers: the same schema answers with and without it, interleaved.

    python -m bench.jump_forward --export EXPORT [--rounds 5] [--threads 2] [--batch-invariant]
        [--out bench-out/jump-forward.json]

A 10-field schema of the documents-to-JSON kind (enums, booleans, bounded integers, short strings) is answered
greedily for a few prompts, each answer once with jump-forward and once without, in one loaded model, the
order alternating each round. Reported per mode: end-to-end seconds per answer (submission to the last token,
prefill included: a text prompt of ~30 tokens), decode tokens/s, decoder calls, and the share of tokens that
went through a jump-forward chunk; the tokens of the two modes are compared answer by answer (they must be
equal; a difference is reported with where it starts). Medians and the spread (min-max) over the rounds, and
the speedup as the median of per-round ratios. `--batch-invariant` runs every answer (both modes) as a
batch-invariant request: on a 4-bit export its tokens must then be exactly equal (engine/jump_forward.py);
by default a lone step takes MatMulNBits' one-row kernel and a chunk the other, so a float-level difference
can move a close choice. Torch is not needed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from . import machine
from .report import write_json

SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["vendor", "country", "currency", "total", "tax_rate", "paid", "items", "invoice_type",
                 "due_days", "reference"],
    "properties": {
        "vendor": {"type": "string", "maxLength": 12},
        "country": {"enum": ["Germany", "France", "United States", "Japan"]},
        "currency": {"enum": ["EUR", "USD", "JPY"]},
        "total": {"type": "integer", "minimum": 0, "maximum": 100000},
        "tax_rate": {"enum": [0, 7, 19, 20]},
        "paid": {"type": "boolean"},
        "items": {"type": "integer", "minimum": 1, "maximum": 99},
        "invoice_type": {"enum": ["standard", "credit_note", "proforma"]},
        "due_days": {"type": "integer", "minimum": 0, "maximum": 90},
        "reference": {"type": "string", "maxLength": 10},
    },
}
PROMPTS = ["Read this invoice and return its fields as JSON.", "Extract the invoice data.",
           "What does the invoice say? Answer in JSON.", "Fill in the invoice form from the document."]


def _answer(vlm, prompt: str, jump: bool, max_tokens: int, invariant: bool = False) -> dict:
    from vlm_core.kernels.sampling import SamplingParams

    fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA}}
    calls = vlm.engine.counters["decoder_calls"]
    start = time.perf_counter()
    result = vlm.generate([{"role": "user", "content": prompt}], SamplingParams(greedy=True),
                          max_new_tokens=max_tokens, response_format=fmt, jump_forward=jump, batch_invariant=invariant)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": result.token_ids, "finish_reason": result.finish_reason,
            "decoder_calls": vlm.engine.counters["decoder_calls"] - calls,
            "forced_tokens": result.timings["forced_tokens"],
            "decode_tokens_per_s": result.timings["decode_tokens_per_s"], "text": result.text}


def _first_difference(a: list, b: list):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.jump_forward", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="a format_version 3 export (python -m vlm_core.export ...)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--max-tokens", type=int, default=160, help="max_new_tokens per answer (default 160)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="answer as batch-invariant requests (both modes): the tokens must then be equal")
    p.add_argument("--out", default="bench-out/jump-forward.json")
    args = p.parse_args(argv)
    from vlm_core.runtime.model import VisionLanguageModel

    host = {**machine.describe(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    vlm = VisionLanguageModel(args.export, threads=args.threads, cache_mb=0)  # no prefix cache: every prompt prefills
    if not vlm.runner.gives_all_positions:
        raise SystemExit(f"error: {args.export} is an older export without logits_index; re-export it")
    _answer(vlm, PROMPTS[0], True, 8)  # warm-up: llguidance's tokenizer, the schema compile, ORT's first runs
    rounds = []
    for index in range(args.rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        runs = {}
        for prompt in PROMPTS:
            for jump in order:
                runs.setdefault(jump, []).append(_answer(vlm, prompt, jump, args.max_tokens, args.batch_invariant))
        rounds.append(runs)
    summary = _summary(rounds)
    result = {"machine": host, "load_after": os.getloadavg(), "export": os.path.abspath(args.export),
              "schema": SCHEMA, "prompts": PROMPTS, "rounds": args.rounds, "batch_invariant": args.batch_invariant,
              **summary,
              "runs": [{("jump_forward" if k else "step_by_step"): [{x: y for x, y in r.items() if x != "tokens"}
                                                                  for r in v] for k, v in runs.items()}
                       for runs in rounds]}
    write_json(args.out, result)
    print(_table(result))
    print(f"wrote {args.out}")
    return 0


def _summary(rounds: list) -> dict:
    per_mode = {}
    for jump, name in ((True, "jump_forward"), (False, "step_by_step")):
        seconds = [sum(r["seconds"] for r in runs[jump]) / len(runs[jump]) for runs in rounds]
        tokens = sum(len(r["tokens"]) for runs in rounds for r in runs[jump])
        per_mode[name] = {
            "seconds_per_answer_median": round(statistics.median(seconds), 4),
            "seconds_per_answer_min_max": [round(min(seconds), 4), round(max(seconds), 4)],
            "decode_tokens_per_s_median": round(statistics.median(r["decode_tokens_per_s"] for runs in rounds
                                                                  for r in runs[jump]), 3),
            "decoder_calls_per_answer": round(sum(r["decoder_calls"] for runs in rounds for r in runs[jump])
                                              / sum(len(runs[jump]) for runs in rounds), 2),
            "forced_share": round(sum(r["forced_tokens"] for runs in rounds for r in runs[jump]) / max(tokens, 1), 4),
            "tokens_per_answer": round(tokens / sum(len(runs[jump]) for runs in rounds), 2)}
    ratios = [sum(r["seconds"] for r in runs[False]) / sum(r["seconds"] for r in runs[True]) for runs in rounds]
    differences = [{"round": i, "prompt": k, "first_difference": d}
                   for i, runs in enumerate(rounds) for k, (a, b) in enumerate(zip(runs[True], runs[False]))
                   if (d := _first_difference(a["tokens"], b["tokens"])) is not None]
    return {"modes": per_mode, "speedup_median": round(statistics.median(ratios), 3),
            "speedup_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
            "identical_tokens": not differences, "differences": differences,
            "example_answer": rounds[0][True][0]["text"]}


def _table(result: dict) -> str:
    host = result["machine"]
    kind = "batch-invariant requests" if result["batch_invariant"] else "default requests"
    lines = [f"## Jump-forward on a 10-field JSON schema ({kind}), {result['rounds']} interleaved rounds x "
             f"{len(result['prompts'])} prompts", "",
             machine.markdown(host),
             f"- load average at start {host['load_average']}, after {[round(x, 2) for x in result['load_after']]}",
             "",
             "| mode | s per answer (median, min-max) | decode tok/s | decoder calls per answer | tokens per answer "
             "| forced share |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in result["modes"].items():
        low, high = m["seconds_per_answer_min_max"]
        lines.append(f"| {name} | {m['seconds_per_answer_median']:.3f} ({low:.3f}-{high:.3f}) | "
                     f"{m['decode_tokens_per_s_median']:.2f} | {m['decoder_calls_per_answer']:.1f} | "
                     f"{m['tokens_per_answer']:.1f} | {100 * m['forced_share']:.0f}% |")
    low, high = result["speedup_min_max"]
    lines += ["", f"speedup end to end: {result['speedup_median']:.2f}x (median of per-round ratios, {low:.2f}-{high:.2f}); "
              f"tokens identical in every answer: {result['identical_tokens']}"
              + ("" if result["identical_tokens"] else f" (first differences: {result['differences']})"),
              f"example answer: {result['example_answer']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
