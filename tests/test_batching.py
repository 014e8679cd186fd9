"""The batched engine: requests that ask for batch invariance get exactly the tokens they give alone, and the
others the same or a different token first at a near-tie; continuous batching (join and leave mid-flight);
prefix and image-feature caches; chat sessions; generate_batch."""
from __future__ import annotations

import numpy as np
import pytest
from batching_helpers import alone, make_sequence, run_schedule, schedule, tokens_of
from PIL import Image

from vlm_core.kernels.sampling import SamplingParams
from vlm_core.runtime.engine.decode_plan import DecoderCall, plan_decode
from vlm_core.runtime.engine.step_loop import BatchEngine

# A request that did not ask for invariance may differ from its answer alone, first where its two most likely
# tokens are this close in logits (issue 18): kernel choice changes the logits at float rounding level.
NEAR_TIE = 1e-3


def _requests(photos) -> list:
    def user(*parts):
        content = [{"type": "image", "path": photos[p]} if p in photos else {"type": "text", "text": p} for p in parts]
        return [{"role": "user", "content": content}]

    return [
        {"messages": user("astronaut", "Describe this picture."), "sampling": SamplingParams(greedy=True),
         "max_new_tokens": 20, "min_new_tokens": 20},
        {"messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}],
         "sampling": SamplingParams(temperature=0.9, top_p=0.95, seed=11), "max_new_tokens": 30,
         "min_new_tokens": 30},
        {"messages": user("coffee", "noise", "Compare the two."), "sampling": SamplingParams(greedy=True),
         "max_new_tokens": 6, "min_new_tokens": 6},
        {"messages": user("Hi"), "sampling": SamplingParams(temperature=1.2, top_k=50, seed=5),
         "max_new_tokens": 17, "min_new_tokens": 17},
        {"messages": user("noise", "What is this?"), "sampling": SamplingParams(greedy=True, repetition_penalty=1.3),
         "max_new_tokens": 9, "min_new_tokens": 9},
    ]


JOIN_STEPS = [0, 0, 4, 9, 15]  # staggered: later requests join while earlier ones decode; short ones leave early


def _invariant(requests) -> list:
    return [dict(r, batch_invariant=True) for r in requests]


def _check_batched_equals_alone(vlm, requests, prefill_chunk=16):
    expected = alone(vlm, requests, prefill_chunk=prefill_chunk, cache_mb=0)
    got, engine, widest = run_schedule(vlm, requests, JOIN_STEPS, prefill_chunk=prefill_chunk, cache_mb=0, parallel=8)
    assert widest >= 3, f"the schedule never decoded several sequences together (widest step: {widest})"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert len(e) == requests[i]["max_new_tokens"]
        assert g == e, f"request {i}: batched tokens {g} differ from alone {e}"
    assert engine.batch.rows == 0 and not engine.decoding
    assert not engine.runner._decode_binding._buffers  # the decode binding let the buffers go with the batch


def test_batched_equals_alone_fp32(vlm, photos):
    _check_batched_equals_alone(vlm, _invariant(_requests(photos)))


def test_batched_equals_alone_int4(qwen_export_int4, photos):
    from vlm_core.runtime.model import VisionLanguageModel

    _check_batched_equals_alone(VisionLanguageModel(qwen_export_int4, threads=2), _invariant(_requests(photos)))


def test_batched_equals_alone_int8(qwen_export_int8, photos):
    from vlm_core.runtime.model import VisionLanguageModel

    _check_batched_equals_alone(VisionLanguageModel(qwen_export_int8, threads=2), _invariant(_requests(photos)))


