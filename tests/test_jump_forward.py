"""Jump-forward over forced tokens (runtime/engine/jump_forward.py) on the tiny random-weight model.

The schemas' keys, quotes, separators and enum tails go through the decoder as chunks; the answers must be the
step-by-step ones token for token (greedy and seeded), alone and in a batch with free and other constrained
requests, with the same logprobs, while taking fewer engine steps. The switches (API, server field, CLI flag)
turn it off and are checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llguidance", reason="constrained decoding needs the 'structured' extra (llguidance)")

from batching_helpers import alone, run_schedule, schedule, tokens_of  # noqa: E402
from structured_cases import PROMPTS, SCHEMAS  # noqa: E402

from vlm_core.kernels.sampling import SamplingParams  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = SamplingParams(greedy=True)
MAX_TOKENS = 96
# the near-tie bound of the batching tests: a first difference is allowed only where the two best logits the
# sampler saw were closer than this (float rounding of one chunk vs one-token calls can flip such a choice)
NEAR_TIE = 1e-3


def _format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def _request(name: str, prompt: str, sampling, jump: bool, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "sampling": sampling, "max_new_tokens": MAX_TOKENS,
            "response_format": _format(name), "jump_forward": jump, **extra}


def _cases():
    return [(name, PROMPTS[(i + k) % len(PROMPTS)]) for i, name in enumerate(SCHEMAS) for k in range(2)]


def _assert_same_or_near_tie(jumped: list, stepped: list, stepped_logits: list, where) -> None:
    """Equal token lists, or a first difference where the step-by-step run's two best logits nearly tie."""
    if jumped == stepped:
        return
    first = next((i for i, (a, b) in enumerate(zip(jumped, stepped)) if a != b), min(len(jumped), len(stepped)))
    top = np.sort(stepped_logits[first][np.isfinite(stepped_logits[first])])[-2:]
    assert len(top) == 2 and top[1] - top[0] < NEAR_TIE, (where, first, jumped, stepped)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.8, seed=11)], ids=["greedy", "seeded"])
def test_tokens_are_the_step_by_step_ones_in_fewer_steps(vlm, sampling):
    forced = steps_jumped = steps_stepped = 0
    for name, prompt in _cases():
        jumped, engine_jumped, _ = run_schedule(vlm, [_request(name, prompt, sampling, True)], [0])
        stepped_request = _request(name, prompt, sampling, False, keep_logits=True)
        (sequence,), engine_stepped, _ = schedule(vlm, [stepped_request], [0])
        _assert_same_or_near_tie(jumped[0], tokens_of(sequence), sequence.seen_logits, (name, prompt))
        assert engine_stepped.counters["forced_tokens"] == 0  # the switch is honoured
        forced += engine_jumped.counters["forced_tokens"]
        steps_jumped += engine_jumped.counters["steps"]
        steps_stepped += engine_stepped.counters["steps"]
    # every schema forces its keys and separators: a good share of the answers' tokens skipped a step
    assert forced >= 50, forced
    assert steps_jumped + forced <= steps_stepped + 2 * len(_cases()), (steps_jumped, forced, steps_stepped)
    assert steps_jumped < 0.7 * steps_stepped, (steps_jumped, steps_stepped)


def test_in_a_batch_with_free_and_constrained_requests_the_tokens_are_each_ones_alone(vlm):
    """Rows jump while others decode one token, join and leave (float32 weights batch freely, so every token
    must equal the request's own step-by-step answer alone)."""
    requests = [
        _request("meter", "Read the meter.", GREEDY, True),
        {"messages": [{"role": "user", "content": "Describe the sea."}], "sampling": GREEDY, "max_new_tokens": 24},
        _request("detections", "Locate the objects.", GREEDY, True),
        _request("form", "Fill in the form.", SamplingParams(temperature=0.8, seed=5), True),
        _request("invoice", "Read the invoice.", GREEDY, True, batch_invariant=True),
    ]
    together, engine, widest = run_schedule(vlm, requests, [0, 0, 2, 3, 5])
    assert widest >= 4 and engine.counters["forced_tokens"] > 0 and engine.counters["forced_calls"] > 0
    stepped = alone(vlm, [{**r, "jump_forward": False} for r in requests])
    assert together == stepped


def test_logprobs_of_forced_tokens_are_their_own_positions(vlm):
    fmt = _format("invoice")
    messages = [{"role": "user", "content": "Read the invoice."}]
    jumped = vlm.generate(messages, GREEDY, max_new_tokens=MAX_TOKENS, response_format=fmt, logprobs=3)
    stepped = vlm.generate(messages, GREEDY, max_new_tokens=MAX_TOKENS, response_format=fmt, logprobs=3,
                           jump_forward=False)
    assert jumped.timings["forced_tokens"] > 0 and stepped.timings["forced_tokens"] == 0
    assert jumped.token_ids == stepped.token_ids
    for a, b in zip(jumped.logprobs, stepped.logprobs):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t.token_id for t in a.top_logprobs] == [t.token_id for t in b.top_logprobs]


def test_free_text_never_jumps(vlm):
    result = vlm.generate([{"role": "user", "content": "Describe the sea."}], GREEDY, max_new_tokens=12)
    assert result.timings["forced_tokens"] == 0


def test_switch_is_checked_in_the_api(vlm):
    from vlm_core.errors import ParameterError

    with pytest.raises(ParameterError, match="jump_forward must be true or false") as info:
        vlm.options(GREEDY, jump_forward="no")
    assert info.value.param == "jump_forward"


