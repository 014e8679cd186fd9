"""`python -m bench.memory_limit --folder EXPORT`: the smallest memory limit at which the model still answers at speed.

    python -m bench.memory_limit --folder bench-out/export-int4 --repeats 2 --json-out memory-limit.json

First the model answers unlimited (a fresh process per repetition, as `python -m bench` runs them): decode
tok/s, TTFT, peak RSS. Then it answers inside a memory cgroup whose limit steps down from roundup(peak RSS,
--step-mib) by --step-mib until a run fails (OOM-killed, timed out, error) or decodes below --threshold
(default 90%) of the unlimited median. Page cache counts against a cgroup's limit, memory-mapped weights
included: a limit below what the model touches makes weight pages get evicted and read again (slower
decode) before anything is killed. Before every run the export folder's pages are dropped from the page
cache, since a page stays charged to the group that first read it. Whether swap is on is recorded: with
swap a limit slows a run down instead of killing it (--no-swap caps swap in the group too).
Needs root (or a delegated cgroup) on Linux; elsewhere it prints why it is skipped and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from . import artifacts, machine
from .__main__ import DEFAULT_PROMPT
from .cgroup import CgroupUnavailable, MemoryGroup, drop_file_cache, probe, swap_devices
from .report import write_json
from .worker import RESULT_PREFIX, ROOT, thread_env

MIB = 1 << 20


def roundup_mib(mib: float, step: int) -> int:
    """`mib` rounded up to a whole number of `step`-MiB steps (at least one step)."""
    return max(step, -(-int(mib * MIB) // (step * MIB)) * step)


def limits(start_mib: int, step_mib: int, floor_mib: int) -> list:
    """The limits tried, in MiB: start, start - step, ... down to floor (inclusive, at least one step)."""
    floor_mib = max(floor_mib, step_mib)
    return list(range(start_mib, floor_mib - 1, -step_mib))


def summarize_step(limit_mib: int | None, runs: list, baseline_tok_s: float | None, threshold: float) -> dict:
    """One row: runs are dicts with `answered`, `oom_killed`, and for answered runs the worker's result.
    It passes when every repetition answered and the median decode rate is >= threshold x baseline."""
    answered = [r for r in runs if r["answered"]]
    row = {"limit_mib": limit_mib, "repeats": len(runs), "answered": bool(runs) and len(answered) == len(runs),
           "oom_killed": any(r.get("oom_killed") for r in runs), "timed_out": any(r.get("timed_out") for r in runs),
           "failure": next((r["failure"] for r in runs if not r["answered"]), None), "runs": runs}

    def median(key):
        values = [r[key] for r in answered if r.get(key) is not None]
        return statistics.median(values) if values else None

    for key in ("decode_tokens_per_s", "ttft_s", "peak_rss_mb", "cgroup_peak_mb", "wall_s"):
        row[key] = median(key)
    rate = row["decode_tokens_per_s"]
    row["ratio"] = rate / baseline_tok_s if rate is not None and baseline_tok_s else None
    row["same_tokens"] = all(r.get("same_tokens", True) for r in answered) if answered else None
    row["passed"] = row["answered"] and row["ratio"] is not None and row["ratio"] >= threshold
    return row


def search(candidates: list, measure, baseline_tok_s: float, threshold: float) -> tuple:
    """Try each limit (MiB, largest first) with `measure(limit) -> list of runs` until a step fails.
    Returns (rows, smallest passing limit or None)."""
    rows, smallest = [], None
    for limit in candidates:
        row = summarize_step(limit, measure(limit), baseline_tok_s, threshold)
        rows.append(row)
        if not row["passed"]:
            break
        smallest = limit
    return rows, smallest


def run_once(spec: dict, cgroup: tuple | None, limit_mib: int | None, log_path: str, timeout_s: float,
             no_swap: bool, reference_tokens: list | None) -> dict:
    """One worker in a fresh process (in a fresh cgroup with `limit_mib` when `cgroup` is (version, parent)).
    Returns answered/exit code/OOM-killed/timed out, the worker's timings and the group's peak charge."""
    drop_file_cache(spec["folder"])
    argv = [sys.executable, "-m", "bench.worker", json.dumps(spec)]  # task "onnx": bench/ours.py
    group = None
    if cgroup:
        name = f"vlm-bench-{os.getpid()}-{limit_mib or 'unlimited'}-{time.monotonic_ns()}"
        group = MemoryGroup(cgroup[0], cgroup[1], name, limit_mib * MIB if limit_mib else None, no_swap)
        argv = group.wrap(argv)
    out = {"limit_mib": limit_mib, "answered": False, "timed_out": False, "oom_killed": False}
    start = time.perf_counter()
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=thread_env(spec["threads"]), stdout=subprocess.PIPE,
                                    stderr=log, text=True)
            try:
                stdout, _ = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()  # our own child (sh exec'd python, so this is the worker itself)
                stdout, _ = proc.communicate()
                out["timed_out"] = True
        out["wall_s"] = time.perf_counter() - start
        out["exit_code"] = proc.returncode
        if group:
            peak = group.peak_bytes()
            out["cgroup_peak_mb"] = round(peak / MIB, 1) if peak is not None else None
            out["oom_kills"] = group.oom_kills()
            out["oom_killed"] = out["oom_kills"] > 0 or (proc.returncode == -9 and not out["timed_out"])
    finally:
        if group:
            group.remove()
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode == 0 and lines:
        result = json.loads(lines[-1][len(RESULT_PREFIX):])
        out.update({k: result.get(k) for k in ("decode_tokens_per_s", "ttft_s", "peak_rss_mb", "load_s",
                                               "prompt_tokens", "image_tokens")})
        out["token_ids"] = result.get("token_ids")
        if reference_tokens is not None:
            out["same_tokens"] = result.get("token_ids") == reference_tokens
        out["answered"] = True
    else:
        out["failure"] = ("timed out" if out["timed_out"] else "OOM-killed" if out["oom_killed"]
                          else f"exit {proc.returncode}: {_last_line(log_path)}")
        out["log"] = log_path
    return out


def _last_line(path: str) -> str:
    """The log's last non-empty line (a traceback's exception, e.g. ORT failing to allocate under the limit)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][:200] if lines else "no output"


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    """A table cell: `value` formatted, or `none`."""
    return none if value is None else format(value, spec)