def _check_near_tie(alone_sequence, batched_sequence, name: str) -> None:
    """Greedy tokens equal, or the first difference is where both runs' two best logits lie within NEAR_TIE
    (the context before it is the same, so the logits there are comparable)."""
    expected, got = tokens_of(alone_sequence), tokens_of(batched_sequence)
    first = next((i for i, (e, g) in enumerate(zip(expected, got)) if e != g), None)
    if first is None:
        assert got == expected, name
        return
    for run, sequence in (("alone", alone_sequence), ("batched", batched_sequence)):
        second, best = np.sort(sequence.seen_logits[first])[-2:]
        assert best - second < NEAR_TIE, (f"{name}: batched tokens {got} differ from alone {expected} at {first}, "
                                          f"where the {run} run's top-2 logit gap is {best - second:.2e}")


def _greedy(requests) -> list:
    """The requests with greedy sampling (their repetition penalty kept): the near-tie test needs the argmax."""
    return [dict(r, sampling=SamplingParams(greedy=True, repetition_penalty=r["sampling"].repetition_penalty))
            for r in requests]


def _model(export):
    from vlm_core.runtime.model import VisionLanguageModel

    return VisionLanguageModel(export, threads=2)


@pytest.mark.parametrize("export", ["qwen_export", "qwen_export_int4"])
def test_default_requests_equal_alone_or_differ_at_a_near_tie(export, request, photos):
    """Requests that did not ask for invariance take the fastest kernels (int4: a lone row by the one-row
    kernel, no padding); int8 is left out: its rows share one quantization scale, a coupling above float level
    (up to 0.13 in logits on this tiny model), which is why such requests may differ there."""
    vlm = _model(request.getfixturevalue(export))
    requests = [dict(r, keep_logits=True) for r in _greedy(_requests(photos))]
    expected = [schedule(vlm, [r], [0], prefill_chunk=16, cache_mb=0)[0][0] for r in requests]
    got, engine, widest = schedule(vlm, requests, JOIN_STEPS, prefill_chunk=16, cache_mb=0, parallel=8)
    assert widest >= 3
    for i, (e, g) in enumerate(zip(expected, got)):
        _check_near_tie(e, g, f"request {i}")
    assert engine.counters["padding_rows"] == 0


@pytest.mark.parametrize("export", ["qwen_export", "qwen_export_int4", "qwen_export_int8"])
def test_both_modes_in_one_batch(export, request, photos):
    """Invariant and default requests decoded together, joining and leaving mid-flight (the engine keeps the
    default ones' rows first: `schedule` checks it every step): the invariant ones give their tokens alone,
    the default ones theirs or a near-tie (float weights and int4; int8's share one scale)."""
    vlm = _model(request.getfixturevalue(export))
    asked = (False, True, True, False, False)  # a default request joins after invariant ones: rows reordered
    requests = [dict(r, batch_invariant=a, keep_logits=True) for a, r in zip(asked, _requests(photos))]
    expected = [schedule(vlm, [r], [0], prefill_chunk=16, cache_mb=0)[0][0] for r in requests]
    got, _, widest = schedule(vlm, requests, JOIN_STEPS, prefill_chunk=16, cache_mb=0, parallel=8)
    assert widest >= 3
    for i, (e, g) in enumerate(zip(expected, got)):
        if requests[i]["batch_invariant"]:
            assert tokens_of(g) == tokens_of(e), f"request {i} asked for invariance"
        elif export != "qwen_export_int8" and requests[i]["sampling"].greedy:
            _check_near_tie(e, g, f"request {i}")


def test_plan_pads_only_a_lone_invariant_int4_row_and_runs_int8_invariant_rows_apart():
    assert plan_decode("int4", [False]) == [DecoderCall(0, 1, 1)]  # the one-row kernel: fastest
    assert plan_decode("int4", [True]) == [DecoderCall(0, 1, 2)]  # never the one-row kernel for it
    assert plan_decode("mixed", [False, True]) == [DecoderCall(0, 2, 2)]
    assert plan_decode("none", [True]) == [DecoderCall(0, 1, 1)]
    assert plan_decode("int8", [False, False, True, True]) == [DecoderCall(0, 2, 2), DecoderCall(2, 3, 1),
                                                               DecoderCall(3, 4, 1)]
    assert plan_decode("int8", [True]) == [DecoderCall(0, 1, 1)]
    assert plan_decode("int8", [False, False]) == [DecoderCall(0, 2, 2)]  # one call, one scale: fastest
    with pytest.raises(ValueError, match="must come last"):
        plan_decode("int8", [True, False])


