"""The export job: checkpoint folder -> self-contained model folder, verified against eager PyTorch.

The folder is built under a temporary name beside OUT and renamed into place only after the
parity check passes, so a failed or interrupted export never leaves a folder that loads as complete.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

from models import family_for_model_type
from runtime.manifest import FORMAT_VERSION, MANIFEST

from . import assets
from .kv_dtype import KV_DTYPES, default_kv_dtype

EXPORT_FAMILIES = {"qwen3_vl": "export.qwen3_vl", "minigpt4": "export.minigpt4"}


class ExportError(Exception):
    """The export cannot proceed; the message says why and what to do."""


class Progress:
    """Numbered step lines on stderr, with a heartbeat during long steps."""

    def __init__(self, total: int, stream=None, heartbeat_s: float = 20.0):
        # stream None: whatever sys.stderr is when a line is written (a default bound at import time
        # would keep writing to a stream that was swapped out and closed since, e.g. by a test harness)
        self.total, self.index, self.stream, self.heartbeat_s = total, 0, stream, heartbeat_s

    def log(self, message: str) -> None:
        print(message, file=self.stream if self.stream is not None else sys.stderr, flush=True)

    @contextmanager
    def step(self, name: str):
        self.index += 1
        start = time.perf_counter()
        self.log(f"[{self.index}/{self.total}] {name} ...")
        done = threading.Event()

        def beat():
            while not done.wait(self.heartbeat_s):
                self.log(f"      ... {name}: {time.perf_counter() - start:.0f} s")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
        self.log(f"      done in {time.perf_counter() - start:.1f} s")


def _read_config(source: str) -> dict:
    path = os.path.join(source, "config.json")
    if os.path.isdir(source):
        if not os.path.isfile(path):
            raise ExportError(f"{source!r} has no config.json: pass a Hugging Face checkpoint folder "
                              f"(config.json, *.safetensors, tokenizer.json, ...)")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(f"{path} cannot be read as JSON ({e}); pass a valid Hugging Face checkpoint "
                              f"folder") from None
        if not isinstance(config, dict):
            raise ExportError(f"{path} is not a JSON object (got {type(config).__name__}); pass a valid "
                              f"Hugging Face checkpoint folder")
        return config
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(source, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except Exception as e:
        raise ExportError(f"{source!r} is not a local folder and could not be fetched from the Hugging Face hub "
                          f"({type(e).__name__}); pass a local checkpoint folder") from None


def _resolve_source(source: str) -> str:
    """A local folder for `source` (a hub id is downloaded to the local cache first)."""
    if os.path.isdir(source):
        return source
    from huggingface_hub import snapshot_download

    return snapshot_download(source)


def prepare_output(out: str, force: bool) -> str:
    """Check OUT and return the temporary folder to build in (beside OUT, same filesystem)."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"output {out!r} exists and is not a folder; choose another -o")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ExportError(f"output folder {out!r} is not empty; pass --force to replace it or choose another -o")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_staging(parent, os.path.basename(out))
    staging = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def _remove_stale_staging(parent: str, name: str) -> None:
    """Delete `.NAME.partial-PID` folders left by exports that were killed (their PID is gone)."""
    prefix = f".{name}.partial-"
    for entry in os.listdir(parent):
        pid = entry[len(prefix):]
        if entry.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _publish(staging: str, out: str) -> None:
    """Move the finished folder into place (replacing an old OUT only now, when the new one is complete)."""
    _normalize_permissions(staging)
    out = os.path.abspath(out)
    if os.path.isdir(out):
        trash = out + f".old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, out)