def test_server_field_turns_it_off_and_is_checked(vlm, qwen_export):
    pytest.importorskip("starlette", reason="the server needs the 'serve' extra (starlette)")
    from inprocess_server import InProcessServer, import_httpx

    from vlm_core.runtime.server.app import create_app
    from vlm_core.runtime.server.config import ServeConfig

    httpx = import_httpx()
    body = {"messages": [{"role": "user", "content": "Read the meter."}], "max_tokens": 64, "temperature": 0,
            "response_format": _format("meter")}
    with InProcessServer(create_app(ServeConfig(model=qwen_export, threads=1), vlm=vlm)) as server:
        url = server.url + "/v1/chat/completions"
        on = httpx.post(url, json=body, timeout=120)
        off = httpx.post(url, json={**body, "jump_forward": False}, timeout=120)
        bad = httpx.post(url, json={**body, "jump_forward": "no"}, timeout=120)
    assert on.status_code == 200 and off.status_code == 200, (on.text, off.text)
    assert on.json()["timings"]["forced_tokens"] > 0 and off.json()["timings"]["forced_tokens"] == 0
    assert on.json()["choices"][0]["message"] == off.json()["choices"][0]["message"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "jump_forward", bad.text


def test_cli_flag_turns_it_off(qwen_export, tmp_path):
    schema = tmp_path / "meter.json"
    schema.write_text(json.dumps(SCHEMAS["meter"]))
    base = [sys.executable, "-m", "vlm_core.runtime.generate", "--model", qwen_export, "-p", "Read the meter.",
            "--json-schema", str(schema), "--max-new-tokens", "64", "--json", "--greedy"]
    runs = [subprocess.run(base + extra, capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                           env={**os.environ, "PYTHONPATH": ROOT}) for extra in ([], ["--no-jump-forward"])]
    for run in runs:
        assert run.returncode == 0, run.stderr
    on, off = (json.loads(run.stdout) for run in runs)
    assert on["forced_tokens"] > 0 and off["forced_tokens"] == 0
    assert on["token_ids"] == off["token_ids"]


def test_int4_tokens_are_the_step_by_step_ones_or_differ_at_a_near_tie(qwen_export_int4):
    """4-bit MatMulNBits runs a chunk with its several-row kernel and a lone step with its one-row kernel: the
    logits differ by float rounding, so a near-tie may flip (asserted to be one where it happens)."""
    from vlm_core import VisionLanguageModel

    model = VisionLanguageModel(qwen_export_int4, threads=1)
    forced = 0
    for name, prompt in _cases():
        jumped, engine, _ = run_schedule(model, [_request(name, prompt, GREEDY, True)], [0])
        (sequence,), _, _ = schedule(model, [_request(name, prompt, GREEDY, False, keep_logits=True)], [0])
        _assert_same_or_near_tie(jumped[0], tokens_of(sequence), sequence.seen_logits, (name, prompt))
        forced += engine.counters["forced_tokens"]
    assert forced >= 50, forced


def test_int4_invariant_requests_jump_too_and_stay_batch_invariant(qwen_export_int4):
    """A request that asked for invariance jumps (a lone forced token runs as a chunk of two, never MatMulNBits'
    one-row kernel): its tokens are the step-by-step ones or differ first at a near-tie, and they are the same
    alone and batched with other rows."""
    from vlm_core import VisionLanguageModel

    model = VisionLanguageModel(qwen_export_int4, threads=1)
    forced = 0
    for sampling in (GREEDY, SamplingParams(temperature=0.8, seed=2)):
        for name, prompt in _cases():
            request = _request(name, prompt, sampling, True, batch_invariant=True)
            jumped, engine, _ = run_schedule(model, [request], [0])
            (sequence,), _, _ = schedule(model, [{**request, "jump_forward": False, "keep_logits": True}], [0])
            _assert_same_or_near_tie(jumped[0], tokens_of(sequence), sequence.seen_logits, (name, prompt))
            forced += engine.counters["forced_tokens"]
    assert forced >= 100, forced
    free = {"messages": [{"role": "user", "content": "Describe the sea."}], "sampling": GREEDY, "max_new_tokens": 20}
    requests = [_request("meter", "Read the meter.", GREEDY, True, batch_invariant=True), free,
                _request("form", "Fill in the form.", GREEDY, True, batch_invariant=True)]
    together, _, widest = run_schedule(model, requests, [0, 0, 1])
    assert widest == 3
    assert together[0] == alone(model, requests[:1])[0] and together[2] == alone(model, requests[2:])[0]


def test_int8_invariant_requests_do_not_jump(qwen_export_int8):
    """Dynamic int8 quantizes a call's activations with one scale: a chunk could not give a lone step's logits."""
    from vlm_core import VisionLanguageModel

    model = VisionLanguageModel(qwen_export_int8, threads=1)
    (tokens,), engine, _ = run_schedule(model, [_request("meter", "Read the meter.", GREEDY, True,
                                                         batch_invariant=True)], [0])
    assert engine.counters["forced_tokens"] == 0 and engine.counters["forced_calls"] == 0
    (stepped,), _, _ = run_schedule(model, [_request("meter", "Read the meter.", GREEDY, False,
                                                     batch_invariant=True)], [0])
    assert tokens == stepped


def test_a_decoder_without_logits_index_decodes_forced_tokens_step_by_step(vlm, monkeypatch):
    """A format_version 2 folder (its decoder gives the last position's logits only) is still served, without
    jump-forward."""
    monkeypatch.setattr(vlm.runner, "gives_all_positions", False)
    (tokens,), engine, _ = run_schedule(vlm, [_request("meter", "Read the meter.", GREEDY, True)], [0])
    assert engine.counters["forced_calls"] == 0
    (stepped,), _, _ = run_schedule(vlm, [_request("meter", "Read the meter.", GREEDY, False)], [0])
    assert tokens == stepped