def test_int4_pads_a_lone_row_only_when_it_asked(qwen_export_int4):
    vlm = _model(qwen_export_int4)
    for invariant in (False, True):
        request = {"messages": [{"role": "user", "content": "Hi"}], "sampling": SamplingParams(greedy=True),
                   "max_new_tokens": 5, "min_new_tokens": 5, "batch_invariant": invariant}
        _, engine, _ = schedule(vlm, [request], [0], cache_mb=0)
        assert engine.counters["padding_rows"] == (4 if invariant else 0)  # 4 decode steps after the prefill


def test_parallel_limit_and_threaded_generate_batch(vlm, photos):
    """generate_batch through the engine thread with parallel=2: everything answered, same tokens as alone."""
    from vlm_core.runtime.model import VisionLanguageModel

    requests = [dict(r, max_new_tokens=30, min_new_tokens=6) for r in _requests(photos)]
    expected = alone(vlm, requests, prefill_chunk=16, cache_mb=0)
    model = VisionLanguageModel(vlm.folder, threads=2, parallel=2, prefill_chunk=16, cache_mb=0)
    results = model.generate_batch([r["messages"] for r in requests], [r["sampling"] for r in requests],
                                   max_new_tokens=30, min_new_tokens=6)
    assert [r.token_ids for r in results] == expected
    assert model.engine.active == 0 and model.engine.counters["steps"] > 0


def test_cancel_frees_the_row(vlm, photos):
    engine = BatchEngine(vlm.runner, prefill_chunk=8, cache_mb=0)
    requests = _requests(photos)
    a = engine.add(make_sequence(vlm, requests[1]))
    b = engine.add(make_sequence(vlm, requests[3]))
    for _ in range(12):
        engine.step()
    assert len(engine.decoding) == 2
    a.cancel()
    engine.step()
    assert a.finished and a.finish_reason == "cancelled" and engine.decoding == [b] and b.row == 0
    assert engine.batch.rows == 1


def test_the_engine_never_calls_back_into_the_facade(vlm, photos, monkeypatch):
    """Every graph call of the engine goes through the model runner (engine/runner.py)."""
    from vlm_core.runtime.model import VisionLanguageModel

    def forbidden(self, *args, **kwargs):
        raise AssertionError("the engine called the VisionLanguageModel")

    for method in ("embed", "run_decoder", "prefill", "encode_images", "new_cache"):
        monkeypatch.setattr(VisionLanguageModel, method, forbidden)
    requests = _requests(photos)[:3]  # an image, text, two images
    tokens, engine, _ = run_schedule(vlm, requests, [0, 0, 1], prefill_chunk=16, cache_mb=1)
    assert [len(t) for t in tokens] == [r["max_new_tokens"] for r in requests]
    assert engine.counters["vision_images"] == 3


# --- prefix and image-feature caches ---------------------------------------------------------------

def _fresh(vlm, **options):
    from vlm_core.runtime.model import VisionLanguageModel

    return VisionLanguageModel(vlm.folder, threads=2, **options)


