"""Streamed export of the decoder: for checkpoints whose float32 weights do not fit in memory.

The usual path loads the whole model in float32 and lets the exporter write its weights. A 7B text
model is 27 GB in float32, more than a 24 GB host has. Here the model is built with empty weights
(`accelerate.init_empty_weights`), only the parts that are not the decoder (vision encoder,
projector) are read from the checkpoint, and the decoder graph is traced with placeholder tensors
that are never written to (untouched memory costs nothing). Its weights are then copied from the
checkpoint's safetensors files one tensor at a time, converted to float32 (and to the [in, out]
layout the graph's MatMuls read), straight into the graph's external-data file. Peak memory is the
non-decoder weights plus one decoder tensor; quantization then reads that file one tensor at a time
too (export/quantize.py).

Every decoder Linear is traced as `x @ W_t` with W_t a named [in, out] parameter, so each weight
keeps its name in the graph and no transposed copy is ever folded in memory. A parameter records the
checkpoint tensor(s) it comes from (`_stream_key`: a name, or a list of names concatenated along the
output axis for fused q/k/v and gate/up weights).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from vlm_core.export.errors import ExportError

STREAM_KEY = "_stream_key"
ALIGNMENT = 4096  # page-aligned tensors in the data file: ONNX Runtime can map them instead of copying


class StreamError(ExportError):
    """The checkpoint cannot be streamed; the message names the tensor and the fix."""


class TransposedLinear(nn.Module):
    """nn.Linear as MatMul(x, W_t) + b with W_t [in, out] a parameter of its own (its name survives export)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(torch.empty((linear.in_features, linear.out_features), device="meta"),
                                     requires_grad=False)
        setattr(self.weight_t, STREAM_KEY, getattr(linear.weight, STREAM_KEY, None))
        self.weight_t.stream_transpose = True
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(torch.empty((linear.out_features,), device="meta"), requires_grad=False)
            setattr(self.bias, STREAM_KEY, getattr(linear.bias, STREAM_KEY, None))

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class CheckpointReader:
    """Tensors of a safetensors checkpoint folder by name, read one at a time (never the whole file)."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
            if not files:
                raise StreamError(f"{folder!r} has no *.safetensors files; the streamed export reads safetensors "
                                  f"checkpoints (convert .bin files with transformers' save_pretrained)")
            weight_map = {}
            for name in files:
                with safe_open(os.path.join(folder, name), "pt") as f:
                    weight_map.update({key: name for key in f.keys()})
        self.weight_map = weight_map
        self._open = {}
        self._safe_open = safe_open
        self.base_prefix = ""  # the model's base_model_prefix: checkpoints saved without/with it still load

    def resolve(self, key: str) -> str | None:
        """The stored name of the model's tensor `key` (as transformers resolves it: exactly, or without /
        with the base-model prefix), or None."""
        if key in self.weight_map:
            return key
        prefix = self.base_prefix + "." if self.base_prefix else ""
        for candidate in ((key[len(prefix):],) if prefix and key.startswith(prefix) else ()) + (
                (prefix + key,) if prefix else ()):
            if candidate in self.weight_map:
                return candidate
        return None

    def float32_bytes(self) -> int:
        """Bytes the checkpoint's tensors take in float32 (from the safetensors headers; nothing is read)."""
        total = 0
        for name in sorted(set(self.weight_map.values())):
            with self._safe_open(os.path.join(self.folder, name), "pt") as f:
                for key in f.keys():
                    total += 4 * int(np.prod(f.get_slice(key).get_shape(), dtype=np.int64))
        return total

    def shape(self, key: str) -> list[int]:
        stored = self.resolve(key)
        return self._file(stored).get_slice(stored).get_shape()

    def _file(self, stored: str):
        name = self.weight_map[stored]
        if name not in self._open:
            self._open[name] = self._safe_open(os.path.join(self.folder, name), "pt")
        return self._open[name]

    def __contains__(self, key: str) -> bool:
        return self.resolve(key) is not None

    def get(self, key: str) -> torch.Tensor:
        stored = self.resolve(key)
        if stored is None:
            raise StreamError(f"the checkpoint in {self.folder!r} has no tensor {key!r}, which the model's "
                              f"configuration requires; is config.json from the same checkpoint?")
        return self._file(stored).get_tensor(stored)

    def float32(self, keys, transpose: bool = False) -> np.ndarray:
        """The tensor `keys` (or the tensors `keys` concatenated on axis 0) as float32, optionally transposed."""
        parts = [self.get(k).float() for k in ([keys] if isinstance(keys, str) else keys)]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
        if transpose:
            tensor = tensor.t()
        return np.ascontiguousarray(tensor.numpy())


