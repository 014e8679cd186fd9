"""The engine: many sequences at once, one batched decoder call per step (continuous batching).

Each `step()`:
  1. admits waiting sequences while fewer than `parallel` are active (a prefix-cache lookup each);
  2. does one unit of prompt work for the oldest sequence still reading its prompt: encode one image
     (through the image-feature cache) or prefill one chunk of at most `prefill_chunk` tokens, straight
     into the batch row the sequence took when admitted (kv_slots.py; a prefix-cache hit is copied in
     first); when its prompt is done it samples its first token and joins the decode batch in that row;
  3. runs every decoding sequence's pending token through the decoder in one call (rows = sequences,
     per-row positions and masks), plus one chunk per row whose grammar forces the tokens after it
     (jump-forward: jump_forward.py); finished, stopped or cancelled sequences leave at once, keeping
     their KV in the prefix cache.
So a long new prompt or image holds running streams up for one chunk (or one image) at most.

A prompt's KV is written once, into the row it is decoded in: rows 0..n-1 are the n decoding sequences (one
contiguous view per decoder call), and a sequence reading its prompt holds a row after them. It is copied only
when it must move to stay contiguous: when it joins and a decoding sequence left meanwhile (the hole is filled
from the sequence's row), or when rows of two kinds of request must change places (int8, below). The batch
counts the slots it copies (`stats()["kv_copied_slots"]`).

A request that asks for it (`Sequence(batch_invariant=True)`) gets tokens that do not depend on the batch
(tests check it token by token); the others get the fastest kernels. Each step's decoder calls are planned
from the rows that asked (decode_plan.py), and the rows are kept in the order that plan reads: rows that did
not ask first.
"""
from __future__ import annotations

import threading
import time
import traceback

import numpy as np

from vlm_core.runtime.engine.decode_plan import DecoderCall, plan_decode
from vlm_core.runtime.engine.jump_forward import (
    chunk_width,
    plan_forced,
    run_forced,
    take_forced,
)
from vlm_core.runtime.engine.prefix_cache import (
    EngineCache,
    PrefixEntry,
    image_hash,
    image_key_id,
)
from vlm_core.runtime.engine.sequence import DECODE, DONE, PREFILL, WAITING, Sequence

DEFAULT_PARALLEL = 4
DEFAULT_PREFILL_CHUNK = 128
DEFAULT_CACHE_MB = 256
# A clip is encoded a few frame groups per vision call (each group attends only to itself, so the
# pieces give the same features): the graph's attention is quadratic in the patches of one call, so
# calls stay near one 720p-ish frame group (2B int4, AVX2: 880 patches 4.1 s per group alone, 6.9 s
# per group four at a time; peak memory falls with it).
VISION_PATCHES_PER_CALL = 1024


