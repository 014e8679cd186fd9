"""The export job: checkpoint folder -> self-contained model folder, verified against eager PyTorch.

    run_export("Qwen3-VL-2B-Instruct", "qwen3-vl-2b-onnx", quantize="int4")

The steps, each in its own file: plan memory (export/memory_plan.py), stage the output folder
(export/output.py), the PyTorch stage (export/torch_stage.py: load, eager reference, graphs,
embedding table), the assets and manifest (export/manifest_build.py), the parity check
(export/parity.py), quantization (export/quantize_step.py), publishing (export/output.py). The
family's part is its export module, `export.<family>` (export/family_defaults.py holds the contract).
"""
from __future__ import annotations

import gc
import json
import os
import shutil

from vlm_core.export import parity
from vlm_core.export.assets import read_json
from vlm_core.export.errors import ExportError
from vlm_core.export.family_defaults import export_family
from vlm_core.export.manifest_build import add_assets, add_provenance, write_manifest
from vlm_core.export.memory_plan import MemoryPlan, plan_memory
from vlm_core.export.options import ExportOptions
from vlm_core.export.output import prepare_output, publish
from vlm_core.export.progress import Progress
from vlm_core.export.quantize import INT4_ALGORITHM, INT4_BLOCK_SIZE
from vlm_core.export.quantize_step import plausible, quantize_and_measure
from vlm_core.export.torch_stage import TORCH_STAGE_STEPS, run_torch_stage
from vlm_core.models import family_for_model_type

__all__ = ["ExportError", "ExportOptions", "Progress", "count_steps", "export_checkpoint", "run_export"]


def count_steps(options: ExportOptions, plan: MemoryPlan | None = None, prelude_steps: int = 0) -> int:
    """The numbered steps of an export: `prelude_steps` taken before it (e.g. writing the demo checkpoint),
    the torch stage's, the assets, the float32 parity check (unless `plan` says the float32 graphs cannot be
    run here; None: not planned yet, counted) and quantization (unless "none")."""
    fp32_parity = plan is None or plan.verify_fp32
    return prelude_steps + TORCH_STAGE_STEPS + 1 + int(fp32_parity) + int(options.quantize != "none")


def run_export(source: str, out: str, force: bool = False, quantize: str = "none", progress: Progress | None = None,
               parity_tokens: int = 8, isolate: bool | None = None, stream: bool | None = None,
               int4_block_size: int = INT4_BLOCK_SIZE, kv_dtype: str | None = None,
               int4_algorithm: str = INT4_ALGORITHM) -> dict:
    """Export `source` to `out`; returns the manifest written. Raises ExportError on bad input or failed parity.

    The keywords are ExportOptions' fields (export/options.py)."""
    options = ExportOptions(quantize=quantize, kv_dtype=kv_dtype, parity_tokens=parity_tokens, stream=stream,
                            int4_block_size=int4_block_size, int4_algorithm=int4_algorithm, force=force,
                            isolate=isolate)
    return export_checkpoint(source, out, options, progress)


def export_checkpoint(source: str, out: str, options: ExportOptions, progress: Progress | None = None) -> dict:
    """Export `source` to `out` as `options` say; returns the manifest written.

    progress: its total is set here (count_steps, counting the steps it has already taken)."""
    progress = progress or Progress()
    config = _read_config(source)
    try:
        family_name = family_for_model_type(config.get("model_type", "?"))
    except KeyError as e:
        raise ExportError(f"{source!r}: {e.args[0]}") from None
    family = export_family(family_name)
    plan = plan_memory(source, options.quantize, options.stream)
    progress.total = count_steps(options, plan, prelude_steps=progress.index)
    if plan.stream:
        progress.log(f"streamed export: float32 weights {plan.float32_gb:.1f} GB, memory {plan.memory_gb:.1f} GB; "
                     f"the decoder's weights go from the checkpoint to disk one tensor at a time")
    staging = prepare_output(out, options.force)
    try:
        manifest = _build(source, staging, family, family_name, options, plan, progress)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress.log(f"exported {source} -> {os.path.abspath(out)}")
    return manifest


def _build(source, staging, family, family_name, options: ExportOptions, plan: MemoryPlan,
           progress: Progress) -> dict:
    manifest, reference, folder = run_torch_stage(source, staging, family_name, options, plan, progress)
    gc.collect()
    with progress.step("writing tokenizer, chat template and configs"):
        add_assets(manifest, family, folder, staging)
    add_provenance(manifest, source, staging)
    write_manifest(staging, manifest)
    if plan.verify_fp32:
        _check_fp32(staging, manifest, reference, progress)
    else:
        manifest["parity"] = {"fp32_graphs": "not run: their weights do not fit in this machine's memory; the "
                                             "quantized graphs are checked against eager "
                                             f"{plan.reference_dtype} below"}
        progress.log("parity: the float32 graphs are too big to run here; checking the quantized graphs instead")
    if options.quantize != "none":
        with progress.step(f"quantizing ({options.quantize}) and measuring agreement with eager PyTorch"):
            agreement = quantize_and_measure(staging, manifest, reference, options.quantize,
                                             options.int4_block_size, options.int4_algorithm)
        progress.log(f"quantized agreement with eager {agreement['reference_dtype']}: " + ", ".join(
            f"{k}={v}" for k, v in agreement.items() if k != "reference_dtype"))
        if not plan.verify_fp32 and not plausible(agreement):
            raise ExportError("the quantized graphs disagree with eager PyTorch beyond quantization error "
                              "(a wiring fault, not rounding): " + json.dumps(agreement))
    return manifest


def _check_fp32(staging: str, manifest: dict, reference: dict, progress: Progress) -> None:
    """Run the float32 graphs through the runtime against the eager reference (manifest "parity")."""
    with progress.step("checking the ONNX graphs against eager PyTorch"):
        figures = parity.check_parity(staging, reference)
        gc.collect()  # the fp32 sessions go before quantization loads the graphs again
    manifest["parity"] = figures
    write_manifest(staging, manifest)
    progress.log("parity: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    if not figures["passed"]:
        raise ExportError("the exported graphs do not match eager PyTorch: " + json.dumps(figures))


def _read_config(source: str) -> dict:
    """config.json of a local checkpoint folder, or fetched from the hub for a hub id."""
    path = os.path.join(source, "config.json")
    if os.path.isdir(source):
        if not os.path.isfile(path):
            raise ExportError(f"{source!r} has no config.json: pass a Hugging Face checkpoint folder "
                              f"(config.json, *.safetensors, tokenizer.json, ...)")
        try:
            config = read_json(path)
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
