"""The KV cache's dtype, chosen at export (`--kv-dtype`, export/kv_dtype.py): float16 graphs' I/O and
manifest, the defaults per --quantize, greedy agreement with the float32 cache on both families, and the
contract that makes float16 results independent of how a prompt is split into chunks."""
from __future__ import annotations

import json
import os

import minigpt4_helpers as helpers
import numpy as np
import pytest

from bench.accuracy import teacher_forced
from vlm_core.runtime.model import VisionLanguageModel

STEPS = 24
NEAR_TIE = 1e-3  # top-2 logit gap under which float16 rounding may pick the other token
# export/parity.py's tolerance for a float16 cache, restated here (imported, the check below could never fail)
FLOAT16_KV_LOGITS_RTOL = 1e-3


def _manifest(folder: str) -> dict:
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def _kv_types(manifest: dict) -> set:
    """Element types of every graph's past_key_values.* inputs and present.* outputs."""
    types = set()
    for graph in manifest["graphs"].values():
        types |= {v["type"] for v in graph["inputs"] + graph["outputs"]
                  if v["name"].startswith(("past_key_values.", "present."))}
    return types


def _qwen_messages(photos):
    return [{"role": "user", "content": [{"type": "image", "path": photos["astronaut"]},
                                         {"type": "text", "text": "Describe the picture."}]}]


def _mg_messages():
    return [{"role": "user", "content": [{"type": "image", "image": helpers.rng_images(0)[0]},
                                         {"type": "text", "text": "What is this?"}]}]


def _greedy(vlm, messages, steps: int = STEPS):
    """Greedy continuation through the runtime's prefill and decoder steps: (tokens, logits per step)."""
    prompt = vlm.prepare(messages)
    tokens, rows = [], []
    for logits in teacher_forced(vlm, prompt, vlm.encode_images(prompt), steps, lambda i, _: tokens[i]):
        rows.append(np.asarray(logits, np.float64))
        tokens.append(int(np.argmax(logits)))
    return tokens, rows


def assert_greedy_agrees(reference_vlm, vlm, messages):
    """Greedy tokens equal the float32 cache's, or first differ where the float32 logits' top-2 gap < NEAR_TIE."""
    expected, expected_logits = _greedy(reference_vlm, messages)
    tokens, logits = _greedy(vlm, messages)
    first = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), None)
    agree = len(expected) if first is None else first
    drift = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(logits[:agree + 1], expected_logits))
    print(f"greedy tokens equal for {agree}/{len(expected)} steps; logits rel. err. up to there {drift:.2e}")
    if first is not None:
        top2 = np.sort(expected_logits[first])[-2:]
        assert top2[1] - top2[0] < NEAR_TIE, (
            f"step {first}: float16 cache chose {tokens[first]}, float32 {expected[first]}, top-2 gap "
            f"{top2[1] - top2[0]:.2e} is no near-tie")


def test_qwen_float16_cache_greedy_matches_float32(vlm, qwen_export_kv16, photos):
    assert_greedy_agrees(vlm, VisionLanguageModel(qwen_export_kv16, threads=2), _qwen_messages(photos))


def test_minigpt4_float16_cache_greedy_matches_float32(mg_vlm, mg_export_kv16):
    manifest = _manifest(mg_export_kv16)
    assert manifest["text_config"]["kv_dtype"] == "float16" and _kv_types(manifest) == {"float16"}
    assert manifest["parity"]["kv_dtype"] == "float16" and manifest["parity"]["greedy_tokens"] == 4
    assert_greedy_agrees(mg_vlm, VisionLanguageModel(mg_export_kv16, threads=2), _mg_messages())


def test_float16_manifest_graph_io_and_runtime_cache(qwen_export_kv16):
    manifest = _manifest(qwen_export_kv16)
    assert manifest["text_config"]["kv_dtype"] == "float16"
    assert manifest["quantization"]["method"] == "none"
    assert _kv_types(manifest) == {"float16"}
    # parity against eager PyTorch that rounds the cache, q and the attention output the same way; what is
    # left are float32 values a few 1e-7 apart rounding one float16 step apart (measured 1.1e-4 here)
    assert manifest["parity"]["kv_dtype"] == "float16" and manifest["parity"]["greedy_tokens"] == 4
    assert manifest["parity"]["first_logits_rel_err"] <= FLOAT16_KV_LOGITS_RTOL
    import onnx

    graph = onnx.load(os.path.join(qwen_export_kv16, "decoder.onnx"), load_external_data=False).graph
    past = [v for v in graph.input if v.name.startswith("past_key_values.")]
    assert past and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in past)
    cache = VisionLanguageModel(qwen_export_kv16, threads=1).new_cache(8)
    assert cache.keys[0].dtype == np.float16


def test_defaults_float32_unquantized_float16_quantized(qwen_export, qwen_export_int4):
    unquantized, quantized = _manifest(qwen_export), _manifest(qwen_export_int4)
    assert unquantized["text_config"]["kv_dtype"] == "float32" and _kv_types(unquantized) == {"float"}
    assert quantized["text_config"]["kv_dtype"] == "float16" and _kv_types(quantized) == {"float16"}
    assert quantized["quantization"]["agreement"]["reference_kv_dtype"] == "float16"


def test_old_manifest_without_kv_dtype_loads_as_float32(qwen_export, tmp_path):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(qwen_export, folder)
    manifest = _manifest(str(folder))
    del manifest["text_config"]["kv_dtype"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert VisionLanguageModel(str(folder), threads=1).new_cache(8).keys[0].dtype == np.float32


@pytest.mark.parametrize("split", [1, 5])
def test_float16_results_do_not_depend_on_chunking(qwen_export_kv16, photos, split):
    """The prompt in one prefill, or its last `split` tokens as single decode steps on the cached head: the
    same logits and the same cache, because each new key/value is rounded before attention uses it."""
    model = VisionLanguageModel(qwen_export_kv16, threads=2)
    full = model.prepare(_qwen_messages(photos))
    vision = model.encode_images(full)
    whole_cache = model.new_cache(len(full.input_ids))
    whole = model.prefill(full, whole_cache, vision)

    head = model.family.prepare(full.input_ids[:-split], full.pixel_values, full.media_grid)
    cache = model.new_cache(len(full.input_ids))
    logits = model.prefill(head, cache, vision)
    for token in full.input_ids[-split:]:
        logits = model.run_decoder(model.family.decode_feeds(head, model.embed([token])[0], cache.offset), cache)
    err = float(np.abs(logits - whole).max() / np.abs(whole).max())
    cached = max(float(np.abs(a[:, :, :cache.offset].astype(np.float32) - b[:, :, :cache.offset]).max())
                 for a, b in zip(cache.keys + cache.values, whole_cache.keys + whole_cache.values))
    print(f"split {split}: logits rel. err. {err:.2e}, cache max abs diff {cached:.2e}")
    assert err < 1e-5  # float32 summation order only; keys/values used unrounded in the prompt would give ~1e-4
    assert cached <= 1e-3  # at most a rare one-unit float16 rounding flip
