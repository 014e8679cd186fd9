#!/usr/bin/env python3
"""The install a user gets, checked end to end (CI runs it; `python3 scripts/wheel_check.py` by hand).

1. A fresh virtual environment gets a real, non-editable `pip install '.[export,serve]'` (torch pinned to the
   2.13.0 CPU build, every other package the newest the pins allow) and the versions pip chose are printed.
2. `import vlm_core` and `import kernels` (the hub's package, which transformers >= 5.25 imports) both work.
3. From a folder holding an app's own `models.py`, `kernels.py`, `runtime.py` and `export.py` (each raises if
   imported, so any use of those names by vlm-core fails loudly), with that folder on PYTHONPATH as an app's is:
   `vlm-export --demo` exports, `vlm-generate` answers, `vlm-serve` answers one chat request, and
   `from vlm_core import VisionLanguageModel, SamplingParams` answers from Python.

Exits 0 when all of it holds; otherwise prints which step failed (with its output) and the versions pip chose,
so that a new release that breaks us shows up as a red CI naming the package.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "assets", "astronaut.jpg")
SHADOWS = ("models", "kernels", "runtime", "export")
KEY_PACKAGES = ("torch", "transformers", "kernels", "onnx", "onnxscript", "onnxruntime", "tokenizers", "numpy",
                "pillow", "jinja2", "starlette", "uvicorn", "huggingface-hub", "vlm-core")


class CheckFailed(Exception):
    pass


def run(step: str, cmd: list[str], timeout: int, **kwargs) -> str:
    """Run one step; its combined output, or CheckFailed naming the step with the output's tail."""
    print(f"== {step}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kwargs)
    print(f"   rc={proc.returncode} in {time.monotonic() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        raise CheckFailed(f"{step} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc.stdout


def chosen_versions(python: str) -> dict[str, str]:
    out = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(out or "[]")}


def serve_one_request(bin_dir: str, model: str, cwd: str, env: dict) -> str:
    """Start vlm-serve on a free loopback port, send one chat request with an image, return the answer's text."""
    cmd = [os.path.join(bin_dir, "vlm-serve"), "-m", model, "--port", "0", "--threads", "1", "--log-level", "warning"]
    print(f"== vlm-serve answers one request: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        port = None
        for line in proc.stdout:  # the server prints its address once it listens
            lines.append(line)
            match = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
            if match:
                port = int(match.group(1))
                break
        if port is None:
            raise CheckFailed("vlm-serve did not start:\n" + "".join(lines)[-4000:])
        with open(IMAGE, "rb") as f:
            import base64

            data_url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
        body = {"model": os.path.basename(model), "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                          {"type": "text", "text": "Describe it."}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        choice = answer["choices"][0]
        if answer["usage"]["completion_tokens"] < 1 or not isinstance(choice["message"]["content"], str):
            raise CheckFailed(f"vlm-serve gave no answer: {answer}")
        return choice["message"]["content"]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def check(work: str) -> dict[str, str]:
    venv = os.path.join(work, "venv")
    python = os.path.join(venv, "bin", "python")
    bin_dir = os.path.join(venv, "bin")
    run("fresh virtual environment", [sys.executable, "-m", "venv", venv], 120)
    run("pip upgrade", [python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], 600)
    # a copy of the tree, so that the build leaves nothing in the checkout (build/, *.egg-info)
    source = os.path.join(work, "source")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info",
                                                               "build", "demo-out", "out", "bench-out"))
    try:
        run("non-editable install of '.[export,serve]'",
            [python, "-m", "pip", "install", "--quiet", f"{source}[export,serve]"], 1800)
    finally:
        versions = chosen_versions(python)
        print("versions pip chose: " + ", ".join(f"{name}=={versions[name]}" for name in KEY_PACKAGES
                                                 if name in versions), flush=True)
    site = run("where vlm_core is imported from", [python, "-I", "-c",
                                                   "import vlm_core, kernels; print(vlm_core.__file__); "
                                                   "print(kernels.__file__)"], 120, cwd=work)
    if "site-packages" not in site.split("\n")[0] or os.path.abspath(ROOT) in site:
        raise CheckFailed(f"vlm_core was not imported from the installed wheel:\n{site}")
    top = run("top-level names the wheel installed", [python, "-I", "-c", (
        "import importlib.metadata as m; files = m.distribution('vlm-core').files; "
        "print(sorted({str(f).split('/')[0] for f in files if not str(f).startswith(('vlm_core-', '..'))}))")],
        60, cwd=work)
    names = set(eval(top.strip().splitlines()[-1]))  # a printed list of strings
    if names - {"vlm_core"} - {"bin"}:
        raise CheckFailed(f"the wheel installs top-level names other than vlm_core: {sorted(names)}")

    app = os.path.join(work, "app")
    os.makedirs(app)
    for name in SHADOWS:
        with open(os.path.join(app, f"{name}.py"), "w") as f:
            f.write(f'raise ImportError("the app\'s own {name}.py was imported by vlm-core")\n')
    env = dict(os.environ, PYTHONPATH=app)  # the app's folder first on sys.path, as a Flask app's is
    model = os.path.join(work, "demo-model")
    # transformers (export time) imports the hub's `kernels`, so the export runs with the app's folder as its
    # working directory but not on PYTHONPATH: shadowing transformers' own imports is not ours to fix.
    run("vlm-export --demo", [os.path.join(bin_dir, "vlm-export"), "--demo", "-o", model], 900, cwd=app)
    answer = run("vlm-generate", [os.path.join(bin_dir, "vlm-generate"), "-m", model, "--image", IMAGE, "-p",
                                  "Describe it.", "--greedy", "--max-new-tokens", "4", "--min-new-tokens", "4",
                                  "--json", "--threads", "1"], 300, cwd=app, env=env)
    if len(json.loads(answer.strip().splitlines()[-1])["token_ids"]) != 4:
        raise CheckFailed(f"vlm-generate did not answer 4 tokens:\n{answer}")
    served = serve_one_request(bin_dir, model, app, env)
    embedded = run("embedding API from the app's folder", [python, "-c", (
        "from vlm_core import VisionLanguageModel, SamplingParams\n"
        f"vlm = VisionLanguageModel({model!r}, threads=1)\n"
        "r = vlm.generate([{'role': 'user', 'content': 'Hi'}], SamplingParams(greedy=True), max_new_tokens=3, "
        "min_new_tokens=3)\n"
        "assert len(r.token_ids) == 3, r\nprint('embedded answer:', repr(r.text))")], 300, cwd=app, env=env)
    for name in ("--help",):
        for command in ("vlm-export", "vlm-generate", "vlm-serve"):
            run(f"{command} {name}", [os.path.join(bin_dir, command), name], 120, cwd=app,
                env=env if command != "vlm-export" else None)
    print(f"served answer: {served!r}; {embedded.strip().splitlines()[-1]}")
    return versions


def main() -> int:
    work = tempfile.mkdtemp(prefix="vlm-wheel-check-")
    try:
        check(work)
    except (CheckFailed, subprocess.TimeoutExpired) as e:
        print(f"wheel check FAILED: {e}", flush=True)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("wheel check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