class BatchEngine:
    """Runs Sequences of one model together.

    Args:
        runner: the model's ModelRunner (engine/runner.py): every graph call goes through it.
        parallel: sequences prefilled or decoded at once; more wait their turn.
        prefill_chunk: prompt tokens per prefill call.
        cache_mb: memory for the prefix and image-feature caches (0 turns both off).
    A sequence's own `batch_invariant` says whether its tokens must not depend on the batch (decode_plan.py).
    """

    def __init__(self, runner, parallel: int = DEFAULT_PARALLEL, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 cache_mb: float = DEFAULT_CACHE_MB):
        self.runner = runner
        self.parallel, self.prefill_chunk = int(parallel), int(prefill_chunk)
        self.cache = EngineCache(int(cache_mb * 2**20)) if cache_mb > 0 else None
        self.family = runner.family
        self.batch = runner.new_batch()
        self.waiting: list[Sequence] = []
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []  # decoding[r] holds batch row r
        self.counters = {"decoder_tokens": 0, "decoder_calls": 0, "vision_images": 0, "steps": 0, "widest_batch": 0,
                         "admitted": 0,  # sequences taken from `waiting` into a slot (read by tests)
                         "padding_rows": 0,  # decoder rows run only for a request's invariance (decode_plan.py)
                         # jump-forward (jump_forward.py): chunks run, and forced tokens they saved a step for
                         "forced_calls": 0, "forced_tokens": 0}
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    # --- submitting (any thread) ----------------------------------------------------------------
    def add(self, sequence: Sequence) -> Sequence:
        """Queue a sequence without starting the engine thread (for callers that drive `step()` themselves)."""
        with self._lock:
            self.waiting.append(sequence)
        return sequence

    def submit(self, sequence: Sequence) -> Sequence:
        """Queue a sequence; the engine thread (started on first use) takes it between steps."""
        with self._lock:
            self.waiting.append(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vlm-engine", daemon=True)
                self._thread.start()
            self._lock.notify()
        return sequence

    @property
    def active(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def stats(self) -> dict:
        """Slots and cache use (for /health)."""
        return {"parallel": self.parallel, "decoding": len(self.decoding), "prefilling": len(self.prefilling),
                "waiting": len(self.waiting), "kv_mb": round(self.batch.nbytes / 2**20, 1),
                "kv_copied_slots": dict(self.batch.copied_slots),
                "cache": self.cache.stats() if self.cache else None, **self.counters}

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self.waiting or self.prefilling or self.decoding):
                    self._lock.wait()
            try:
                self.step()
            except Exception as e:  # an engine bug: fail what is running, keep serving
                traceback.print_exc()
                for sequence in self.prefilling + self.decoding:
                    self._leave(sequence, error=e)

    # --- one step ---------------------------------------------------------------------------
    def step(self) -> None:
        """Admit, one unit of prompt work, one decode step (see the module docstring)."""
        self.counters["steps"] += 1
        self._drop_cancelled()
        self._admit()
        if self.prefilling:
            sequence = self.prefilling[0]
            try:
                self._prefill_unit(sequence)
            except Exception as e:
                self._leave(sequence, error=e)
        if self.decoding:
            self._decode()

    def _drop_cancelled(self) -> None:
        with self._lock:
            for sequence in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(sequence)
                sequence.finish()
        for sequence in [s for s in self.prefilling + self.decoding if s.cancelled]:
            self._leave(sequence)

    def _admit(self) -> None:
        while self.active < self.parallel:
            with self._lock:
                if not self.waiting:
                    return
                sequence = self.waiting.pop(0)
            try:
                self._start(sequence)
                self.counters["admitted"] += 1
            except Exception as e:
                sequence.finish(error=e)

    def _start(self, sequence: Sequence) -> None:
        """Key ids, prefix-cache lookup, a private KV cache for the prompt."""
        prompt = sequence.prompt
        if sequence.key_ids is None:  # not keyed by its submitter (VisionLanguageModel.submit keys on its thread)
            sequence.key_ids, sequence.image_digests = self.prompt_keys(prompt)
        # its row for good, with room for the whole prompt at once: its chunks never regrow it
        row = self.batch.acquire(sequence.prompt_len, self._slots_limit(sequence))
        try:
            if self.cache is not None:
                # At least the last prompt token is always run: its logits give the first new token.
                entry, length = self.cache.longest_prefix(sequence.key_ids, sequence.prompt_len - 1)
                if entry is not None and length > 0:
                    self.batch.load(row, [k[:, :length] for k in entry.keys], [v[:, :length] for v in entry.values])
                    sequence.position = sequence.cached_tokens = length
        except BaseException:
            self.batch.release(row)
            raise
        sequence.row = row
        sequence.state = PREFILL
        self.prefilling.append(sequence)

    def _image_spans(self, prompt) -> list:
        """The prompt positions (int64 arrays) each image or clip fills, in order (a clip's frame groups are
        apart: timestamps lie between them)."""
        if prompt.media_grid is None:
            return []
        where = np.flatnonzero(self.family.media_token_mask(prompt.input_ids))
        spans, start = [], 0
        for count in self.family.image_token_counts(prompt.media_grid):
            spans.append(where[start:start + count])
            start += count
        return spans

    def prompt_keys(self, prompt) -> tuple[np.ndarray, list]:
        """(the prompt's key ids, one digest per image or clip): their tokens replaced by their digest id.

        Any thread may call it (it reads only the prompt and the family): hashing a 1 MP image reads ~25 MB, so
        submitters do it on their own thread, not the engine's, which would hold every stream up meanwhile."""
        key_ids = np.array(prompt.input_ids, dtype=np.int64)
        if prompt.pixel_values is None:
            return key_ids, []
        images = self.family.split_images(prompt.pixel_values, prompt.media_grid)
        digests = [image_hash(pixels, grid) for pixels, grid in images]
        for positions, digest in zip(self._image_spans(prompt), digests):
            key_ids[positions] = image_key_id(digest)
        return key_ids, digests

    # --- prompt work ------------------------------------------------------------------------
    def _prefill_unit(self, sequence: Sequence) -> None:
        prompt = sequence.prompt
        start = time.perf_counter()
        if sequence.feeds is None:
            spans = self._image_spans(prompt)
            needs_images = spans and spans[-1][-1] >= sequence.position
            if needs_images and sequence.images_done < len(spans):
                self._encode_one_image(sequence)
                sequence.timings["vision_s"] += time.perf_counter() - start
                return
            vision = self.runner.join_vision(sequence.vision_outputs) if needs_images else None
            sequence.feeds = self.family.prefill_feeds(prompt, self.runner.embed(prompt.input_ids), vision)
            sequence.vision_outputs = None
        begin = sequence.position
        end = min(begin + self.prefill_chunk, sequence.prompt_len)
        feeds = {name: _take(value, self.family.decoder_feed_axes[name][1], begin, end)
                 for name, value in sequence.feeds.items()}
        logits = self._run_prompt_chunk(sequence, feeds, end - begin)
        sequence.position = end
        sequence.timings["prefill_s"] += time.perf_counter() - start
        if end < sequence.prompt_len:
            return
        self.prefilling.remove(sequence)
        sequence.feeds = None
        sequence.sample(logits)
        if sequence.finished:
            self._remember(sequence)
            self.batch.release(sequence.row)
            sequence.row = None
            return
        self._join(sequence)

    def _encode_one_image(self, sequence: Sequence) -> None:
        """One vision call: a whole image, or the next few frame groups of a clip (a long clip's patches in
        one call would make the vision graph's attention mask quadratic in the whole clip)."""
        prompt = sequence.prompt
        index = sequence.images_done
        pixels, grid = self.family.split_images(prompt.pixel_values, prompt.media_grid)[index]
        digest = sequence.image_digests[index]
        outputs = self.cache.get_image(digest) if self.cache is not None and not sequence.item_parts else None
        if outputs is None:
            pieces = self.family.split_frames(pixels, grid, VISION_PATCHES_PER_CALL)
            piece_pixels, piece_grid = pieces[len(sequence.item_parts)]
            sequence.item_parts.append(self.runner.encode(piece_pixels, piece_grid))
            if len(sequence.item_parts) < len(pieces):
                return
            outputs = self.runner.join_vision(sequence.item_parts)
            sequence.item_parts = []
            self.counters["vision_images"] += 1
            if self.cache is not None:
                self.cache.put_image(digest, outputs)
        sequence.vision_outputs = (sequence.vision_outputs or []) + [outputs]
        sequence.images_done += 1

    def _run_prompt_chunk(self, sequence: Sequence, feeds: dict, new_tokens: int) -> np.ndarray:
        """One decoder call for a chunk of `sequence`'s prompt, written into its batch row; the last logits."""
        row = sequence.row
        logits = self.runner.prefill_row(feeds, *self.batch.buffers(row, row + 1), self.batch.lengths[row] + new_tokens)
        self.batch.advance(row, row + 1, new_tokens)
        self.counters["decoder_tokens"] += new_tokens
        self.counters["decoder_calls"] += 1
        return logits

    # --- decoding -------------------------------------------------------------------------
    def _join(self, sequence: Sequence) -> None:
        """A prefilled sequence joins the decode batch in the row after the decoding ones (its own, unless a
        decoding sequence left meanwhile), then changes places with the first row whose request asked for
        invariance if it did not ask (the order plan_decode reads)."""
        target = len(self.decoding)
        if sequence.row != target:
            self._take_row(sequence, target)
        free = self._free_rows()
        self.decoding.append(sequence)
        if not sequence.batch_invariant and free < target:  # only int8 plans care: rows of both kinds
            self.batch.swap(free, target)
            self.decoding[free], self.decoding[target] = sequence, self.decoding[free]
            self.decoding[target].row, sequence.row = target, free
        sequence.state = DECODE

    def _take_row(self, sequence: Sequence, target: int) -> None:
        """Move `sequence`'s KV to row `target`, changing places with the sequence reading its prompt there."""
        holder = next((s for s in self.prefilling if s.row == target), None)
        if holder is None:
            self.batch.move(sequence.row, target)
        else:
            self.batch.swap(sequence.row, target)
            holder.row = sequence.row
        sequence.row = target

    def _slots_limit(self, joining: Sequence | None = None) -> int:
        """The most KV slots a row (or `joining`'s) can ever use: its prompt and all its new tokens."""
        rows = self.decoding + self.prefilling + ([joining] if joining is not None else [])
        return max(s.prompt_len + s.max_new_tokens for s in rows)

    def _free_rows(self) -> int:
        """How many rows (the first ones) hold sequences that did not ask for batch invariance."""
        return sum(not s.batch_invariant for s in self.decoding)

    def _decode(self) -> None:
        batch = self.batch
        rows = len(self.decoding)
        self.counters["widest_batch"] = max(self.counters["widest_batch"], rows)
        method = self.runner.quantization
        calls = plan_decode(method, [s.batch_invariant for s in self.decoding])
        # rows whose grammar forces tokens after the pending one: a chunk of their own (jump_forward.py)
        forced = ({s.row: f for s in self.decoding if (f := plan_forced(s, method))}
                  if self.runner.gives_all_positions else {})
        longest = max(batch.lengths[r] + 1 + (chunk_width(self.decoding[r], forced[r], method) if r in forced else 0)
                      for r in range(rows))
        batch.reserve(max(call.start + call.width for call in calls), longest, self._slots_limit())
        embeds = self.runner.embed([s.pending_token for s in self.decoding])  # [rows, H]: one lookup for all
        logits = [self._decode_rows(call, embeds) for call in calls]
        logits = logits[0] if len(calls) == 1 else np.concatenate(logits)  # one call: no copy of the logits
        forced_logits = {row: self._run_forced(row, tokens) for row, tokens in forced.items()}
        failed = []
        for sequence in list(self.decoding):
            try:
                row = sequence.row
                if row in forced:
                    taken = take_forced(sequence, logits[row], forced[row], forced_logits[row])
                    batch.advance(row, row + 1, taken)
                    self.counters["forced_tokens"] += taken
                else:
                    sequence.sample(logits[row])
            except Exception as e:  # one request's failure (its grammar) ends only that request
                failed.append((sequence, e))
        for sequence, error in failed:  # rows move as sequences leave: only after every row has sampled
            self._leave(sequence, error=error)
        for sequence in [s for s in self.decoding if s.finished]:
            self._leave(sequence)

    def _decode_rows(self, call: DecoderCall, embeds: np.ndarray) -> np.ndarray:
        """One decoder call for rows [call.start, call.stop), padding rows included; `embeds`: every row's
        pending token embedded [rows, H]."""
        batch, runner = self.batch, self.runner
        start, stop, width = call.start, call.stop, call.width
        real = [min(r, stop - 1) for r in range(start, start + width)]  # padding rows repeat the last real row
        positions = [batch.lengths[r] for r in real]
        feeds = self.family.decode_rows_feeds([self.decoding[r].prompt for r in real], embeds[real], positions)
        # A padding row writes its (discarded) entry into its own row of the buffer, after that row's filled slots:
        # the row is free, or a prompt's still being read, whose next chunk overwrites that slot before reading it.
        lengths = [batch.lengths[r] + 1 for r in range(start, start + width)]
        logits = runner.decode(feeds, *batch.buffers(start, start + width), lengths, (batch.layout, start, width))
        batch.advance(start, stop)
        self.counters["decoder_tokens"] += stop - start
        self.counters["decoder_calls"] += 1
        self.counters["padding_rows"] += width - (stop - start)
        return logits[: stop - start]

    def _run_forced(self, row: int, tokens: list) -> np.ndarray:
        """One jump-forward chunk for batch row `row` (jump_forward.run_forced): logits [len(tokens), vocab]."""
        logits = run_forced(self.runner, self.batch, self.decoding[row], tokens)
        self.counters["decoder_tokens"] += len(tokens)
        self.counters["decoder_calls"] += 1
        self.counters["forced_calls"] += 1
        return logits

    # --- leaving ------------------------------------------------------------------------------
    def _leave(self, sequence: Sequence, error: BaseException | None = None) -> None:
        """Take a sequence out (finished, cancelled or failed), keeping its KV in the prefix cache."""
        if sequence in self.prefilling:
            self.prefilling.remove(sequence)
            sequence.feeds = sequence.vision_outputs = None
            if sequence.row is not None:
                self.batch.release(sequence.row)
                sequence.row = None
        elif sequence in self.decoding:
            if error is None:
                self._remember(sequence)
            self._free_row(sequence.row)
            sequence.row = None
        sequence.finish(error=error)

    def _free_row(self, row: int) -> None:
        """Drop a batch row, keeping rows that did not ask for invariance first: the last of those moves into
        a freed one of theirs, then the last row into the hole (two rows copied at most)."""
        last_free = self._free_rows() - 1
        if not self.decoding[row].batch_invariant and row != last_free:
            self.batch.move(last_free, row)
            self.decoding[row] = self.decoding[last_free]
            self.decoding[row].row = row
            row = last_free
        last = len(self.decoding) - 1
        if row != last:
            self.batch.move(last, row)
            self.decoding[row] = self.decoding[last]
            self.decoding[row].row = row
        else:
            self.batch.release(row)
        self.decoding.pop()
        if not self.decoding:  # the batch gave its buffers back: so does the decode binding
            self.runner.release_decode_buffers()

    def _remember(self, sequence: Sequence) -> None:
        """Keep the KV of every token that went through the decoder (prompt + all but the last sampled), from
        the sequence's row."""
        if self.cache is None:
            return
        row = sequence.row
        length = self.batch.lengths[row]
        if length <= 0 or not self.cache.fits(PrefixEntry.size(length, self.runner.bytes_per_slot)):
            return  # over the whole budget: no copy, and the prefix it extends stays cached
        key_ids = np.concatenate([sequence.key_ids, np.asarray(sequence.tokens[sequence.prompt_len:], np.int64)])
        keys, values = self.batch.copy_prefix(row, length)
        self.cache.put_prefix(key_ids[:length], keys, values)


def _take(value: np.ndarray, axis: int, begin: int, end: int) -> np.ndarray:
    """value[..., begin:end, ...] along `axis`, contiguous (ONNX Runtime reads it without a copy)."""
    index = [slice(None)] * value.ndim
    index[axis] = slice(begin, end)
    return np.ascontiguousarray(value[tuple(index)])
