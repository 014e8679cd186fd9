"""Telling the OS which memory this process no longer needs, so that a memory limit takes the right pages.

Under a memory limit without swap, only file-backed pages can be reclaimed, and the kernel picks them by
recency. Two things go wrong for a VLM whose 4-bit decoder is memory-mapped (prepacked.py):
- the vision graph's memory-mapped weights, just used, look hotter than the decoder's, so after an image the
  kernel evicts the decoder's packed weights and the first decode steps read them back from disk (2B int4,
  1792 MiB cgroup: 9 steps of 1.5-3.4 s with ~250 major faults each, then 0.3 s);
- heap that ONNX Runtime and the tokenizer freed stays in the process (glibc keeps it), anonymous memory that
  nothing uses: ~115 MB after loading the 2B export.
After each vision call the runtime marks the vision weights' pages cold (madvise MADV_COLD: reclaimed first,
kept when memory is plentiful) and returns freed heap to the OS (malloc_trim); once more after loading.
Linux with glibc; elsewhere both are no-ops.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MADV_COLD = 20  # Linux 5.4+: deactivate the pages (first to go under pressure); no effect on their contents


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_LIBC = _libc()


def release_freed_heap() -> None:
    """Give the heap pages malloc holds free back to the OS (glibc's malloc_trim(0), every arena)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def mapped_ranges(paths: set) -> list:
    """(start, end) of this process's mappings of the files in `paths` (real paths), from /proc/self/maps."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") in paths:
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return ranges


def mark_cold(paths: set) -> int:
    """Mark the mapped pages of the files in `paths` (real paths) cold; returns the bytes advised."""
    if _LIBC is None or not paths:
        return 0
    advised = 0
    for start, end in mapped_ranges(paths):
        if _LIBC.madvise(start, end - start, MADV_COLD) == 0:  # EINVAL before Linux 5.4: nothing to do
            advised += end - start
    return advised


def drop_unmapped_pages(path: str) -> int:
    """Drop `path`'s clean page-cache pages that no process maps (posix_fadvise DONTNEED; mapped pages stay);
    returns the file's size when advised, else 0. After loading a packed copy these are what ONNX Runtime read
    and let go (the unpacked weights beside the packed blobs in the same file): ~200 MB of page cache that a
    memory limit otherwise keeps while it evicts the decoder's pages."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.fstat(fd).st_size
    except OSError:
        return 0
    finally:
        os.close(fd)


def graph_files(folder: str, graph: dict) -> set:
    """The real paths of a manifest graph entry's files (the graph and its external data)."""
    return {os.path.realpath(os.path.join(folder, name)) for name in [graph["file"], *graph.get("external_data", [])]}


def after_vision(weight_files: set) -> None:
    """What the runtime does after each vision call: vision weights cold, freed heap returned."""
    mark_cold(weight_files)
    release_freed_heap()
