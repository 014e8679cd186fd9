"""Streamed export (export/streamed.py): decoder weights copied from the checkpoint one tensor at a time,
for checkpoints whose float32 weights do not fit in memory. Checked on tiny models against eager PyTorch
(exact parity, as the normal path), against the normal path's int4 graph, and on the low-memory plan
(forced here by shrinking the memory share) with its bfloat16 reference."""
from __future__ import annotations

import os
import shutil

import minigpt4_helpers as helpers
import numpy as np
import pytest

from vlm_core.export import memory_plan, output
from vlm_core.export.pipeline import ExportError, Progress, run_export

PARITY_TOKENS = 24


def _export(checkpoint, out, **kwargs):
    return run_export(checkpoint, out, progress=Progress(total=6, heartbeat_s=600), **kwargs)


@pytest.fixture(scope="module")
def mg_ckpt(tmp_path_factory) -> str:
    tok = str(tmp_path_factory.mktemp("smol"))
    helpers.smol_tokenizer_json(tok)
    return helpers.write_blip2_checkpoint(str(tmp_path_factory.mktemp("mg") / "ckpt"), tok)


@pytest.fixture
def equal_placeholders(monkeypatch):
    """Placeholders with equal contents (what fresh memory gives): the exporter must not merge them."""
    import torch

    from vlm_core.export import streamed

    monkeypatch.setattr(streamed, "_placeholder", lambda shape: torch.zeros(shape, dtype=torch.float32))


def test_streamed_minigpt4_fp32_matches_eager(mg_ckpt, tmp_path, equal_placeholders):
    out = str(tmp_path / "streamed")
    manifest = _export(mg_ckpt, out, stream=True, parity_tokens=PARITY_TOKENS)
    parity = manifest["parity"]
    # the export raised unless its check passed; what it leaves open: the check ran on the tokens asked for,
    # with a float32 cache and on the vision output too, within this test's own 1e-4
    assert parity["greedy_tokens"] == PARITY_TOKENS and parity["kv_dtype"] == "float32"
    assert parity["first_logits_rel_err"] <= 1e-4 and parity["image_embeds_rel_err"] <= 1e-4
    assert os.path.getsize(os.path.join(out, "decoder.onnx.data")) > 0


def _first_logits(folder):
    from vlm_core.runtime.model import VisionLanguageModel

    model = VisionLanguageModel(folder, threads=2)
    image = helpers.rng_images(0)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is this?"}]}]
    return model.prefill(model.prepare(messages))


def test_streamed_int4_equals_normal_int4(mg_ckpt, tmp_path):
    """Same weights, same [in, out] layout, same ORT quantizer: the two int4 decoders give the same logits."""
    streamed, normal = str(tmp_path / "s"), str(tmp_path / "n")
    _export(mg_ckpt, streamed, stream=True, quantize="int4", parity_tokens=2)
    _export(mg_ckpt, normal, stream=False, quantize="int4", parity_tokens=2)
    a, b = _first_logits(streamed), _first_logits(normal)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))


def test_streamed_qwen3_vl_fp32_matches_eager(tmp_path, equal_placeholders):
    """Qwen3-VL's decoder fuses q/k/v and gate/up: the fused weights are concatenated from their sources."""
    from vlm_core.export.demo import write_checkpoint

    checkpoint = write_checkpoint(str(tmp_path / "qwen"))
    manifest = _export(checkpoint, str(tmp_path / "out"), stream=True, parity_tokens=PARITY_TOKENS)
    parity = manifest["parity"]
    assert parity["greedy_tokens"] == PARITY_TOKENS and parity["kv_dtype"] == "float32"
    assert parity["first_logits_rel_err"] <= 1e-4 and parity["image_embeds_rel_err"] <= 1e-4


def test_low_memory_plan_refuses_unverifiable_float32(mg_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_plan, "MEMORY_SHARE", 1e-9)
    out = tmp_path / "out"
    for method in ("none", "int8", "mixed"):
        with pytest.raises(ExportError, match="--quantize int4"):
            _export(mg_ckpt, str(out), quantize=method)
        assert not out.exists()


