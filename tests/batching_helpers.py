"""Drive a BatchEngine step by step: requests that join at given steps, alone or together."""
from __future__ import annotations

from vlm_core.runtime.engine.sequence import Sequence
from vlm_core.runtime.engine.step_loop import BatchEngine


def make_sequence(vlm, request: dict) -> Sequence:
    """request: {"messages", "sampling", "max_new_tokens", optional "min_new_tokens", "stop", "response_format"}."""
    prompt = vlm.prepare(request["messages"])
    stops = list(request.get("stop", [])) + list(getattr(vlm.family, "stop_strings", ()))
    grammar = vlm.grammars.compile(request.get("response_format"))
    return Sequence(prompt, request["sampling"], request["max_new_tokens"], request.get("min_new_tokens", 0),
                    stops, vlm.eos_token_ids, vlm.tokenizer,
                    constraint=vlm.grammars.constraint(grammar) if grammar else None)


def run_schedule(vlm, requests: list, join_steps: list, max_steps: int = 2000, **engine_options):
    """Add request i at step join_steps[i] to one engine and step it until all are done.

    Returns (token id lists in request order, the engine, the largest number of sequences decoded in one step)."""
    engine = BatchEngine(vlm, **engine_options)
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
    else:
        raise AssertionError("the engine did not finish the requests")
    tokens = []
    for sequence in sequences:
        if sequence.error is not None:
            raise sequence.error
        tokens.append([c.token_id for c in sequence.chunks() if c.token_id is not None])
    return tokens, engine, widest


def alone(vlm, requests: list, **engine_options) -> list:
    """Each request run by itself in a fresh engine."""
    return [run_schedule(vlm, [r], [0], **engine_options)[0][0] for r in requests]
