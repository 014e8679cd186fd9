"""Reading and checking manifest.json, the one file that tells the runtime what a model folder holds."""
from __future__ import annotations

import json
import os

from vlm_core.errors import ModelFolderError

# 2: the decoder's attention is ONNX Runtime's GroupQueryAttention, with seqlens_k / total_sequence_length
#    inputs and the KV cache written in place (runtime/engine/decoder_call.py); 1 took an attention_mask and
#    returned only the new entries.
# 3: the decoder takes `logits_index` (the positions of the call that get logits) and returns logits
#    [B, K, vocab]; 2 returned the last position's only [B, vocab].
FORMAT_VERSION = 3
# Older versions this runtime still reads, and what such a folder goes without.
STILL_READ = {2: "jump-forward over forced tokens (its decoder gives only the last position's logits)"}
MANIFEST = "manifest.json"
OLD_VERSIONS = {1: "its decoder graph takes an attention mask and returns only new cache entries, while this "
                   "runtime binds the cache in place for GroupQueryAttention"}
# The entries every export writes and the runtime reads; the graphs it runs.
REQUIRED = ("family", "graphs", "text_config", "vision_config", "tokenizer", "embeddings", "special_tokens",
            "preprocessing")
GRAPHS = ("vision", "decoder")
MAX_TEMPLATE_BYTES = 1 << 20  # chat templates are a few KB; a bound keeps a bad file from filling memory
# generation_config.json keys the runtime takes as sampling defaults (checked as SamplingParams checks them)
SAMPLING_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


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
    if not isinstance(manifest, dict):
        raise ModelFolderError(f"{path} holds a JSON {_json_type(manifest)}, not the object an export writes; "
                               f"re-export the model")
    version = manifest.get("format_version")
    if version in OLD_VERSIONS:
        raise ModelFolderError(f"{path} has format_version {version}, an older export ({OLD_VERSIONS[version]}); "
                               f"this runtime reads format_version {FORMAT_VERSION}: re-export the model from its "
                               f"checkpoint with `python -m vlm_core.export SRC -o {folder}`")
    if version != FORMAT_VERSION and version not in STILL_READ:
        raise ModelFolderError(f"{path} has format_version {version!r}, this runtime reads format_version "
                               f"{FORMAT_VERSION}; re-export the model with this version of the exporter")
    for key in REQUIRED:
        if key not in manifest:
            raise ModelFolderError(f"{path} lacks the {key!r} entry; re-export the model")
    check_fields(manifest, path)
    for name in list_files(manifest):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ModelFolderError(f"{folder!r} is incomplete: {name} is missing; re-export the model")
    return manifest


def check_fields(manifest: dict, path: str) -> None:
    """Refuse a manifest whose fields the runtime reads have the wrong type or range (ModelFolderError naming
    `path` and the field, e.g. ``graphs``, ``text_config.max_context``, ``generation.temperature``)."""
    from vlm_core.kernels.sampling import SamplingParams
    from vlm_core.models.config import TextConfig

    def require(ok: bool, name: str, expected: str, value) -> None:
        if not ok:
            raise ModelFolderError(f"{path}: {name} must be {expected}, got {_short(value)}; re-export the model")

    for key in ("family", "tokenizer"):
        require(_is_name(manifest[key]), key, "a non-empty string", manifest[key])
    graphs = manifest["graphs"]
    require(isinstance(graphs, dict) and all(name in graphs for name in GRAPHS), "graphs",
            f"an object with the {' and '.join(GRAPHS)} graphs", graphs)
    for name, graph in graphs.items():
        require(isinstance(graph, dict) and _is_name(graph.get("file")), f"graphs.{name}",
                "an object whose 'file' is a file name", graph)
        extra = graph.get("external_data", [])
        require(isinstance(extra, list) and all(_is_name(item) for item in extra), f"graphs.{name}.external_data",
                "a list of file names", extra)
    table = manifest["embeddings"]
    require(isinstance(table, dict) and _is_name(table.get("file")), "embeddings",
            "an object whose 'file' is a file name", table)
    require(table.get("scale_file") is None or _is_name(table["scale_file"]), "embeddings.scale_file",
            "a file name or null", table.get("scale_file"))
    shape = table.get("shape")
    require(shape is None or (isinstance(shape, list) and len(shape) == 2 and all(_is_count(n) for n in shape)),
            "embeddings.shape", "[rows, width], two positive integers", shape)
    template = manifest.get("chat_template")
    require(template is None or _is_name(template), "chat_template", "a file name or null", template)
    for key in ("special_tokens", "vision_config", "preprocessing", "generation", "template_variables",
                "video_preprocessing", "quantization", "prompt"):
        if manifest.get(key) is not None or key in REQUIRED:
            require(isinstance(manifest.get(key), dict), key, "an object", manifest.get(key))
    eos = manifest["special_tokens"].get("eos_token_ids", [])
    require(isinstance(eos, list) and all(_is_count(t) or t == 0 for t in eos), "special_tokens.eos_token_ids",
            "a list of token ids (integers >= 0)", eos)
    try:
        TextConfig.from_dict(manifest["text_config"])
    except ValueError as e:  # names the section and the field
        raise ModelFolderError(f"{os.path.dirname(path)!r}: {e}") from None
    generation = {k: v for k, v in (manifest.get("generation") or {}).items() if k in SAMPLING_DEFAULTS}
    try:
        SamplingParams(**generation)
    except ValueError as e:  # SamplingParamError names the field
        raise ModelFolderError(f"{path}: generation.{e}; re-export the model") from None


