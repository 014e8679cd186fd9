"""Tests for runtime/output/detokenize.py on the real Qwen2 byte-level BPE vocabulary
(tests/qwen_vocab.py), plus checks that that vocabulary encodes like Qwen2."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from vlm_core.export.qwen_vocab import (
    PRETOKENIZE_REGEX,
    QWEN2_SPECIAL_TOKENS,
    build_qwen_tokenizer,
    bytes_to_unicode,
    load_qwen_ranks,
)
from vlm_core.runtime.output.detokenize import StopStringMatcher, StreamingDetokenizer

CHINESE = "你好，世界！今天天气很好，我们去公园散步吧。量子力学与鳄鱼、饕餮、龘。"
EMOJI = "Party 🎉🎉 thumbs 👍🏽, family 👨‍👩‍👧‍👦, flag 🇯🇵, 🫠 melting."
MIXED = "def f(x):\n    return x ** 2  # 平方 ✓\nCafé naïve — “quotes” € 3.14 😀 end"
TEXTS = [CHINESE, EMOJI, MIXED, "plain ascii only, nothing fancy."]


@pytest.fixture(scope="module")
def tok():
    return build_qwen_tokenizer()


# ----------------------------------------------------------------------------- vocabulary


def test_qwen_special_token_ids(tok):
    ids = {name: tok.token_to_id(name) for name in QWEN2_SPECIAL_TOKENS}
    assert ids["<|endoftext|>"] == 151643
    assert ids["<|im_start|>"] == 151644
    assert ids["<|im_end|>"] == 151645
    assert ids["<|vision_start|>"] == 151652
    assert ids["<|image_pad|>"] == 151655
    assert ids["<|video_pad|>"] == 151656
    assert list(ids.values()) == list(range(151643, 151657))
    assert tok.get_vocab_size() == 151657
    assert tok.encode("<|im_start|>user\n你好<|im_end|>").ids == [151644, 872, 198, 108386, 151645]
    assert build_qwen_tokenizer() is tok  # cached
    ext = build_qwen_tokenizer(with_tool_tokens=True)
    assert ext.token_to_id("<tool_call>") == 151657 and ext.token_to_id("<|file_sep|>") == 151664
    q3 = build_qwen_tokenizer(with_qwen3_tokens=True)
    assert q3.token_to_id("<tool_response>") == 151665 and q3.token_to_id("</think>") == 151668
    assert q3.get_vocab_size() == 151669
    # non-special added tokens survive skip_special_tokens (as in Qwen2.5/Qwen3 checkpoints)
    ids = q3.encode("<|im_start|><think>\nhm</think>").ids
    assert ids[:2] == [151644, 151667] and q3.decode(ids, skip_special_tokens=True) == "<think>\nhm</think>"


def test_encoding_matches_tiktoken_reference(tok):
    """Qwen's reference tokenizer is tiktoken over the same ranks and regex."""
    tiktoken = pytest.importorskip("tiktoken")
    specials = {s: 151643 + i for i, s in enumerate(QWEN2_SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("qwen", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=load_qwen_ranks(),
                            special_tokens=specials)
    rng = np.random.default_rng(0)
    pools = [(32, 127), (0x4E00, 0x9FFF), (0x1F300, 0x1F64F), (0xA0, 0x2000), (0x400, 0x4FF)]
    texts = TEXTS + ["  lead\n\n\ttabs\r\n  trail  ", "I'M you'll THEY'RE 12345 3.14", "<|im_start|>x<|im_end|>"]
    for _ in range(100):
        chars = [chr(int(rng.integers(*pools[rng.integers(len(pools))]))) for _ in range(rng.integers(1, 40))]
        texts.append("".join(chars))
    for text in texts:
        text = unicodedata.normalize("NFC", text)  # Qwen2's HF tokenizer NFC-normalises first
        assert tok.encode(text).ids == enc.encode(text, allowed_special="all"), text


def test_pipeline_matches_transformers_qwen2_tokenizer(tok):
    """Same normalizer / pre-tokenizer / BPE settings as transformers' Qwen2Tokenizer."""
    transformers = pytest.importorskip("transformers")
    ours = json.loads(tok.to_str())
    hf = transformers.Qwen2Tokenizer(vocab=ours["model"]["vocab"], merges=[tuple(m) for m in ours["model"]["merges"]])
    theirs = json.loads(hf.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        assert ours[key] == theirs[key], key
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk",
                "byte_fallback", "ignore_merges"):
        assert ours["model"][key] == theirs["model"][key], key
    assert len(ours["model"]["merges"]) == 151387  # one merge per non-byte token, as Qwen2's merges.txt
    for text in TEXTS + ["Ünïcödé  composed vs decomposed: e\u0301"]:
        assert tok.encode(text).ids == hf(text)["input_ids"], text


# ----------------------------------------------------------------------------- streaming


def stream(tok, ids, **kw):
    detok = StreamingDetokenizer(tok, **kw)
    deltas = [detok.add_token(i) for i in ids]
    deltas.append(detok.finalize())
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS, ids=["chinese", "emoji", "mixed", "ascii"])
def test_deltas_concatenate_to_full_decode(tok, text):
    ids = tok.encode(text).ids
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert detok.text == text
    assert all("\ufffd" not in d for d in deltas)  # never a partial character
    # every prefix of the stream is a prefix of the final text
    acc = ""
    for d in deltas:
        acc += d
        assert text.startswith(acc)


@pytest.mark.parametrize("text", [CHINESE, EMOJI])
def test_split_characters_are_held_back(tok, text):
    ids = tok.encode(text).ids
    partial = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    split_steps = [i for i, p in enumerate(partial) if p.endswith("\ufffd")]
    assert split_steps, "text should contain characters split across byte-level tokens"
    _, deltas = stream(tok, ids)
    for i in split_steps:
        assert deltas[i] == ""


def test_special_tokens_skipped(tok):
    text = "<|im_start|>assistant\n你好👋<|im_end|><|endoftext|>"
    ids = tok.encode(text).ids
    assert 151644 in ids and 151645 in ids
    _, deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == "assistant\n你好👋"
    _, deltas = stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) == text


