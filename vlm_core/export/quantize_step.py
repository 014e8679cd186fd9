"""The --quantize step: replace the verified float32 graphs and embedding table by quantized ones,
record how, and measure how close the quantized folder stays to eager PyTorch.

The weight formats themselves are export/quantize.py's; this file decides which graph gets which
(QUANTIZED_GRAPHS) and writes the manifest's "quantization" entry.
"""
from __future__ import annotations

import os

import numpy as np

from vlm_core.export import assets, parity, quantize
from vlm_core.export.manifest_build import write_manifest

# Which weight format each graph gets, per --quantize method. "mixed" keeps two decoders with the
# same inputs and outputs: int8 GEMMs (AMX/VNNI) for the prompt, 4-bit GEMVs for single tokens.
QUANTIZED_GRAPHS = {
    "int8": {"vision": [("vision", "int8")], "decoder": [("decoder", "int8")]},
    "int4": {"vision": [("vision", "int8")], "decoder": [("decoder", "int4")]},
    "mixed": {"vision": [("vision", "int8")], "decoder": [("decoder", "int4"), ("prefill", "int8")]},
}

# When the float32 graphs cannot be run here, the quantized ones are the check: their first-step logits
# and image features must point the same way as eager PyTorch's. Quantization error on 4-bit weights
# lowers cosine similarity (0.87 measured for the 2B decoder on random weights, whose flat logits are
# the worst case); a mis-wired graph gives ~0. The floors sit between the two.
PLAUSIBLE_LOGITS_COSINE = 0.5
PLAUSIBLE_FEATURES_COSINE = 0.9


def quantize_and_measure(staging: str, manifest: dict, reference: dict, method: str, int4_block_size: int,
                         int4_algorithm: str = quantize.INT4_ALGORITHM) -> dict:
    """Quantize the folder (manifest "quantization") and return its agreement with the eager reference,
    also recorded in the manifest (written after each)."""
    manifest["quantization"] = quantize_folder(staging, manifest, method, int4_block_size, int4_algorithm)
    write_manifest(staging, manifest)
    agreement = parity.quantized_agreement(staging, reference)
    manifest["quantization"]["agreement"] = agreement
    agreement["reference_dtype"] = reference.get("dtype", "float32")
    agreement["reference_kv_dtype"] = reference.get("kv_dtype", "float32")
    write_manifest(staging, manifest)
    return agreement


def plausible(agreement: dict) -> bool:
    """Whether quantized graphs agree with eager PyTorch within quantization error (not a wiring fault)."""
    return (agreement["first_logits_cosine"] >= PLAUSIBLE_LOGITS_COSINE
            and agreement["image_embeds_cosine"] >= PLAUSIBLE_FEATURES_COSINE)


def quantize_folder(staging: str, manifest: dict, method: str, int4_block_size: int = quantize.INT4_BLOCK_SIZE,
                    int4_algorithm: str = quantize.INT4_ALGORITHM) -> dict:
    """Replace the fp32 graphs and embeddings in `staging` by quantized ones; returns the manifest entry."""
    record = {"method": method}
    graphs = {}
    for source_name, source in manifest["graphs"].items():
        path = os.path.join(staging, source["file"])
        for name, weight_format in QUANTIZED_GRAPHS[method][source_name]:
            quantized = os.path.join(staging, f"{source_name}.{weight_format}.onnx")
            if weight_format == "int4":
                extra = quantize.quantize_int4(path, quantized, block_size=int4_block_size, algorithm=int4_algorithm)
                record[name] = {"format": "MatMulNBits", "bits": 4, "block_size": int4_block_size,
                                "algorithm": int4_algorithm, "accuracy_level": quantize.INT4_ACCURACY_LEVEL,
                                "symmetric": int4_algorithm == "rtn"}
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
    record["embeddings"] = _quantize_embeddings(staging, manifest)
    return record


def _quantize_embeddings(staging: str, manifest: dict) -> dict:
    """The embedding table as int8 rows + a float32 scale per row (manifest "embeddings" updated)."""
    table_path = os.path.join(staging, manifest["embeddings"]["file"])
    rows, scale = quantize.quantize_embeddings(np.load(table_path))
    os.remove(table_path)
    np.save(os.path.join(staging, "embed_tokens.int8.npy"), rows)
    np.save(os.path.join(staging, "embed_tokens.scale.npy"), scale)
    manifest["embeddings"] = {"file": "embed_tokens.int8.npy", "scale_file": "embed_tokens.scale.npy",
                              "dtype": "int8", "shape": list(rows.shape)}
    return {"format": "int8 rows, float32 scale per row"}
