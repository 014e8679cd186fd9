"""Token log-probabilities, as OpenAI's `logprobs` / `top_logprobs` report them.

They describe the model's own distribution at each step: the log-softmax of the raw logits the
decoder returned, *before* the request's logits processors (repetition penalty, min-new-tokens), its
sampling warpers (temperature, top-k/p, min-p) and its grammar mask (`response_format`) — what OpenAI
and vLLM report. So a token can be chosen that the model found unlikely (sampling, a grammar), and the
figures do not change with the sampling settings.

    table = TokenTable(tokenizer)
    entry = token_logprob(logits, token_id, top=5, table=table)   # a TokenLogprob
    entry.to_dict()   # {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}

Computed only for requests that ask (a log-sum-exp over the vocabulary and a partial sort per token:
about 1 ms on a 152k vocabulary).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte-fallback tokens


def _byte_level_decoder() -> dict:
    """GPT-2's byte-level alphabet inverted: printable stand-in character -> byte (tokenizers' ByteLevel)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenTable:
    """Token id -> (text, UTF-8 bytes) for a `tokenizers.Tokenizer`, looked up on demand and remembered.

    A token may hold part of a character (byte-level BPE splits most CJK characters and emoji), so its
    bytes are exact and its text is those bytes decoded with `\\xNN` escapes for an incomplete
    character, as OpenAI shows them. Byte-level vocabularies (GPT-2 style: Qwen, SmolLM) map their
    stand-in characters back to bytes; SentencePiece ones (LLaMA) turn `▁` into a space and `<0xNN>` into
    that byte; added tokens (`<|im_end|>`) are their literal text.
    """

    def __init__(self, tokenizer):
        from tokenizers import decoders

        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._bytes_of_char = _byte_level_decoder()
        self._added = {int(i): t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __getitem__(self, token_id: int) -> tuple[str, bytes]:
        entry = self._cache.get(token_id)
        if entry is None:
            data = self._bytes(token_id)
            entry = self._cache[token_id] = (data.decode("utf-8", "backslashreplace"), data)
        return entry

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:  # an id past the tokenizer's vocabulary (padded LM head)
            return b""
        if self.byte_level and all(c in self._bytes_of_char for c in piece):
            return bytes(self._bytes_of_char[c] for c in piece)
        match = _BYTE_FALLBACK.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the `top` most likely tokens at its step, most likely first."""

    token_id: int
    token: str
    bytes: bytes
    logprob: float
    top_logprobs: list = field(default_factory=list)  # [TokenLogprob] (their own top_logprobs empty)

    def to_dict(self, with_top: bool = True) -> dict:
        """OpenAI's shape: {"token", "logprob", "bytes": [ints], "top_logprobs": [...]}."""
        entry = {"token": self.token, "logprob": self.logprob, "bytes": list(self.bytes)}
        if with_top:
            entry["top_logprobs"] = [t.to_dict(with_top=False) for t in self.top_logprobs]
        return entry


def token_logprob(logits: np.ndarray, token_id: int, top: int, table: TokenTable) -> TokenLogprob:
    """The log-softmax of `logits` [vocab] at `token_id`, with the `top` most likely tokens.

    Ties among the top are ordered by token id (lowest first), as a stable sort would."""
    x = np.asarray(logits, dtype=np.float32)  # [vocab]
    peak = float(x.max())
    # exp in float32 (10x faster than float64 here), summed in float64: the total is exact to ~1e-7 relative
    log_total = peak + float(np.log(np.sum(np.exp(x - np.float32(peak)), dtype=np.float64)))

    def entry(i: int) -> TokenLogprob:
        text, data = table[i]
        return TokenLogprob(i, text, data, float(x[i]) - log_total)

    chosen = entry(int(token_id))
    if top > 0:
        vocab = x.shape[0]
        best = np.argpartition(x, vocab - top)[vocab - top:] if top < vocab else np.arange(vocab)
        best = best[np.lexsort((best, -x[best]))]  # by logit descending, then id
        chosen.top_logprobs = [entry(int(i)) for i in best]
    return chosen
