"""Incremental (streaming) detokenization and stop-string handling.

`StreamingDetokenizer` turns token ids into text deltas as they are generated, the way
HF's ``TextStreamer``, mlx-lm's streaming detokenizer and vLLM's incremental
detokenization do: it decodes only a short window of recent ids (from ``prefix_offset``)
and emits the part past the text already emitted, holding back output while the
window ends in U+FFFD (a UTF-8 character split across byte-level BPE tokens, e.g.
most CJK characters and emoji). Cost per step is O(window), independent of the output
length, and the concatenated deltas equal ``tokenizer.decode(ids, skip_special_tokens=True)``.

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

__all__ = ["StreamingDetokenizer", "StopStringMatcher"]

REPLACEMENT_CHAR = "\ufffd"


class StreamingDetokenizer:
    """Token ids in, safe text deltas out, for a ``tokenizers.Tokenizer``.

    State: ``_ids`` all ids so far; text for ``_ids[:_read_offset]`` has been emitted;
    ``_prefix_offset <= _read_offset`` starts the decode window at a point where the
    emitted text ended on a complete character (decoding from there reproduces it, and
    keeps decoders that drop a leading space from changing the delta).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text."""
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
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
        self._ids.append(int(token_id))
        prefix_text, new_text = self._decode_window()
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            return self._emit(new_text[len(prefix_text) :])
        return ""

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Append several ids; return the concatenated deltas."""
        return "".join(self.add_token(t) for t in token_ids)

    def finalize(self) -> str:
        """Flush everything held back (an incomplete character decodes as U+FFFD)."""
        prefix_text, new_text = self._decode_window()
        if len(new_text) > len(prefix_text):
            return self._emit(new_text[len(prefix_text) :])
        return ""

    def _decode_window(self) -> tuple[str, str]:
        """(text of ids[prefix:read], text of ids[prefix:]) — the window, not the whole output."""
        dec = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix_text = dec(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        new_text = dec(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        return prefix_text, new_text

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
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
