"""Reading and checking manifest.json, the one file that tells the runtime what a model folder holds."""
from __future__ import annotations

import json
import os

from vlm_core.errors import ModelFolderError

# 2: the decoder's attention is ONNX Runtime's GroupQueryAttention, with seqlens_k / total_sequence_length
#    inputs and the KV cache written in place (runtime/engine/decoder_call.py); 1 took an attention_mask and
#    returned only the new entries.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
OLD_VERSIONS = {1: "its decoder graph takes an attention mask and returns only new cache entries, while this "
                   "runtime binds the cache in place for GroupQueryAttention"}


def load_manifest(folder: str) -> dict:
    """Load and validate `folder`/manifest.json; raise ModelFolderError naming what is wrong."""
    if os.path.isfile(folder):
        hint = (f"; pass its folder {os.path.dirname(folder) or '.'!r}" if os.path.basename(folder) == MANIFEST
                else " (pass the OUT folder written by `python -m vlm_core.export`)")
        raise ModelFolderError(f"{folder!r} is a file, not an exported model folder{hint}")
    if not os.path.isdir(folder):
        raise ModelFolderError(f"model folder {folder!r} does not exist (pass the OUT folder written by `python -m vlm_core.export`)")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise ModelFolderError(f"{folder!r} is not an exported model: it has no {MANIFEST} "
                               f"(export one with `python -m vlm_core.export SRC -o {folder}`)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} cannot be read as JSON ({e}); re-export the model") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version in OLD_VERSIONS:
        raise ModelFolderError(f"{path} has format_version {version}, an older export ({OLD_VERSIONS[version]}); "
                               f"this runtime reads format_version {FORMAT_VERSION}: re-export the model from its "
                               f"checkpoint with `python -m vlm_core.export SRC -o {folder}`")
    if version != FORMAT_VERSION:
        raise ModelFolderError(f"{path} has format_version {version!r}, this runtime reads format_version "
                               f"{FORMAT_VERSION}; re-export the model with this version of the exporter")
    for key in ("family", "graphs", "text_config", "tokenizer", "embeddings"):
        if key not in manifest:
            raise ModelFolderError(f"{path} lacks the {key!r} entry; re-export the model")
    for name in list_files(manifest):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ModelFolderError(f"{folder!r} is incomplete: {name} is missing; re-export the model")
    return manifest


def list_files(manifest: dict) -> list[str]:
    """Every file the manifest refers to (graphs with their external data, tokenizer, tables)."""
    files = []
    for graph in manifest["graphs"].values():
        files.append(graph["file"])
        files += graph.get("external_data", [])
    files.append(manifest["tokenizer"])
    files.append(manifest["embeddings"]["file"])
    if manifest.get("chat_template"):
        files.append(manifest["chat_template"])
    return files
