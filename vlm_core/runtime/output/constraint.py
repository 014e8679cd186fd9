"""Constrained decoding: a JSON schema, any JSON object, or a Lark grammar shapes what a request may say.

Built on llguidance (the `structured` extra: `pip install 'vlm-core[structured]'`), as mlx-vlm, vLLM,
llama-server and ONNX Runtime GenAI do: it reads the model's `tokenizer.json` and, for each step,
gives a bitmask of the tokens that keep the text inside the grammar. Each request gets its own matcher,
so constrained and free requests decode in the same batch.

    compiler = GrammarCompiler("model/tokenizer.json", vocab_size=151936, eos_token_ids=[151645])
    grammar = compiler.compile({"type": "json_schema", "json_schema": {"name": "r", "schema": {...}}})
    constraint = compiler.constraint(grammar)      # one per request
    logits = constraint.mask(logits)               # disallowed tokens -> -inf (before processors and sampler)
    constraint.advance(token)                      # after sampling
    constraint.finished                            # the grammar cannot go on: the answer ends ("stop")

`response_format` takes OpenAI's forms, `{"type": "text"}` (no constraint), `{"type": "json_object"}`
(any JSON object) and `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`, plus
`{"type": "grammar", "grammar": LARK}` (a Lark grammar as llguidance reads it). JSON is generated on
one line with `", "` and `": "` between items (no other whitespace): a model cannot pad an answer with
endless blank lines, which flexible whitespace allows and small or unsure models do.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from vlm_core.errors import ParameterError

# llguidance's JSON options: compact, single-line JSON (see the module docstring).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FORMAT_TYPES = ("text", "json_object", "json_schema", "grammar")
INSTALL_HINT = "pip install 'vlm-core[structured]' (it adds llguidance)"


def _llguidance(param: str = "response_format"):
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the mask helpers)
    except ImportError:
        raise ParameterError(f"{param} needs the llguidance package, which is not installed: "
                                    f"{INSTALL_HINT}", param) from None
    return llguidance


def grammar_source(response_format, param: str = "response_format") -> str | None:
    """A response_format value -> llguidance's grammar text, or None for plain text.

    Checks the structure only (no llguidance needed); `compile` checks the schema or grammar itself.
    Raises ParameterError naming `param` (and the part at fault in the message)."""
    if not isinstance(response_format, dict):
        raise ParameterError(f"{param} must be an object like {{\"type\": \"json_object\"}}, got "
                                    f"{json.dumps(response_format, default=repr)[:80]}", param)
    kind = response_format.get("type")
    if kind not in FORMAT_TYPES:
        raise ParameterError(f"{param}.type must be one of {', '.join(FORMAT_TYPES)}, got "
                                    f"{json.dumps(kind, default=repr)[:40]}", param)
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_grammar({"type": "object"})
    if kind == "grammar":
        lark = response_format.get("grammar")
        if not isinstance(lark, str) or not lark.strip():
            raise ParameterError(f"{param}.grammar must be a non-empty string holding a Lark grammar", param)
        return json.dumps({"grammars": [{"lark_grammar": lark}]})
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ParameterError(f"{param}.json_schema must be an object with 'name' and 'schema'", param)
    if "name" in spec and not isinstance(spec["name"], str):
        raise ParameterError(f"{param}.json_schema.name must be a string", param)
    if "strict" in spec and not isinstance(spec["strict"], bool):
        raise ParameterError(f"{param}.json_schema.strict must be true or false", param)
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ParameterError(f"{param}.json_schema.schema must be a JSON schema (an object), got "
                                    f"{json.dumps(schema, default=repr)[:80]}", param)
    return _json_grammar(schema)


def _json_grammar(schema) -> str:
    """llguidance's grammar text for a JSON schema with JSON_OPTIONS (what grammar_from_json_schema writes)."""
    options = schema.get("x-guidance")
    schema = {**schema, "x-guidance": {**(options if isinstance(options, dict) else {}), **JSON_OPTIONS}}
    return json.dumps({"grammars": [{"json_schema": schema}]})


@dataclass(frozen=True)
class Grammar:
    """A compiled, checked grammar; `compiler.constraint(grammar)` starts a matcher from it (cheap)."""

    text: str
    matcher: object  # a pristine llguidance.LLMatcher, copied for each request


