"""One decoder call with the KV cache bound in place (the format_version 2 and 3 graph contract).

Every decoder graph's attention is ONNX Runtime's GroupQueryAttention (export/group_query_attention.py):
it takes each row's length (`seqlens_k` = length after the call - 1, and the longest as
`total_sequence_length`) and writes the new keys/values into the past buffers at each row's own offset.
Binding one OrtValue over our numpy buffer as both `past_key_values.{i}.*` and `present.{i}.*` (IO
binding) makes that write land in the buffer itself: no step copies the cache, and the runtime has
nothing to append afterwards. Only the logits are copied out.

A format_version 3 graph also takes `logits_index`, the positions of the call whose logits it computes: the
last one for a prompt chunk or a decode step, every one for a jump-forward chunk (engine/jump_forward.py). A
format_version 2 graph computes the last position's only.
"""
from __future__ import annotations

import numpy as np


def run_decoder(session, feeds: dict, keys: list, values: list, lengths_after, all_positions: bool = False
                ) -> np.ndarray:
    """Run `session` over the cache buffers with a fresh binding; returns logits [rows, vocab] (the last
    position's), or [rows, S, vocab] with `all_positions` (a format_version 3 graph only).

    Args:
        session: an ONNX Runtime session of a decoder graph.
        feeds: the family's inputs (inputs_embeds, position_ids, ...), numpy arrays.
        keys, values: per layer, [rows, kv_heads, capacity, head_dim] C-contiguous arrays (views of leading
            or single rows are fine): read as the past, written with the new entries.
        lengths_after: each row's filled length once this call's tokens are in; every length must fit the
            capacity, and a call with more than one new token must have one row (ONNX Runtime's limit).
    """
    return BoundDecoder(session).run(feeds, keys, values, lengths_after, all_positions=all_positions)


def gives_all_positions(session) -> bool:
    """Whether a decoder session can return every position's logits (it takes `logits_index`)."""
    return any(i.name == "logits_index" for i in session.get_inputs())


class BoundDecoder:
    """A decoder session and one IO binding kept between calls (the decode step's).

    Binding the KV cache costs an OrtValue and two bind calls per buffer (56 OrtValues, 112 binds for a 28-layer
    model) though the buffers change only when they grow or the rows change. A caller that can tell when they
    change passes `buffers_key` (anything that changes with them: BatchKVCache.layout and the row range); the
    buffers are bound again only when it differs from the last call's. The small inputs are bound every call.
    `release()` drops the bound buffers (they would otherwise stay alive)."""

    def __init__(self, session):
        self.session = session
        self._binding = None
        self._buffers_key = None
        self._buffers: list = []  # the bound KV OrtValues: they keep the numpy memory they view alive
        self._inputs: dict = {}  # bind_cpu_input reads the arrays where they are: alive until rebound
        self._takes_index = gives_all_positions(session)

    def release(self) -> None:
        """Forget the binding and the buffers it holds."""
        self._binding, self._buffers_key, self._buffers, self._inputs = None, None, [], {}

    def run(self, feeds: dict, keys: list, values: list, lengths_after, buffers_key=None,
            all_positions: bool = False) -> np.ndarray:
        """One call (arguments as `run_decoder`'s); `buffers_key`: see the class docstring (None: bind the
        buffers again). Returns logits [rows, vocab], or [rows, S, vocab] with `all_positions`."""
        lengths_after = np.asarray(lengths_after, dtype=np.int32)
        capacity = keys[0].shape[2]
        if int(lengths_after.max()) > capacity:  # the op would return a bigger present instead of writing in place
            raise ValueError(f"decoder call needs {int(lengths_after.max())} cache slots, the buffer has {capacity}")
        if self._binding is None:
            self._binding = self.session.io_binding()
            self._binding.bind_output("logits")  # first: rebinding by name keeps it get_outputs()[0]
        binding = self._binding
        if buffers_key is None or buffers_key != self._buffers_key:
            self._bind_buffers(keys, values)
            self._buffers_key = buffers_key
        inputs = {name: np.ascontiguousarray(value) for name, value in feeds.items()}
        inputs["seqlens_k"] = lengths_after - 1
        inputs["total_sequence_length"] = np.array(lengths_after.max(), dtype=np.int32)
        new_tokens = inputs["inputs_embeds"].shape[1]
        if self._takes_index:
            first = 0 if all_positions else new_tokens - 1
            inputs["logits_index"] = np.arange(first, new_tokens, dtype=np.int64)
        elif all_positions:
            raise ValueError("this decoder graph gives only the last position's logits (format_version 2)")
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        self._inputs = inputs
        binding.bind_output("logits")  # a fresh output each call: the rows may differ from the last call's
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return logits[:, -1] if self._takes_index and not all_positions else logits

    def _bind_buffers(self, keys: list, values: list) -> None:
        import onnxruntime as ort

        binding, buffers = self._binding, []
        for i, (key, value) in enumerate(zip(keys, values)):
            for kind, array in (("key", key), ("value", value)):
                if not array.flags.c_contiguous:
                    raise ValueError("KV buffers must be C-contiguous to be written in place")
                buffer = ort.OrtValue.ortvalue_from_numpy(array)  # on the CPU: the numpy memory itself, no copy
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffer)
                binding.bind_ortvalue_output(f"present.{i}.{kind}", buffer)
                buffers.append(buffer)
        self._buffers = buffers