def _is_name(value) -> bool:
    return isinstance(value, str) and value != ""


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _json_type(value) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def list_files(manifest: dict) -> list[str]:
    """Every file the manifest refers to (graphs with their external data, tokenizer, tables)."""
    files = []
    for graph in manifest["graphs"].values():
        files.append(graph["file"])
        files += graph.get("external_data", [])
    files.append(manifest["tokenizer"])
    files.append(manifest["embeddings"]["file"])
    if manifest["embeddings"].get("scale_file"):
        files.append(manifest["embeddings"]["scale_file"])
    if manifest.get("chat_template"):
        files.append(manifest["chat_template"])
    return files


def load_tokenizer(folder: str, manifest: dict):
    """The folder's tokenizers.Tokenizer (manifest["tokenizer"]); ModelFolderError naming the file when the
    tokenizers library cannot read it."""
    from tokenizers import (
        Tokenizer,  # serve-time dependency, imported here to keep `import runtime` light
    )

    path = os.path.join(folder, manifest["tokenizer"])
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for JSON it cannot read as a tokenizer
        raise ModelFolderError(f"{path} cannot be read as a tokenizer ({_first_line(e)}); re-export the "
                               f"model") from None


def load_chat_template(folder: str, manifest: dict) -> str | None:
    """The folder's chat template (manifest["chat_template"]), read as UTF-8 and compiled once so a template
    that is not valid Jinja is refused now (ModelFolderError naming the file); None when there is none."""
    from vlm_core.runtime.chat.template import compile_chat_template

    if not manifest.get("chat_template"):
        return None
    path = os.path.join(folder, manifest["chat_template"])
    try:
        with open(path, "rb") as f:
            template = f.read(MAX_TEMPLATE_BYTES + 1)
        if len(template) > MAX_TEMPLATE_BYTES:
            raise ModelFolderError(f"over {MAX_TEMPLATE_BYTES >> 20} MiB, which no chat template needs")
        template = template.decode("utf-8")
        compile_chat_template(template)
    except OSError as e:
        raise ModelFolderError(f"{path} cannot be read ({e.strerror}); re-export the model") from None
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                               f"re-export the model") from None
    except ModelFolderError as e:
        raise ModelFolderError(f"{path}: {e}; re-export the model") from None
    return template


def load_embeddings(folder: str, manifest: dict) -> tuple:
    """(the token embedding table [vocab, width], its per-row scales or None), memory-mapped from the folder's
    .npy files (manifest["embeddings"]); ModelFolderError naming the file when one is not a readable .npy
    (truncated, say) or its shape is not the manifest's."""
    import numpy as np

    table = manifest["embeddings"]

    def load(name: str):
        path = os.path.join(folder, name)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:  # a truncated file: "mmap length is greater than file size"
            raise ModelFolderError(f"{path} cannot be read as a .npy array ({_first_line(e)}; truncated or "
                                   f"corrupt?); re-export the model") from None

    embeddings = load(table["file"])
    path = os.path.join(folder, table["file"])
    if embeddings.ndim != 2 or (table.get("shape") is not None and list(embeddings.shape) != table["shape"]):
        expected = table["shape"] if table.get("shape") is not None else "[rows, width]"
        raise ModelFolderError(f"{path} holds an array of shape {list(embeddings.shape)}, not the "
                               f"{expected} the manifest says; re-export the model")
    scale = load(table["scale_file"]) if table.get("scale_file") else None
    if scale is not None and scale.shape[:1] != embeddings.shape[:1]:
        raise ModelFolderError(f"{os.path.join(folder, table['scale_file'])} holds {list(scale.shape)} scales for "
                               f"{embeddings.shape[0]} embedding rows; re-export the model")
    return embeddings, scale


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
