"""torch.onnx.export with the settings every graph of ours uses, and ONNX file helpers."""
from __future__ import annotations

import contextlib
import io
import os
import warnings

import torch

OPSET = 18
# Above this many bytes of weights a graph keeps them in a side file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1 << 30


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_graph(module: torch.nn.Module, args: tuple, path: str, dynamic_shapes, opset: int = OPSET,
                 verbose: bool = False) -> list[str]:
    """Export `module(*args)` to `path` with the dynamo exporter; returns the external data files written.

    Input and output names come from `module.input_names` / `module.output_names`.
    """
    external = parameter_bytes(module) > EXTERNAL_DATA_BYTES
    program = export_program(module, args, dynamic_shapes, opset, verbose)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program.save(path, external_data=external)
    folder = os.path.dirname(path)
    data = os.path.basename(path) + ".data"
    return [data] if external and os.path.exists(os.path.join(folder, data)) else []


def export_program(module: torch.nn.Module, args: tuple, dynamic_shapes, opset: int = OPSET, verbose: bool = False):
    """torch.onnx.export (dynamo, optimized) of `module(*args)`, not yet saved: the ONNXProgram."""
    sink = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink if not verbose else None):
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module, args, input_names=module.input_names, output_names=module.output_names,
            opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=verbose, optimize=True)
