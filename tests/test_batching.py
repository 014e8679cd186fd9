"""The batched engine: requests decoded together give exactly the tokens they give alone; continuous
batching (join and leave mid-flight); prefix and image-feature caches; chat sessions; generate_batch."""
from __future__ import annotations

import numpy as np
import pytest
from batching_helpers import alone, make_sequence, run_schedule
from PIL import Image

from vlm_core.kernels.sampling import SamplingParams
from vlm_core.runtime.engine.step_loop import BatchEngine


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


def _check_batched_equals_alone(vlm, requests, prefill_chunk=16):
    expected = alone(vlm, requests, prefill_chunk=prefill_chunk, cache_mb=0)
    got, engine, widest = run_schedule(vlm, requests, JOIN_STEPS, prefill_chunk=prefill_chunk, cache_mb=0, parallel=8)
    assert widest >= 3, f"the schedule never decoded several sequences together (widest step: {widest})"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert len(e) == requests[i]["max_new_tokens"]
        assert g == e, f"request {i}: batched tokens {g} differ from alone {e}"
    assert engine.batch.rows == 0 and not engine.decoding


def test_batched_equals_alone_fp32(vlm, photos):
    _check_batched_equals_alone(vlm, _requests(photos))


def test_batched_equals_alone_int4(qwen_export_int4, photos):
    from vlm_core.runtime.model import VisionLanguageModel

    _check_batched_equals_alone(VisionLanguageModel(qwen_export_int4, threads=2), _requests(photos))


def test_batched_equals_alone_int8(qwen_export_int8, photos):
    from vlm_core.runtime.model import VisionLanguageModel

    _check_batched_equals_alone(VisionLanguageModel(qwen_export_int8, threads=2), _requests(photos))


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
    engine = BatchEngine(vlm, prefill_chunk=8, cache_mb=0)
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
