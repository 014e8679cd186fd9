"""One test runner for every family (tests/family_cases.py lists them): each family's tiny export, run by our
runtime, against transformers' eager model fed by the family's reference inputs, on the same checks: a prompt
with two images of different sizes, a text-only prompt (prompt ids equal, first-step logits within 1e-4,
24 greedy tokens equal), and prefill followed by one cached decode step (its logits equal transformers' on the
prompt plus that token)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from family_cases import CASES

from vlm_core.export.parity import relative_error
from vlm_core.kernels.sampling import SamplingParams

NEW_TOKENS = 24
LOGITS_RTOL = 1e-4
CASE_IDS = [case.name for case in CASES]


@pytest.fixture(scope="session")
def qwen_reference(hf_model, hf_processor):
    return hf_model, hf_processor


@pytest.fixture(scope="session")
def mg_reference(mg_checkpoint, smol_folder):
    import minigpt4_helpers
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(mg_checkpoint, attn_implementation="eager").eval()
    return model, minigpt4_helpers.hf_tokenizer(smol_folder)


def _messages(paths, question):
    return [{"role": "user", "content": [*({"type": "image", "path": p} for p in paths),
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def runs(request):
    """Per family: (our model, transformers' reference fixture value), loaded once per module."""
    from vlm_core.runtime.model import VisionLanguageModel

    loaded = {}

    def get(case):
        if case.name not in loaded:
            loaded[case.name] = (VisionLanguageModel(request.getfixturevalue(case.export), threads=2),
                                 request.getfixturevalue(case.reference))
        return loaded[case.name]
    return get


def _check_against_transformers(case, vlm, reference, paths, question):
    messages = _messages(paths, question)
    model, inputs = case.hf_inputs(reference, messages, paths)
    prompt = vlm.prepare(messages)
    np.testing.assert_array_equal(prompt.input_ids, inputs["input_ids"][0].numpy())
    if paths:  # the family's pixels, in its own layout (transformers may add a batch axis)
        expected = inputs["pixel_values"].numpy()
        np.testing.assert_allclose(prompt.pixel_values, expected.reshape(prompt.pixel_values.shape), rtol=0, atol=1e-6)
    with torch.no_grad():
        reference_logits = model(**inputs).logits[0, -1].numpy()
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    reference_tokens = generated[0].tolist()[-NEW_TOKENS:]
    assert relative_error(vlm.prefill(prompt), reference_logits) < LOGITS_RTOL
    tokens = list(vlm.generate_step(prompt, SamplingParams(greedy=True), NEW_TOKENS, NEW_TOKENS))
    assert tokens == reference_tokens and len(tokens) == NEW_TOKENS
    return prompt


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_two_images_match_transformers(case, runs, photos):
    vlm, reference = runs(case)
    prompt = _check_against_transformers(case, vlm, reference, [photos["coffee"], photos["noise"]],
                                         "Compare the two images.")
    assert len(prompt.media_grid) == 2 and prompt.image_tokens > 0


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_text_only_matches_transformers(case, runs):
    vlm, reference = runs(case)
    prompt = _check_against_transformers(case, vlm, reference, [], "Write a haiku about the sea.")
    assert prompt.pixel_values is None and prompt.image_tokens == 0


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prefill_then_one_cached_step(case, runs, photos):
    """Prefill the prompt into the KV cache, decode one token through it: the step's logits equal transformers'
    last-position logits on the prompt with that token appended (positions, cache and masks all exercised)."""
    vlm, reference = runs(case)
    messages = _messages([photos["astronaut"]], "What is in this picture?")
    model, inputs = case.hf_inputs(reference, messages, [photos["astronaut"]])
    prompt = vlm.prepare(messages)
    cache = vlm.new_cache(len(prompt.input_ids) + 1)
    token = int(np.argmax(vlm.prefill(prompt, cache, vlm.encode_images(prompt))))
    step = vlm.run_decoder(vlm.family.decode_feeds(prompt, vlm.embed([token])[0], cache.offset), cache)
    longer = {}
    for name, value in inputs.items():  # every per-token input (ids, mask, token types) grows by one column
        if torch.is_tensor(value) and value.shape == inputs["input_ids"].shape:
            extra = token if name == "input_ids" else (1 if name == "attention_mask" else 0)
            value = torch.cat([value, torch.full((1, 1), extra, dtype=value.dtype)], dim=1)
        longer[name] = value
    with torch.no_grad():
        expected = model(**longer).logits[0, -1].numpy()
    assert relative_error(step, expected) < LOGITS_RTOL


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_step_feeds_of_several_rows(case, runs, photos):
    """The decode step builds every row's inputs in one call (decode_rows_feeds): equal to each row's own
    decode_feeds joined along the batch axis, for rows after prompts with and without an image."""
    from vlm_core.models.contract import FamilyBase

    vlm, _ = runs(case)
    prompts = [vlm.prepare(_messages([photos["astronaut"]], "What is it?")),
               vlm.prepare(_messages([], "Hello there.")), vlm.prepare(_messages([photos["coffee"]], "And this?"))]
    embeds = vlm.embed([11, 12, 13])
    positions = [len(p.input_ids) + extra for p, extra in zip(prompts, (0, 5, 2))]
    batched = vlm.family.decode_rows_feeds(prompts, embeds, positions)
    joined = FamilyBase.decode_rows_feeds(vlm.family, prompts, embeds, positions)
    assert set(batched) == set(joined)
    for name in joined:
        np.testing.assert_array_equal(batched[name], joined[name], err_msg=name)
        assert batched[name].dtype == joined[name].dtype and batched[name].shape == joined[name].shape
