"""logprobs: the log-softmax of the model's raw logits at each step (before processors, warpers and any
grammar), checked against transformers' eager scores along the tiny model's greedy path; top_logprobs
sorted and holding the chosen token when it ranks within N; the same figures from the API, the CLI and
the server (streamed and not)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vlm_core.kernels.sampling import SamplingParams

NEW_TOKENS = 12
TOP = 5
TOLERANCE = 1e-4


def _messages(photos) -> list:
    return [{"role": "user", "content": [{"type": "image", "path": photos["astronaut"]},
                                         {"type": "text", "text": "What is in this picture?"}]}]


def test_logprobs_equal_transformers_log_softmax_along_the_greedy_path(vlm, hf_model, hf_processor, photos):
    import torch

    messages = _messages(photos)
    inputs = hf_processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
    reference_tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    reference = torch.log_softmax(torch.stack(out.logits)[:, 0].double(), dim=-1).numpy()  # [steps, vocab]

    result = vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, logprobs=TOP)
    assert result.token_ids == reference_tokens
    assert len(result.logprobs) == NEW_TOKENS
    for step, (token, entry) in enumerate(zip(result.token_ids, result.logprobs)):
        assert entry.token_id == token
        assert abs(entry.logprob - reference[step, token]) < TOLERANCE, step
        top_ids = [t.token_id for t in entry.top_logprobs]
        top_values = np.array([t.logprob for t in entry.top_logprobs])
        assert len(top_ids) == TOP and np.all(np.diff(top_values) <= 0)  # most likely first
        assert top_ids[0] == token  # greedy: the chosen token ranks first
        np.testing.assert_allclose(top_values, reference[step, top_ids], atol=TOLERANCE)
        np.testing.assert_allclose(top_values, np.sort(reference[step])[::-1][:TOP], atol=TOLERANCE)
        text, data = vlm.token_table[token]
        assert (entry.token, entry.bytes) == (text, data)
    # the tokens' bytes join to the answer's text
    assert b"".join(entry.bytes for entry in result.logprobs).decode("utf-8", "replace") == result.text


def test_sampled_tokens_report_the_raw_distribution(vlm, photos):
    """With temperature, top-k and a repetition penalty, the chosen token may rank below N; the figures are the
    raw log-softmax all the same, and the same as greedy decoding reports at the same first step."""
    messages = _messages(photos)
    sampling = SamplingParams(temperature=1.5, top_k=50, repetition_penalty=1.3, seed=11)
    sampled = vlm.generate(messages, sampling, max_new_tokens=16, min_new_tokens=16, logprobs=3)
    greedy = vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=1, logprobs=3)
    first, reference = sampled.logprobs[0], greedy.logprobs[0]
    assert [(t.token_id, t.logprob) for t in first.top_logprobs] == \
        [(t.token_id, t.logprob) for t in reference.top_logprobs]
    outside = 0
    for entry in sampled.logprobs:
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        if entry.logprob >= values[-1]:  # ranks within N: listed
            assert entry.token_id in [t.token_id for t in entry.top_logprobs]
        else:
            outside += 1
    assert outside > 0  # the sampler did pick tokens outside the top 3 (so the check above is not vacuous)


def test_logprobs_are_taken_before_the_grammar_mask(vlm):
    pytest.importorskip("llguidance", reason="constrained decoding needs the 'structured' extra")
    messages = [{"role": "user", "content": "Hello"}]
    free = vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=1, logprobs=4)
    constrained = vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=4, logprobs=4,
                               response_format={"type": "json_object"})
    assert constrained.text.startswith("{")
    first = constrained.logprobs[0]
    assert [t.token_id for t in first.top_logprobs] == [t.token_id for t in free.logprobs[0].top_logprobs]
    assert first.token_id not in [t.token_id for t in first.top_logprobs]  # the grammar chose an unlikely one
    assert first.logprob < first.top_logprobs[-1].logprob


def test_no_logprobs_unless_asked_and_bad_values_refused(vlm):
    from vlm_core.errors import ParameterError

    messages = [{"role": "user", "content": "Hello"}]
    result = vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=3)
    assert result.logprobs is None and "logprobs" not in result.to_dict()
    zero = vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=3, logprobs=0)
    assert [e.top_logprobs for e in zero.logprobs] == [[]] * len(zero.token_ids)
    assert json.loads(json.dumps(zero.to_dict()))["logprobs"][0]["top_logprobs"] == []
    for bad in (21, -1, True, 2.0):
        with pytest.raises(ParameterError, match="logprobs must be an integer from 0 to 20") as error:
            vlm.generate(messages, max_new_tokens=3, logprobs=bad)
        assert error.value.param == "logprobs"


def test_cli_logprobs_in_json(qwen_export, vlm, capsys):
    from vlm_core.runtime.generate import main

    rc = main(["-m", qwen_export, "-p", "Hello", "--greedy", "--max-new-tokens", "4", "--min-new-tokens", "4",
               "--threads", "2", "--json", "--logprobs", "2"])
    answer = json.loads(capsys.readouterr().out)
    assert rc == 0
    api = vlm.generate([{"role": "user", "content": "Hello"}], SamplingParams(greedy=True), max_new_tokens=4,
                       min_new_tokens=4, logprobs=2)
    assert answer["token_ids"] == api.token_ids
    # the API's model has answered "Hello" before: its prompt KV comes from the prefix cache (same up to rounding)
    _assert_same_entries(answer["logprobs"], [entry.to_dict() for entry in api.logprobs])


def _assert_same_entries(entries: list, expected: list) -> None:
    """OpenAI-shaped logprobs entries: the same tokens (text and bytes), log-probabilities within TOLERANCE."""
    def tokens(entry):
        return entry["token"], entry["bytes"], [(t["token"], t["bytes"]) for t in entry["top_logprobs"]]

    def values(entry):
        return [entry["logprob"]] + [t["logprob"] for t in entry["top_logprobs"]]

    assert [tokens(e) for e in entries] == [tokens(e) for e in expected]
    for entry, reference in zip(entries, expected):
        np.testing.assert_allclose(values(entry), values(reference), atol=TOLERANCE)


def test_server_logprobs_streamed_and_not(qwen_export, vlm):
    openai = pytest.importorskip("openai", reason="the official openai client is a test dependency")
    from test_serve import Server

    srv = Server(qwen_export, "--cache-mb", "0")  # no prefix cache: both requests compute the same prompt alike
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        options = dict(model="qwen3-vl-tiny-onnx", messages=[{"role": "user", "content": "Hello"}], temperature=0,
                       max_tokens=10, logprobs=True, top_logprobs=TOP)
        answer = client.chat.completions.create(**options)
        content = answer.choices[0].logprobs.content
        api = vlm.generate(options["messages"], SamplingParams(greedy=True), max_new_tokens=10, logprobs=TOP)
        expected = [e.to_dict() for e in api.logprobs if e.token_id not in vlm.eos_token_ids]
        _assert_same_entries([c.model_dump() for c in content], expected)
        assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == answer.choices[0].message.content

        chunks = [c for c in client.chat.completions.create(stream=True, **options) if c.choices]
        streamed = [entry.model_dump() for c in chunks if c.choices[0].logprobs
                    for entry in c.choices[0].logprobs.content or []]
        assert streamed == [c.model_dump() for c in content]  # the same, exactly, streamed or not
        assert all(len(entry["top_logprobs"]) == TOP for entry in streamed)
        plain = client.chat.completions.create(**{**options, "logprobs": None, "top_logprobs": None})
        assert plain.choices[0].logprobs is None
    finally:
        srv.stop()