def test_follow_up_turn_reuses_the_cache_and_equals_an_empty_cache(vlm, photos):
    greedy = SamplingParams(greedy=True)
    model = _fresh(vlm, prefill_chunk=16)
    chat = model.chat(sampling=greedy, max_new_tokens=12)
    chat.ask("What is in this photo?", images=[photos["astronaut"]])
    counters = dict(model.engine.counters)
    second = chat.send({"role": "user", "content": "And what colour is it?"})
    prompt_tokens = second.prompt_tokens
    assert second.cached_tokens > 0
    # only the tokens after the cached prefix went through the decoder (prompt rest + decode steps)
    decoded = model.engine.counters["decoder_tokens"] - counters["decoder_tokens"]
    assert decoded == prompt_tokens - second.cached_tokens + len(second.token_ids) - 1
    assert model.engine.counters["vision_images"] == counters["vision_images"] == 1
    # the same conversation answered with an empty cache
    empty = _fresh(vlm, prefill_chunk=16, cache_mb=0)
    reference = empty.generate(chat.messages[:-1], greedy, max_new_tokens=12)
    assert second.token_ids == reference.token_ids
    assert reference.cached_tokens == 0


def test_same_image_new_question_runs_no_vision(vlm, photos):
    model = _fresh(vlm, prefill_chunk=16)
    greedy = SamplingParams(greedy=True)
    model.generate([{"role": "user", "content": [{"type": "image", "path": photos["coffee"]},
                                                 {"type": "text", "text": "Describe it."}]}], greedy, max_new_tokens=4)
    assert model.engine.counters["vision_images"] == 1
    # the same image with another question, and the same image after other text: no vision run
    for content in ([{"type": "image", "path": photos["coffee"]}, {"type": "text", "text": "How many cups?"}],
                    [{"type": "text", "text": "Look:"}, {"type": "image", "path": photos["coffee"]}]):
        result = model.generate([{"role": "user", "content": content}], greedy, max_new_tokens=4)
        reference = _fresh(vlm, prefill_chunk=16, cache_mb=0).generate(
            [{"role": "user", "content": content}], greedy, max_new_tokens=4)
        assert result.token_ids == reference.token_ids
    assert model.engine.counters["vision_images"] == 1
    assert model.engine.cache.hits["image"] >= 1  # the second layout needs the features, not the prefix


