"""One measurement in a process of its own: `python -m bench.worker SPEC_JSON`.

Every configuration (and every repetition) runs in a fresh interpreter, so its peak resident
memory is its own: VmHWM from /proc/self/status (the high-water mark of this process's memory
map, fresh after exec) rather than ru_maxrss, which Linux carries over from the forking parent.
The worker prints one line `BENCH-RESULT {json}` on stdout; the parent side is `launch`.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

RESULT_PREFIX = "BENCH-RESULT "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkerError(RuntimeError):
    """A worker process failed; the message holds the tail of its log (returncode, last_line, log_path apart)."""

    def __init__(self, message: str, returncode: int, last_line: str, log_path: str):
        super().__init__(message)
        self.returncode, self.last_line, self.log_path = returncode, last_line, log_path


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _task(name: str):
    if name == "eager":
        from .eager import run
    elif name == "onnx":
        from .ours import run
    elif name == "accuracy-reference":
        from .accuracy import reference as run
    elif name == "accuracy-compare":
        from .accuracy import compare as run
    else:
        raise SystemExit(f"unknown bench task {name!r}")
    return run


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    result = _task(spec["task"])(spec)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def thread_env(threads: int) -> dict:
    """The environment for a worker: BLAS/OpenMP pools capped to `threads` like ONNX Runtime's."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def launch(spec: dict, log_path: str, threads: int) -> dict:
    """Run `spec` in a fresh interpreter; return its result (stderr goes to `log_path`)."""
    return launch_command([sys.executable, "-m", "bench.worker", json.dumps(spec)], log_path, threads, spec["task"])


def launch_command(cmd: list, log_path: str, threads: int, what: str) -> dict:
    """Run a worker command (one that prints a `BENCH-RESULT {json}` line) in a fresh process with `threads`
    threads; return that result. Raises WorkerError (named `what`) when it fails or prints none."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=thread_env(threads), stdout=subprocess.PIPE, stderr=log, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            log_lines = f.read().strip().splitlines()
        tail = "".join(line + "\n" for line in log_lines[-15:])
        raise WorkerError(f"{what} worker failed (exit {proc.returncode}); log {log_path}:\n{tail}", proc.returncode,
                          (log_lines[-1:] or ["(empty log)"])[0], log_path)
    return json.loads(lines[-1][len(RESULT_PREFIX):])


if __name__ == "__main__":
    sys.exit(main())