class Constraint:
    """One request's position in its grammar.

    Args:
        matcher: an llguidance.LLMatcher of its own.
        vocab_size: the width of the model's logits.
    """

    def __init__(self, matcher, vocab_size: int):
        import llguidance.numpy as llg_numpy

        self.matcher = matcher
        self.vocab_size = vocab_size
        self._fill = llg_numpy.fill_next_token_bitmask
        self.bitmask = llg_numpy.allocate_token_bitmask(1, vocab_size)  # [1, ceil(vocab / 32)] int32

    @property
    def finished(self) -> bool:
        """True when the grammar allows nothing more (only an end of text): the answer is complete."""
        return self.matcher.is_stopped()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits [vocab] -> a copy with every token the grammar does not allow now at -inf.

        EOS ids are allowed only where the grammar may end."""
        self._fill(self.matcher, self.bitmask)
        self._check()
        # One bit per token, lowest bit first. Unpacking the bits is ~2.5x faster than
        # llguidance.numpy.apply_token_bitmask_inplace on a 152k vocabulary (0.22 vs 0.55 ms).
        allowed = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def forced_tokens(self, limit: int) -> list:
        """The tokens the grammar forces from here (llguidance's fast-forward tokens), at most `limit`: the
        keys, quotes and separators of a JSON schema, the rest of a unique enum value. Nothing is consumed."""
        if limit <= 0 or self.matcher.is_stopped():
            return []
        tokens = self.matcher.compute_ff_tokens()
        self._check()
        return [int(t) for t in tokens[:limit]]

    def advance(self, token_id: int) -> None:
        """Move past a sampled token (one `mask` allowed)."""
        self.matcher.consume_token(int(token_id))
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():  # cannot happen for tokens the mask allowed; a bug if it does
            raise RuntimeError(f"grammar matcher error: {self.matcher.get_error()}")


class GrammarCompiler:
    """Compiles response formats against one model's tokenizer; compiled grammars are cached by their text.

    The llguidance tokenizer is built on first use (about 2 s for a 152k vocabulary), not when the model
    loads. Thread-safe: requests compile on their own threads.

    Args:
        tokenizer_file: the exported folder's tokenizer.json.
        vocab_size: the width of the model's logits (the embedding table's rows; may exceed the tokenizer's).
        eos_token_ids: ids that end an answer (the manifest's special_tokens.eos_token_ids).
        cache_size: compiled grammars kept (least recently used dropped).
    """

    def __init__(self, tokenizer_file: str, vocab_size: int, eos_token_ids, cache_size: int = 64):
        self.tokenizer_file, self.vocab_size = tokenizer_file, int(vocab_size)
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.cache_size = cache_size
        self._tokenizer = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self, param: str = "response_format"):
        """llguidance's LLTokenizer for the model (built once)."""
        llguidance = _llguidance(param)
        with self._lock:
            if self._tokenizer is None:
                with open(self.tokenizer_file, encoding="utf-8") as f:
                    self._tokenizer = llguidance.LLTokenizer(f.read(), n_vocab=self.vocab_size,
                                                             eos_token=self.eos_token_ids or None)
            return self._tokenizer

    def compile(self, response_format, param: str = "response_format") -> Grammar | None:
        """A response_format (or an already compiled Grammar) -> Grammar, or None for plain text.

        Raises ParameterError naming `param` when the value is malformed, the schema or grammar does not
        compile, or llguidance is not installed."""
        if response_format is None or isinstance(response_format, Grammar):
            return response_format
        text = grammar_source(response_format, param)
        if text is None:
            return None
        with self._lock:
            grammar = self._cache.get(text)
            if grammar is not None:
                self._cache.move_to_end(text)
                return grammar
        llguidance = _llguidance(param)
        tokenizer = self.tokenizer(param)
        error = llguidance.LLMatcher.validate_grammar(text, tokenizer)
        if error:
            raise ParameterError(f"{param} cannot be compiled: {_one_line(error)}", param)
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if matcher.is_error():
            raise ParameterError(f"{param} cannot be compiled: {_one_line(matcher.get_error())}", param)
        grammar = Grammar(text, matcher)
        with self._lock:
            self._cache[text] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def constraint(self, grammar: Grammar) -> Constraint:
        """A fresh matcher at the start of `grammar`, for one request."""
        return Constraint(grammar.matcher.deep_copy(), self.vocab_size)


def check_grammar(response_format, param: str = "response_format") -> None:
    """Check a response_format without a tokenizer (a CLI checks its files before loading the model).

    Raises ParameterError naming `param`, as `GrammarCompiler.compile` would for most mistakes."""
    text = grammar_source(response_format, param)
    if text is None:
        return
    is_error, messages = _llguidance(param).LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise ParameterError(f"{param} cannot be compiled: {_one_line(messages[0])}", param)


def _one_line(message: str) -> str:
    """llguidance's message on one line (its Lark errors draw a caret under the source over several)."""
    return " ".join(message.split())
