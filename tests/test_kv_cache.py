"""The runtime's KV cache: written in place, grown in steps, masks exactly the filled slots."""
import numpy as np

from runtime.kv_cache import KVCache


def _presents(layers, kv, new, d, value):
    return [np.full((1, kv, new, d), value + i, np.float32) for i in range(2 * layers)]


def test_decode_steps_write_in_place_without_reallocating():
    cache = KVCache(num_layers=2, num_kv_heads=2, head_dim=4, max_length=4096, step=8, expected_length=100)
    assert cache.capacity == 0 and cache.attention_mask(5).tolist() == [[1] * 5]  # prefill sees no past slots
    cache.append(_presents(2, 2, 5, 4, 10.0))  # the prompt
    assert cache.capacity == 8 and cache.offset == 5
    buffers = [id(b) for b in cache.keys + cache.values]
    for step in range(3):  # 5 -> 8 tokens: fits, so the same buffers are written
        assert cache.attention_mask(1).tolist() == [[1] * cache.offset + [0] * (8 - cache.offset) + [1]]
        cache.append(_presents(2, 2, 1, 4, 100.0 * (step + 1)))
        assert [id(b) for b in cache.keys + cache.values] == buffers
    np.testing.assert_array_equal(cache.keys[1][0, :, :5], 12.0)  # layer 1 key of the prompt kept
    np.testing.assert_array_equal(cache.values[0][0, :, 7], 301.0)  # the third step's value, layer 0
    cache.append(_presents(2, 2, 1, 4, 400.0))  # the 9th token grows the buffer by one step
    assert cache.capacity == 16 and cache.offset == 9
    np.testing.assert_array_equal(cache.keys[0][0, :, :5], 10.0)  # content carried over
    np.testing.assert_array_equal(cache.keys[0][0, :, 8], 400.0)


def test_growth_is_capped_by_the_expected_length_and_the_context():
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=2, max_length=20, step=256, expected_length=12)
    cache.append(_presents(1, 1, 10, 2, 0.0))
    assert cache.capacity == 12  # not 256: the request can never use more
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=2, max_length=20, step=256)
    cache.append(_presents(1, 1, 10, 2, 0.0))
    assert cache.capacity == 20  # the model's context


def test_trim_forgets_the_tail():
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=2, max_length=64, step=8)
    cache.append(_presents(1, 1, 6, 2, 0.0))
    cache.trim(3)
    assert cache.offset == 3 and cache.attention_mask(1).tolist() == [[1, 1, 1, 0, 0, 0, 0, 0, 1]]
