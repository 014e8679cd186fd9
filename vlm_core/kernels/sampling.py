"""Token sampling in pure NumPy: logits processors, warpers and a seeded sampler.

Modelled on mlx-lm's samplers (small pure functions over logits composed by
`make_sampler`, logits processors ``(tokens, logits) -> logits``) and llama2.c (the
sampler owns its RNG, so a run is reproducible from its seed).

Semantics follow transformers' ``generate`` (generation/logits_process.py and
``GenerationMixin._get_logits_processor``):

1. logits processors, applied for greedy *and* sampling, in this order:
   ``RepetitionPenaltyLogitsProcessor`` -> ``MinNewTokensLengthLogitsProcessor``
   (`make_logits_processors`);
2. warpers, sampling only, in this order, each with ``min_tokens_to_keep=1``:
   temperature (skipped at 1.0) -> top-k (skipped at 0) -> top-p (skipped at 1.0)
   -> min-p (no-op at 0.0);
3. softmax (float64 here) and one categorical draw from the sampler's generator.

Everything works on one sequence: logits are 1-D ``[vocab]`` (float32; float16/64
inputs are cast). Filtered entries are set to ``-inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from vlm_core.errors import ParameterError

__all__ = [
    "SamplingParams",
    "SamplingParamError",
    "LogitsProcessor",
    "Sampler",
    "make_sampler",
    "make_logits_processors",
    "repetition_penalty_processor",
    "min_new_tokens_processor",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "warp_logits",
    "softmax",
    "log_softmax",
]

# (tokens so far [seq] (prompt + generated), logits [vocab]) -> logits [vocab]
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]

NEG_INF = np.float32(-np.inf)

# Top-p: a tail whose cumulative mass is within this of (1 - top_p) counts as reaching
# it. Float32 logits carry ~1e-7 relative error, so e.g. probs [.5, .3, .15, .05] with
# top_p=0.8 keep exactly {0, 1} (the tail .15 + .05 == 0.2 is removed, as in exact
# arithmetic and in transformers' float32 computation).
_TOP_P_EPS = 1e-7

# Upper bounds, so a typo is refused rather than silently meaning "off": OpenAI's temperature range is 0-2
# (past 2 the distribution is close to uniform noise); top_k past any vocabulary (the largest are ~262k) keeps
# every token, which top_k=0 already says; a repetition penalty past 10 divides a repeated token's logit
# by more than any model's logit range, so the value only says "never repeat" (1e308 was accepted).
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 1_000_000
MAX_REPETITION_PENALTY = 10.0


# ----------------------------------------------------------------------------- params


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


class SamplingParamError(ParameterError):
    """A sampling option out of its range.

    `param` is the SamplingParams field (``top_p``), which the message names; `flag` is the CLI flag
    (``--top-p``) and `naming(name)` the same message naming something else (a flag, a JSON field).
    """

    def __init__(self, param: str, requirement: str, value):
        self.param, self.requirement, self.value = param, requirement, value
        super().__init__(self.naming(param), param)

    @property
    def flag(self) -> str:
        return "--" + self.param.replace("_", "-")

    def naming(self, name: str) -> str:
        """The one-line message with the option called `name`."""
        return f"{name} must be {self.requirement}, got {self.value!r}"


@dataclass
class SamplingParams:
    """Decoding options (CLI flags in brackets), checked when made. ``temperature == 0`` means greedy.

    temperature         [--temperature]         in [0, 2] (OpenAI's range); logits are divided by it
    top_k               [--top-k]               in [0, 1e6]; keep the k most likely (0 = off)
    top_p               [--top-p]               in (0, 1]; nucleus mass (1 = off)
    min_p               [--min-p]               in [0, 1]; keep p >= min_p * p_max (0 = off)
    repetition_penalty  [--repetition-penalty]  in (0, 10]; CTRL-style penalty (1 = off)
    greedy              [--greedy]              argmax, ignores the warpers
    seed                [--seed]                sampler RNG seed (None = from OS entropy)

    Raises:
        SamplingParamError (a ValueError) naming the field, e.g. ``temperature must be a number
        from 0 to 2 (0 = greedy), got -1``.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: Optional[int] = None

    def __post_init__(self):
        self.validate()

    @property
    def is_greedy(self) -> bool:
        """True when decoding is argmax (``greedy`` set or ``temperature == 0``)."""
        return bool(self.greedy) or self.temperature == 0

    def validate(self) -> "SamplingParams":
        """Check every field (again, if one was changed after construction); returns self.

        Raises:
            SamplingParamError: one line naming the field, its valid range and the value.
        """
        t, k, p, m, r = self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        # Written as `not (ok)` so NaN always fails.
        if not (_is_real(t) and 0 <= t <= MAX_TEMPERATURE):
            raise SamplingParamError("temperature", f"a number from 0 to {MAX_TEMPERATURE:g} (0 = greedy)", t)
        if not (_is_int(k) and 0 <= k <= MAX_TOP_K):
            raise SamplingParamError("top_k", f"an integer from 0 to {MAX_TOP_K:,} (0 = off)", k)
        if not (_is_real(p) and 0 < p <= 1):
            raise SamplingParamError("top_p", "in (0, 1] (1 = off)", p)
        if not (_is_real(m) and 0 <= m <= 1):
            raise SamplingParamError("min_p", "in [0, 1] (0 = off)", m)
        if not (_is_real(r) and 0 < r <= MAX_REPETITION_PENALTY):
            raise SamplingParamError("repetition_penalty", f"a number > 0 and at most {MAX_REPETITION_PENALTY:g} "
                                                           f"(1 = off)", r)
        if not (self.seed is None or (_is_int(self.seed) and self.seed >= 0)):
            raise SamplingParamError("seed", "a non-negative integer", self.seed)
        return self


# ----------------------------------------------------------------------------- helpers


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64. ``-inf`` entries get probability 0."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    z = x - np.where(np.isfinite(m), m, 0.0)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def _as_logits(logits) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim != 1:
        raise ValueError(f"expected 1-D logits [vocab], got shape {x.shape}")
    return x.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- processors


def repetition_penalty_processor(penalty: float) -> LogitsProcessor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` for one sequence.

    Every distinct id in `tokens` (the prompt and the generated ids, as given) gets,
    once: ``logit * penalty`` if ``logit < 0`` else ``logit / penalty``. Ids outside
    ``[0, vocab)`` are ignored (the model cannot emit them).

    The processor keeps the distinct ids it has seen, so a sequence that grows between
    calls (each call's `tokens` extending the last's, as a decoding sequence's do) costs
    only its new tokens and a gather/scatter of the distinct ids, not a sort of every id
    each step; `tokens` shorter than the last call's start it over.
    """
    if not (_is_real(penalty) and 0 < penalty < math.inf):
        raise SamplingParamError("repetition_penalty", "a finite number > 0 (1 = off)", penalty)
    pen = np.float32(penalty)
    state = {"counted": 0, "seen": None, "ids": np.zeros(16, np.int64), "n": 0}  # ids[:n]: distinct, first-seen order

    def absorb(tokens: Sequence[int], vocab: int) -> np.ndarray:
        if state["seen"] is None or state["seen"].shape[0] != vocab or len(tokens) < state["counted"]:
            state.update(counted=0, seen=np.zeros(vocab, bool), n=0)
        seen, ids, n = state["seen"], state["ids"], state["n"]
        for token in tokens[state["counted"]:]:
            token = int(token)
            if 0 <= token < vocab and not seen[token]:
                seen[token] = True
                if n == len(ids):  # doubled: appending stays O(1) amortised
                    ids = np.concatenate([ids, np.zeros_like(ids)])
                ids[n] = token
                n += 1
        state.update(counted=len(tokens), ids=ids, n=n)
        return ids[:n]  # [n_distinct]

    def process(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        out = _as_logits(logits).copy()  # [vocab]
        ids = absorb(tokens, out.shape[0])
        s = out[ids]
        out[ids] = np.where(s < 0, s * pen, s / pen)
        return out

    return process


def min_new_tokens_processor(eos_ids: int | Iterable[int], min_new_tokens: int, prompt_len: int) -> LogitsProcessor:
    """transformers' ``MinNewTokensLengthLogitsProcessor`` for one sequence.

    While ``len(tokens) - prompt_len < min_new_tokens`` every EOS logit is ``-inf``.
    EOS ids outside ``[0, vocab)`` are ignored.
    """
    for name, v in (("min_new_tokens", min_new_tokens), ("prompt_len", prompt_len)):
        if not (_is_int(v) and v >= 0):
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    eos = np.asarray([eos_ids] if _is_int(eos_ids) else list(eos_ids), dtype=np.int64).reshape(-1)  # [n_eos]

    def process(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        out = _as_logits(logits).copy()  # [vocab]
        if len(tokens) - prompt_len < min_new_tokens:
            out[eos[(eos >= 0) & (eos < out.shape[0])]] = NEG_INF
        return out

    return process


def make_logits_processors(
    params: SamplingParams,
    eos_ids: int | Iterable[int] = (),
    min_new_tokens: int = 0,
    prompt_len: int = 0,
) -> list[LogitsProcessor]:
    """Processors implied by `params`, in transformers' order (penalty, then min-new-tokens)."""
    procs: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        procs.append(repetition_penalty_processor(params.repetition_penalty))
    eos = [eos_ids] if _is_int(eos_ids) else list(eos_ids)
    if min_new_tokens > 0 and eos:
        procs.append(min_new_tokens_processor(eos, min_new_tokens, prompt_len))
    return procs


# ----------------------------------------------------------------------------- warpers


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``TemperatureLogitsWarper``: float32 ``logits / temperature`` (no-op at 1.0)."""
    x = _as_logits(logits)
    if temperature == 1.0:
        return x
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to warp (use greedy for 0), got {temperature!r}")
    return x / np.float32(temperature)


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """``TopKLogitsWarper``: drop logits strictly below the k-th largest (ties at it survive)."""
    x = _as_logits(logits)
    if top_k <= 0 or top_k >= x.shape[0]:
        return x
    kth = np.partition(x, x.shape[0] - top_k)[x.shape[0] - top_k]  # k-th largest value
    return np.where(x < kth, NEG_INF, x)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """``TopPLogitsWarper``: nucleus filtering (no-op at 1.0).

    Sort ascending (stable, so among equal logits the lower index goes first), remove
    tokens whose cumulative probability is ``<= 1 - top_p``, always keep the most
    likely one. Equivalently: keep the smallest most-likely prefix with mass >= top_p.
    """
    x = _as_logits(logits)
    if top_p >= 1.0:
        return x
    order = np.argsort(x, kind="stable")  # [vocab] ascending
    cum = np.cumsum(softmax(x[order]))  # [vocab] float64
    remove_sorted = cum <= (1.0 - top_p) + _TOP_P_EPS
    remove_sorted[-1] = False  # min_tokens_to_keep = 1
    remove = np.empty_like(remove_sorted)
    remove[order] = remove_sorted
    return np.where(remove, NEG_INF, x)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """``MinPLogitsWarper``: drop tokens with ``p < min_p * max(p)`` (argmax always kept)."""
    x = _as_logits(logits)
    if min_p <= 0.0:
        return x
    probs = softmax(x)  # [vocab] float64
    remove = probs < min_p * probs.max()
    remove[np.argmax(probs)] = False  # min_tokens_to_keep = 1
    return np.where(remove, NEG_INF, x)


def warp_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature -> top-k -> top-p -> min-p over the full ``[vocab]`` (float32, -inf = cut)."""
    x = apply_temperature(logits, params.temperature)
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return apply_min_p(x, params.min_p)


# ----------------------------------------------------------------------------- sampler


class Sampler:
    """``sampler(logits [vocab]) -> token id``, with its own ``np.random.Generator``.

    Greedy: argmax (first index on ties). Otherwise the warpers of `warp_logits` are
    applied and one token is drawn from the float64 softmax. After top-k only the
    surviving candidates are carried (same result, cheaper on a 150k vocab).
    """

    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        x = _as_logits(logits)
        if self.params.is_greedy:
            return int(np.argmax(x))
        idx, probs = self._candidates(x)
        return int(idx[self._draw(probs)])

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The full float64 distribution ``[vocab]`` this sampler draws from (one-hot if greedy)."""
        x = _as_logits(logits)
        out = np.zeros(x.shape[0], dtype=np.float64)
        if self.params.is_greedy:
            out[np.argmax(x)] = 1.0
        else:
            idx, p = self._candidates(x)
            out[idx] = p
        return out

    def _candidates(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(surviving token ids [n] ascending, their probabilities [n] float64)."""
        p = self.params
        x = apply_temperature(x, p.temperature)
        idx = np.flatnonzero(apply_top_k(x, p.top_k) > NEG_INF)  # [n], keeps index order
        if idx.size == 0:
            raise ValueError("all logits are -inf: nothing to sample")
        sub = apply_min_p(apply_top_p(x[idx], p.top_p), p.min_p)  # [n]
        keep = sub > NEG_INF
        return idx[keep], softmax(sub[keep])

    def _draw(self, probs: np.ndarray) -> int:
        """Inverse-CDF draw of one index from `probs` [n] using ``self.rng``."""
        cdf = np.cumsum(probs)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return min(i, probs.shape[0] - 1 - int(np.argmax(probs[::-1] > 0)))  # never a p=0 tail


def make_sampler(params: SamplingParams) -> Sampler:
    """Validate `params` and build a `Sampler` seeded from ``params.seed``."""
    return Sampler(params)
