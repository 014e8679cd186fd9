"""llama.cpp's side of `python -m bench.peers`: find its tools, make the Q4_K_M GGUF, time it with llama-bench.

The checkpoint (a random-weight Qwen3ForCausalLM) goes through llama.cpp's own convert_hf_to_gguf.py (f16,
run by the peers' interpreter, which has torch and transformers), then llama-quantize to Q4_K_M.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

from .worker import ROOT, thread_env

SETUP = "bench/peers_setup.md"
LLAMA_RECIPE = ("pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36; build its vendor/llama.cpp: "
                "cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-bench "
                "llama-quantize (" + SETUP + ")")


class Skip(Exception):
    """A peer cannot run here; the message is the one-line reason (with the install recipe)."""


def run_step(cmd: list, log_path: str, what: str) -> None:
    """A setup command (checkpoint, build, convert, quantize), logged; RuntimeError with the log's tail."""
    print(f"{what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=thread_env(os.cpu_count() or 1))
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = (f.read().strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {tail[:300]} (log {log_path})")


def llama_tools(args) -> tuple[str, str, str]:
    """(llama-bench, llama-quantize, convert_hf_to_gguf.py), or Skip with the build recipe."""
    bench = args.llama_bench or shutil.which("llama-bench") or "/work/llama.cpp/build/bin/llama-bench"
    if not (os.path.isfile(bench) and os.access(bench, os.X_OK)):
        raise Skip(f"llama-bench not found ({bench}); build recipe: {LLAMA_RECIPE}")
    bench = os.path.abspath(bench)
    quantize = os.path.join(os.path.dirname(bench), "llama-quantize")
    quantize = quantize if os.path.exists(quantize) else shutil.which("llama-quantize")
    if not quantize:
        raise Skip(f"llama-quantize not found beside {bench} or on PATH; build recipe: {LLAMA_RECIPE}")
    convert, folder = args.llama_convert, os.path.dirname(bench)
    while not convert and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
        if os.path.exists(os.path.join(folder, "convert_hf_to_gguf.py")):
            convert = os.path.join(folder, "convert_hf_to_gguf.py")
    if not convert or not os.path.exists(convert):
        raise Skip("convert_hf_to_gguf.py not found above llama-bench; pass --llama-convert (llama.cpp's source)")
    return bench, quantize, convert


def llama_model(args, python: str, ckpt: str, quantize: str, convert: str) -> str:
    """WORK/model-Q4_K_M.gguf: the checkpoint converted to GGUF f16, then quantized to Q4_K_M (made once)."""
    f16, q4 = os.path.join(args.work_dir, "model-f16.gguf"), os.path.join(args.work_dir, "model-Q4_K_M.gguf")
    if not os.path.exists(q4):
        logs = os.path.join(args.work_dir, "logs")
        run_step([python, convert, ckpt, "--outfile", f16, "--outtype", "f16"], os.path.join(logs, "gguf.log"),
                 "gguf convert")
        run_step([quantize, f16, q4 + ".tmp", "Q4_K_M", str(args.threads)], os.path.join(logs, "quantize.log"),
                 "llama-quantize")
        os.replace(q4 + ".tmp", q4)
        os.remove(f16)
    return q4


def llama_run(bench: str, gguf: str, prompt: int, new: int, threads: int, log_path: str, extra=()) -> dict:
    """One llama-bench process: prefill of `prompt` tokens (depth 0) and `new` decoded tokens at depth `prompt`
    (-d: after as many context tokens as our prompt); `extra`: more llama-bench options.
    Peak RSS: its VmHWM, polled every 20 ms (the process is not ours to read it at exit)."""
    cmd = [bench, "-m", gguf, "-p", str(prompt), "-n", str(new), "-d", f"0,{prompt}", "-t", str(threads),
           "-r", "1", "-o", "json", *extra]
    with open(log_path, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=thread_env(threads))
        peak = [0.0]

        def poll():
            while proc.poll() is None:
                try:
                    with open(f"/proc/{proc.pid}/status", encoding="ascii") as s:
                        hwm = next((ln for ln in s if ln.startswith("VmHWM:")), None)
                    peak[0] = max(peak[0], int(hwm.split()[1]) / 1024.0) if hwm else peak[0]
                except (OSError, ValueError):
                    pass
                time.sleep(0.02)
        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        out, _ = proc.communicate()
        watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench exit {proc.returncode} (log {log_path})")
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0 and r.get("n_depth", 0) == 0)
    tg = next(r for r in rows if r["n_prompt"] == 0 and r["n_gen"] == new and r.get("n_depth", 0) == prompt)
    return {"prefill_s": prompt / pp["avg_ts"], "prefill_tokens_per_s": pp["avg_ts"],
            "decode_tokens_per_s": tg["avg_ts"], "prompt_tokens": prompt, "peak_rss_mb": round(peak[0], 1),
            "cpu_info": pp.get("cpu_info"), "build_commit": pp.get("build_commit"), "model_type": pp.get("model_type")}
