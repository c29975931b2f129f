"""The arithmetic of the metrics, on synthetic data where the right answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qbench.host.buildflags import cmake_args, missing_features
from qbench.metrics.kld import (Options as KldOptions, _compare_rows, _top_mass, _top_rows, statistics)
from qbench.metrics.sanity import degenerate_reason
from qbench.metrics.scoring import log_softmax, mean_and_stderr


def _exact_kld(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def test_log_softmax_rows_sum_to_one() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 1000)).astype(np.float32) * 5
    lp = log_softmax(logits)
    assert np.allclose(np.exp(lp.astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)
    # shift invariance
    assert np.allclose(log_softmax(logits + 100.0), lp, atol=1e-4)


def test_mean_and_stderr_matches_llama_perplexity_formula() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    mean, se = mean_and_stderr(x)
    # llama-perplexity: sqrt((mean(x^2) - mean^2) / (N - 1)) = sqrt(1.25 / 3)
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(1.25 / 3))


def test_top_mass_kld_matches_exact_kld_when_mass_is_covered() -> None:
    rng = np.random.default_rng(1)
    base = log_softmax((rng.normal(size=(50, 4000)) * 3).astype(np.float32))
    other = log_softmax((np.log(np.exp(base.astype(np.float64)) + 1e-9) +
                         rng.normal(size=base.shape) * 0.3).astype(np.float32))
    ids, lp, counts, rest = _top_mass(base, 0.9999, 4000)
    row = np.repeat(np.arange(50), counts)
    p = np.exp(lp.astype(np.float64))
    approx = np.bincount(row, p * (lp - other[row, ids]), minlength=50)
    p_rest = np.exp(rest.astype(np.float64))
    q_rest = 1 - np.bincount(row, np.exp(other[row, ids].astype(np.float64)), minlength=50)
    approx += p_rest * (np.log(p_rest) - np.log(np.clip(q_rest, 1e-30, None)))
    exact = _exact_kld(base.astype(np.float64), other.astype(np.float64))
    assert np.all(approx <= exact + 1e-6)            # a lower bound (data processing)
    assert approx.mean() == pytest.approx(exact.mean(), rel=0.02)
    assert np.all(counts <= 4000) and np.all(counts >= 1)


def test_tail_draws_make_kld_unbiased_when_the_cap_truncates() -> None:
    # heavy tails: 100 stored tokens of 4000 keep well under the coverage target, so the
    # "rest bucket" alone underestimates KLD; the tail draws must recover it
    rng = np.random.default_rng(2)
    base = log_softmax((rng.normal(size=(500, 4000)) * 1.5).astype(np.float32))
    other = log_softmax((base.astype(np.float64) + rng.normal(size=base.shape) * 0.4
                         ).astype(np.float32))
    exact = _exact_kld(base.astype(np.float64), other.astype(np.float64))
    targets = rng.integers(0, 4000, size=500)
    opts = KldOptions(max_tokens=100, tail_samples=256)
    rows = _top_rows(base, targets, opts, seed=0)
    assert np.exp(rows["rest"].astype(np.float64)).mean() > 0.5    # most mass is in the tail
    kld = _compare_rows(rows, other, targets)["kld"]
    # the partition bound (stored tokens + one bucket for the tail), by hand
    row = np.repeat(np.arange(500), rows["counts"])
    ids = rows["ids"].astype(np.int64)
    lp, lq = rows["logp"].astype(np.float64), other[row, ids].astype(np.float64)
    p_rest = np.exp(rows["rest"].astype(np.float64))
    q_rest = 1 - np.bincount(row, np.exp(lq), minlength=500)
    lower = (np.bincount(row, np.exp(lp) * (lp - lq), minlength=500)
             + p_rest * np.log(p_rest / q_rest))
    assert lower.mean() < 0.8 * exact.mean()
    assert kld.mean() == pytest.approx(exact.mean(), rel=0.02)
    # unbiased per token, so a token may fall under the partition bound, never under 0
    assert np.all(kld >= 0.0)
    # a distribution compared with itself: exactly zero, tail included
    assert np.allclose(_compare_rows(rows, base, targets)["kld"], 0.0, atol=1e-6)
    # seeded: the same draws every time
    again = _top_rows(base, targets, opts, seed=0)
    assert np.array_equal(again["tail_ids"], rows["tail_ids"])


def test_top_mass_respects_cap() -> None:
    flat = log_softmax(np.zeros((3, 5000), dtype=np.float32))
    _, _, counts, rest = _top_mass(flat, 0.9999, 100)
    assert np.all(counts == 100)
    assert np.allclose(np.exp(rest), 1 - 100 / 5000, atol=1e-4)


def test_statistics_of_identical_distributions_is_zero_kld_and_full_agreement() -> None:
    n = 200
    nll = np.linspace(0.5, 5, n)
    t = {"kld": np.zeros(n), "same": np.ones(n, dtype=bool), "nll_q": nll, "nll_b": nll,
         "dp": np.zeros(n)}
    out = statistics(t)["values"]
    assert out["kld_mean"]["value"] == 0.0
    assert out["same_top_pct"]["value"] == 100.0
    assert out["ln_ppl_ratio"]["value"] == pytest.approx(0.0)
    assert out["ln_ppl_ratio"]["stderr"] == pytest.approx(0.0, abs=1e-9)


def test_statistics_same_top_error_formula() -> None:
    n = 1000
    same = np.zeros(n, dtype=bool)
    same[:900] = True
    t = {"kld": np.full(n, 0.01), "same": same, "nll_q": np.full(n, 2.0) + np.arange(n) * 1e-3,
         "nll_b": np.full(n, 2.0) + np.arange(n) * 1e-3, "dp": np.full(n, -0.01)}
    v = statistics(t)["values"]
    assert v["same_top_pct"]["value"] == pytest.approx(90.0)
    assert v["same_top_pct"]["stderr"] == pytest.approx(100 * math.sqrt(0.9 * 0.1 / (n - 1)))
    assert v["rms_dp_pct"]["value"] == pytest.approx(1.0)


@pytest.mark.parametrize("tokens,text,expect", [
    ([], "", "no tokens"),
    ([5] * 20, "aaaa", "token 5"),
    ([1, 2, 3] * 10, "abcabc", "loops on a 3-token pattern"),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "!!!!!!!!!!??", "mostly symbols"),
    (list(range(30)), "The Roman Empire began when Augustus took power.", None),
])
def test_degenerate_reason(tokens: list[int], text: str, expect: str | None) -> None:
    reason = degenerate_reason(tokens, text)
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and expect in reason


def test_build_flags_follow_cpu_and_never_enable_amx() -> None:
    flags = {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
             "avx512cd", "avx512_vnni", "amx_tile", "amx_int8"}
    args = cmake_args(flags)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX512=ON" in args
    assert "-DGGML_AVX512_BF16=OFF" in args        # the CPU lacks avx512_bf16
    assert "-DGGML_AMX_INT8=OFF" in args           # never AMX, even on an AMX CPU


def test_missing_features_names_what_the_cpu_lacks() -> None:
    info = "CPU : SSE3 = 1 | AVX = 1 | AVX512_BF16 = 1 | AVX_VNNI = 0 | LLAMAFILE = 1"
    assert missing_features(info, {"avx", "avx2"}) == ["AVX512_BF16"]
    assert missing_features(info, {"avx", "avx512_bf16"}) == []
