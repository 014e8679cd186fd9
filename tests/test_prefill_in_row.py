"""A prompt's KV is written once, into the batch row its sequence decodes in (engine/kv_slots.py): nothing is
copied for a lone request, only the cached prefix for a follow-up turn, and rows move only to stay contiguous
when a decoding sequence leaves while another reads its prompt. The tokens stay those of the request alone."""
from __future__ import annotations

from batching_helpers import alone, make_sequence, run_schedule, tokens_of

from vlm_core.kernels.sampling import SamplingParams
from vlm_core.runtime.engine.step_loop import BatchEngine


def _request(text: str, tokens: int, invariant: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": text}], "sampling": SamplingParams(greedy=True),
            "max_new_tokens": tokens, "min_new_tokens": tokens, "batch_invariant": invariant}


LONG = "Tell me, slowly and with every detail, how a lighthouse keeper spends a stormy night. " * 3


def test_a_lone_request_copies_no_kv_and_decodes_in_its_prefill_row(vlm):
    engine = BatchEngine(vlm.runner, prefill_chunk=8, cache_mb=0)
    sequence = engine.add(make_sequence(vlm, _request(LONG, 5)))
    engine.step()
    assert engine.prefilling == [sequence] and sequence.row == 0 and engine.batch.lengths[0] == 8
    while not sequence.finished:
        engine.step()
        if engine.decoding:
            assert engine.decoding == [sequence] and sequence.row == 0
    assert engine.stats()["kv_copied_slots"] == {"moved": 0, "loaded": 0}
    assert engine.batch.rows == 0 and engine.batch.nbytes == 0  # the row went back with the sequence
    assert len(tokens_of(sequence)) == 5


def test_a_follow_up_turn_copies_only_the_cached_prefix(vlm):
    from vlm_core.runtime.model import VisionLanguageModel

    greedy = SamplingParams(greedy=True)
    model = VisionLanguageModel(vlm.folder, threads=2, prefill_chunk=16)
    chat = model.chat(sampling=greedy, max_new_tokens=6)
    chat.ask(LONG)
    assert model.engine.stats()["kv_copied_slots"] == {"moved": 0, "loaded": 0}
    second = chat.send({"role": "user", "content": "And then?"})
    assert second.cached_tokens > 0
    assert model.engine.stats()["kv_copied_slots"] == {"moved": 0, "loaded": second.cached_tokens}
    reference = VisionLanguageModel(vlm.folder, threads=2, prefill_chunk=16, cache_mb=0).generate(
        chat.messages[:-1], greedy, max_new_tokens=6)
    assert second.token_ids == reference.token_ids


def test_rows_stay_contiguous_when_a_decoding_sequence_leaves_during_a_prefill(vlm):
    """A (short) and B decode; C joins while they do and reads a long prompt in chunks; A leaves meanwhile, so
    C's row moves down to join: every answer is the one it gives alone (invariant requests: exact)."""
    requests = [_request("Hi", 4, True), _request("Describe a storm.", 30, True), _request(LONG, 6, True)]
    expected = alone(vlm, requests, prefill_chunk=8, cache_mb=0)
    got, engine, widest = run_schedule(vlm, requests, [0, 0, 3], prefill_chunk=8, cache_mb=0, parallel=4)
    assert got == expected and widest >= 2
    assert engine.stats()["kv_copied_slots"]["moved"] > 0  # the hole A left was filled


def test_a_padding_row_never_touches_the_prompt_read_after_it(qwen_export_int4):
    """On int4 a lone invariant row decodes with a padding row after it (decode_plan.py): that row is the one
    of the sequence reading its prompt there, and its discarded entry lands where the prompt's next chunk is
    written. Both answers are their answers alone."""
    from vlm_core.runtime.model import VisionLanguageModel

    vlm = VisionLanguageModel(qwen_export_int4, threads=2)
    requests = [_request("Describe a storm.", 12, True), _request(LONG, 4, True)]
    expected = alone(vlm, requests, prefill_chunk=8, cache_mb=0)
    engine = BatchEngine(vlm.runner, prefill_chunk=8, cache_mb=0)
    first = engine.add(make_sequence(vlm, requests[0]))
    while not engine.decoding:
        engine.step()
    second = engine.add(make_sequence(vlm, requests[1]))
    padded_over_a_prompt = 0
    while not (first.finished and second.finished):
        before = engine.counters["padding_rows"]
        reading = second in engine.prefilling and engine.batch.lengths[second.row] > 0
        engine.step()
        if reading and engine.counters["padding_rows"] > before and second.row == 1:
            padded_over_a_prompt += 1
    assert padded_over_a_prompt > 0, "no step padded the lone row over the prompt being read"
    assert [tokens_of(first), tokens_of(second)] == expected