def test_low_memory_plan_int4_checks_against_bfloat16(mg_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_plan, "MEMORY_SHARE", 1e-9)
    manifest = _export(mg_ckpt, str(tmp_path / "out"), quantize="int4", parity_tokens=4)
    agreement = manifest["quantization"]["agreement"]
    assert agreement["reference_dtype"] == "bfloat16"
    assert "not run" in manifest["parity"]["fp32_graphs"]
    # the export enforced its plausibility floors (quantize_step.plausible) on this plan (measured ~0.98 /
    # ~0.9999); what it leaves open: the agreement was measured on the 4 greedy tokens asked for, against a
    # reference whose cache is rounded to float16 as the int4 graphs' is
    assert agreement["greedy_tokens_equal_prefix"].endswith("/4") and agreement["reference_kv_dtype"] == "float16"


def _rewrite_tensor(checkpoint, tmp_path, key, change):
    from safetensors.torch import load_file, save_file

    copy = str(tmp_path / "broken")
    shutil.copytree(checkpoint, copy)
    for name in os.listdir(copy):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(copy, name))
            if key in tensors:
                change(tensors)
                save_file(tensors, os.path.join(copy, name), metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("fault", ["missing", "misshaped"])
def test_streamed_export_names_a_bad_tensor(mg_ckpt, tmp_path, fault):
    key = "language_model.model.layers.1.mlp.down_proj.weight"

    def change(tensors):
        if fault == "missing":
            del tensors[key]
        else:
            tensors[key] = tensors[key][:, :-1].contiguous()

    broken = _rewrite_tensor(mg_ckpt, tmp_path, key, change)
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        _export(broken, str(out), stream=True)
    assert key in str(info.value)
    assert not out.exists()


def test_published_files_follow_the_umask(tmp_path):
    """ONNX's external-data writer creates owner-only files; the published folder must not keep that."""
    import stat

    staging = tmp_path / ".out.partial-1"
    staging.mkdir()
    data = staging / "decoder.int4.onnx.data"
    data.write_bytes(b"\0" * 16)
    data.chmod(0o600)
    umask = os.umask(0o022)
    try:
        output.publish(str(staging), str(tmp_path / "out"))
    finally:
        os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "out" / "decoder.int4.onnx.data").stat().st_mode)
    assert mode == 0o644


def test_int4_block_size_flag(mg_ckpt, tmp_path):
    """--int4-block-size and --int4-algorithm reach the quantizer and the manifest; the folder loads and
    generates."""
    import json

    from matmul_nbits_check import check_matmul_nbits

    from vlm_core.export.cli import main
    from vlm_core.runtime.model import VisionLanguageModel

    out = tmp_path / "b64"
    assert main([mg_ckpt, "-o", str(out), "--quantize", "int4", "--int4-block-size", "64",
                 "--int4-algorithm", "hqq", "--parity-tokens", "2"]) == 0
    with open(out / "manifest.json") as f:
        record = json.load(f)["quantization"]["decoder"]
    assert record["block_size"] == 64 and record["ops"]["MatMulNBits"] > 0
    assert record["algorithm"] == "hqq" and record["symmetric"] is False
    check_matmul_nbits(str(out / "decoder.int4.onnx"), block_size=64, zero_points=True)
    model = VisionLanguageModel(str(out), threads=2)
    result = model.generate([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], max_new_tokens=3,
                            min_new_tokens=3)
    assert len(result.token_ids) == 3


def test_reader_resolves_names_with_or_without_the_base_prefix(tmp_path):
    """Checkpoints saved from the base model lack its prefix (transformers loads them either way)."""
    import torch
    from safetensors.torch import save_file

    from vlm_core.export.streamed import CheckpointReader

    save_file({"layers.0.w": torch.ones(2, 3), "model.norm.w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(str(tmp_path))
    reader.base_prefix = "model"
    assert reader.resolve("model.layers.0.w") == "layers.0.w"
    assert reader.resolve("norm.w") == "model.norm.w"
    assert reader.resolve("model.norm.w") == "model.norm.w"
    assert reader.resolve("model.layers.1.w") is None and "model.layers.1.w" not in reader
    assert reader.shape("model.layers.0.w") == [2, 3]
    assert reader.float32("model.layers.0.w", transpose=True).shape == (3, 2)
