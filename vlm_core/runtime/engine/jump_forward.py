"""Jump-forward: the tokens a grammar forces go through the decoder as one chunk, checked as they would be sampled.

In a JSON-schema answer the keys, quotes, separators and the rest of a unique enum value are forced by the
grammar (llguidance's fast-forward tokens: output/constraint.py's `forced_tokens`). Step by step, each costs a
decode step. Here a row whose grammar forces tokens after its pending token p gets, in the same step, one more
decoder call of its own: the forced tokens d0..d(k-1), written into its KV after p, with logits for every
position (the format_version 3 graph's `logits_index`). The row then samples as it would have step by step:

    x0 = sample(logits after p)             the batched call's row, as for every row
    x1 = sample(logits after d0)            only if x0 == d0
    x2 = sample(logits after d1)            only if x1 == d1, ...

and stops at the first sampled token that is not the forced one (or at the end of the answer). The KV of the
forced tokens past that point is left behind the row's length (never read, overwritten later).

So the tokens are the ones step-by-step decoding samples from the same logits: the same grammar mask, logits
processors, sampler and random draws, one sample per token, and logprobs of forced tokens are exact (each
comes from its own position's logits). The logits themselves are the step-by-step ones up to float
rounding, not bit for bit:
- GroupQueryAttention runs a multi-token chunk through another path than one token (measured on its op
  alone, 16/8 heads of 128 over 100 filled slots: up to 3e-7 apart in float32, 2.4e-4 with a float16 cache),
  so a chunk can flip a near-tie. Tested on the tiny models: every test schema's answer is the step-by-step
  one, float32 and int4, greedy and seeded. On the 2B's random weights (very flat logits) 2 of 4 invoice
  answers differ, first at top-2 logit gaps of 0.022 and 0.031 (bench/jump_forward.py). `jump_forward=False`
  is the bit-exact step-by-step answer.
- 4-bit MatMulNBits may compute one row (M = 1) with another kernel than several (decode_plan.py; on the
  AVX-512 VNNI host a row came out the same for any M, on others it did not): a chunk of one forced token
  of a request that asked for batch invariance runs as two (the second's output dropped), so it never meets
  the one-row kernel there either.
- dynamic int8 quantizes a call's activations with one scale: a chunk's differ from one token's more than
  rounding, so a request that asked for invariance does not jump on an int8 export.
Batch invariance itself is kept: a row's chunk is its own call, whatever else is decoded. A forced token the model
would not have picked (llguidance writes forced text in its own tokenization, a model may spell it in other
tokens) costs the chunk and nothing else: the answer is the step-by-step one.

A request turns it off with `jump_forward=False` (API), `"jump_forward": false` (server) or
`--no-jump-forward` (server and CLI defaults); a format_version 2 folder has no `logits_index`, so none of its
requests jump.
"""
from __future__ import annotations

import numpy as np

from vlm_core.runtime.engine.decode_plan import NBITS_METHODS

# Forced tokens per chunk at most: a chunk's lm_head runs on every position (152k x hidden each on Qwen),
# and a long forced run is rare past this (a long enum value); the rest follows in the next step's chunk.
MAX_FORCED_TOKENS = 32


def plan_forced(sequence, quantization: str) -> list:
    """The tokens the grammar forces after `sequence`'s pending token, as many as its answer may still take
    past the next sampled one (none when it does not jump forward, or asked for invariance on an int8 export:
    the module docstring). `quantization`: the decoder's method (the manifest's)."""
    if not sequence.jump_forward or sequence.constraint is None or sequence.pending_token is None:
        return []
    if sequence.batch_invariant and quantization == "int8":
        return []
    room = sequence.max_new_tokens - sequence.generated - 1  # tokens still to sample after the next one
    return sequence.constraint.forced_tokens(min(MAX_FORCED_TOKENS, room))


def chunk_width(sequence, forced: list, quantization: str) -> int:
    """Tokens the chunk for `forced` runs: one more than forced when a lone forced token of a request that
    asked for invariance would meet 4-bit MatMulNBits' one-row kernel (the module docstring)."""
    padded = len(forced) == 1 and sequence.batch_invariant and quantization in NBITS_METHODS
    return len(forced) + 1 if padded else len(forced)


def run_forced(runner, batch, sequence, forced: list) -> np.ndarray:
    """Write `forced` into `sequence`'s batch row after its filled slots (its pending token went in with the
    step's batched call) -> logits after each forced token [k, vocab]. The row's length is not moved:
    `take_forced` says how many of them count. A padding token (chunk_width) repeats the last forced one in
    the slot after it, which the row's length never reaches."""
    row = sequence.row
    start = batch.lengths[row]
    width = chunk_width(sequence, forced, runner.quantization)
    tokens = list(forced) + [forced[-1]] * (width - len(forced))
    feeds = runner.family.decode_feeds(sequence.prompt, runner.embed(tokens), start)
    keys, values = batch.buffers(row, row + 1)
    return runner.run_chunk(feeds, keys, values, start + width)[: len(forced)]


def take_forced(sequence, first_logits: np.ndarray, forced: list, forced_logits: np.ndarray) -> int:
    """Sample `sequence`'s tokens from the logits after its pending token, then after each forced token while
    the sampled token is the forced one (the module docstring) -> how many forced tokens are now in its KV."""
    token = sequence.sample(first_logits)
    taken = 0
    while not sequence.finished and taken < len(forced) and token == forced[taken]:
        token = sequence.sample(forced_logits[taken])
        taken += 1
    sequence.timings["forced_tokens"] = sequence.timings.get("forced_tokens", 0) + taken
    return taken
