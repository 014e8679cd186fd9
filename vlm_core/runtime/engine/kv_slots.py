"""The KV cache of the engine's sequences: one buffer per layer with a row per sequence, prompt and answer alike.

Layout per layer: keys / values [rows, kv_heads, capacity, head_dim]. A sequence takes a row when it is admitted
and keeps it to the end: its prompt's chunks are written into that row (a prefix-cache hit is copied in first),
and its decode steps go on in the same row, so a prompt's KV is written once, where it is decoded. The engine
keeps its decoding sequences in rows 0..n-1, so a decode call hands ONNX Runtime a view of consecutive rows
`buffer[start:stop]` (contiguous: no copy), whose GroupQueryAttention ops write each row's new key / value at
that row's own length; the rows of sequences still reading their prompt lie after them, each run by itself.
Rows are free or held; a free row's length is 0. Moving a row copies its filled slots only.

Growth (more rows, more slots) at least doubles what it grows (kv_buffer.grown_capacity), copying only the
filled slots, so the copying amortised over the steps stays constant however long the sequences get. When no
row is held the memory goes back.
"""
from __future__ import annotations

import itertools

import numpy as np

from vlm_core.runtime.engine.kv_buffer import GROWTH, aligned, grown_capacity

# Layout tokens, unique in the process: a decoder binding made for one set of buffers (decoder_call.BoundDecoder)
# is never reused for another, even one of another BatchKVCache.
_layouts = itertools.count()


class BatchKVCache:
    """Per-layer [rows, kv_heads, capacity, head_dim] buffers; `lengths[r]` slots of row r are filled.

    `copied_slots` counts the slots copied from one row to another or in from a prefix entry (for tests and
    benchmarks: what a prompt's KV costs besides being written)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, dtype=np.float32):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_length, self.dtype = aligned(max_length), dtype
        self.lengths: list[int] = []  # one per allocated row
        self.held: list[bool] = []
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.layout = next(_layouts)  # changes whenever the buffers do (reallocated, given back)
        self.copied_slots = {"moved": 0, "loaded": 0}

    @property
    def rows(self) -> int:
        """Rows held."""
        return sum(self.held)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def allocated_rows(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values)

    def _reallocate(self, rows: int, capacity: int) -> None:
        # One layer at a time, each old buffer dropped as soon as it is copied: growing costs one layer's
        # worth of extra memory, not a second copy of the whole cache.
        shape = (rows, self.num_kv_heads, capacity, self.head_dim)
        self.layout = next(_layouts)
        old_rows = self.allocated_rows
        filled = max(self.lengths, default=0)  # slots past every row's length hold nothing to keep
        for store in (self.keys, self.values):
            if not store:
                store.extend(np.zeros(shape, self.dtype) for _ in range(self.num_layers))
                continue
            for i, old in enumerate(store):
                new = np.zeros(shape, self.dtype)
                new[:old_rows, :, :filled] = old[:, :, :filled]
                store[i] = new
        self.lengths += [0] * (rows - len(self.lengths))
        self.held += [False] * (rows - len(self.held))

    def reserve(self, rows: int, length: int, limit: int | None = None) -> None:
        """Room for `rows` rows (padding rows of a decoder call included: decode_plan.py) of `length` slots each:
        rows double, slots grow by `grown_capacity`, capped at `limit` (the most any row's request can use, when
        the caller knows it) and the context."""
        new_rows = self.allocated_rows
        while new_rows < rows:
            new_rows = max(1, new_rows * GROWTH)
        limit = self.max_length if limit is None else min(limit, self.max_length)
        new_capacity = grown_capacity(self.capacity, length, limit)
        if new_rows != self.allocated_rows or new_capacity != self.capacity:
            self._reallocate(new_rows, new_capacity)

    def acquire(self, length: int, limit: int | None = None) -> int:
        """Hold the lowest free row, with room for `length` slots (`limit` as in `reserve`); returns its index.
        Its length is 0."""
        row = next((r for r, held in enumerate(self.held) if not held), len(self.held))
        self.reserve(row + 1, length, limit)
        self.held[row], self.lengths[row] = True, 0
        return row

    def load(self, row: int, keys: list, values: list) -> None:
        """Start row `row` (held, room reserved) from a cached prefix: per-layer keys / values
        [kv_heads, length, head_dim]."""
        length = keys[0].shape[1]
        for i in range(self.num_layers):
            self.keys[i][row, :, :length] = keys[i]
            self.values[i][row, :, :length] = values[i]
        self.lengths[row] = length
        self.copied_slots["loaded"] += length

    def release(self, row: int) -> None:
        """Free row `row`; when no row is held any more, the memory goes back."""
        self.held[row], self.lengths[row] = False, 0
        if not any(self.held):
            self.keys, self.values, self.lengths, self.held = [], [], [], []
            self.layout = next(_layouts)

    def move(self, source: int, target: int) -> None:
        """Row `source`'s filled slots (and its length) over row `target`, which it then holds; `source` is freed
        (what `target` held before is dropped)."""
        length = self.lengths[source]
        for store in (self.keys, self.values):
            for array in store:
                array[target, :, :length] = array[source, :, :length]
        self.lengths[target], self.held[target] = length, True
        self.lengths[source], self.held[source] = 0, False
        self.copied_slots["moved"] += length

    def swap(self, a: int, b: int) -> None:
        """Exchange rows `a` and `b` (held or free), filled slots and lengths."""
        la, lb = self.lengths[a], self.lengths[b]
        for store in (self.keys, self.values):
            for array in store:
                kept = array[a, :, :la].copy()
                array[a, :, :lb] = array[b, :, :lb]
                array[b, :, :la] = kept
        self.lengths[a], self.lengths[b] = lb, la
        self.held[a], self.held[b] = self.held[b], self.held[a]
        self.copied_slots["moved"] += la + lb

    def copy_prefix(self, row: int, length: int) -> tuple[list, list]:
        """Copies of row `row`'s first `length` slots: per-layer [kv_heads, length, head_dim]."""
        return ([k[row, :, :length].copy() for k in self.keys], [v[row, :, :length].copy() for v in self.values])

    def buffers(self, start: int, stop: int) -> tuple[list, list]:
        """Per-layer keys and values of rows [start, stop): contiguous views the decoder writes in place."""
        return [k[start:stop] for k in self.keys], [v[start:stop] for v in self.values]

    def advance(self, start: int, stop: int, new_tokens: int = 1) -> None:
        """Rows [start, stop) took `new_tokens` each (written by the decoder call)."""
        for r in range(start, stop):
            self.lengths[r] += new_tokens
