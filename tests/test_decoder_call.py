"""The decoder call of format_version 2 and 3 (runtime/engine/decoder_call.py) on a one-layer graph made of ONNX Runtime's
GroupQueryAttention op alone: the cache buffers are written in place at each row's own length, and the op
computes what export/group_query_attention.py's eager twin says it does (rows of different lengths, a
multi-token chunk on a filled past, a float16 cache)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from vlm_core.export.group_query_attention import group_query_attention
from vlm_core.runtime.engine.decoder_call import BoundDecoder, run_decoder

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def _session(dtype) -> ort.InferenceSession:
    """inputs_embeds [B, S, (heads + 2 kv) d] split into q/k/v -> GroupQueryAttention; logits = its output."""
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    kv = ["B", KV_HEADS, "C", HEAD_DIM]
    inputs = [helper.make_tensor_value_info("inputs_embeds", elem, ["B", "S", width]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("past_key_values.0.key", elem, kv),
              helper.make_tensor_value_info("past_key_values.0.value", elem, kv)]
    outputs = [helper.make_tensor_value_info("logits", elem, ["B", "S", HEADS * HEAD_DIM]),
               helper.make_tensor_value_info("present.0.key", elem, kv),
               helper.make_tensor_value_info("present.0.value", elem, kv)]
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [3], [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM,
                                                                 KV_HEADS * HEAD_DIM])
    nodes = [helper.make_node("Split", ["inputs_embeds", "sizes"], ["q", "k", "v"], axis=-1),
             helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key_values.0.key", "past_key_values.0.value",
                                                      "seqlens_k", "total_sequence_length"],
                              ["logits", "present.0.key", "present.0.value"], domain="com.microsoft",
                              num_heads=HEADS, kv_num_heads=KV_HEADS, scale=HEAD_DIM ** -0.5, do_rotary=0)]
    graph = helper.make_graph(nodes, "gqa", inputs, outputs, initializer=[sizes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _expected(embeds, keys, values, lengths_after):
    """The eager twin's output and presents for the same inputs."""
    q, k, v = np.split(embeds, [HEADS * HEAD_DIM, (HEADS + KV_HEADS) * HEAD_DIM], axis=-1)
    out, present_key, present_value = group_query_attention(
        *(torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v, keys, values)),
        torch.tensor(np.asarray(lengths_after) - 1, dtype=torch.int32), torch.tensor(max(lengths_after)),
        num_heads=HEADS, num_kv_heads=KV_HEADS, scale=HEAD_DIM ** -0.5)
    return out.float().numpy(), present_key.float().numpy(), present_value.float().numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rows_of_different_lengths_write_in_place_and_match_the_eager_twin(dtype):
    rng = np.random.default_rng(0)
    capacity, lengths = 64, [3, 17, 9]  # filled slots per row before the step
    keys = rng.standard_normal((3, KV_HEADS, capacity, HEAD_DIM)).astype(dtype)
    values = rng.standard_normal((3, KV_HEADS, capacity, HEAD_DIM)).astype(dtype)
    embeds = rng.standard_normal((3, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(dtype)
    after = [n + 1 for n in lengths]
    expected_out, expected_keys, expected_values = _expected(embeds, keys.copy(), values.copy(), after)
    key_buffer, value_buffer = keys, values
    out = run_decoder(_session(dtype), {"inputs_embeds": embeds}, [key_buffer], [value_buffer], after)
    tolerance = 2e-3 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(out.astype(np.float32), expected_out, atol=tolerance)
    for r, n in enumerate(lengths):  # the new entry landed in our own buffer, at the row's own length
        np.testing.assert_array_equal(key_buffer[r, :, n], embeds[r, 0, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM]
                                      .reshape(KV_HEADS, HEAD_DIM))
    np.testing.assert_array_equal(key_buffer.astype(np.float32), expected_keys)
    np.testing.assert_array_equal(value_buffer.astype(np.float32), expected_values)


def test_a_chunk_on_a_filled_past_of_one_row_and_a_view_of_a_wider_buffer():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((2, KV_HEADS, 64, HEAD_DIM)).astype(np.float32)
    values = rng.standard_normal((2, KV_HEADS, 64, HEAD_DIM)).astype(np.float32)
    embeds = rng.standard_normal((1, 4, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32)
    row = slice(1, 2)  # the second row of a batch buffer, as the engine hands one row over
    expected_out, expected_keys, _ = _expected(embeds, keys[row].copy(), values[row].copy(), [9])
    untouched = keys[0].copy()
    out = run_decoder(_session(np.float32), {"inputs_embeds": embeds}, [keys[row]], [values[row]], [9])
    np.testing.assert_allclose(out, expected_out, atol=1e-5)
    np.testing.assert_array_equal(keys[row], expected_keys)
    np.testing.assert_array_equal(keys[0], untouched)


def test_a_kept_binding_writes_where_a_fresh_one_does_and_rebinds_when_the_buffers_change():
    """Steps with the same buffers_key reuse the bound KV buffers; a new key (the batch reallocated) binds the new
    ones, and nothing more lands in the old."""
    rng = np.random.default_rng(2)
    session = _session(np.float32)
    keys = rng.standard_normal((2, KV_HEADS, 64, HEAD_DIM)).astype(np.float32)
    values = rng.standard_normal((2, KV_HEADS, 64, HEAD_DIM)).astype(np.float32)
    fresh_keys, fresh_values = keys.copy(), values.copy()
    bound = BoundDecoder(session)
    lengths = [3, 7]
    for step in range(3):
        embeds = rng.standard_normal((2, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32)
        after = [n + 1 + step for n in lengths]
        out = bound.run({"inputs_embeds": embeds}, [keys], [values], after, buffers_key=("layout", 0))
        expected = run_decoder(session, {"inputs_embeds": embeds}, [fresh_keys], [fresh_values], after)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(keys, fresh_keys)
    grown_keys = np.zeros((2, KV_HEADS, 128, HEAD_DIM), np.float32)
    grown_values = np.zeros_like(grown_keys)
    grown_keys[:, :, :64], grown_values[:, :, :64] = keys, values
    old = keys.copy()
    embeds = rng.standard_normal((2, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32)
    bound.run({"inputs_embeds": embeds}, [grown_keys], [grown_values], [7, 11], buffers_key=("layout", 1))
    np.testing.assert_array_equal(keys, old)
    assert not np.array_equal(grown_keys[:, :, :64], old)  # the new entries landed in the new buffers
    bound.release()
    assert bound._buffers == []


def test_a_call_that_does_not_fit_the_buffer_is_refused():
    keys = np.zeros((1, KV_HEADS, 8, HEAD_DIM), np.float32)
    embeds = np.zeros((1, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="needs 9 cache slots, the buffer has 8"):
        run_decoder(_session(np.float32), {"inputs_embeds": embeds}, [keys], [keys.copy()], [9])


def test_an_export_of_format_version_1_is_refused_with_the_fix(tmp_path):
    """Its decoder takes an attention mask and returns only new entries: the runtime says to re-export."""
    import json

    from vlm_core.errors import ModelFolderError
    from vlm_core.runtime.manifest import load_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "family": "qwen3_vl"}))
    with pytest.raises(ModelFolderError) as error:
        load_manifest(str(tmp_path))
    message = str(error.value)
    assert "format_version 1" in message and "python -m vlm_core.export SRC -o" in message and "GroupQueryAttention" in message


def test_a_graph_without_logits_index_refuses_every_positions_logits():
    """A format_version 2 decoder (no logits_index input) gives the last position's logits only: asking it for
    every position's (jump-forward) is an error, not a silent last-position answer."""
    from vlm_core.runtime.engine.decoder_call import gives_all_positions

    session = _session(np.float32)
    assert not gives_all_positions(session)
    keys = np.zeros((1, KV_HEADS, 16, HEAD_DIM), np.float32)
    embeds = np.zeros((1, 3, (HEADS + 2 * KV_HEADS) * HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="format_version 2"):
        run_decoder(session, {"inputs_embeds": embeds}, [keys], [keys.copy()], [3], all_positions=True)
