"""What the user asked the export to do, in one record passed through every stage.

    options = ExportOptions(quantize="int4", parity_tokens=8)   # kv_dtype resolved to "float16"

`python -m vlm_core.export`'s flags map onto these fields one to one (export/cli.py); run_export(source, out,
**fields) builds the record for Python callers.
"""
from __future__ import annotations

import dataclasses

from vlm_core.export.errors import ExportError
from vlm_core.export.kv_dtype import KV_DTYPES, default_kv_dtype
from vlm_core.export.quantize import INT4_ALGORITHM, INT4_ALGORITHMS, INT4_BLOCK_SIZE


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """quantize: "none", "int8", "int4" or "mixed" (export/quantize_step.py).
    kv_dtype: the KV cache's dtype, "float16" or "float32" (None: float32 for quantize "none", else
        float16; see export/kv_dtype.py); always resolved after construction.
    parity_tokens: greedy tokens compared with eager PyTorch.
    stream: copy the decoder's weights from the checkpoint one tensor at a time (None: when the float32
        model would not fit in memory; see export/memory_plan.py and export/streamed.py).
    int4_block_size: weights per 4-bit scale for int4 / mixed.
    int4_algorithm: how int4 / mixed fit the 4-bit weights: "rtn" (symmetric round-to-nearest) or "hqq"
        (scale and float zero point per block, fitted by HQQ: slow to decode); export/quantize.py.
    force: replace a non-empty output folder.
    isolate: run the PyTorch stage in a child process (None: for checkpoints over 1 GiB; see
        export/torch_stage.py)."""

    quantize: str = "none"
    kv_dtype: str | None = None
    parity_tokens: int = 8
    stream: bool | None = None
    int4_block_size: int = INT4_BLOCK_SIZE
    int4_algorithm: str = INT4_ALGORITHM
    force: bool = False
    isolate: bool | None = None

    def __post_init__(self):
        if self.kv_dtype is None:
            object.__setattr__(self, "kv_dtype", default_kv_dtype(self.quantize))  # frozen: set once, here
        if self.int4_algorithm not in INT4_ALGORITHMS:
            raise ExportError(f"int4 algorithm {self.int4_algorithm!r}: choose one of {', '.join(INT4_ALGORITHMS)} "
                              f"(--int4-algorithm)")
        if self.kv_dtype not in KV_DTYPES:
            raise ExportError(f"KV cache dtype {self.kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