def _normalize_permissions(folder: str) -> None:
    """Files as the user's umask makes them. ONNX's C++ writer creates external-data files owner-only
    (0600), so a folder copied to a server running as another user could not be read there."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # a missing optional package is recorded as absent
            found[name] = None
    return found


def run_export(source: str, out: str, force: bool = False, quantize: str = "none", progress: Progress | None = None,
               parity_tokens: int = 8, isolate: bool | None = None, stream: bool | None = None,
               int4_block_size: int = 32, kv_dtype: str | None = None) -> dict:
    """Export `source` to `out`; returns the manifest written. Raises ExportError on bad input or failed parity.

    stream: export the decoder's weights tensor by tensor from the checkpoint (None: when the float32
    model would not fit in memory; see export/streamed.py).
    kv_dtype: the KV cache's dtype, "float16" or "float32" (None: float32 for quantize "none", else
    float16; see export/kv_dtype.py)."""
    progress = progress or Progress(total=6)
    kv_dtype = kv_dtype or default_kv_dtype(quantize)
    if kv_dtype not in KV_DTYPES:
        raise ExportError(f"KV cache dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
    config = _read_config(source)
    try:
        family_name = family_for_model_type(config.get("model_type", "?"))
    except KeyError as e:
        raise ExportError(f"{source!r}: {e.args[0]}") from None
    family = importlib.import_module(EXPORT_FAMILIES[family_name])
    plan = plan_memory(source, quantize, stream)
    if not plan.verify_fp32:
        progress.total -= 1  # no float32 parity step
    if plan.stream:
        progress.log(f"streamed export: float32 weights {plan.float32_gb:.1f} GB, memory {plan.memory_gb:.1f} GB; "
                     f"the decoder's weights go from the checkpoint to disk one tensor at a time")
    staging = prepare_output(out, force)
    try:
        manifest = _build(source, staging, family, family_name, quantize, progress, parity_tokens, isolate, plan,
                          int4_block_size, kv_dtype)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress.log(f"exported {source} -> {os.path.abspath(out)}")
    return manifest


# A float32 model above this share of physical memory is exported streamed; its float32 graphs are run
# (for the parity check) only when they fit in it too, else the eager reference is computed in bfloat16.
MEMORY_SHARE = 0.5


@dataclasses.dataclass
class MemoryPlan:
    stream: bool
    verify_fp32: bool  # the float32 graphs and an eager float32 model fit: exact parity check
    reference_dtype: str
    float32_gb: float
    memory_gb: float


def plan_memory(source: str, quantize: str, stream: bool | None) -> MemoryPlan:
    """How to export `source` on this machine, from the checkpoint's size in float32 and the memory here."""
    import psutil

    memory = psutil.virtual_memory().total
    float32 = _float32_bytes(source)
    fits = float32 <= MEMORY_SHARE * memory
    plan = MemoryPlan(stream=(not fits) if stream is None else stream, verify_fp32=fits,
                      reference_dtype="float32" if fits else "bfloat16", float32_gb=float32 / 1e9,
                      memory_gb=memory / 1e9)
    if not fits and quantize != "int4":
        raise ExportError(
            f"{source!r} is {plan.float32_gb:.1f} GB in float32 and this machine has {plan.memory_gb:.1f} GB of "
            f"memory: its float32 graphs could be written but not run here to verify them"
            + ("" if quantize == "none" else f", and --quantize {quantize} reads them whole")
            + "; pass --quantize int4 (written tensor by tensor and checked against eager bfloat16), or export "
              "on a machine with more memory")
    return plan


def _float32_bytes(source: str) -> int:
    """The checkpoint's tensors in float32 (safetensors headers; other formats: twice their 16-bit file size)."""
    if not os.path.isdir(source):
        return 0  # a hub id: resolved (downloaded) later; planned as small
    if any(n.endswith(".safetensors") for n in os.listdir(source)):
        from .streamed import CheckpointReader

        return CheckpointReader(source).float32_bytes()
    return 2 * _checkpoint_bytes(source)


