"""End-to-end parity: the exported tiny Qwen3-VL, run by our runtime, against transformers' eager
`generate` fed by transformers' own processor (greedy tokens equal, first-step logits close)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export.parity import relative_error
from kernels.sampling import SamplingParams

NEW_TOKENS = 24
LOGITS_RTOL = 1e-4


def _messages(kind: str, photos: dict) -> list:
    if kind == "one_image":
        return [{"role": "user", "content": [{"type": "image", "path": photos["astronaut"]},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    if kind == "two_images":
        return [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "image", "path": photos["coffee"]},
                                             {"type": "image", "path": photos["noise"]},
                                             {"type": "text", "text": "Compare the two images."}]}]
    return [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about the sea."}]}]


@pytest.mark.parametrize("kind", ["one_image", "two_images", "text_only"])
def test_greedy_tokens_and_logits_match_transformers(kind, photos, vlm, hf_model, hf_processor):
    messages = _messages(kind, photos)
    inputs = hf_processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              return_dict=True, return_tensors="pt")
    prompt = vlm.prepare(messages)
    np.testing.assert_array_equal(prompt.input_ids, inputs["input_ids"][0].numpy())
    if kind != "text_only":
        np.testing.assert_array_equal(prompt.image_grid_thw, inputs["image_grid_thw"].numpy())
        np.testing.assert_array_equal(prompt.pixel_values, inputs["pixel_values"].numpy())
        assert len(prompt.image_grid_thw) == (2 if kind == "two_images" else 1)

    with torch.no_grad():
        reference_logits = hf_model(**inputs).logits[0, -1].numpy()
        generated = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      do_sample=False)
    reference_tokens = generated[0, inputs["input_ids"].shape[1]:].tolist()

    logits = vlm.prefill(prompt)
    assert relative_error(logits, reference_logits) < LOGITS_RTOL
    result = vlm.generate(prompt, SamplingParams(greedy=True), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS)
    assert result.token_ids == reference_tokens
    assert len(result.token_ids) == NEW_TOKENS
    expected_text = hf_processor.tokenizer.decode(reference_tokens, skip_special_tokens=True)
    assert result.text == expected_text


def test_two_images_differ_in_size_and_aspect(photos, vlm):
    prompt = vlm.prepare(_messages("two_images", photos))
    (t1, h1, w1), (t2, h2, w2) = prompt.image_grid_thw.tolist()
    assert (h1 > w1) != (h2 > w2), "one image must be wide and the other tall"
    assert h1 * w1 != h2 * w2


def test_export_records_parity_in_manifest(qwen_export):
    import json
    import os

    with open(os.path.join(qwen_export, "manifest.json")) as f:
        manifest = json.load(f)
    parity = manifest["parity"]
    assert parity["passed"] is True and parity["greedy_tokens_equal"] is True
    assert parity["first_logits_rel_err"] < LOGITS_RTOL
    assert manifest["format_version"] == 1 and manifest["family"] == "qwen3_vl"
    assert {"vision", "decoder"} <= set(manifest["graphs"])
