"""Paired comparison of per-question correctness (a variant against its base).

Both variants answer the same questions, so their accuracies are compared as a paired 2x2 table:
only the questions that *flipped* carry information. With ``gained`` = questions the variant gets
right and the base wrong, and ``lost`` = the reverse:

- **p-value**: exact McNemar test = two-sided exact binomial test of ``gained`` among the
  ``gained + lost`` discordant questions with p = 1/2 (``min(1, 2 * P(X <= min(gained, lost)))``,
  as R's ``mcnemar.exact`` / ``binom.test``). No normal approximation, so it is valid for the
  handful of flips a 285-question subset yields.
- **95% CI of the accuracy difference** (variant - base): Newcombe's square-and-add interval for
  paired proportions (Newcombe 1998, Stat. Med. 17:2635, method 10): Wilson score intervals of
  both accuracies combined with the estimated correlation phi (continuity-corrected as in
  Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8). Unlike the
  Wald interval it keeps a non-zero width when nothing flipped and stays inside [-1, 1].
- **significant**: p-value < alpha (0.05). The test and the interval are different procedures and
  can disagree right at the boundary; the test decides.

Pure Python (math only): stored records can be compared without numpy or scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z95 = 1.959963984540054  # the 97.5% standard normal quantile


def binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (integers, one division)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when none flipped)."""
    if gained < 0 or lost < 0:
        raise ValueError(f"counts must be >= 0, got {gained}, {lost}")
    n = gained + lost
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf_half(min(gained, lost), n))


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired_ci(both: int, only_first: int, only_second: int, neither: int,
                       z: float = Z95) -> tuple[float, float]:
    """Newcombe's square-and-add CI of p1 - p2 for paired proportions.

    ``both``: right in both; ``only_first``: right in the first only; ``only_second``: right in
    the second only; ``neither``: wrong in both. p1 = (both + only_first)/n, p2 = (both +
    only_second)/n.
    """
    a, b, c, d = both, only_first, only_second, neither
    n = a + b + c + d
    if n <= 0:
        raise ValueError("an empty table has no confidence interval")
    r1, r2 = a + b, a + c          # first's and second's right answers
    p1, p2 = r1 / n, r2 / n
    l1, u1 = wilson_interval(r1, n, z)
    l2, u2 = wilson_interval(r2, n, z)
    if min(r1, n - r1, r2, n - r2) == 0:
        phi = 0.0
    else:
        prod = r1 * (n - r1) * r2 * (n - r2)
        cross = a * d - b * c
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(prod)
        elif cross >= 0:
            phi = 0.0
        else:
            phi = cross / math.sqrt(prod)
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2
                               - 2 * phi * (p1 - l1) * (u2 - p2)))
    high = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2
                                - 2 * phi * (p2 - l2) * (u1 - p1)))
    return max(-1.0, low), min(1.0, high)


def paired_accuracy(base_correct: Sequence[int | bool], other_correct: Sequence[int | bool],
                    alpha: float = 0.05) -> dict[str, Any]:
    """Compare ``other`` with ``base`` on the same questions (same order, 0/1 per question).

    Returns n, both accuracies, flips_gained (base wrong, other right), flips_lost (base right,
    other wrong), diff = acc_other - acc_base, its 95% Newcombe interval (ci_low, ci_high), the
    exact McNemar p_value and significant (p_value < alpha).
    """
    if len(base_correct) != len(other_correct):
        raise ValueError(f"paired lists differ in length: {len(base_correct)} vs "
                         f"{len(other_correct)} (not the same questions?)")
    n = len(base_correct)
    if n == 0:
        raise ValueError("no questions to compare")
    both = gained = lost = neither = 0
    for x, y in zip(base_correct, other_correct):
        bx, by = bool(x), bool(y)
        if bx and by:
            both += 1
        elif by:
            gained += 1
        elif bx:
            lost += 1
        else:
            neither += 1
    ci_low, ci_high = newcombe_paired_ci(both, gained, lost, neither)
    p_value = mcnemar_exact(gained, lost)
    return {
        "n": n,
        "acc_base": (both + lost) / n,
        "acc_other": (both + gained) / n,
        "flips_gained": gained,
        "flips_lost": lost,
        "diff": (gained - lost) / n,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p_value": p_value,
        "significant": p_value < alpha,
        "method": "exact McNemar (two-sided binomial on flips); 95% Newcombe paired CI",
    }


def paired_from_records(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """:func:`paired_accuracy` from two mmlu result ``details`` dicts (question_ids + correct),
    aligned on question id; an error if they did not answer the same questions."""
    b = dict(zip(base["question_ids"], base["correct"]))
    o = dict(zip(other["question_ids"], other["correct"]))
    if set(b) != set(o):
        raise ValueError(f"the two runs answered different questions ({len(set(b) ^ set(o))} "
                         "ids differ): compare runs with the same subset, seed and dataset")
    ids = sorted(b)
    return paired_accuracy([b[i] for i in ids], [o[i] for i in ids])


# ------------------------------------------------------------------ paired continuous values

# two-sided 95 % Student t quantiles (t_{0.975, df}) for small samples; the normal beyond 30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (normal past 30):
    a paired difference over 8 chunks has 7 degrees of freedom, not a normal's."""
    if df < 1:
        return math.inf
    return _T975[df - 1] if df <= len(_T975) else Z95


def paired_mean_diff(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean of paired differences (candidate - base, one per shared unit: chunk, question)
    with its standard error and 95 % t interval. The noise of a paired difference is the
    spread of the differences, never the two runs' own sampling errors."""
    n = len(diffs)
    if n == 0:
        raise ValueError("no paired units to compare")
    mean = math.fsum(diffs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "se": math.inf, "ci_low": -math.inf,
                "ci_high": math.inf, "df": 0}
    var = math.fsum((d - mean) ** 2 for d in diffs) / (n - 1)
    se = math.sqrt(var / n)
    half = t975(n - 1) * se
    return {"n": n, "mean": mean, "se": se, "ci_low": mean - half, "ci_high": mean + half,
            "df": n - 1}


def n_to_resolve(n: int, se: float, point: float, threshold: float, z: float = Z95
                 ) -> int | None:
    """The sample size (in the units of ``n``) at which a 95 % interval around ``point``
    would no longer straddle ``threshold``, assuming the error shrinks as 1/sqrt(n). None when
    the point sits on the threshold (no finite sample resolves it) or nothing is known."""
    gap = abs(point - threshold)
    if n <= 0 or not math.isfinite(se) or se <= 0 or gap == 0:
        return None
    need = n * (z * se / gap) ** 2
    return max(n + 1, math.ceil(need))
