"""One decoder call with the KV cache bound in place (the format_version 2 graph contract).

Every decoder graph's attention is ONNX Runtime's GroupQueryAttention (export/group_query_attention.py):
it takes each row's length (`seqlens_k` = length after the call - 1, and the longest as
`total_sequence_length`) and writes the new keys/values into the past buffers at each row's own offset.
Binding one OrtValue over our numpy buffer as both `past_key_values.{i}.*` and `present.{i}.*` (IO
binding) makes that write land in the buffer itself: no step copies the cache, and the runtime has
nothing to append afterwards. Only the logits are copied out.
"""
from __future__ import annotations

import numpy as np


def run_decoder(session, feeds: dict, keys: list, values: list, lengths_after) -> np.ndarray:
    """Run `session` over the cache buffers; returns logits [rows, vocab].

    Args:
        session: an ONNX Runtime session of a decoder graph.
        feeds: the family's inputs (inputs_embeds, position_ids, ...), numpy arrays.
        keys, values: per layer, [rows, kv_heads, capacity, head_dim] C-contiguous arrays (views of leading
            or single rows are fine): read as the past, written with the new entries.
        lengths_after: each row's filled length once this call's tokens are in; every length must fit the
            capacity, and a call with more than one new token must have one row (ONNX Runtime's limit).
    """
    import onnxruntime as ort

    lengths_after = np.asarray(lengths_after, dtype=np.int32)
    capacity = keys[0].shape[2]
    if int(lengths_after.max()) > capacity:  # the op would return a bigger present instead of writing in place
        raise ValueError(f"decoder call needs {int(lengths_after.max())} cache slots, the buffer has {capacity}")
    binding = session.io_binding()
    # bind_cpu_input reads the arrays where they are: keep them alive until the run is over
    inputs = {name: np.ascontiguousarray(value) for name, value in feeds.items()}
    inputs["seqlens_k"] = lengths_after - 1
    inputs["total_sequence_length"] = np.array(lengths_after.max(), dtype=np.int32)
    for name, value in inputs.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output("logits")
    buffers = []
    for i, (key, value) in enumerate(zip(keys, values)):
        for kind, array in (("key", key), ("value", value)):
            if not array.flags.c_contiguous:
                raise ValueError("KV buffers must be C-contiguous to be written in place")
            buffer = ort.OrtValue.ortvalue_from_numpy(array)  # on the CPU: the numpy memory itself, no copy
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffer)
            binding.bind_ortvalue_output(f"present.{i}.{kind}", buffer)
            buffers.append(buffer)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()
