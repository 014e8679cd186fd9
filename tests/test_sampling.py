"""Tests for kernels/sampling.py: hand-made distributions, statistics, and parity with
transformers' generate processors/warpers (torch/transformers are test-only here)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from vlm_core.kernels.sampling import (
    SamplingParamError,
    SamplingParams,
    apply_min_p,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    log_softmax,
    make_logits_processors,
    make_sampler,
    min_new_tokens_processor,
    repetition_penalty_processor,
    softmax,
    warp_logits,
)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)


def apply_logits_processors(processors, tokens, logits):
    """Run `processors` left to right on logits [vocab] (what the engine's Sequence does each step)."""
    out = np.asarray(logits, dtype=np.float32)
    for proc in processors:
        out = proc(tokens, out)
    return out


def draw(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    sampler = make_sampler(params)
    return np.array([sampler(logits) for _ in range(n)])


def counts(ids: np.ndarray, vocab: int) -> np.ndarray:
    return np.bincount(ids, minlength=vocab)


# ----------------------------------------------------------------------------- helpers


def test_softmax_and_log_softmax():
    x = np.array([1000.0, 999.0, -np.inf], dtype=np.float32)
    p = softmax(x)
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, [1 / (1 + math.e**-1), math.e**-1 / (1 + math.e**-1), 0.0])
    np.testing.assert_allclose(np.exp(log_softmax(x)), p)
    assert log_softmax(x)[2] == -np.inf
    np.testing.assert_allclose(softmax(LOGITS), PROBS, rtol=1e-6)


# ----------------------------------------------------------------------------- samplers


def test_greedy_picks_argmax():
    logits = np.array([0.1, 2.0, -1.0, 1.9], dtype=np.float32)
    for params in (SamplingParams(greedy=True, temperature=1.9), SamplingParams(temperature=0.0)):
        assert params.is_greedy
        assert draw(params, logits, 20).tolist() == [1] * 20
    # ties -> first index, like torch.argmax / np.argmax
    assert make_sampler(SamplingParams(greedy=True))(np.array([3.0, 5.0, 5.0], np.float32)) == 1


def test_top_k_1_is_deterministic():
    rng = np.random.default_rng(0)
    for seed in range(5):
        logits = rng.normal(size=500).astype(np.float32)
        ids = draw(SamplingParams(top_k=1, temperature=1.5, seed=seed), logits, 50)
        assert set(ids.tolist()) == {int(np.argmax(logits))}


def test_top_k_keeps_k_most_likely():
    ids = draw(SamplingParams(top_k=2, seed=0), LOGITS, 3000)
    c = counts(ids, 4)
    assert c[2] == c[3] == 0
    # renormalised over {0, 1}: p0 = 0.625; std of the mean at n=3000 is ~0.009
    assert abs(c[0] / c.sum() - 0.625) < 0.04


def test_top_p_keeps_exact_nucleus():
    # descending cumulative mass: 0.5, 0.8, 0.95, 1.0 -> nucleus for 0.8 is {0, 1}
    np.testing.assert_array_equal(np.isfinite(apply_top_p(LOGITS, 0.8)), [True, True, False, False])
    np.testing.assert_array_equal(np.isfinite(apply_top_p(LOGITS, 0.81)), [True, True, True, False])
    np.testing.assert_array_equal(np.isfinite(apply_top_p(LOGITS, 0.4)), [True, False, False, False])
    np.testing.assert_array_equal(np.isfinite(apply_top_p(LOGITS, 1.0)), [True] * 4)
    ids = draw(SamplingParams(top_p=0.8, seed=1), LOGITS, 5000)
    c = counts(ids, 4)
    assert set(np.flatnonzero(c).tolist()) == {0, 1}
    assert abs(c[0] / c.sum() - 0.625) < 0.03  # 0.5 / 0.8; std ~0.007 at n=5000


def test_top_p_tiny_keeps_only_argmax():
    ids = draw(SamplingParams(top_p=1e-6, seed=2), LOGITS, 200)
    assert set(ids.tolist()) == {0}


def test_min_p():
    # threshold = min_p * p_max = 0.35 * 0.5 = 0.175 -> keeps {0, 1}
    np.testing.assert_array_equal(np.isfinite(apply_min_p(LOGITS, 0.35)), [True, True, False, False])
    # 0.2 * 0.5 = 0.1 -> keeps {0, 1, 2}
    np.testing.assert_array_equal(np.isfinite(apply_min_p(LOGITS, 0.2)), [True, True, True, False])
    # min_p = 1 keeps only the max (and all ties with it)
    np.testing.assert_array_equal(np.isfinite(apply_min_p(np.float32([1, 3, 3, 0]), 1.0)), [0, 1, 1, 0])
    ids = draw(SamplingParams(min_p=0.35, seed=3), LOGITS, 3000)
    assert set(np.flatnonzero(counts(ids, 4)).tolist()) == {0, 1}


# Chi-square critical value for df=4 at significance 0.001. With a fixed seed the test is
# deterministic; a correct sampler passes for 99.9% of seeds, while a wrong temperature
# (e.g. multiplying instead of dividing, or none at all) gives chi2 in the thousands
# at n=20000.
CHI2_DF4_P001 = 18.467


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    n = 20000
    c = counts(draw(SamplingParams(temperature=temperature, seed=1234), logits, n), 5)
    expected = n * softmax(logits / temperature)
    chi2 = float(np.sum((c - expected) ** 2 / expected))
    assert chi2 < CHI2_DF4_P001, (c, expected)
    # and it is clearly *not* the distribution of a neighbouring temperature
    wrong = n * softmax(logits / (temperature * 1.5))
    assert float(np.sum((c - wrong) ** 2 / wrong)) > 10 * CHI2_DF4_P001


def test_same_seed_same_sequence_different_seed_differs():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    a = draw(SamplingParams(temperature=1.0, seed=42), logits, 64)
    b = draw(SamplingParams(temperature=1.0, seed=42), logits, 64)
    c = draw(SamplingParams(temperature=1.0, seed=43), logits, 64)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampler_never_draws_filtered_tokens_large_vocab():
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=3.0, size=151936).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=7)
    allowed = np.flatnonzero(np.isfinite(warp_logits(logits, params)))
    ids = draw(params, logits, 200)
    assert set(ids.tolist()) <= set(allowed.tolist())
    np.testing.assert_allclose(make_sampler(params).probs(logits), softmax(warp_logits(logits, params)), atol=1e-12)


