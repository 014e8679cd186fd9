"""Incremental (streaming) detokenization and stop-string handling.

`StreamingDetokenizer` turns token ids into text deltas as they are generated with the tokenizers
library's own `DecodeStream` (one call into Rust per token): it decodes a short window of recent ids and
emits the part past the text already emitted, holding back output while the window ends in U+FFFD (a
UTF-8 character split across byte-level BPE tokens, e.g. most CJK characters and emoji), as HF's
``TextStreamer``, TGI and vLLM's incremental detokenization do. Cost per step is O(window), independent
of the output length, and the concatenated deltas equal ``tokenizer.decode(ids, skip_special_tokens=True)``.

`StopStringMatcher` cuts a text stream at the first stop string, never emitting text
that could turn out to be the start of one.

    detok, stops = StreamingDetokenizer(tok), StopStringMatcher(["\\nUser:"])
    for tid in generated_ids:
        out = stops.feed(detok.add_token(tid))
        print(out, end="")
        if stops.stopped:
            break
    else:
        print(stops.feed(detok.finalize()) + stops.flush(), end="")
"""

from __future__ import annotations

from typing import Iterable, Optional

from tokenizers.decoders import DecodeStream

__all__ = ["StreamingDetokenizer", "StopStringMatcher"]


class StreamingDetokenizer:
    """Token ids in, safe text deltas out, for a ``tokenizers.Tokenizer``.

    Each `add_token` is one `DecodeStream.step` (the window and the held-back bytes live in Rust). Only
    `finalize` after ids that produced no text yet (an unfinished character, skipped special tokens)
    decodes the whole output once, to flush what the stream still holds exactly as `decode` would.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text."""
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        self._ids: list[int] = []
        self._unflushed = 0  # ids since the stream last gave text
        self._chunks: list[str] = []
        self._text_cache: Optional[str] = ""

    @property
    def token_ids(self) -> list[int]:
        """All ids added so far (a copy)."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """All text emitted so far (concatenation of the returned deltas)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
        return self._text_cache

    def add_token(self, token_id: int) -> str:
        """Append one id; return the newly safe text ('' while a character is incomplete)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        delta = self._stream.step(self.tokenizer, token_id)
        if not delta:
            self._unflushed += 1
            return ""
        self._unflushed = 0
        return self._emit(delta)

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Append several ids; return the concatenated deltas."""
        return "".join(self.add_token(t) for t in token_ids)

    def finalize(self) -> str:
        """Flush everything held back (an incomplete character decodes as U+FFFD). Later ids start a new
        stream after the flushed text."""
        if not self._unflushed:
            return ""
        full = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        emitted = self.text
        tail = full[len(emitted):] if full.startswith(emitted) else ""
        self._unflushed = 0
        # the stream still holds the flushed ids: a fresh one keeps them from being emitted twice
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        return self._emit(tail) if tail else ""

    def _emit(self, delta: str) -> str:
        self._chunks.append(delta)
        self._text_cache = None
        return delta


class StopStringMatcher:
    """Cut a streamed text at the first occurrence of any stop string.

    ``feed(delta)`` returns the text that is safe to emit: everything before a stop
    string once one is seen (then `stopped` is True and further input is ignored), and
    otherwise everything except the longest tail that is a proper prefix of some stop
    string. ``flush()`` returns that held tail when the stream ends without a stop.
    """

    def __init__(self, stop_strings: Iterable[str]):
        self.stop_strings = tuple(dict.fromkeys(stop_strings))  # dedupe, keep order
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty str")
        self._held = ""
        self.stopped = False
        self.matched: Optional[str] = None  # the stop string that ended the stream

    def feed(self, delta: str) -> str:
        """Add new text; return the part safe to emit now."""
        if self.stopped:
            return ""
        buf = self._held + delta
        cut, hit = self._find_stop(buf)
        if hit is not None:
            self._held, self.stopped, self.matched = "", True, hit
            return buf[:cut]
        keep = self._held_tail_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """End of stream: release the held tail (empty after a stop)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _find_stop(self, buf: str) -> tuple[int, Optional[str]]:
        """Earliest stop-string occurrence in `buf` as (start, string), else (-1, None)."""
        best, hit = -1, None
        for s in self.stop_strings:
            i = buf.find(s)
            if i >= 0 and (best < 0 or i < best):
                best, hit = i, s
        return best, hit

    def _held_tail_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