def empty_model(load_class, folder: str, dtype=torch.float32) -> nn.Module:
    """The model of `folder` with every parameter on the meta device (buffers real), each tagged with its
    checkpoint name."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = load_class._from_config(config, dtype=dtype, attn_implementation="eager")
        model.tie_weights()  # tied LM heads share the embedding's parameter, as from_pretrained makes them
    for name, param in model.named_parameters():  # shared (tied) parameters are named once: their first name
        setattr(param, STREAM_KEY, name)
    # A tied weight (LM head = token embeddings) is stored once, under its source's name.
    # transformers declares ties per module class (`_tied_weights_keys`, relative names), e.g. a BLIP-2
    # model's LLaMA text model ties its own lm_head.
    tied = {}
    for prefix, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if isinstance(keys, dict):
            dot = prefix + "." if prefix else ""
            tied.update({dot + target: dot + source for target, source in keys.items()})
    if tied:
        stored = CheckpointReader(folder)
        stored.base_prefix = getattr(model, "base_model_prefix", "") or ""
        params = dict(model.named_parameters(remove_duplicate=False))
        for target, source in tied.items():
            if target in params and target not in stored and source in stored:
                setattr(params[target], STREAM_KEY, source)
    return model.eval()


def check_checkpoint(model: nn.Module, reader: CheckpointReader) -> None:
    """Every parameter of the empty `model` is in the checkpoint with its shape (headers only: nothing is read),
    so a missing or misshaped tensor is named before any work starts."""
    reader.base_prefix = getattr(model, "base_model_prefix", "") or ""
    for name, param in model.named_parameters():
        key = getattr(param, STREAM_KEY, name)
        if key not in reader:
            raise StreamError(f"the checkpoint in {reader.folder!r} has no tensor {key!r}, which its config.json "
                              f"requires; the checkpoint is incomplete or config.json belongs to another model")
        shape = tuple(reader.shape(key))
        if shape != tuple(param.shape):
            raise StreamError(f"checkpoint tensor {key!r} has shape {shape}, config.json implies "
                              f"{tuple(param.shape)}; the checkpoint is damaged or config.json belongs to another "
                              f"model")


def materialize(module: nn.Module, reader: CheckpointReader, skip: set[int] = frozenset()) -> None:
    """Read every meta parameter of `module` (except those whose id is in `skip`) from the checkpoint."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_meta or id(param) in skip:
                continue
            key = getattr(param, STREAM_KEY, None)
            if key is None:
                raise StreamError(f"parameter {name!r} of {type(sub).__name__} has no checkpoint source")
            value = torch.from_numpy(reader.float32(key, getattr(param, "stream_transpose", False)))
            if tuple(value.shape) != tuple(param.shape):
                raise StreamError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(param.shape)}; is config.json from the same checkpoint?")
            new = nn.Parameter(value, requires_grad=False)
            setattr(new, STREAM_KEY, key)
            sub._parameters[name] = new


def _placeholder(shape) -> torch.Tensor:
    """Memory for a weight that is traced but never computed with: untouched, so it costs no RAM."""
    return torch.empty(shape, dtype=torch.float32)


def streamable_decoder(graph: nn.Module) -> nn.Module:
    """Prepare a decoder graph wrapper built on an empty model: Linears become TransposedLinear, and every
    parameter left on the meta device gets an untouched placeholder of its shape."""
    for sub in list(graph.modules()):
        for name, child in list(sub.named_children()):
            if isinstance(child, nn.Linear):
                setattr(sub, name, TransposedLinear(child))
    count = 0
    for sub in graph.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_meta:
                placeholder = nn.Parameter(_placeholder(param.shape), requires_grad=False)
                # The exporter's optimizer merges initializers with equal contents: untouched placeholders
                # of one shape (all zeros, or equal garbage) would all become one tensor (every RMSNorm
                # reading layer 0's weight). One distinct element each keeps them apart; one page touched.
                count += 1
                if placeholder.numel():
                    placeholder.data.view(-1)[0] = count + 0.5
                for attr in (STREAM_KEY, "stream_transpose"):
                    if hasattr(param, attr):
                        setattr(placeholder, attr, getattr(param, attr))
                sub._parameters[name] = placeholder
    return graph


def export_streamed(graph: nn.Module, args: tuple, dynamic, path: str, reader: CheckpointReader,
                    log=None) -> list[str]:
    """Export the prepared `graph` to `path`, its weights streamed from `reader` into `path`.data."""
    import onnx_ir as ir

    from vlm_core.export.onnx_io import export_program

    sources = {name: param for name, param in graph.named_parameters()}
    program = export_program(graph, args, dynamic)
    model = program.model
    folder, data_name = os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".data"
    data_path = os.path.join(folder, data_name)
    initializers = model.graph.initializers
    streamed = [name for name in initializers if name in sources]
    embeddings = {id(m.weight) for m in graph.modules() if isinstance(m, nn.Embedding)}  # looked up outside
    missing = [name for name, p in sources.items() if name not in initializers and id(p) not in embeddings]
    if missing:
        raise StreamError(f"the traced decoder lost the weights {missing[:3]} (merged or folded by the exporter); "
                          f"cannot stream them")
    offset = 0
    with open(data_path, "wb") as out:
        for count, name in enumerate(streamed, 1):
            param = sources[name]
            key = getattr(param, STREAM_KEY, None)
            if key is None:
                raise StreamError(f"decoder weight {name!r} has no checkpoint source")
            array = reader.float32(key, getattr(param, "stream_transpose", False))
            if tuple(array.shape) != tuple(param.shape):
                raise StreamError(f"checkpoint tensor(s) {key!r} give shape {array.shape}, the decoder expects "
                                  f"{tuple(param.shape)}; is config.json from the same checkpoint?")
            pad = (-offset) % ALIGNMENT
            out.write(b"\0" * pad)
            offset += pad
            out.write(array.tobytes())
            value = initializers[name]
            value.const_value = ir.ExternalTensor(data_name, offset, array.nbytes, ir.DataType.FLOAT,
                                                  shape=ir.Shape(array.shape), name=name, base_dir=folder)
            offset += array.nbytes
            del array
            if log and count % 50 == 0:
                log(f"      streamed {count}/{len(streamed)} decoder tensors ({offset / 1e9:.1f} GB)")
    for name, value in initializers.items():  # placeholders must never reach the file
        tensor = value.const_value
        if name in sources and not isinstance(tensor, ir.ExternalTensor):
            raise StreamError(f"decoder weight {name!r} was not streamed")
    ir.save(model, path)
    return [data_name]
