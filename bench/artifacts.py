"""What the bench runs on, made once and reused: the checkpoint, the image and our exported folders.

* `--config CONFIG.json` becomes a random-weight checkpoint (`python -m bench.make_checkpoint`)
  in WORK/checkpoint-<name>-<hash of the config>; a checkpoint folder is used as it is.
* the default image is assets/astronaut.jpg resized to 448x448 (196 Qwen3-VL image tokens), or to
  --image-size WxH, saved as PNG (--image with --image-size: that image resized).
* each of our configurations is exported to WORK/<cfg> with `python -m vlm_core.export CKPT -o WORK/<cfg>
  --force` and the configuration's EXPORTS arguments (`--quantize <cfg>`; `none-kv16` is `--quantize
  none --kv-dtype float16`), unless that folder's manifest already records the same checkpoint as its
  source, the same quantization and KV cache dtype, and is newer than the checkpoint's files.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from .worker import ROOT, thread_env

DEFAULT_IMAGE = os.path.join(ROOT, "assets", "astronaut.jpg")
# Our configurations: (--quantize, --kv-dtype), the KV dtype being export's default for that --quantize.
EXPORTS = {"none": ("none", "float32"), "none-kv16": ("none", "float16"), "int8": ("int8", "float16"),
           "int4": ("int4", "float16"), "mixed": ("mixed", "float16")}
IMAGE_SIDE = 448


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_checkpoint(config: str, work_dir: str) -> str:
    """A checkpoint folder for `config` (a folder, or a config.json to fill with random weights)."""
    if os.path.isdir(config):
        return os.path.abspath(config)
    if not os.path.isfile(config):
        raise SystemExit(f"error: --config {config!r} is neither a checkpoint folder nor a config.json")
    with open(config, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:10]
    name = os.path.splitext(os.path.basename(config))[0]
    folder = os.path.join(work_dir, f"checkpoint-{name}-{digest}")
    if glob.glob(os.path.join(folder, "*.safetensors")) and os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    staging = folder + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    log(f"writing a random-weight checkpoint from {config} to {folder}")
    subprocess.run([sys.executable, "-m", "bench.make_checkpoint", os.path.abspath(config), "-o", staging],
                   cwd=ROOT, env=thread_env(os.cpu_count() or 1), check=True)
    os.rename(staging, folder)
    return folder


def parse_size(text: str) -> tuple:
    """'1024x768' -> (1024, 768): width x height in pixels; ValueError for anything else."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT in pixels (e.g. 1024x768)")
    return int(parts[0]), int(parts[1])


def image_size(path: str) -> list:
    """[width, height] of the image at `path`."""
    from PIL import Image

    with Image.open(path) as image:
        return list(image.size)


def default_image(work_dir: str, size: tuple | None = None, source: str | None = None) -> str:
    """`source` (default assets/astronaut.jpg) resized to `size` (width, height; default 448x448: a multiple
    of 32, 28x28 patches -> 196 Qwen3-VL tokens), as PNG in `work_dir`."""
    width, height = size or (IMAGE_SIDE, IMAGE_SIDE)
    source = source or DEFAULT_IMAGE
    stem = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(work_dir, f"{stem}-{width}x{height}.png" if size else f"{stem}-{IMAGE_SIDE}.png")
    if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(source):
        from PIL import Image

        with Image.open(source) as image:
            image.convert("RGB").resize((width, height), Image.BICUBIC).save(path)
    return path


def _newest_mtime(checkpoint: str) -> float:
    files = glob.glob(os.path.join(checkpoint, "*.safetensors")) + [os.path.join(checkpoint, "config.json")]
    return max(os.path.getmtime(f) for f in files if os.path.exists(f))


def is_current(folder: str, checkpoint: str, cfg: str) -> bool:
    """True when `folder` holds a finished export of `checkpoint` with configuration `cfg`'s quantization and
    KV cache dtype (exports made before the KV dtype was recorded have a float32 cache)."""
    quantize, kv_dtype = EXPORTS[cfg]
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    from vlm_core.runtime.manifest import FORMAT_VERSION

    return (manifest.get("format_version") == FORMAT_VERSION  # an older graph contract: export again
            and manifest.get("source", {}).get("checkpoint") == os.path.abspath(checkpoint)
            and manifest.get("quantization", {}).get("method") == quantize
            and manifest.get("text_config", {}).get("kv_dtype", "float32") == kv_dtype
            and manifest.get("parity", {}).get("passed") is True
            and os.path.getmtime(path) >= _newest_mtime(checkpoint))


def ensure_exports(checkpoint: str, configs: list, work_dir: str, jobs: int = 1) -> dict:
    """Export each of `configs` (keys of EXPORTS) into WORK/<cfg> unless current; returns cfg -> folder.

    Up to `jobs` exports run at once (each logs to WORK/logs/export-<cfg>.log)."""
    folders = {cfg: os.path.join(work_dir, cfg) for cfg in configs}
    todo = [cfg for cfg in configs if not is_current(folders[cfg], checkpoint, cfg)]
    for cfg in sorted(set(configs) - set(todo)):
        log(f"reusing {folders[cfg]} (exported from {checkpoint})")
    running = {}
    while todo or running:
        while todo and len(running) < max(1, jobs):
            cfg = todo.pop(0)
            log_path = os.path.join(work_dir, "logs", f"export-{cfg}.log")
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            quantize, kv_dtype = EXPORTS[cfg]
            command = ["-m", "vlm_core.export", checkpoint, "-o", folders[cfg], "--force", "--quantize", quantize,
                       "--kv-dtype", kv_dtype]
            log(f"exporting {cfg}: python {' '.join(command)} (log: {log_path})")
            handle = open(log_path, "w", encoding="utf-8")
            proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=thread_env(os.cpu_count() or 1),
                                    stdout=handle, stderr=subprocess.STDOUT)
            running[cfg] = (proc, handle, log_path, time.perf_counter())
        for cfg, (proc, handle, log_path, start) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()
            del running[cfg]
            if proc.returncode != 0:
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    tail = "".join(f.readlines()[-10:])
                raise SystemExit(f"error: exporting {cfg} failed (exit {proc.returncode}):\n{tail}")
            log(f"exported {cfg} in {time.perf_counter() - start:.0f} s")
        time.sleep(0.2)
    return folders
