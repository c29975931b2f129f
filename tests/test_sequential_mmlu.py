"""The sequential plan keeps its error rate on MMLU too: simulated variants whose true drop
sits at, just outside and well inside claim 1's "lossless" threshold (a drop within 1 point,
no significant drop), their questions grown look by look as ``--until-decided`` grows them
(stop when the verdict is no longer "indistinguishable"), get the wrong verdict at most alpha
of the time - judged with the product's own interval (Newcombe's paired), test (exact
McNemar) and rule (qbench.report.claims.lossless_on_mmlu) at the plan's level; re-judging at
95 % after every look would not keep the rate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from qbench.report.claims import CONTRADICTED, SUPPORTED, UNRESOLVED, lossless_on_mmlu
from qbench.results.sequential import level, looks
from qbench.results.stats import mcnemar_exact, newcombe_paired_ci

PLAN = looks(57, 14042, 2.0)      # the smoke suite's subset, up to all of MMLU's test split
BASE_ACC = 0.60                   # a model that discriminates (an 8B answers ~0.65)
FLIPS = 0.06                      # questions that change answer correctness, either way
SEEDS = 1500


def _run(drop_pts: float, rng: np.random.Generator, lvl: float) -> tuple[str, int]:
    """One variant measured until decided: (verdict, questions used)."""
    lost = (FLIPS + drop_pts / 100) / 2          # base right, variant wrong
    gained = (FLIPS - drop_pts / 100) / 2        # base wrong, variant right
    probs = [BASE_ACC - lost, gained, lost, 1 - BASE_ACC - gained]  # both, +, -, neither
    counts = np.zeros(4, dtype=int)
    z = float(sps.norm.ppf(1 - (1 - lvl) / 2))
    verdict = UNRESOLVED
    for n in PLAN:
        counts += rng.multinomial(n - int(counts.sum()), probs)
        both, gain, lose, neither = (int(c) for c in counts)
        lo, _ = newcombe_paired_ci(both, gain, lose, neither, z)   # variant - base
        verdict = lossless_on_mmlu(mcnemar_exact(gain, lose), (gain - lose) / n, -100 * lo,
                                   lvl)
        if verdict != UNRESOLVED:
            return verdict, n
    return verdict, PLAN[-1]


@pytest.mark.parametrize("drop_pts", [1.0, 1.3])
def test_a_drop_at_or_beyond_the_threshold_is_called_lossless_at_most_alpha(
        drop_pts: float) -> None:
    rng = np.random.default_rng(int(drop_pts * 100))
    lvl = level(0.05, len(PLAN))
    wrong = sum(_run(drop_pts, rng, lvl)[0] == SUPPORTED for _ in range(SEEDS))
    print(f"\ntrue drop {drop_pts} pts: called lossless {wrong}/{SEEDS}")
    assert wrong / SEEDS <= 0.05


def test_a_lossless_variant_is_rarely_called_lossy_and_mostly_decided() -> None:
    rng = np.random.default_rng(7)
    lvl = level(0.05, len(PLAN))
    outcomes = [_run(0.0, rng, lvl) for _ in range(SEEDS)]
    wrong = sum(v == CONTRADICTED for v, _ in outcomes)
    passed = sum(v == SUPPORTED for v, _ in outcomes)
    print(f"\ntrue drop 0: called lossy {wrong}/{SEEDS}, lossless {passed}/{SEEDS}, mean "
          f"questions {sum(n for _, n in outcomes) / SEEDS:,.0f}")
    assert wrong / SEEDS <= 0.05
    assert passed / SEEDS >= 0.9


def test_looking_again_at_95_percent_would_not_keep_the_rate() -> None:
    rng = np.random.default_rng(99)
    naive = sum(_run(0.0, rng, 0.95)[0] == CONTRADICTED for _ in range(SEEDS))
    print(f"\nnaive 95 % at every look, no true drop: called lossy {naive}/{SEEDS}")
    assert naive / SEEDS > 0.05
