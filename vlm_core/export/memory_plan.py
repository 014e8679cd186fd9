"""How to export a checkpoint on this machine, from its size in float32 and the memory here.

A float32 model above MEMORY_SHARE of physical memory is exported streamed (export/streamed.py);
its float32 graphs are run (for the parity check) only when they fit too, else the eager reference
is computed in bfloat16 and only `--quantize int4` (written and quantized tensor by tensor) is
allowed.
"""
from __future__ import annotations

import dataclasses
import os

from vlm_core.export.errors import ExportError
from vlm_core.export.streamed import CheckpointReader

MEMORY_SHARE = 0.5


@dataclasses.dataclass
class MemoryPlan:
    stream: bool
    verify_fp32: bool  # the float32 graphs and an eager float32 model fit: exact parity check
    reference_dtype: str
    float32_gb: float
    memory_gb: float


def plan_memory(source: str, quantize: str, stream: bool | None) -> MemoryPlan:
    """How to export `source` on this machine (stream None: decide from the sizes).

    Raises ExportError when the float32 graphs would not fit and `quantize` is not int4."""
    import psutil

    memory = psutil.virtual_memory().total
    float32 = float32_bytes(source)
    fits = float32 <= MEMORY_SHARE * memory
    plan = MemoryPlan(stream=(not fits) if stream is None else stream, verify_fp32=fits,
                      reference_dtype="float32" if fits else "bfloat16", float32_gb=float32 / 1e9,
                      memory_gb=memory / 1e9)
    if not fits and quantize != "int4":
        raise ExportError(
            f"{source!r} is {plan.float32_gb:.1f} GB in float32 and this machine has {plan.memory_gb:.1f} GB of "
            f"memory: its float32 graphs could be written but not run here to verify them"
            + ("" if quantize == "none" else f", and --quantize {quantize} reads them whole")
            + "; pass --quantize int4 (written tensor by tensor and checked against eager bfloat16), or export "
              "on a machine with more memory")
    return plan


def float32_bytes(source: str) -> int:
    """The checkpoint's tensors in float32 (safetensors headers; other formats: twice their 16-bit file size)."""
    if not os.path.isdir(source):
        return 0  # a hub id: resolved (downloaded) later; planned as small
    if any(n.endswith(".safetensors") for n in os.listdir(source)):
        return CheckpointReader(source).float32_bytes()
    return 2 * checkpoint_bytes(source)


def checkpoint_bytes(source: str) -> int:
    """The size of the checkpoint's weight files (a hub id: assumed large)."""
    if not os.path.isdir(source):
        return 1 << 40
    return sum(os.path.getsize(os.path.join(source, n)) for n in os.listdir(source)
               if n.endswith((".safetensors", ".bin", ".pth")))