def test_ties():
    # top-k keeps every token tied with the k-th value (transformers: `scores < kth`)
    x = np.float32([1.0, 2.0, 2.0, 2.0, 0.0])
    np.testing.assert_array_equal(np.isfinite(apply_top_k(x, 2)), [0, 1, 1, 1, 0])
    # top-p sorts ascending with a stable sort: among equal logits the lower ids go
    # first and are removed first
    np.testing.assert_array_equal(np.isfinite(apply_top_p(np.zeros(8, np.float32), 0.5)), [0] * 4 + [1] * 4)


# ----------------------------------------------------------------------------- parity with transformers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig  # noqa: E402
from transformers.generation import logits_process as hf_lp  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402


def hf_processors(gen_config: GenerationConfig, prompt_len: int):
    """Run transformers' own `_get_logits_processor`, so its ordering is what we test."""
    gen_config._eos_token_tensor = (
        torch.tensor(gen_config.eos_token_id) if gen_config.eos_token_id is not None else None
    )
    fake_model = SimpleNamespace(
        config=SimpleNamespace(is_encoder_decoder=False),
        _merge_criteria_processor_list=lambda default, custom: default,
    )
    return GenerationMixin._get_logits_processor(
        fake_model, generation_config=gen_config, input_ids_seq_length=prompt_len, device="cpu"
    )


def run_hf(procs, tokens, logits: np.ndarray) -> np.ndarray:
    out = procs(torch.tensor([tokens]), torch.from_numpy(logits.copy())[None])
    return out[0].numpy()


def assert_same_logits(ours: np.ndarray, ref: np.ndarray):
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    keep = np.isfinite(ref)
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-6, atol=1e-6)


GRID = [
    dict(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r)
    for t in (0.7, 1.0, 1.6)
    for k in (0, 1, 50)
    for p in (1.0, 0.9, 0.3)
    for m in (0.0, 0.05)
    for r in (1.0, 1.3)
]


@pytest.mark.parametrize("opts", GRID, ids=lambda o: "-".join(f"{k[:4]}{v}" for k, v in o.items()))
def test_pipeline_matches_transformers_generate(opts):
    vocab, prompt_len, min_new, eos = 512, 12, 3, [7, 9]
    rng = np.random.default_rng(abs(hash(tuple(opts.values()))) % 2**32)
    logits = (rng.normal(size=vocab) * 3).astype(np.float32)
    logits[eos] += 4.0  # make EOS likely so that masking it matters
    tokens = rng.integers(0, vocab, size=prompt_len + 1).tolist()  # 1 token generated so far
    params = SamplingParams(**opts)

    gen = GenerationConfig(
        do_sample=True, eos_token_id=eos, min_new_tokens=min_new, **{**opts, "min_p": opts["min_p"] or None}
    )
    ref = run_hf(hf_processors(gen, prompt_len), tokens, logits)

    procs = make_logits_processors(params, eos_ids=eos, min_new_tokens=min_new, prompt_len=prompt_len)
    ours = warp_logits(apply_logits_processors(procs, tokens, logits), params)
    assert_same_logits(ours, ref)
    assert np.all(np.isneginf(ours[eos]))
    # the sampler draws from exactly softmax(transformers' warped scores)
    probs = make_sampler(params).probs(apply_logits_processors(procs, tokens, logits))
    np.testing.assert_allclose(probs, softmax(ref), atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_individual_warpers_match_transformers(seed):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=2000) * 2).astype(np.float32)
    t = torch.from_numpy(logits)[None]
    for temp in (0.3, 1.7):
        assert_same_logits(apply_temperature(logits, temp), hf_lp.TemperatureLogitsWarper(temp)(None, t)[0].numpy())
    for k in (1, 5, 100, 1999, 5000):
        assert_same_logits(apply_top_k(logits, k), hf_lp.TopKLogitsWarper(k)(None, t)[0].numpy())
    for p in (0.01, 0.2, 0.5, 0.95, 0.999):
        assert_same_logits(apply_top_p(logits, p), hf_lp.TopPLogitsWarper(p)(None, t)[0].numpy())
    for m in (0.0, 0.01, 0.1, 0.5, 1.0):
        assert_same_logits(apply_min_p(logits, m), hf_lp.MinPLogitsWarper(m)(None, t)[0].numpy())


