"""End-to-end parity for the SmolVLM family: the exported tiny SmolVLM, run by our runtime, against
transformers' eager `generate` fed by transformers' own SmolVLMProcessor (PIL backend): prompt ids and
pixel values equal, first-step logits within 1e-4, 24 greedy tokens equal."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from export.parity import relative_error
from kernels.sampling import SamplingParams

NEW_TOKENS = 24
LOGITS_RTOL = 1e-4


@pytest.fixture(scope="module")
def unsplit_export(smolvlm_export, tmp_path_factory) -> str:
    """The same graphs with image splitting off in the manifest (every image one tile, rows = cols = 0),
    as a checkpoint whose preprocessor_config.json says do_image_splitting: false exports it."""
    folder = tmp_path_factory.mktemp("smolvlm-unsplit")
    for name in os.listdir(smolvlm_export):
        if name != "manifest.json":
            os.symlink(os.path.join(smolvlm_export, name), folder / name)
    with open(os.path.join(smolvlm_export, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["preprocessing"]["do_image_splitting"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def _messages(kind: str, photos: dict) -> list:
    if kind in ("one_image", "unsplit"):
        return [{"role": "user", "content": [{"type": "image", "path": photos["astronaut"]},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    if kind == "two_images":
        return [{"role": "user", "content": [{"type": "image", "path": photos["coffee"]},
                                             {"type": "text", "text": "and"},
                                             {"type": "image", "path": photos["noise"]},
                                             {"type": "text", "text": "Compare the two images."}]}]
    return [{"role": "user", "content": [{"type": "text", "text": "Write a haiku about the sea."}]}]


# Tiled images, two images and text only run in the shared runner (tests/test_families.py); here what only
# SmolVLM has: a checkpoint that does not split images (rows = cols = 0, the single-image prompt string).
@pytest.mark.parametrize("kind", ["one_image", "unsplit"])
def test_greedy_tokens_and_logits_match_transformers(kind, photos, smolvlm_export, unsplit_export, smolvlm_hf):
    from runtime.engine import VisionLanguageModel

    model, processor = smolvlm_hf
    messages = _messages(kind, photos)
    images = {} if kind != "unsplit" else {"images_kwargs": {"do_image_splitting": False}}
    inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt", **images)
    vlm = VisionLanguageModel(unsplit_export if kind == "unsplit" else smolvlm_export, threads=2)
    prompt = vlm.prepare(messages)
    np.testing.assert_array_equal(prompt.input_ids, inputs["input_ids"][0].numpy())
    if kind != "text_only":
        np.testing.assert_array_equal(prompt.pixel_values, inputs["pixel_values"][0].numpy())
        # astronaut 97x131 -> 94x128 -> 128x128: 2 x 2 tiles + global; coffee 150x61 -> 128x64: 1 x 2 + global
        rows_cols = {"one_image": [[2, 2]], "unsplit": [[0, 0]], "two_images": [[1, 2], [2, 2]]}[kind]
        np.testing.assert_array_equal(prompt.media_grid, rows_cols)

    with torch.no_grad():
        reference_logits = model(**inputs).logits[0, -1].numpy()
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    reference_tokens = generated[0, inputs["input_ids"].shape[1]:].tolist()

    logits = vlm.prefill(prompt)
    assert relative_error(logits, reference_logits) < LOGITS_RTOL
    result = vlm.generate(prompt, SamplingParams(greedy=True), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert result.token_ids == reference_tokens
