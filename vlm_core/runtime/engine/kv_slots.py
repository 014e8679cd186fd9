"""The KV cache of the sequences decoded together: one buffer per layer with a row per sequence.

Layout per layer: keys / values [rows, kv_heads, capacity, head_dim]. The active sequences hold rows
0..n-1, so a decoder call hands ONNX Runtime a view of consecutive rows `buffer[start:stop]` (contiguous: no
copy), whose GroupQueryAttention ops write each row's new key / value at that row's own length. A sequence
that leaves is replaced by moving the last row into its place (one row copied, not the cache); a
sequence that joins is copied in once from the cache its prompt was prefilled into. Growth (more rows,
more slots) at least doubles what it grows (kv_buffer.grown_capacity), copying only the filled slots, so the
copying amortised over the steps stays constant however long the sequences get.
"""
from __future__ import annotations

import itertools

import numpy as np

from vlm_core.runtime.engine.kv_buffer import GROWTH, KVCache, aligned, grown_capacity

# Layout tokens, unique in the process: a decoder binding made for one set of buffers (decoder_call.BoundDecoder)
# is never reused for another, even one of another BatchKVCache.
_layouts = itertools.count()


class BatchKVCache:
    """Per-layer [rows, kv_heads, capacity, head_dim] buffers; `lengths[r]` slots of row r are filled."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, dtype=np.float32):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_length, self.dtype = aligned(max_length), dtype
        self.lengths: list[int] = []
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.layout = next(_layouts)  # changes whenever the buffers do (reallocated, given back)

    @property
    def rows(self) -> int:
        return len(self.lengths)

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
        filled = max(self.lengths, default=0)  # slots past every row's length hold nothing to keep
        for store in (self.keys, self.values):
            if not store:
                store.extend(np.zeros(shape, self.dtype) for _ in range(self.num_layers))
                continue
            for i, old in enumerate(store):
                new = np.zeros(shape, self.dtype)
                new[: self.rows, :, :filled] = old[: self.rows, :, :filled]
                store[i] = new

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

    def add(self, cache: KVCache, at: int | None = None, limit: int | None = None) -> int:
        """Copy a prefilled single-sequence cache into a new row, or into row `at` after moving the row there to
        the end (the caller keeps its rows in an order of its choosing); returns the row index. `limit` as in
        `reserve`."""
        length = cache.offset
        self.reserve(self.rows + 1, length + 1, limit)
        row = self.rows
        self.lengths.append(0)
        if at is not None and at < row:
            self.move(at, row)
            row = at
        for i in range(self.num_layers):
            self.keys[i][row, :, :length] = cache.keys[i][0, :, :length]
            self.values[i][row, :, :length] = cache.values[i][0, :, :length]
        self.lengths[row] = length
        return row

    def move(self, source: int, target: int) -> None:
        """Copy row `source`'s filled slots (and its length) over row `target` (one row, not the cache)."""
        length = self.lengths[source]
        for store in (self.keys, self.values):
            for array in store:
                array[target, :, :length] = array[source, :, :length]
        self.lengths[target] = length

    def remove(self, row: int) -> int | None:
        """Drop `row`; the last row moves into its place. Returns the moved row's old index (or None)."""
        last = self.rows - 1
        moved = None
        if row != last:
            self.move(last, row)
            moved = last
        self.lengths.pop()
        if not self.lengths:  # nobody decoding: give the memory back
            self.keys, self.values = [], []
            self.layout = next(_layouts)
        return moved

    def copy_prefix(self, row: int, length: int) -> tuple[list, list]:
        """Copies of row `row`'s first `length` slots: per-layer [kv_heads, length, head_dim]."""
        return ([k[row, :, :length].copy() for k in self.keys], [v[row, :, :length].copy() for v in self.values])

    def buffers(self, start: int, stop: int) -> tuple[list, list]:
        """Per-layer keys and values of rows [start, stop): contiguous views the decoder writes in place."""
        return [k[start:stop] for k in self.keys], [v[start:stop] for v in self.values]

    def advance(self, start: int, stop: int) -> None:
        """Rows [start, stop) took one token each (written by the decoder call)."""
        for r in range(start, stop):
            self.lengths[r] += 1
