"""One request inside the engine: its tokens, KV rows, sampler (own RNG), logits processors, optional
grammar constraint and log-probabilities, and stop state.

The engine moves a sequence through waiting -> prefill -> decode -> done and hands it logits; the
sequence samples, detokenizes, checks its stops and puts GenerationChunks in its outbox, a thread-safe
queue its consumer (a caller's generator, a server worker) reads while the engine runs elsewhere.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import numpy as np

from vlm_core.kernels.sampling import (
    SamplingParams,
    make_sampler,
    min_new_tokens_processor,
    repetition_penalty_processor,
)
from vlm_core.runtime.output.detokenize import StopStringMatcher, StreamingDetokenizer
from vlm_core.runtime.output.logprobs import TokenLogprob, TokenTable, token_logprob

WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


@dataclass
class GenerationChunk:
    """One streamed piece of an answer."""

    text: str
    token_id: int | None
    finish_reason: str | None = None
    logprobs: TokenLogprob | None = None  # the token's, when the request asked for them
    tool_calls: list | None = None  # ToolCalls completed by this chunk (requests with tools; runtime/chat/tools.py)


class Sequence:
    """A prompt being answered.

    Args:
        prompt: the family's PreparedPrompt.
        sampling: SamplingParams (greedy when None).
        max_new_tokens, min_new_tokens: length limits (EOS is suppressed until the minimum).
        stop_strings: text that ends the answer (the family's own are added by the caller).
        eos_token_ids: ids that end the answer.
        tokenizer: a tokenizers.Tokenizer for the streamed text.
        constraint: a runtime.constraint.Constraint (its own matcher): tokens the grammar does not allow
            are masked before the processors and the sampler, and the answer ends ("stop") when the
            grammar is complete. None: free text.
        logprobs: report each token's log-probability with this many top alternatives (0-20) on its
            chunk; None: not computed.
        token_table: a TokenTable for the logprobs' token text (made here when not given).
        tool_parser: a runtime.tools.ToolCallParser: `chunks` then yields the content (the text outside
            ``<tool_call>`` blocks) with the calls on the chunk that completes them. None: text as is.
        batch_invariant: the tokens must not depend on what is decoded beside it (engine/decode_plan.py).
        jump_forward: with a constraint, run the tokens it forces as one chunk (engine/jump_forward.py).
    """

    def __init__(self, prompt, sampling: SamplingParams | None, max_new_tokens: int, min_new_tokens: int,
                 stop_strings, eos_token_ids, tokenizer, constraint=None, logprobs: int | None = None,
                 token_table: TokenTable | None = None, tool_parser=None, batch_invariant: bool = False,
                 jump_forward: bool = True):
        self.prompt = prompt
        self.sampling = sampling or SamplingParams(greedy=True)  # checked by the caller (runtime/request.py)
        self.max_new_tokens, self.min_new_tokens = int(max_new_tokens), int(min_new_tokens)
        self.eos_token_ids = set(int(t) for t in eos_token_ids)
        self.prompt_len = len(prompt.input_ids)
        self.tokens = [int(t) for t in prompt.input_ids]
        self.sampler = make_sampler(self.sampling)
        self.processors = []
        if self.sampling.repetition_penalty != 1.0:
            self.processors.append(repetition_penalty_processor(self.sampling.repetition_penalty))
        if self.min_new_tokens > 0 and self.eos_token_ids:
            self.processors.append(min_new_tokens_processor(sorted(self.eos_token_ids), self.min_new_tokens,
                                                            self.prompt_len))
        self.constraint = constraint
        self.logprobs = logprobs
        self.tool_parser = tool_parser
        # the tokens must equal this request's alone, whatever is decoded beside it (the engine plans for it)
        self.batch_invariant = bool(batch_invariant)
        # tokens the grammar forces go through the decoder as one chunk, checked as sampled (jump_forward.py)
        self.jump_forward = bool(jump_forward)
        self.token_table = token_table or (TokenTable(tokenizer) if logprobs is not None else None)
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.stopper = StopStringMatcher(list(stop_strings or []))
        self.state = WAITING
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.pending_token: int | None = None  # sampled, not yet run through the decoder
        self.row: int | None = None  # its row in the engine's BatchKVCache, from admission to the end
        # prefill state (set by the engine)
        self.key_ids: np.ndarray | None = None
        self.image_digests: list = []  # one per image: keys of the image-feature cache
        self.position = 0
        self.feeds = None
        self.vision_outputs = None
        self.images_done = 0
        self.item_parts: list = []  # vision outputs of the pieces of the image or clip being encoded
        self.cached_tokens = 0
        self.timings: dict = {"submitted": time.perf_counter(), "vision_s": 0.0, "prefill_s": 0.0}

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.state == DONE

    def cancel(self) -> None:
        """Ask the engine to drop this sequence at its next step (any thread)."""
        self.cancelled = True

    def sample(self, logits: np.ndarray) -> int:
        """Pick the next token from this sequence's logits [vocab] and stream it; returns the token.

        Order: grammar mask, logits processors, sampler (warpers included). Log-probabilities are those of
        the raw `logits`."""
        raw = logits
        if self.constraint is not None:
            logits = masked = self.constraint.mask(logits)
        for process in self.processors:
            logits = process(self.tokens, logits)  # the list as it grows (no array of every token each step)
        if self.constraint is not None and self.processors and not np.isfinite(logits).any():
            logits = masked  # min_new_tokens forbade the only end the grammar allows: the grammar wins
        token = int(self.sampler(logits))
        logprob = None if self.logprobs is None else token_logprob(raw, token, self.logprobs, self.token_table)
        if self.constraint is not None:
            self.constraint.advance(token)
        now = time.perf_counter()
        if self.generated == 0:
            self.timings["ttft_s"] = now - self.timings["submitted"]
            self.timings["decode_start"] = now
        else:
            self.timings["decode_s"] = now - self.timings["decode_start"]
            self.timings["decode_steps"] = self.generated
        self.tokens.append(token)
        self._stream(token, logprob)
        return token

    def _stream(self, token: int, logprob: TokenLogprob | None) -> None:
        if token in self.eos_token_ids:
            text = self.stopper.feed(self.detokenizer.finalize())
            self.finish(GenerationChunk(text + self.stopper.flush(), token, "stop", logprob))
            return
        text = self.stopper.feed(self.detokenizer.add_token(token))
        if self.stopper.stopped:
            self.finish(GenerationChunk(text, token, "stop", logprob))
            return
        if self.constraint is not None and self.constraint.finished:  # the grammar allows nothing more
            text += self.stopper.feed(self.detokenizer.finalize())
            self.finish(GenerationChunk(text + self.stopper.flush(), token, "stop", logprob))
            return
        self.outbox.put(GenerationChunk(text, token, logprobs=logprob))
        if self.generated >= self.max_new_tokens:
            text = self.stopper.feed(self.detokenizer.finalize())
            self.finish(GenerationChunk(text + self.stopper.flush(), None,
                                        "stop" if self.stopper.stopped else "length"))
        else:
            self.pending_token = token

    def finish(self, last: GenerationChunk | None = None, error: BaseException | None = None) -> None:
        """Mark the sequence done; the outbox gets the last chunk (or the error) and then None."""
        if self.state == DONE:
            return
        self.state = DONE
        self.pending_token = None
        if last is not None:
            self.finish_reason = last.finish_reason
            self.outbox.put(last)
        if error is not None:
            self.error = error
            self.finish_reason = "error"
            self.outbox.put(error)
        elif self.cancelled and last is None:
            self.finish_reason = "cancelled"
        self.outbox.put(None)

    def chunks(self, timeout: float | None = None):
        """Yield this sequence's GenerationChunks as the engine produces them (re-raises an engine error);
        with a tool parser, their text is the content and calls ride on `chunk.tool_calls`."""
        items = self._items(timeout)
        return self.tool_parser.chunks(items) if self.tool_parser is not None else items

    def _items(self, timeout: float | None):
        while True:
            item = self.outbox.get(timeout=timeout)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
