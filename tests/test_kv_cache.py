"""The runtime's KV caches: grown geometrically in aligned capacities, keeping what was written; the batch cache's
rows join by one copy, leave by moving one row, and are handed to the decoder as views. (The decoder call
that writes into them in place is tested in tests/test_decoder_call.py.)"""
import numpy as np

from vlm_core.runtime.engine.kv_buffer import CAPACITY_ALIGN, KVCache, grown_capacity
from vlm_core.runtime.engine.kv_slots import BatchKVCache


def _write(cache: KVCache, new: int, value: float) -> None:
    """What a decoder call does to a private cache: room for `new` tokens, entries written at the offset
    (layer i's key value + 2i, its value value + 2i + 1), the offset advanced."""
    cache.reserve(cache.offset + new)
    for i in range(cache.num_layers):
        cache.keys[i][0, :, cache.offset:cache.offset + new] = value + 2 * i
        cache.values[i][0, :, cache.offset:cache.offset + new] = value + 2 * i + 1
    cache.advance(new)


def test_decode_steps_write_in_place_without_reallocating():
    cache = KVCache(num_layers=2, num_kv_heads=2, head_dim=4, max_length=4096, expected_length=500)
    assert cache.capacity == 0
    _write(cache, 5, 10.0)  # the prompt
    assert cache.capacity == 64 and cache.offset == 5
    buffers = [id(b) for b in cache.keys + cache.values]
    for step in range(59):  # 5 -> 64 tokens: fits, so the same buffers are written
        _write(cache, 1, 100.0 * (step + 1))
        assert [id(b) for b in cache.keys + cache.values] == buffers
    np.testing.assert_array_equal(cache.keys[1][0, :, :5], 12.0)  # layer 1 key of the prompt kept
    np.testing.assert_array_equal(cache.values[0][0, :, 7], 301.0)  # the third step's value, layer 0
    _write(cache, 1, 400.0)  # the 65th token doubles the buffer
    assert cache.capacity == 128 and cache.offset == 65
    np.testing.assert_array_equal(cache.keys[0][0, :, :5], 10.0)  # content carried over
    np.testing.assert_array_equal(cache.keys[0][0, :, 64], 400.0)


def test_capacity_is_aligned_and_capped_by_the_expected_length_and_the_context():
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=2, max_length=4096, expected_length=150)
    _write(cache, 100, 0.0)
    assert cache.capacity == 128
    _write(cache, 30, 0.0)
    assert cache.capacity == 192  # not 256: the request can never use more than 150 (aligned up)
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=2, max_length=70)
    _write(cache, 10, 0.0)
    _write(cache, 60, 0.0)
    assert cache.capacity == 128 and cache.capacity % CAPACITY_ALIGN == 0  # the model's context, aligned up


def test_growth_is_geometric_so_a_long_sequence_copies_few_slots():
    capacities, copied, capacity = [], 0, 0
    for length in range(1, 4097):  # one decode step at a time, as a 4096-token answer does
        grown = grown_capacity(capacity, length, 8192)
        if grown != capacity:
            copied += length - 1  # the filled slots move to the new buffer
            capacities.append(grown)
            capacity = grown
    assert capacities == [64, 128, 256, 512, 1024, 2048, 4096]
    assert copied < 4096  # O(n) slots in all (steps of 256 copied ~32,000)
    assert grown_capacity(4096, 4097, 4100) == 4160 and grown_capacity(64, 60, 100) == 64


def _hold(batch, length, value):
    """A row prefilled as the engine does: acquired, then written in place by a prompt chunk."""
    row = batch.acquire(length)
    keys, values = batch.buffers(row, row + 1)
    for i in range(batch.num_layers):
        keys[i][0, :, :length] = value + 2 * i
        values[i][0, :, :length] = value + 2 * i + 1
    batch.lengths[row] = length
    return row


