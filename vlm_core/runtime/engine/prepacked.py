"""Pre-packed 4-bit weights written once next to the export, then memory-mapped on every later load.

At session creation MLAS copies each MatMulNBits weight into its own layout (the 4-bit blocks interleaved with
their scales and block sums). That copy is anonymous memory, and more than the file: 1265 MiB for the
Qwen3-VL-2B int4 decoder, whose weights take 1076 MB on disk. Anonymous memory cannot be dropped under a
memory limit, so it stays while the vision graph runs its large activations.

ONNX Runtime can write the packed layout into an optimized model's external data file
(`session.save_external_prepacked_constant_initializers`, ONNX format only). Loading that model memory-maps the
blobs and hands them to the kernels (`UseSharedPrePackedBuffers`) instead of packing again: the same bytes,
file-backed. Measured on the 2B int4 decoder (ONNX Runtime 1.32, AMD EPYC Zen 4): RssAnon after creating the
session 1265 -> 74 MiB, RssFile 238 -> 1470 MiB, and the session is built in 1.8 s instead of 3.6 s.

The packed layout depends on the CPU (MLAS picks its kernels by instruction set) and on the ONNX Runtime
version, so it is written on the first load on a host, not at export, into
``<folder>/prepacked/<graph>-<key>/`` where the key hashes both with the source graph's files. A folder that
cannot be written (read-only, full) still loads, pre-packing in memory as before, with a one-line note.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time

log = logging.getLogger("vlm_core.runtime")

FOLDER = "prepacked"  # under the model folder; safe to delete at any time (the next load writes it again)
DATA_SUFFIX = ".data"
WORK_PREFIX = ".writing-"
ABANDONED_S = 3600  # a work folder this old was left by a process that died writing (a write takes seconds)


def cpu_signature() -> str:
    """What decides MLAS's kernels on this host: the machine type and the CPU's feature flags (Linux), else
    what the platform module says about the processor."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    return platform.machine() + ":" + " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + ":" + platform.processor()


def cache_key(folder: str, graph: dict) -> str:
    """16 hex digits naming one packed copy: ONNX Runtime's version, the CPU, and the source graph's files
    (name, size and modification time of the graph and its external data), so a re-export, an upgrade or
    another CPU writes a new copy instead of loading a stale one."""
    import onnxruntime as ort

    digest = hashlib.sha256(f"ort={ort.__version__}\ncpu={cpu_signature()}\n".encode())
    for name in [graph["file"], *graph.get("external_data", [])]:
        st = os.stat(os.path.join(folder, name))
        digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def packed_path(folder: str, graph: dict) -> str:
    """Where the packed copy of `graph` lives (it may not exist yet)."""
    stem = os.path.basename(graph["file"])
    return os.path.join(folder, FOLDER, f"{os.path.splitext(stem)[0]}-{cache_key(folder, graph)}", stem)


def write_packed(source: str, target: str, options) -> None:
    """Build a session from `source` that saves its optimized graph to `target`, the packed blobs in
    `target` + DATA_SUFFIX, and drop it. Written into a fresh folder beside the target's and renamed into
    place, so a reader never sees half a copy; a copy another process finished first is kept."""
    import onnxruntime as ort

    final_dir = os.path.dirname(target)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent)
    try:
        name = os.path.basename(target)
        options.optimized_model_filepath = os.path.join(work, name)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         name + DATA_SUFFIX)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        # ORT writes the files while building the session; the session itself (packed in anonymous memory) is
        # dropped at once
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        for written in (name, name + DATA_SUFFIX):
            if not os.path.exists(os.path.join(work, written)):
                raise OSError(f"ONNX Runtime wrote no {written}")
            with open(os.path.join(work, written), "rb") as f:
                os.fsync(f.fileno())  # on disk before the rename makes the copy visible
        try:
            os.rename(work, final_dir)
        except OSError:
            if not os.path.exists(target):
                raise
            # another process renamed its copy first: use that one
    finally:
        shutil.rmtree(work, ignore_errors=True)
    remove_stale(final_dir)


def remove_stale(current_dir: str) -> None:
    """Delete the other packed copies of the same graph (an older ONNX Runtime, a re-export, another CPU), and
    work folders abandoned by a process that died writing (OOM-killed, say). A process still mapping a copy
    keeps its pages: unlinking a mapped file frees it only at unmap."""
    parent, current = os.path.split(current_dir)
    stem = current.rsplit("-", 1)[0]
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if entry.startswith(WORK_PREFIX):
            try:
                abandoned = time.time() - os.stat(path).st_mtime > ABANDONED_S
            except OSError:
                continue
            if abandoned:
                shutil.rmtree(path, ignore_errors=True)
        elif entry != current and entry.rsplit("-", 1)[0] == stem:
            shutil.rmtree(path, ignore_errors=True)


def packed_graph(folder: str, graph: dict, make_options) -> str | None:
    """The path of `graph`'s packed copy, written now if this host has none (`make_options()` gives fresh
    SessionOptions for the writing session); None, with a one-line note, when it cannot be written: the
    caller then loads the source graph and pre-packs in memory."""
    source = os.path.join(folder, graph["file"])
    try:
        target = packed_path(folder, graph)
        if not os.path.exists(target):
            # a copy the size of the graph and its packed weights (2.37 GB for the 2B int4): say so, once
            log.warning("note: writing %s's pre-packed weights for this host to %s (once; later loads map it; "
                        "--no-prepacked-cache skips it)", graph["file"], os.path.dirname(target))
            write_packed(source, target, make_options())
        return target
    except Exception as e:  # a read-only or full folder (OSError), or ONNX Runtime refusing to save
        log.warning("note: %s: pre-packed weights not cached (%s); packing in memory",
                    source, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return None