def test_random_ids_including_invalid_utf8(tok):
    """Arbitrary id sequences (lone continuation bytes, truncated characters, specials)."""
    rng = np.random.default_rng(0)
    vocab = tok.get_vocab_size()
    table = bytes_to_unicode()  # raw bytes: lead bytes, continuation bytes, 0xFF (never valid)
    byte_ids = [tok.token_to_id(table[b]) for b in (0xE4, 0xBD, 0xA0, 0x80, 0xF0, 0x9F, 0xFF)]
    assert None not in byte_ids
    for _ in range(30):
        n = int(rng.integers(1, 60))
        ids = [int(x) for x in rng.integers(0, vocab, size=n)]
        for j in rng.integers(0, n, size=n // 3):
            ids[j] = byte_ids[rng.integers(len(byte_ids))]
        _, deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_finalize_flushes_incomplete_character(tok):
    ids = tok.encode("ok 龘").ids
    last = ids[:-1] if tok.decode(ids[:-1]).endswith("\ufffd") else None
    assert last is not None, "龘 should span several byte-level tokens"
    detok = StreamingDetokenizer(tok)
    out = detok.add_tokens(last)
    assert out.startswith("ok") and "\ufffd" not in out  # the split character is held back
    tail = detok.finalize()
    assert out + tail == tok.decode(last) and tail.endswith("\ufffd")
    assert detok.finalize() == ""


def test_one_stream_step_per_token(tok, monkeypatch):
    """One call into tokenizers' DecodeStream per token, and no whole-output decode for a stream that ends
    on a complete character: the cost per step does not grow with the output."""
    from vlm_core.runtime.output import detokenize

    steps, decodes = [], []
    real_stream = detokenize.DecodeStream

    class CountingStream:
        def __init__(self, **kw):
            self.inner = real_stream(**kw)

        def step(self, tokenizer, token_id):
            steps.append(token_id)
            return self.inner.step(tokenizer, token_id)

    class CountingDecode(detokenize.StreamingDetokenizer):
        def finalize(self):
            if self._unflushed:
                decodes.append(len(self._ids))
            return super().finalize()

    monkeypatch.setattr(detokenize, "DecodeStream", CountingStream)
    text = (CHINESE + EMOJI + MIXED) * 20
    ids = tok.encode(text).ids
    assert len(ids) > 1000
    detok = CountingDecode(tok)
    deltas = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert "".join(deltas) == text
    assert len(steps) == len(ids) and decodes == []


def test_matches_tokenizers_decode_stream(tok):
    decoders = pytest.importorskip("tokenizers.decoders")
    if not hasattr(decoders, "DecodeStream"):
        pytest.skip("tokenizers without DecodeStream")
    ids = tok.encode(CHINESE + EMOJI).ids
    ds = decoders.DecodeStream(skip_special_tokens=True)
    ref = "".join(filter(None, (ds.step(tok, i) for i in ids)))
    _, deltas = stream(tok, ids)
    assert "".join(deltas) == ref


# ----------------------------------------------------------------------------- stop strings


def feed_all(matcher, chunks):
    out = []
    for c in chunks:
        out.append(matcher.feed(c))
        if matcher.stopped:
            break
    else:
        out.append(matcher.flush())
    return out


def test_stop_string_across_chunks():
    m = StopStringMatcher(["User:"])
    out = feed_all(m, ["Hello U", "se", "r: more text", "never seen"])
    assert "".join(out) == "Hello "
    assert out[0] == "Hello "  # "U" held back: could start "User:"
    assert m.stopped and m.matched == "User:"
    assert m.feed("anything") == "" and m.flush() == ""


def test_held_tail_released_when_not_a_stop():
    m = StopStringMatcher(["User:"])
    assert m.feed("a Us") == "a "
    assert m.feed("ually") == "Usually"
    assert m.feed(" ends with Use") == " ends with "
    assert m.flush() == "Use" and not m.stopped


def test_earliest_of_several_stop_strings_wins():
    m = StopStringMatcher(["</answer>", "\n\n"])
    assert "".join(feed_all(m, ["x\n", "\ny</ans", "wer>"])) == "x"
    assert m.matched == "\n\n"
    m = StopStringMatcher(["bc", "abc"])  # "abc" starts earlier, though listed second
    assert "".join(feed_all(m, ["xab", "cd"])) == "x" and m.matched == "abc"


def test_overlapping_prefixes():
    m = StopStringMatcher(["abab"])
    assert "".join(feed_all(m, list("aabababab"))) == "a"
    m = StopStringMatcher(["aab"])
    assert "".join(feed_all(m, list("aaaaab!"))) == "aaa"


def test_stop_string_rejects_empty():
    with pytest.raises(ValueError):
        StopStringMatcher([""])


@pytest.mark.parametrize(
    "text, stop",
    [
        ("The answer is 42.\nObservation: tool output follows", "\nObservation:"),
        ("我们去公园散步吧。谢谢你！然后回家。", "谢谢"),
        ("emoji 👨‍👩‍👧‍👦 stop 🛑 after", "🛑"),
    ],
)
def test_stop_strings_with_real_tokens(tok, text, stop):
    ids = tok.encode(text).ids
    detok, matcher = StreamingDetokenizer(tok), StopStringMatcher([stop])
    emitted, steps = "", 0
    for i in ids:
        emitted += matcher.feed(detok.add_token(i))
        steps += 1
        assert text[: text.index(stop)].startswith(emitted)  # nothing after the stop leaks
        if matcher.stopped:
            break
    assert matcher.stopped and emitted == text[: text.index(stop)]
    assert steps < len(ids)  # stopped before the end of the stream