def test_batch_rows_are_held_take_views_and_move_one_row():
    batch = BatchKVCache(num_layers=2, num_kv_heads=1, head_dim=2, max_length=4096)
    rows = [_hold(batch, n, 10.0 * (i + 1)) for i, n in enumerate((3, 7, 5))]
    assert rows == [0, 1, 2] and batch.lengths[:3] == [3, 7, 5] and batch.capacity % CAPACITY_ALIGN == 0
    assert batch.copied_slots == {"moved": 0, "loaded": 0}  # written where they are: nothing copied
    keys, values = batch.buffers(0, 3)
    assert all(np.shares_memory(view, store) and view.flags.c_contiguous
               for view, store in ((keys[0], batch.keys[0]), (values[1], batch.values[1])))
    assert keys[0].shape[0] == 3 and batch.buffers(1, 2)[0][0].flags.c_contiguous  # one row: contiguous too
    for r, at in enumerate(batch.lengths[:3]):  # what the decoder call writes: each row at its own length
        values[1][r, 0, at] = 300 + r
    batch.advance(0, 3)
    assert batch.lengths[:3] == [4, 8, 6]
    batch.move(2, 0)  # the last row over a leaving one: its filled slots only
    assert batch.lengths[:3] == [6, 8, 0] and batch.held[:3] == [True, True, False] and batch.rows == 2
    assert batch.copied_slots["moved"] == 6
    np.testing.assert_array_equal(batch.keys[0][0, 0, :5, 0], 30.0)
    assert batch.values[1][0, 0, 5, 0] == 302
    assert batch.acquire(4) == 2  # the lowest free row
    batch.release(2)
    batch.release(1)
    assert batch.nbytes > 0
    batch.release(0)
    assert batch.nbytes == 0 and batch.rows == 0  # nobody holds a row: memory given back


def test_batch_grows_slots_and_rows_keeping_content():
    batch = BatchKVCache(num_layers=1, num_kv_heads=1, head_dim=2, max_length=4096)
    _hold(batch, 60, 1.0)
    batch.reserve(2, 61)  # a padding row for the next call (decode_plan.py)
    assert batch.allocated_rows == 2 and batch.capacity == 64
    batch.reserve(2, 65)
    assert batch.capacity == 128  # doubled
    batch.reserve(2, 129, limit=150)
    assert batch.capacity == 192  # capped by what the rows' requests can use, aligned
    batch.reserve(1, 200)
    assert batch.capacity == 384 and batch.capacity % CAPACITY_ALIGN == 0  # no limit given: doubled again
    np.testing.assert_array_equal(batch.keys[0][0, 0, :60], 1.0)
    for i in range(3):
        _hold(batch, 10, 5.0 + i)
    assert batch.rows == 4 and batch.allocated_rows == 4
    np.testing.assert_array_equal(batch.keys[0][0, 0, :60], 1.0)
    np.testing.assert_array_equal(batch.keys[0][3, 0, :10], 7.0)
    assert batch.copied_slots["moved"] == 0  # growth is not counted: it is amortised (kv_buffer.py)


def test_batch_rows_swap_and_load_a_prefix():
    batch = BatchKVCache(num_layers=2, num_kv_heads=1, head_dim=2, max_length=4096)
    for i, n in enumerate((3, 7)):
        _hold(batch, n, 10.0 * (i + 1))
    batch.swap(0, 1)
    assert batch.lengths[:2] == [7, 3] and batch.copied_slots["moved"] == 10
    np.testing.assert_array_equal(batch.keys[1][0, 0, :7, 0], 22.0)  # layer i's keys: value + 2i
    np.testing.assert_array_equal(batch.values[0][1, 0, :3, 0], 11.0)
    row = batch.acquire(9)
    prefix = [np.full((1, 4, 2), 40.0 + i) for i in range(2)]
    batch.load(row, prefix, [p + 1 for p in prefix])
    assert row == 2 and batch.lengths[2] == 4 and batch.copied_slots["loaded"] == 4
    np.testing.assert_array_equal(batch.values[1][2, 0, :4, 0], 42.0)