def _torch_stage(source, staging, family_name, parity_tokens, progress, plan=None,
                 kv_dtype: str = "float32") -> tuple[dict, dict, str]:
    """Everything that needs PyTorch: load, eager reference, graph export, embedding table.

    Returns (manifest so far, reference case, local checkpoint folder)."""
    family = importlib.import_module(EXPORT_FAMILIES[family_name])
    if plan is not None and plan.stream:
        return _streamed_torch_stage(family, family_name, source, staging, parity_tokens, progress, plan, kv_dtype)
    with progress.step(f"loading checkpoint {source}"):
        folder = _resolve_source(source)
        _check_checkpoint(family, folder)
        model = family.load_model(folder)
    with progress.step("computing the eager PyTorch reference"
                       + (f" (KV cache rounded to {kv_dtype})" if kv_dtype != "float32" else "")):
        reference = family.reference_case(model, new_tokens=parity_tokens, kv_dtype=kv_dtype)
    manifest = _manifest_head(family, family_name, model, kv_dtype)
    graphs = manifest["graphs"] = {}
    with progress.step("exporting the vision graph"):
        extra = family.export_vision(model, os.path.join(staging, "vision.onnx"))
        graphs["vision"] = {"file": "vision.onnx", "external_data": extra}
    with progress.step(f"exporting the decoder graph ({kv_dtype} KV cache)"):
        extra = family.export_decoder(model, os.path.join(staging, "decoder.onnx"), kv_dtype=kv_dtype)
        graphs["decoder"] = {"file": "decoder.onnx", "external_data": extra}
        table = family.embedding_table(model)
        np.save(os.path.join(staging, "embed_tokens.npy"), table)
        manifest["embeddings"] = {"file": "embed_tokens.npy", "dtype": str(table.dtype), "shape": list(table.shape)}
    return manifest, reference, folder


def _manifest_head(family, family_name: str, model, kv_dtype: str) -> dict:
    """format_version, family and the family's sections, with the KV cache's dtype in text_config (the
    runtime allocates its cache buffers in it; absent means float32, as in exports made before it existed)."""
    manifest = {"format_version": FORMAT_VERSION, "family": family_name, **family.manifest_sections(model)}
    manifest["text_config"]["kv_dtype"] = kv_dtype
    return manifest


def _streamed_torch_stage(family, family_name, source, staging, parity_tokens, progress, plan, kv_dtype="float32"):
    """The torch stage for checkpoints whose float32 weights do not fit in memory: the eager reference in
    `plan.reference_dtype`, then the graphs from an empty model whose decoder weights are streamed from the
    checkpoint into the graph's data file (export/streamed.py)."""
    import torch

    from . import streamed

    folder = _resolve_source(source)
    dtype = getattr(torch, plan.reference_dtype)
    with progress.step(f"loading checkpoint {source} ({plan.reference_dtype}) for the eager PyTorch reference"):
        _check_checkpoint(family, folder)
        model = family.load_model(folder, dtype=dtype)
    with progress.step(f"computing the eager PyTorch reference ({plan.reference_dtype})"):
        reference = family.reference_case(model, new_tokens=parity_tokens, kv_dtype=kv_dtype)
        reference["dtype"] = plan.reference_dtype
    manifest = _manifest_head(family, family_name, model, kv_dtype)
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
        table = family.embedding_table(model)
        np.save(os.path.join(staging, "embed_tokens.npy"), table)
        manifest["embeddings"] = {"file": "embed_tokens.npy", "dtype": str(table.dtype), "shape": list(table.shape)}
    return manifest, reference, folder


def _check_checkpoint(family, folder: str) -> None:
    """Name a missing or misshaped tensor before loading (safetensors checkpoints; others load as they are)."""
    if not any(n.endswith(".safetensors") for n in os.listdir(folder)):
        return
    from . import streamed

    streamed.check_checkpoint(family.load_model(folder, empty=True), streamed.CheckpointReader(folder))


def _torch_stage_child(args, result_path) -> None:
    """Child-process entry: run the torch stage and pickle its result (or the error) to `result_path`."""
    import pickle

    try:
        result = ("ok", _torch_stage(*args))
    except BaseException as e:  # reported by the parent as one line
        result = ("error", f"{type(e).__name__}: {e}")
    with open(result_path, "wb") as f:
        pickle.dump(result, f)