def table(rows: list) -> str:
    """The markdown table of every step (the unlimited run first)."""
    lines = ["| limit (MiB) | answered | decode tok/s | vs unlimited | TTFT (s) | peak RSS (MiB) | "
             "cgroup peak (MiB) | OOM-killed | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        answered = "yes" if row["answered"] else f"no ({row['failure']})"
        same = "-" if row.get("same_tokens") is None else ("yes" if row["same_tokens"] else "no")
        lines.append(f"| {row['limit_mib'] or 'unlimited'} | {answered} | {fmt(row['decode_tokens_per_s'], '.1f')} | "
                     f"{fmt(row['ratio'], '.0%')} | {fmt(row['ttft_s'], '.3f')} | {fmt(row['peak_rss_mb'], '.0f')} | "
                     f"{fmt(row.get('cgroup_peak_mb'), '.0f')} | {'yes' if row['oom_killed'] else 'no'} | {same} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.memory_limit", description=__doc__.splitlines()[0])
    p.add_argument("--folder", help="an exported model folder (python -m vlm_core.export ... -o FOLDER)")
    p.add_argument("--image", help="the image (default: assets/astronaut.jpg resized to 448x448)")
    p.add_argument("--text-only", action="store_true", help="no image: the prompt alone")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question (default: bench's description request)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per run (default 32)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="runs per step; medians reported (default 2)")
    p.add_argument("--warmup", type=int, choices=(0, 1), default=1,
                   help="a 2-token call before the timed one (default 1)")
    p.add_argument("--step-mib", type=int, default=256, help="limit step in MiB (default 256; smaller for tiny models)")
    p.add_argument("--start-mib", type=int, help="first limit (default: unlimited peak RSS rounded up to a step)")
    p.add_argument("--floor-mib", type=int, default=0, help="never try below this limit (default: one step)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="a step passes at >= this fraction of the unlimited decode rate (default 0.9)")
    p.add_argument("--timeout-s", type=float,
                   help="per-run limit (default: 5x the unlimited run's wall time + 60 s); a run past it fails")
    p.add_argument("--no-swap", action="store_true", help="also cap swap in the group (no effect without swap)")
    p.add_argument("--no-prepacked-cache", action="store_true",
                   help="pack 4-bit weights in memory at every load (the runtime's prepacked_cache=False) instead of "
                        "mapping the copy under FOLDER/prepacked")
    p.add_argument("--work-dir", default=os.path.join("bench-out", "memory-limit"),
                   help="logs and the resized image (default bench-out/memory-limit)")
    p.add_argument("--json-out", help="results JSON (default WORK/memory-limit.json)")
    args = p.parse_args(argv)
    if not args.folder or not os.path.isfile(os.path.join(args.folder, "manifest.json")):
        p.error(f"--folder {args.folder!r} is not an exported model folder (no manifest.json)")
    for flag in ("new_tokens", "threads", "repeats", "step_mib"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the decode rate needs a second token)")
    if not 0 < args.threshold <= 1:
        p.error("--threshold must be in (0, 1]")
    if args.image and not os.path.isfile(args.image):
        p.error(f"--image {args.image!r} is not a file")
    args.folder = os.path.abspath(args.folder)
    args.work_dir = os.path.abspath(args.work_dir)
    args.json_out = os.path.abspath(args.json_out or os.path.join(args.work_dir, "memory-limit.json"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started, host, swap = time.time(), machine.describe(), swap_devices()
    os.makedirs(os.path.join(args.work_dir, "logs"), exist_ok=True)
    result = {"machine": host, "swap": swap, "started": started}
    try:
        cgroup = probe()
    except CgroupUnavailable as e:
        text = f"## memory limit: skipped: {e}\n\n{machine.markdown(host)}"
        print(text)
        result.update(skipped=str(e), markdown=text)
        write_json(args.json_out, result)
        return 0
    image = None if args.text_only else os.path.abspath(args.image or artifacts.default_image(args.work_dir))
    spec = {"task": "onnx", "folder": args.folder, "image": image,
            "prompt": args.prompt, "new_tokens": args.new_tokens, "threads": args.threads, "warmup": args.warmup,
            "prepacked_cache": not args.no_prepacked_cache}
    artifacts.log(f"memory cgroup v{cgroup[0]} under {cgroup[1]}; swap {'on: ' + ', '.join(swap) if swap else 'off'}")

    def measure(limit_mib, timeout_s, reference):
        runs = []
        for rep in range(args.repeats):
            log_path = os.path.join(args.work_dir, "logs", f"{limit_mib or 'unlimited'}-{rep + 1}.log")
            run = run_once(spec, cgroup, limit_mib, log_path, timeout_s, args.no_swap, reference)
            runs.append(run)
            artifacts.log(f"limit {limit_mib or 'unlimited'} MiB #{rep + 1}: " + (
                f"decode {run['decode_tokens_per_s']:.1f} tok/s, ttft {run['ttft_s']:.3f} s, peak RSS "
                f"{run['peak_rss_mb']:.0f} MiB, cgroup peak {fmt(run.get('cgroup_peak_mb'), '.0f')} MiB"
                if run["answered"] else run["failure"]))
            if not run["answered"]:
                break  # the step has failed; further repetitions would not change that
        return runs

    # The unlimited runs go in an unlimited group too, so their cgroup peak (page cache included) is known.
    unlimited = summarize_step(None, measure(None, 3600, None), None, args.threshold)
    if not unlimited["answered"]:
        print(table([unlimited]))
        artifacts.log(f"the unlimited run failed: {unlimited['failure']}")
        return 1
    baseline = unlimited["decode_tokens_per_s"]
    unlimited.update(ratio=1.0, passed=True)
    reference = unlimited["runs"][0]["token_ids"]
    unlimited["same_tokens"] = all(r["token_ids"] == reference for r in unlimited["runs"])
    timeout_s = args.timeout_s or 5 * unlimited["wall_s"] + 60
    start = args.start_mib or roundup_mib(unlimited["peak_rss_mb"], args.step_mib)
    rows, smallest = search(limits(start, args.step_mib, args.floor_mib),
                            lambda limit: measure(limit, timeout_s, reference), baseline, args.threshold)
    what = "text only" if args.text_only else f"one {'x'.join(map(str, artifacts.image_size(image)))} image"
    first = unlimited["runs"][0]
    verdict = (f"**smallest passing limit: {smallest} MiB** (steps of {args.step_mib} MiB from {start} MiB)"
               if smallest else f"**no step passed** (the first, {start} MiB, already failed or was slow)")
    text = (f"## memory limit: {os.path.basename(args.folder)}, {what}, {first['prompt_tokens']} prompt tokens, "
            f"{args.new_tokens} new tokens, {args.threads} threads, median of {args.repeats}\n\n"
            f"{machine.markdown(host)}\n- memory cgroup v{cgroup[0]} under {cgroup[1]}; swap: "
            f"{'on (' + ', '.join(swap) + ')' + (', capped in the group' if args.no_swap else '') if swap else 'off'}; "
            f"page cache of the export dropped before each run\n\n{table([unlimited] + rows)}\n\n"
            f"{verdict}: decode >= {args.threshold:.0%} of the unlimited {baseline:.1f} tok/s")
    print(text)
    result.update(settings=vars(args), image=image, cgroup=list(cgroup),
                  baseline_decode_tokens_per_s=baseline, timeout_s=timeout_s, start_mib=start, unlimited=unlimited,
                  steps=rows, smallest_passing_mib=smallest, markdown=text, elapsed_s=time.time() - started)
    write_json(args.json_out, result)
    artifacts.log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
