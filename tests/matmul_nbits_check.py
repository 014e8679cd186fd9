"""What the 4-bit quantizer must have written in a graph (tests of int4 exports)."""
from __future__ import annotations


def check_matmul_nbits(path: str, block_size: int, zero_points: bool) -> None:
    """Every MatMulNBits node of the graph at `path`: the block size, accuracy level 4 (ORT's HQQ quantizer
    writes none), zero points or none."""
    import onnx

    nodes = [n for n in onnx.load(path, load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    assert nodes
    for node in nodes:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["block_size"] == block_size and attributes["accuracy_level"] == 4, node.name
        assert (len(node.input) > 3 and bool(node.input[3])) == zero_points, node.name
