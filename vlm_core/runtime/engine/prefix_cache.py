"""What the engine keeps between requests, in one memory budget (LRU): the KV of recent sequences
(prefix cache) and the vision graph's outputs per image (image-feature cache).

Sequences are identified by *key ids*: their token ids, with every image's tokens replaced by a
number derived from a hash of that image's preprocessed pixels and grid (so content and
preprocessing parameters both count, as llama-server identifies image chunks). A new request whose
key ids begin with a cached entry's reuses that entry's KV and prefills only the rest.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def image_hash(pixel_values: np.ndarray, grid) -> bytes:
    """A digest of one preprocessed image: its pixels, their shape and its grid."""
    digest = hashlib.blake2b(digest_size=16)
    pixels = np.ascontiguousarray(pixel_values)
    digest.update(str((pixels.dtype.str, pixels.shape)).encode())
    digest.update(pixels.data)
    digest.update(np.ascontiguousarray(np.asarray(grid, dtype=np.int64)).data)
    return digest.digest()


def image_key_id(digest: bytes) -> int:
    """A negative int64 standing for an image in key ids (token ids are never negative)."""
    return -1 - (int.from_bytes(digest[:7], "little"))


@dataclass
class PrefixEntry:
    key_ids: np.ndarray  # int64 [length]
    keys: list  # per layer [kv_heads, length, head_dim]
    values: list

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values) + self.key_ids.nbytes

    @staticmethod
    def size(length: int, bytes_per_slot: int) -> int:
        """The nbytes of an entry of `length` slots whose KV takes `bytes_per_slot` (all layers, keys and values)."""
        return length * (bytes_per_slot + np.dtype(np.int64).itemsize)


class EngineCache:
    """Prefix KV and image features under one byte budget, least recently used evicted first.

    Thread-safe: the engine thread writes, request threads may read the statistics.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict = OrderedDict()  # ("prefix", n) | ("image", digest) -> (value, nbytes)
        self._lock = threading.Lock()
        self._next_prefix = 0
        self.nbytes = 0
        self.hits = {"prefix": 0, "image": 0}
        self.misses = {"prefix": 0, "image": 0}
        self.evictions = 0

    # --- the store ---------------------------------------------------------------------------
    def _put(self, key, value, nbytes: int) -> bool:
        if nbytes > self.budget_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        while self._entries and self.nbytes + nbytes > self.budget_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.nbytes -= freed
            self.evictions += 1
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes
        return True

    def _touch(self, key):
        self._entries.move_to_end(key)
        return self._entries[key][0]

    # --- image features ----------------------------------------------------------------------
    def get_image(self, digest: bytes):
        """The vision outputs stored for an image, or None."""
        with self._lock:
            if ("image", digest) in self._entries:
                self.hits["image"] += 1
                return self._touch(("image", digest))
            self.misses["image"] += 1
            return None

    def put_image(self, digest: bytes, outputs: list) -> None:
        with self._lock:
            self._put(("image", digest), [np.asarray(o) for o in outputs], sum(np.asarray(o).nbytes for o in outputs))

    # --- prefixes ----------------------------------------------------------------------------
    def longest_prefix(self, key_ids: np.ndarray, limit: int):
        """The entry sharing the longest common prefix (at most `limit` ids) with `key_ids`: (entry, length)."""
        best, best_length = None, 0
        with self._lock:
            for key, (value, _) in self._entries.items():
                if key[0] != "prefix":
                    continue
                n = min(len(value.key_ids), len(key_ids), limit)
                if n <= best_length:
                    continue
                differ = np.flatnonzero(value.key_ids[:n] != key_ids[:n])
                common = int(differ[0]) if len(differ) else n
                if common > best_length:
                    best, best_length, best_key = value, common, key
            if best is not None:
                self._touch(best_key)
                self.hits["prefix"] += 1
            else:
                self.misses["prefix"] += 1
        return best, best_length

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of `nbytes` would be kept (callers check before copying KV out for it)."""
        return nbytes <= self.budget_bytes

    def put_prefix(self, key_ids: np.ndarray, keys: list, values: list) -> bool:
        """Keep a sequence's KV; entries whose key ids are a prefix of it are dropped (it covers them). Returns
        False, dropping nothing, when it is over the whole budget: the entries it extends stay usable."""
        entry = PrefixEntry(np.array(key_ids, dtype=np.int64), keys, values)
        if not self.fits(entry.nbytes):
            return False
        with self._lock:
            for key, (value, nbytes) in list(self._entries.items()):
                if key[0] == "prefix" and len(value.key_ids) <= len(entry.key_ids) and np.array_equal(
                        value.key_ids, entry.key_ids[: len(value.key_ids)]):
                    del self._entries[key]
                    self.nbytes -= nbytes
            self._next_prefix += 1
            return self._put(("prefix", self._next_prefix), entry, entry.nbytes)

    def stats(self) -> dict:
        """Use of the budget, for /health and benchmarks."""
        with self._lock:
            kinds = [k[0] for k in self._entries]
            return {"budget_mb": round(self.budget_bytes / 2**20, 1), "used_mb": round(self.nbytes / 2**20, 1),
                    "prefix_entries": kinds.count("prefix"), "image_entries": kinds.count("image"),
                    "hits": dict(self.hits), "misses": dict(self.misses), "evictions": self.evictions}
