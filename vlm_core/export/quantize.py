"""Weight quantization of exported graphs with ONNX Runtime's own quantizers.

Configurations (`python -m vlm_core.export ... --quantize`):
- none: float32 graphs as exported.
- int8: every MatMul with a constant weight becomes dynamic int8 (DynamicQuantizeLinear +
  MatMulInteger, ORT's `quantize_dynamic`), in the vision graph and the decoder. Int8 GEMMs use the
  CPU's VNNI/AMX units: fast for prompt-sized inputs.
- int4: the decoder's MatMuls (LM head included) become 4-bit MatMulNBits, accuracy_level 4 (int8
  activations: ORT's fastest single-token kernel on CPU), by default symmetric round-to-nearest in blocks
  of 32 ("rtn"). MLAS's decode kernel costs per block: block 128 decodes ~1.35x faster and is less
  accurate. `algorithm="hqq"` fits a scale and a float zero point per block (ORT's HQQWeightOnlyQuantizer):
  as accurate at block 128 as round-to-nearest at 32, but ORT 1.32 has no fast kernel for float zero
  points (a decode step ~70x slower, measured): for accuracy studies only (docs/performance.md).
  The vision graph is int8 as above.
Token embeddings are stored as int8 rows with one float32 scale per row for int8/int4.
The quantizers rewrite only MatMuls with constant weights: the decoder's KV-cache inputs and outputs keep
their dtype (float16 by default for these methods: export/kv_dtype.py).
"""
from __future__ import annotations

import os

import numpy as np

QUANTIZE_CHOICES = ("none", "int8", "int4")
INT4_ALGORITHMS = ("rtn", "hqq")
INT4_ALGORITHM = "rtn"
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4


def _gemm_to_matmul(model) -> int:
    """Rewrite Gemm(A, W, bias) with a constant W as MatMul + Add, which the quantizers handle.

    Returns the number of nodes rewritten.
    """
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    rewritten = 0
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (weight not in initializers or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            array = numpy_helper.to_array(initializers[weight]).T.copy()
            new_name = weight + "_transposed"
            model.graph.initializer.append(numpy_helper.from_array(array, new_name))
            weight = new_name
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        matmul_out = out + "_matmul" if has_bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [matmul_out], name=node.name + "_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [matmul_out, node.input[2]], [out], name=node.name + "_Add"))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return rewritten


def _save(model, path: str) -> list[str]:
    """Save `model` at `path`; weights go to a side file when the graph is large. Returns side files."""
    import onnx

    external = _weight_bytes(model) > (1 << 30)
    data = os.path.basename(path) + ".data"
    if os.path.exists(path + ".data"):
        os.remove(path + ".data")
    onnx.save_model(model, path, save_as_external_data=external, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return [data] if external else []


def _weight_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _has_gemm(path: str) -> bool:
    import onnx

    return any(n.op_type == "Gemm" for n in onnx.load(path, load_external_data=False).graph.node)


def quantize_int8(path: str, out_path: str) -> list[str]:
    """Dynamic int8 (MatMulInteger) for every constant-weight MatMul of the graph at `path`.

    The graph is loaded here only when it has Gemm nodes to rewrite; otherwise ONNX Runtime's
    quantizer reads it from disk itself, so the weights are held once, not twice (the 2B decoder's
    fp32 weights are 6.9 GB).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = path
    if _has_gemm(path):
        import onnx

        model = onnx.load(path)
        _gemm_to_matmul(model)
        source = out_path + ".fp32.onnx"
        _save(model, source)
        del model
    external = os.path.exists(source + ".data") or os.path.getsize(source) > (1 << 30)
    # reduce_range: 7-bit weights. On CPUs without VNNI (AVX2 only) ORT's u8 x s8 kernel sums pairs of
    # products in saturating int16 and full-range weights overflow it: measured on an AVX2-only AMD EPYC
    # host, the tiny model's int8 decoder fell to logits cosine 0.970 vs fp32 (0.999 with reduce_range)
    # and its vision features to 0.9989 (0.9998). Exports run on one machine and serve on another.
    quantize_dynamic(source, out_path, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=True, reduce_range=True, use_external_data_format=external,
                     extra_options={"MatMulConstBOnly": True})
    if source != path:
        _remove(source)
    data = os.path.basename(out_path) + ".data"
    return [data] if os.path.exists(os.path.join(os.path.dirname(out_path), data)) else []


def quantize_int4(path: str, out_path: str, block_size: int = INT4_BLOCK_SIZE,
                  accuracy_level: int = INT4_ACCURACY_LEVEL, algorithm: str = INT4_ALGORITHM) -> list[str]:
    """4-bit MatMulNBits (`block_size`, `accuracy_level`) for every constant-weight MatMul: "hqq" (a scale and
    zero point per block, fitted by HQQ) or "rtn" (symmetric round-to-nearest)."""
    import contextlib

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if algorithm not in INT4_ALGORITHMS:
        raise ValueError(f"int4 algorithm {algorithm!r}: choose one of {', '.join(INT4_ALGORITHMS)}")
    # External tensors stay on disk: the quantizer reads one weight at a time (relative to the working
    # folder, hence the chdir), so a decoder bigger than memory can be quantized.
    folder = os.path.dirname(os.path.abspath(path))
    model = onnx.load(path, load_external_data=False)
    with contextlib.chdir(folder):
        _gemm_to_matmul(model)
        if algorithm == "hqq":
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False,
                                             accuracy_level=accuracy_level,
                                             algo_config=HQQWeightOnlyQuantConfig(block_size=block_size, bits=4))
        else:
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                             accuracy_level=accuracy_level)
        quantizer.process()
    model = quantizer.model.model
    _set_accuracy_level(model, accuracy_level)
    for tensor in _external_tensors(model):  # what stayed float32 (norms, biases): small, read now
        onnx.external_data_helper.load_external_data_for_tensor(tensor, folder)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return _save(model, out_path)


def _set_accuracy_level(model, accuracy_level: int) -> None:
    """Give every MatMulNBits node `accuracy_level`: ORT 1.32's HQQ quantizer writes none (the round-to-nearest
    one writes the level it is given)."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", accuracy_level)])


def _external_tensors(model):
    import onnx

    return [t for t in onnx.external_data_helper._get_all_tensors(model)
            if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL]


def _remove(path: str) -> None:
    for name in (path, path + ".data"):
        if os.path.exists(name):
            os.remove(name)


def quantize_embeddings(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 rows: table ≈ rows * scale. Returns (int8 [V, H], float32 scale [V, 1])."""
    peak = np.abs(table).max(axis=1, keepdims=True).astype(np.float32)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    rows = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return rows, scale


def count_ops(path: str) -> dict:
    """Op-type histogram of a graph (for the manifest: how many MatMuls were converted)."""
    import collections

    import onnx

    model = onnx.load(path, load_external_data=False)
    return dict(collections.Counter(node.op_type for node in model.graph.node))
