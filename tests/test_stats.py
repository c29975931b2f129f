"""Paired accuracy statistics: exact McNemar, Newcombe's paired CI, paired_accuracy."""

from __future__ import annotations

import math

import pytest

from qbench.results.stats import (binom_cdf_half, mcnemar_exact, newcombe_paired_ci, paired_accuracy, paired_from_records, wilson_interval)


@pytest.mark.parametrize("gained,lost,expected", [
    (10, 2, 2 * (1 + 12 + 66) / 4096),   # 0.038574...: R binom.test(2, 12)$p.value
    (2, 10, 2 * (1 + 12 + 66) / 4096),   # symmetric
    (6, 0, 2 / 64),                      # 0.03125
    (5, 0, 2 / 32),                      # 0.0625: five flips one way is not yet significant
    (1, 0, 1.0),
    (0, 0, 1.0),                         # nothing flipped
    (7, 7, 1.0),                         # b == c
    (3, 4, 1.0),                         # |b - c| = 1 with an odd total: capped at 1
])
def test_mcnemar_exact_known_values(gained: int, lost: int, expected: float) -> None:
    assert mcnemar_exact(gained, lost) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_reference_value_to_four_digits() -> None:
    assert round(mcnemar_exact(10, 2), 4) == 0.0386


def test_mcnemar_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_binomial_cdf_half() -> None:
    assert binom_cdf_half(2, 4) == pytest.approx(11 / 16)
    assert binom_cdf_half(-1, 4) == 0.0
    assert binom_cdf_half(4, 4) == 1.0


def test_wilson_interval_known_value() -> None:
    # 8 of 10: Wilson 95% interval (0.4902, 0.9433) (e.g. R prop.test(8, 10, correct=FALSE))
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)


def test_newcombe_paired_ci_reference_table() -> None:
    # Fagerland, Lydersen & Laake, ch. 8, Cavo et al. (2012): table [[59, 6], [16, 80]];
    # the contingencytables R package prints "estimate = -0.0621 (95% CI -0.1186 to -0.0046)"
    low, high = newcombe_paired_ci(59, 6, 16, 80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)


def test_newcombe_no_flips_keeps_a_width() -> None:
    low, high = newcombe_paired_ci(150, 0, 0, 135)
    assert low < 0 < high
    assert high - low > 0.005


def test_paired_accuracy_counts_flips_and_signs() -> None:
    # base right on the first 10, variant right on 2 of those plus 10 the base got wrong
    base = [1] * 10 + [0] * 10 + [1] * 5
    other = [1] * 2 + [0] * 8 + [1] * 10 + [1] * 5
    r = paired_accuracy(base, other)
    assert r["n"] == 25
    assert r["flips_gained"] == 10 and r["flips_lost"] == 8
    assert r["acc_base"] == pytest.approx(15 / 25) and r["acc_other"] == pytest.approx(17 / 25)
    assert r["diff"] == pytest.approx(2 / 25)
    assert r["ci_low"] < r["diff"] < r["ci_high"]
    assert r["p_value"] == pytest.approx(mcnemar_exact(10, 8))
    assert r["significant"] is False


def test_paired_accuracy_significant_loss() -> None:
    base = [1] * 10 + [0] * 2 + [1] * 50 + [0] * 30
    other = [0] * 10 + [1] * 2 + [1] * 50 + [0] * 30
    r = paired_accuracy(base, other)
    assert (r["flips_gained"], r["flips_lost"]) == (2, 10)
    assert r["p_value"] == pytest.approx(0.03857421875)
    assert r["significant"] is True
    assert r["diff"] == pytest.approx(-8 / 92)
    assert r["ci_high"] < 0


def test_small_gap_on_285_questions_is_not_a_loss() -> None:
    """The design's example: a 0.7-point gap on 285 questions (2 questions net) is noise."""
    base = [1] * 100 + [0] * 185
    other = list(base)
    for i in range(3):          # lose 3 ...
        other[i] = 0
    other[200] = 1              # ... gain 1: net -2 of 285 = -0.70 points
    r = paired_accuracy(base, other)
    assert r["diff"] == pytest.approx(-2 / 285)
    assert r["p_value"] == pytest.approx(0.625)
    assert not r["significant"]
    assert r["ci_low"] < 0 < r["ci_high"]


def test_paired_accuracy_accepts_bools_and_rejects_mismatch() -> None:
    r = paired_accuracy([True, False], [True, True])
    assert r["flips_gained"] == 1 and r["flips_lost"] == 0
    with pytest.raises(ValueError, match="differ in length"):
        paired_accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        paired_accuracy([], [])


def test_paired_from_records_aligns_on_question_id() -> None:
    base = {"question_ids": [3, 1, 2], "correct": [1, 0, 1]}
    other = {"question_ids": [1, 2, 3], "correct": [1, 1, 0]}
    r = paired_from_records(base, other)
    assert (r["flips_gained"], r["flips_lost"]) == (1, 1)
    with pytest.raises(ValueError, match="different questions"):
        paired_from_records(base, {"question_ids": [1, 2, 4], "correct": [1, 1, 1]})


def test_ci_is_inside_minus_one_one() -> None:
    low, high = newcombe_paired_ci(0, 0, 5, 0)
    assert -1.0 <= low <= high <= 1.0
    assert math.isclose((0 - 5) / 5, -1.0)
