"""manifest.json's assembly: the family's head, the checkpoint's assets, provenance, and writing it.

The torch stage starts the manifest (`manifest_head`, then "graphs" and "embeddings"); the pipeline
adds the tokenizer, chat template and preprocessing (`add_assets`), the graphs' I/O and where the
export came from (`add_provenance`), then the parity and quantization figures, writing the file
after each so a failed check can be read from the staging folder.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from vlm_core.export import assets
from vlm_core.export.errors import ExportError
from vlm_core.runtime.manifest import FORMAT_VERSION, MANIFEST


def manifest_head(family, family_name: str, model, kv_dtype: str) -> dict:
    """format_version, family and the family's sections, with the KV cache's dtype in text_config (the
    runtime allocates its cache buffers in it; absent means float32, as in exports made before it existed)."""
    manifest = {"format_version": FORMAT_VERSION, "family": family_name, **family.manifest_sections(model)}
    manifest["text_config"]["kv_dtype"] = kv_dtype
    return manifest


def add_assets(manifest: dict, family, folder: str, staging: str) -> None:
    """Copy tokenizer and chat template (and the family's own files) into `staging`; add their entries, the
    EOS ids and the family-normalised image (and, for families that read video, video) preprocessing."""
    manifest.update(assets.copy_assets(folder, staging))
    manifest.update(family.extra_assets(folder, staging, manifest))
    manifest["special_tokens"]["eos_token_ids"] = manifest["generation"].pop("eos_token_ids")
    try:
        manifest["preprocessing"] = family.preprocessing_params(manifest["preprocessing"], manifest)
        video = family.video_preprocessing_params(manifest.pop("video_preprocessing"), manifest)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if video is not None:
        manifest["video_preprocessing"] = video


def add_provenance(manifest: dict, source: str, staging: str) -> None:
    """Quantization "none" (until quantized), the source checkpoint, package versions and each graph's I/O."""
    manifest["quantization"] = {"method": "none"}
    manifest["source"] = {"checkpoint": os.path.abspath(source) if os.path.isdir(source) else source}
    manifest["versions"] = versions()
    for graph in manifest["graphs"].values():
        graph.update(assets.graph_io(os.path.join(staging, graph["file"])))


def versions() -> dict:
    """Python's and the export's packages' versions (None: not installed)."""
    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # a missing optional package is recorded as absent
            found[name] = None
    return found


def write_manifest(folder: str, manifest: dict) -> None:
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        f.write("\n")
