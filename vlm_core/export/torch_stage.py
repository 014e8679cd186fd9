"""Everything that needs PyTorch: load the checkpoint, compute the eager reference, export the graphs
and the embedding table.

Two forms: the eager stage loads the model in float32 and lets the exporter write its weights; the
streamed stage (checkpoints whose float32 weights do not fit in memory, export/memory_plan.py)
computes the reference in the plan's dtype, then exports from an empty model whose decoder weights
are copied from the checkpoint one tensor at a time (export/streamed.py). Either can run in a child
process, so that every byte PyTorch held is returned before the ONNX Runtime checks start.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import pickle

import numpy as np

from vlm_core.export import streamed
from vlm_core.export.errors import ExportError
from vlm_core.export.family_defaults import export_family
from vlm_core.export.manifest_build import manifest_head
from vlm_core.export.memory_plan import MemoryPlan, checkpoint_bytes
from vlm_core.export.options import ExportOptions
from vlm_core.export.progress import Progress

# Progress steps either stage takes: load, reference, vision graph, decoder graph (count_steps in
# export/pipeline.py adds them up; a stage run in a child process advances the parent's count by this).
TORCH_STAGE_STEPS = 4
# Checkpoints above this are exported with the torch stage in a child process (ExportOptions.isolate None).
ISOLATE_BYTES = 1 << 30


def run_torch_stage(source: str, staging: str, family_name: str, options: ExportOptions, plan: MemoryPlan,
                    progress: Progress) -> tuple[dict, dict, str]:
    """The torch stage, in this process or (options.isolate; None: big checkpoints) in a child process.

    Returns (manifest so far, reference case, local checkpoint folder)."""
    args = (source, staging, family_name, options, plan, progress)
    isolate = options.isolate if options.isolate is not None else checkpoint_bytes(source) > ISOLATE_BYTES
    if not isolate:
        return torch_stage(*args)
    result_path = os.path.join(staging, "_torch_stage.pkl")
    child = multiprocessing.get_context("spawn").Process(target=_torch_stage_child, args=(args, result_path))
    child.start()
    try:
        child.join()
    except BaseException:  # Ctrl-C / SIGTERM in the parent: stop the child too, then clean up
        child.terminate()
        child.join()
        raise
    if not os.path.exists(result_path):
        raise ExportError(f"the export process died (exit code {child.exitcode}"
                          f"{', killed: out of memory?' if child.exitcode == -9 else ''})")
    with open(result_path, "rb") as f:
        status, payload = pickle.load(f)
    os.remove(result_path)
    if status != "ok":
        raise ExportError(f"export of {source!r} failed: {payload}")
    progress.index += TORCH_STAGE_STEPS  # the child's steps, printed by the child
    return payload


def _torch_stage_child(args, result_path) -> None:
    """Child-process entry: run the torch stage and pickle its result (or the error) to `result_path`."""
    try:
        result = ("ok", torch_stage(*args))
    except BaseException as e:  # reported by the parent as one line
        result = ("error", f"{type(e).__name__}: {e}")
    with open(result_path, "wb") as f:
        pickle.dump(result, f)


def torch_stage(source: str, staging: str, family_name: str, options: ExportOptions, plan: MemoryPlan,
                progress: Progress) -> tuple[dict, dict, str]:
    """The streamed or the eager stage, as `plan` says."""
    family = export_family(family_name)
    stage = streamed_stage if plan.stream else eager_stage
    return stage(family, family_name, source, staging, options, plan, progress)


def eager_stage(family, family_name, source, staging, options: ExportOptions, plan: MemoryPlan,
                progress: Progress) -> tuple[dict, dict, str]:
    """Load the model in float32, compute the reference, export both graphs and the embedding table."""
    kv_dtype = options.kv_dtype
    with progress.step(f"loading checkpoint {source}"):
        folder = resolve_source(source)
        check_checkpoint(family, folder)
        model = family.load_model(folder)
    with progress.step("computing the eager PyTorch reference"
                       + (f" (KV cache rounded to {kv_dtype})" if kv_dtype != "float32" else "")):
        reference = family.reference_case(model, new_tokens=options.parity_tokens, kv_dtype=kv_dtype)
    manifest = manifest_head(family, family_name, model, kv_dtype)
    graphs = manifest["graphs"] = {}
    with progress.step("exporting the vision graph"):
        extra = family.export_vision(model, os.path.join(staging, "vision.onnx"))
        graphs["vision"] = {"file": "vision.onnx", "external_data": extra}
    with progress.step(f"exporting the decoder graph ({kv_dtype} KV cache)"):
        extra = family.export_decoder(model, os.path.join(staging, "decoder.onnx"), kv_dtype=kv_dtype)
        graphs["decoder"] = {"file": "decoder.onnx", "external_data": extra}
        _save_embeddings(family, model, staging, manifest)
    return manifest, reference, folder


def streamed_stage(family, family_name, source, staging, options: ExportOptions, plan: MemoryPlan,
                   progress: Progress) -> tuple[dict, dict, str]:
    """For checkpoints whose float32 weights do not fit in memory: the eager reference in
    `plan.reference_dtype`, then the graphs from an empty model whose decoder weights are streamed from
    the checkpoint into the graph's data file (export/streamed.py)."""
    import torch

    kv_dtype = options.kv_dtype
    folder = resolve_source(source)
    dtype = getattr(torch, plan.reference_dtype)
    with progress.step(f"loading checkpoint {source} ({plan.reference_dtype}) for the eager PyTorch reference"):
        check_checkpoint(family, folder)
        model = family.load_model(folder, dtype=dtype)
    with progress.step(f"computing the eager PyTorch reference ({plan.reference_dtype})"):
        reference = family.reference_case(model, new_tokens=options.parity_tokens, kv_dtype=kv_dtype)
        reference["dtype"] = plan.reference_dtype
    manifest = manifest_head(family, family_name, model, kv_dtype)
    del model
    gc.collect()
    graphs = manifest["graphs"] = {}
    with progress.step("exporting the vision graph (decoder weights are left on disk)"):
        model = family.load_model(folder, empty=True)
        reader = streamed.CheckpointReader(folder)
        reader.base_prefix = getattr(model, "base_model_prefix", "") or ""
        streamed.materialize(model.get_input_embeddings(), reader)
        graph = streamed.streamable_decoder(family.decoder_graph(model, kv_dtype))
        streamed.materialize(model, reader)  # everything but the decoder: vision encoder, projector
        extra = family.export_vision(model, os.path.join(staging, "vision.onnx"))
        graphs["vision"] = {"file": "vision.onnx", "external_data": extra}
    with progress.step(f"exporting the decoder graph ({kv_dtype} KV cache), streaming its weights from the "
                       f"checkpoint"):
        args, dynamic = family.decoder_example(model, graph)
        extra = streamed.export_streamed(graph, args, dynamic, os.path.join(staging, "decoder.onnx"), reader,
                                         log=progress.log)
        graphs["decoder"] = {"file": "decoder.onnx", "external_data": extra}
        _save_embeddings(family, model, staging, manifest)
    return manifest, reference, folder


def _save_embeddings(family, model, staging: str, manifest: dict) -> None:
    table = family.embedding_table(model)
    np.save(os.path.join(staging, "embed_tokens.npy"), table)
    manifest["embeddings"] = {"file": "embed_tokens.npy", "dtype": str(table.dtype), "shape": list(table.shape)}


def resolve_source(source: str) -> str:
    """A local folder for `source` (a hub id is downloaded to the local cache first)."""
    if os.path.isdir(source):
        return source
    from huggingface_hub import snapshot_download

    return snapshot_download(source)


def check_checkpoint(family, folder: str) -> None:
    """Name a missing or misshaped tensor before loading (safetensors checkpoints; others load as they are)."""
    if not any(n.endswith(".safetensors") for n in os.listdir(folder)):
        return
    streamed.check_checkpoint(family.load_model(folder, empty=True), streamed.CheckpointReader(folder))
