"""Qwen3-VL-specific parity checks (the checks every family shares, greedy tokens and logits against
transformers' `generate` fed by its own processor, are in tests/test_families.py)."""
from __future__ import annotations

LOGITS_RTOL = 1e-4
FEATURES_RTOL = 1e-4  # the export's own tolerances (export/parity.py), restated: loosening those fails here


def test_two_images_differ_in_size_and_aspect(photos, vlm):
    messages = [{"role": "user", "content": [{"type": "image", "path": photos["coffee"]},
                                             {"type": "image", "path": photos["noise"]},
                                             {"type": "text", "text": "Compare the two images."}]}]
    prompt = vlm.prepare(messages)
    (t1, h1, w1), (t2, h2, w2) = prompt.media_grid.tolist()
    assert (h1 > w1) != (h2 > w2), "one image must be wide and the other tall"
    assert h1 * w1 != h2 * w2


def test_export_records_parity_in_manifest(qwen_export):
    import json
    import os

    with open(os.path.join(qwen_export, "manifest.json")) as f:
        manifest = json.load(f)
    parity = manifest["parity"]
    # on the 4 greedy tokens the fixture asked for (parity_tokens=4), with a float32 cache, and on both of the
    # vision graph's outputs (the tiny config has deepstack layers): what a successful export leaves open
    assert parity["greedy_tokens"] == 4 and parity["kv_dtype"] == "float32"
    assert {k for k in parity if k.endswith("_rel_err")} == {"image_embeds_rel_err", "deepstack_embeds_rel_err",
                                                            "first_logits_rel_err"}
    assert parity["first_logits_rel_err"] < LOGITS_RTOL
    assert parity["image_embeds_rel_err"] <= FEATURES_RTOL and parity["deepstack_embeds_rel_err"] <= FEATURES_RTOL
    assert manifest["format_version"] == 3 and manifest["family"] == "qwen3_vl"
    assert {"vision", "decoder"} <= set(manifest["graphs"])
