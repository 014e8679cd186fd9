"""Drive a BatchEngine step by step: requests that join at given steps, alone or together."""
from __future__ import annotations

import numpy as np

from vlm_core.runtime.engine.sequence import Sequence
from vlm_core.runtime.engine.step_loop import BatchEngine


def make_sequence(vlm, request: dict) -> Sequence:
    """request: {"messages", "sampling", "max_new_tokens", optional "min_new_tokens", "stop", "response_format",
    "batch_invariant", "jump_forward" (default True), "keep_logits"}. With keep_logits the sequence's `seen_logits` collects the logits each of
    its tokens was chosen from (after the grammar and the processors, what the sampler saw)."""
    prompt = vlm.prepare(request["messages"])
    stops = list(request.get("stop", [])) + list(getattr(vlm.family, "stop_strings", ()))
    grammar = vlm.grammars.compile(request.get("response_format"))
    sequence = Sequence(prompt, request["sampling"], request["max_new_tokens"], request.get("min_new_tokens", 0),
                        stops, vlm.eos_token_ids, vlm.tokenizer,
                        constraint=vlm.grammars.constraint(grammar) if grammar else None,
                        batch_invariant=request.get("batch_invariant", False),
                        jump_forward=request.get("jump_forward", True))
    if request.get("keep_logits"):
        sequence.seen_logits, sampler = [], sequence.sampler

        def keeping(logits):
            sequence.seen_logits.append(np.array(logits, dtype=np.float32))
            return sampler(logits)

        sequence.sampler = keeping
    return sequence


def schedule(vlm, requests: list, join_steps: list, max_steps: int = 2000, **engine_options):
    """Add request i at step join_steps[i] to one engine and step it until all are done, checking after every
    step that the batch rows stay in the order the decode plan reads (rows that did not ask for invariance first).

    Returns (the finished Sequences in request order, the engine, the most sequences decoded in one step)."""
    engine = BatchEngine(vlm.runner, **engine_options)
    sequences = [None] * len(requests)
    widest = 0
    for step in range(max_steps):
        for i, join in enumerate(join_steps):
            if join == step:
                sequences[i] = engine.add(make_sequence(vlm, requests[i]))
        if step > max(join_steps) and all(s.finished for s in sequences):
            break
        engine.step()
        widest = max(widest, len(engine.decoding))
        flags = [s.batch_invariant for s in engine.decoding]
        assert flags == sorted(flags) and [s.row for s in engine.decoding] == list(range(len(flags)))
    else:
        raise AssertionError("the engine did not finish the requests")
    for sequence in sequences:
        if sequence.error is not None:
            raise sequence.error
    return sequences, engine, widest


def tokens_of(sequence: Sequence) -> list:
    """The token ids a finished sequence streamed."""
    return [c.token_id for c in sequence.chunks() if c.token_id is not None]


def run_schedule(vlm, requests: list, join_steps: list, max_steps: int = 2000, **engine_options):
    """`schedule`, returning (token id lists in request order, the engine, the widest step)."""
    sequences, engine, widest = schedule(vlm, requests, join_steps, max_steps, **engine_options)
    return [tokens_of(s) for s in sequences], engine, widest


def alone(vlm, requests: list, **engine_options) -> list:
    """Each request run by itself in a fresh engine: its token ids."""
    return [run_schedule(vlm, [r], [0], **engine_options)[0][0] for r in requests]