def _checkpoint_bytes(source: str) -> int:
    if not os.path.isdir(source):
        return 1 << 40  # a hub id: assume large
    return sum(os.path.getsize(os.path.join(source, n)) for n in os.listdir(source)
               if n.endswith((".safetensors", ".bin", ".pth")))


def _run_torch_stage(source, staging, family_name, parity_tokens, progress, isolate: bool, plan=None,
                     kv_dtype: str = "float32"):
    """Run the torch stage in this process, or in a child process so that every byte PyTorch held
    (weights, export caches) is returned before the ONNX Runtime checks and quantization start."""
    args = (source, staging, family_name, parity_tokens, progress, plan, kv_dtype)
    if not isolate:
        return _torch_stage(*args)
    import multiprocessing
    import pickle

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
    progress.index += 4
    return payload


def _build(source, staging, family, family_name, quantize, progress, parity_tokens, isolate=None,
           plan=None, int4_block_size: int = 32, kv_dtype: str = "float32") -> dict:
    if isolate is None:  # big checkpoints: keep PyTorch's memory out of the later steps
        isolate = _checkpoint_bytes(source) > (1 << 30)
    manifest, reference, folder = _run_torch_stage(source, staging, family_name, parity_tokens, progress, isolate,
                                                   plan, kv_dtype)
    graphs = manifest["graphs"]
    gc.collect()
    with progress.step("writing tokenizer, chat template and configs"):
        manifest.update(assets.copy_assets(folder, staging))
        if hasattr(family, "extra_assets"):  # a family's own files (e.g. a prompt template the checkpoint lacks)
            manifest.update(family.extra_assets(folder, staging, manifest))
        manifest["special_tokens"]["eos_token_ids"] = manifest["generation"].pop("eos_token_ids")
        try:
            manifest["preprocessing"] = family.preprocessing_params(manifest["preprocessing"], manifest)
            raw_video = manifest.pop("video_preprocessing")
            if hasattr(family, "video_preprocessing_params"):  # families that read video (not MiniGPT-4)
                manifest["video_preprocessing"] = family.video_preprocessing_params(raw_video, manifest)
        except ValueError as e:
            raise ExportError(str(e)) from None
    manifest["quantization"] = {"method": "none"}
    manifest["source"] = {"checkpoint": os.path.abspath(source) if os.path.isdir(source) else source}
    manifest["versions"] = versions()
    for name, graph in graphs.items():
        graph.update(assets.graph_io(os.path.join(staging, graph["file"])))
    _write_manifest(staging, manifest)
    if plan is None or plan.verify_fp32:
        with progress.step("checking the ONNX graphs against eager PyTorch"):
            from .parity import check_parity

            figures = check_parity(staging, reference)
            gc.collect()  # the fp32 sessions go before quantization loads the graphs again
        manifest["parity"] = figures
        _write_manifest(staging, manifest)
        progress.log("parity: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
        if not figures["passed"]:
            raise ExportError("the exported graphs do not match eager PyTorch: " + json.dumps(figures))
    else:
        manifest["parity"] = {"fp32_graphs": "not run: their weights do not fit in this machine's memory; the "
                                             "quantized graphs are checked against eager "
                                             f"{plan.reference_dtype} below"}
        progress.log("parity: the float32 graphs are too big to run here; checking the quantized graphs instead")
    if quantize != "none":
        with progress.step(f"quantizing ({quantize}) and measuring agreement with eager PyTorch"):
            manifest["quantization"] = _quantize(staging, manifest, quantize, int4_block_size)
            _write_manifest(staging, manifest)
            from .parity import quantized_agreement

            agreement = quantized_agreement(staging, reference)
            manifest["quantization"]["agreement"] = agreement
            agreement["reference_dtype"] = reference.get("dtype", "float32")
            agreement["reference_kv_dtype"] = reference.get("kv_dtype", "float32")
            _write_manifest(staging, manifest)
        progress.log(f"quantized agreement with eager {agreement['reference_dtype']}: " + ", ".join(
            f"{k}={v}" for k, v in agreement.items() if k != "reference_dtype"))
        if plan is not None and not plan.verify_fp32 and not _plausible(agreement):
            raise ExportError("the quantized graphs disagree with eager PyTorch beyond quantization error "
                              "(a wiring fault, not rounding): " + json.dumps(agreement))
    return manifest


# When the float32 graphs cannot be run here, the quantized ones are the check: their first-step logits
# and image features must point the same way as eager PyTorch's. Quantization error on 4-bit weights
# lowers cosine similarity (0.87 measured for the 2B decoder on random weights, whose flat logits are
# the worst case); a mis-wired graph gives ~0. The floors sit between the two.
PLAUSIBLE_LOGITS_COSINE = 0.5
PLAUSIBLE_FEATURES_COSINE = 0.9


def _plausible(agreement: dict) -> bool:
    return (agreement["first_logits_cosine"] >= PLAUSIBLE_LOGITS_COSINE
            and agreement["image_embeds_cosine"] >= PLAUSIBLE_FEATURES_COSINE)


# Which weight format each graph gets, per --quantize method. "mixed" keeps two decoders with the
# same inputs and outputs: int8 GEMMs (AMX/VNNI) for the prompt, 4-bit GEMVs for single tokens.
QUANTIZED_GRAPHS = {
    "int8": {"vision": [("vision", "int8")], "decoder": [("decoder", "int8")]},
    "int4": {"vision": [("vision", "int8")], "decoder": [("decoder", "int4")]},
    "mixed": {"vision": [("vision", "int8")], "decoder": [("decoder", "int4"), ("prefill", "int8")]},
}


def _quantize(staging: str, manifest: dict, method: str, int4_block_size: int = 32) -> dict:
    """Replace the fp32 graphs and embeddings in `staging` by quantized ones; returns the manifest entry."""
    from . import quantize

    record = {"method": method}
    graphs = {}
    for source_name, source in manifest["graphs"].items():
        path = os.path.join(staging, source["file"])
        for name, weight_format in QUANTIZED_GRAPHS[method][source_name]:
            quantized = os.path.join(staging, f"{source_name}.{weight_format}.onnx")
            if weight_format == "int4":
                extra = quantize.quantize_int4(path, quantized, block_size=int4_block_size)
                record[name] = {"format": "MatMulNBits", "bits": 4, "block_size": int4_block_size,
                                "accuracy_level": quantize.INT4_ACCURACY_LEVEL, "symmetric": True}
            else:
                extra = quantize.quantize_int8(path, quantized)
                record[name] = {"format": "dynamic int8 (MatMulInteger)", "per_channel": True}
            graphs[name] = {"file": os.path.basename(quantized), "external_data": extra,
                            **assets.graph_io(quantized)}
            record[name]["ops"] = {k: v for k, v in quantize.count_ops(quantized).items()
                                   if k in ("MatMul", "MatMulNBits", "MatMulInteger", "Gemm")}
        for old in (source["file"], source["file"] + ".data"):
            if os.path.exists(os.path.join(staging, old)):
                os.remove(os.path.join(staging, old))
    manifest["graphs"] = graphs
    table_path = os.path.join(staging, manifest["embeddings"]["file"])
    rows, scale = quantize.quantize_embeddings(np.load(table_path))
    os.remove(table_path)
    np.save(os.path.join(staging, "embed_tokens.int8.npy"), rows)
    np.save(os.path.join(staging, "embed_tokens.scale.npy"), scale)
    manifest["embeddings"] = {"file": "embed_tokens.int8.npy", "scale_file": "embed_tokens.scale.npy",
                              "dtype": "int8", "shape": list(rows.shape)}
    record["embeddings"] = {"format": "int8 rows, float32 scale per row"}
    return record


def _write_manifest(folder: str, manifest: dict) -> None:
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        f.write("\n")