def test_same_system_prompt_hits(vlm):
    model = _fresh(vlm, prefill_chunk=16)
    system = "You are a meticulous assistant who answers questions about photographs. " * 3
    for question in ("First question?", "Second, different question?"):
        result = model.generate([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                SamplingParams(greedy=True), max_new_tokens=3)
    assert result.cached_tokens >= 40


def test_cache_stays_within_budget_while_evicting(vlm):
    model = _fresh(vlm, prefill_chunk=32, cache_mb=0.25)
    budget = model.engine.cache.budget_bytes
    for i in range(12):
        model.generate([{"role": "user", "content": f"Question number {i}: " + "tell me more. " * (4 + i)}],
                       SamplingParams(greedy=True), max_new_tokens=6)
        measured = sum(v[1] for v in model.engine.cache._entries.values())
        assert measured == model.engine.cache.nbytes <= budget
    assert model.engine.cache.evictions > 0


def _prefix(length: int, value: float = 1.0):
    """Key ids 0..length-1 and one layer of KV for them (8 bytes a slot for keys and values each)."""
    kv = [np.full((1, length, 2), value, np.float32)]
    return np.arange(length, dtype=np.int64), kv, [kv[0].copy()]


def test_a_prefix_over_budget_never_drops_the_entry_it_extends():
    """A conversation whose KV outgrows the budget keeps its last usable prefix (issue 18: put_prefix dropped
    the entries a new key extends before refusing the new one as too big)."""
    from vlm_core.runtime.engine.prefix_cache import EngineCache, PrefixEntry

    cache = EngineCache(budget_bytes=1000)  # a 40-slot entry takes 960 bytes: 16 per slot + its int64 key ids
    assert PrefixEntry.size(40, 16) == 960  # what the engine checks before copying KV out
    cache.put_prefix(*_prefix(40))
    cache.put_prefix(*_prefix(60))  # 1440 bytes: not kept, and the 40-slot one stays
    entry, length = cache.longest_prefix(np.arange(100, dtype=np.int64), 100)
    assert entry is not None and length == 40 and cache.nbytes == 960 and cache.evictions == 0
    # a longer one that fits covers the shorter: it replaces it
    cache = EngineCache(budget_bytes=1500)
    cache.put_prefix(*_prefix(40))
    cache.put_prefix(*_prefix(60))
    entry, length = cache.longest_prefix(np.arange(100, dtype=np.int64), 100)
    assert length == 60 and cache.stats()["prefix_entries"] == 1 and cache.nbytes == 1440


def test_a_conversation_past_the_budget_keeps_its_last_cached_turn(vlm):
    """The engine's side of the bug above: a turn whose KV is over the whole budget is not kept (nor copied out),
    and the turn before it still serves the next request that starts with it."""
    model = _fresh(vlm, prefill_chunk=16, cache_mb=0.02)  # 20 KiB: a short turn (12 slots, 9 KiB), not a long one
    chat = model.chat(sampling=SamplingParams(greedy=True), max_new_tokens=4)
    chat.send({"role": "user", "content": "Hi"})
    kept = model.engine.cache.nbytes
    second = chat.send({"role": "user", "content": "tell me more. " * 20})
    assert second.cached_tokens > 0 and model.engine.cache.nbytes == kept
    again = model.generate(chat.messages[:-1], SamplingParams(greedy=True), max_new_tokens=4)
    assert again.cached_tokens == second.cached_tokens and again.token_ids == second.token_ids


def test_the_repetition_penalty_of_a_growing_sequence_equals_one_computed_afresh():
    """The processor keeps the distinct ids it has seen (a Sequence's tokens only grow): each step's result is
    the one from every id at once (np.unique), and a shorter token list starts it over."""
    from vlm_core.kernels.sampling import repetition_penalty_processor

    rng = np.random.default_rng(4)
    process, tokens = repetition_penalty_processor(1.3), list(rng.integers(-2, 60, size=20))
    for _ in range(40):
        logits = rng.normal(size=50).astype(np.float32)
        ids = np.unique([t for t in tokens if 0 <= t < 50])
        expected = logits.copy()
        expected[ids] = np.where(logits[ids] < 0, logits[ids] * np.float32(1.3), logits[ids] / np.float32(1.3))
        np.testing.assert_array_equal(process(tokens, logits), expected)
        tokens.append(int(rng.integers(0, 70)))
    logits = rng.normal(size=50).astype(np.float32)
    fresh = repetition_penalty_processor(1.3)
    np.testing.assert_array_equal(process(tokens[:5], logits), fresh(tokens[:5], logits))


def test_images_are_hashed_on_the_submitting_thread(vlm, photos, monkeypatch):
    """The prefix and image-cache keys (blake2b over every pixel) are made by the caller, not the engine thread
    that every stream waits on."""
    import threading

    from vlm_core.runtime.engine import step_loop

    hashed_on = []
    real = step_loop.image_hash

    def recording(pixels, grid):
        hashed_on.append(threading.current_thread().name)
        return real(pixels, grid)

    monkeypatch.setattr(step_loop, "image_hash", recording)
    messages = [{"role": "user", "content": [{"type": "image", "path": photos["noise"]},
                                             {"type": "text", "text": "What is this?"}]}]
    vlm.generate(messages, SamplingParams(greedy=True), max_new_tokens=2)
    assert hashed_on == [threading.current_thread().name]


def test_a_text_prompt_prefills_without_a_whole_prompt_deepstack(vlm):
    """A text prompt's deepstack input is zeros broadcast from one row: only a chunk's slice becomes real."""
    prompt = vlm.prepare([{"role": "user", "content": "Describe the sea. " * 40}])
    feeds = vlm.family.prefill_feeds(prompt, vlm.embed(prompt.input_ids), None)
    deepstack = feeds["deepstack_embeds"]
    assert deepstack.shape[2] == len(prompt.input_ids) > 150 and deepstack.strides[2] == 0 and not deepstack.any()
