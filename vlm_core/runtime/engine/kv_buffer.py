"""A KV cache the runtime owns: per-layer buffers that grow geometrically, written in place.

The decoder graph's GroupQueryAttention ops write the new entries into the buffer themselves (bound as
both past and present: runtime/engine/decoder_call.py) and read only the filled slots. Growth at least
doubles the capacity (`grown_capacity`), so a sequence of n tokens is reallocated O(log n) times and O(n)
slots are copied in all (a fixed step of 256 slots copied O(n^2 / 256): the cost per step grew with the
length); it never passes the length the request can use nor the context. Capacities are multiples of
`CAPACITY_ALIGN` slots, so growing a batch's buffer by a few slots never reallocates it.
"""
from __future__ import annotations

import numpy as np

CAPACITY_ALIGN = 64
GROWTH = 2  # a buffer that grows takes at least this many times its capacity


def aligned(length: int) -> int:
    """`length` rounded up to a multiple of CAPACITY_ALIGN."""
    return -(-length // CAPACITY_ALIGN) * CAPACITY_ALIGN


def grown_capacity(capacity: int, length: int, limit: int) -> int:
    """The capacity a buffer of `capacity` slots takes to hold `length`: unchanged when it fits, else GROWTH
    times as many, capped at `limit` (what the request can use, or the context) but never below `length`;
    aligned up to CAPACITY_ALIGN."""
    if length <= capacity:
        return capacity
    return aligned(max(min(GROWTH * capacity, limit), length))


class KVCache:
    """Keys and values for `num_layers` layers, batch 1, layout [1, kv_heads, capacity, head_dim]."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int,
                 dtype=np.float32, expected_length: int = 0):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_length, self.dtype = max_length, dtype
        self.offset = 0
        self.capacity = 0
        # Prompt + max new tokens, when known: the buffer never grows past what the request can use.
        self.expected_length = min(expected_length, max_length)
        self.keys = [np.zeros((1, num_kv_heads, 0, head_dim), dtype) for _ in range(num_layers)]
        self.values = [np.zeros((1, num_kv_heads, 0, head_dim), dtype) for _ in range(num_layers)]

    def reserve(self, length: int) -> None:
        """Make room for `length` tokens in total (`grown_capacity`, capped at the expected length when known,
        else the context). Copies the filled part only when it grows."""
        capacity = grown_capacity(self.capacity, length, self.expected_length or self.max_length)
        if capacity == self.capacity:
            return
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = np.zeros((1, self.num_kv_heads, capacity, self.head_dim), self.dtype)
                new[:, :, : self.offset] = old[:, :, : self.offset]
                store[i] = new
        self.capacity = capacity

    def advance(self, new_tokens: int) -> None:
        """Count `new_tokens` more slots as filled (the decoder call wrote them in place: runtime/engine/decoder_call.py)."""
        self.offset += new_tokens