def test_ties_match_transformers():
    x = np.float32([1.0, 2.0, 2.0, 2.0, 0.0])
    assert_same_logits(apply_top_k(x, 2), hf_lp.TopKLogitsWarper(2)(None, torch.from_numpy(x)[None])[0].numpy())
    z = np.zeros(8, np.float32)
    assert_same_logits(apply_top_p(z, 0.5), hf_lp.TopPLogitsWarper(0.5)(None, torch.from_numpy(z)[None])[0].numpy())


@pytest.mark.parametrize("penalty", [0.5, 1.2, 3.0])
def test_repetition_penalty_matches_transformers(penalty):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=300).astype(np.float32)
    logits[5] = 0.0
    tokens = [5, 3, 3, 3, 250, 17, 17, 299, 0]  # duplicates are penalised once
    ours = repetition_penalty_processor(penalty)(tokens, logits)
    ref = run_hf(hf_lp.RepetitionPenaltyLogitsProcessor(penalty), tokens, logits)
    np.testing.assert_array_equal(ours, ref)
    assert ours[3] == (logits[3] * penalty if logits[3] < 0 else logits[3] / penalty)
    untouched = np.setdiff1d(np.arange(300), tokens)
    np.testing.assert_array_equal(ours[untouched], logits[untouched])
    assert ours is not logits


@pytest.mark.parametrize("generated", [0, 2, 3, 5])
def test_min_new_tokens_matches_transformers(generated):
    prompt_len, min_new, eos = 4, 3, [1, 6]
    logits = np.random.default_rng(2).normal(size=10).astype(np.float32)
    tokens = list(range(prompt_len + generated))
    ours = min_new_tokens_processor(eos, min_new, prompt_len)(tokens, logits)
    ref = run_hf(hf_lp.MinNewTokensLengthLogitsProcessor(prompt_len, min_new, eos), tokens, logits)
    np.testing.assert_array_equal(ours, ref)
    assert np.all(np.isneginf(ours[eos])) == (generated < min_new)
    # a single int EOS works too
    assert np.isneginf(min_new_tokens_processor(6, min_new, prompt_len)(tokens, logits)[6]) == (generated < min_new)


def test_make_logits_processors_defaults_are_noops():
    assert make_logits_processors(SamplingParams()) == []
    assert make_logits_processors(SamplingParams(), eos_ids=[2], min_new_tokens=0) == []
    assert len(make_logits_processors(SamplingParams(repetition_penalty=1.1), eos_ids=2, min_new_tokens=1)) == 2


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "opts, name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=2.01), "temperature"),  # OpenAI's range is 0-2
        (dict(temperature=1e30), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.2), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=10**20), "top_k"),  # past any vocabulary
        (dict(min_p=-0.01), "min_p"),
        (dict(min_p=1.01), "min_p"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(repetition_penalty=1e308), "repetition_penalty"),  # past MAX_REPETITION_PENALTY
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_values_are_refused_at_construction_naming_the_parameter(opts, name):
    """The API caller wrote `temperature=`, so the message says `temperature`, not the CLI's `--temperature`."""
    with pytest.raises(SamplingParamError) as exc:
        SamplingParams(**opts)
    message = str(exc.value)
    assert message.startswith(f"{name} must be "), message
    assert "--" not in message and "\n" not in message
    assert exc.value.param == name and isinstance(exc.value, ValueError)
    assert exc.value.flag == "--" + name.replace("_", "-")
    assert exc.value.naming(exc.value.flag).startswith(f"{exc.value.flag} must be ")


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 1.5), ("top_k", -2), ("seed", -1)])
def test_a_field_changed_after_construction_is_refused_by_validate_and_make_sampler(field, value):
    params = SamplingParams()
    setattr(params, field, value)
    with pytest.raises(SamplingParamError, match=f"^{field} must be"):
        params.validate()
    with pytest.raises(SamplingParamError, match=f"^{field} must be"):
        make_sampler(params)


def test_repetition_penalty_processor_names_the_parameter():
    with pytest.raises(SamplingParamError, match="^repetition_penalty must be"):
        repetition_penalty_processor(0.0)


def test_valid_edge_values():
    for opts in (dict(temperature=0.0), dict(top_p=1.0), dict(top_k=0), dict(min_p=0.0), dict(min_p=1.0),
                 dict(repetition_penalty=1e-3), dict(seed=0), dict(top_k=np.int64(5))):
        SamplingParams(**opts).validate()
