"""ONNX Runtime sessions with settings that fit a small CPU host."""
from __future__ import annotations

import logging
import os

from vlm_core.errors import ModelFolderError, ParameterError
from vlm_core.runtime.engine.memory_hints import drop_unmapped_pages
from vlm_core.runtime.engine.prepacked import DATA_SUFFIX, packed_graph

log = logging.getLogger("vlm_core.runtime")

# Intra-op threads per core at most: more only queue for the same cores, and ONNX Runtime starts an OS thread
# for each (`--threads 100000` hung at start, and crashed under a memory limit).
THREADS_PER_CORE = 4


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(threads, name: str = "threads") -> None:
    """Refuse a thread count other than None (all usable cores) or an integer from 1 to THREADS_PER_CORE x the
    usable cores; the ParameterError names `name` (the API's `threads`, the CLI's `--threads`)."""
    limit = THREADS_PER_CORE * usable_cores()
    if threads is not None and not (isinstance(threads, int) and not isinstance(threads, bool)
                                    and 1 <= threads <= limit):
        raise ParameterError(f"{name} must be an integer from 1 to {limit} ({THREADS_PER_CORE} per core of the "
                             f"{usable_cores()} this process may use), got {threads!r:.40}", name)


def session_options(threads: int | None, arena: bool, prepack: bool):
    """SessionOptions for one CPU session (see create_session for `arena` and `prepack`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = arena
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def create_session(folder: str, graph: dict, threads: int | None = None, arena: bool = True, prepack: bool = True,
                   cache_prepacked: bool = False):
    """An InferenceSession for one manifest graph entry, on the CPU.

    Args:
        folder: the model folder; graph["file"] is relative to it.
        threads: intra-op threads (default: the cores this process may use).
        arena: keep ONNX Runtime's memory arena. The vision graph runs without one: its activations
            (attention over every patch of an image) are large and transient, and an arena would keep
            their peak for the life of the process (measured on the 2B shape, 448x448 image: peak RSS
            2376 -> 2188 MB, same vision time).
        prepack: let kernels copy their weights into their own layout at load (ONNX Runtime's default).
            The vision graph runs without: its int8 weights then stay in the memory-mapped file, pages the
            kernel may drop between images (under a memory limit), instead of ~340 MB of anonymous memory
            that stays for the life of the process (2B int4 export: RssAnon 419 -> 34 MB after load, the
            same vision time within noise). The decoder needs its pre-packed 4-bit weights: without them
            a decode step takes seconds.
        cache_prepacked: load a copy of the graph whose pre-packed weights are in its external data file
            (written on this host's first load, see prepacked.py), so they are memory-mapped instead of
            anonymous memory. A folder that cannot hold the copy loads the graph as without it.
    """
    import onnxruntime as ort

    path = os.path.join(folder, graph["file"])
    if prepack and cache_prepacked:
        packed = packed_graph(folder, graph, lambda: session_options(threads, arena, prepack))
        if packed is not None:
            try:
                session = ort.InferenceSession(packed, session_options(threads, arena, prepack),
                                               providers=["CPUExecutionProvider"])
                drop_unmapped_pages(packed + DATA_SUFFIX)
                return session
            except Exception as e:  # a damaged copy: the source graph still loads
                log.warning("note: %s cannot be loaded (%s); packing %s in memory", packed,
                            str(e).splitlines()[0][:200], path)
    try:
        return ort.InferenceSession(path, session_options(threads, arena, prepack),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for corrupt or truncated graphs
        raise ModelFolderError(f"{path} cannot be loaded by ONNX Runtime ({str(e).splitlines()[0][:300]}); "
                               f"re-export the model") from None
