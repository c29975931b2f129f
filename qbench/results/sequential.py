"""A group-sequential plan for measuring until a decision is made (``--until-decided``).

The sample grows in looks - the suite's own chunks, then times ``growth`` each round up to a
ceiling - and after each look a variant whose interval still straddles the tolerated loss is
measured further. Looking again and again would spend the error rate many times over, so the
plan spends it up front: with K planned looks every interval is taken at level 1 - alpha/K
(Bonferroni spending). However many looks a variant takes, the chance that any of its
intervals lies wholly on the wrong side of the tolerance is at most alpha - checked by
simulation in tests/test_sequential.py. Simple and conservative: a variant decided at the first
look is judged at the same level as one decided at the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def looks(first: int, ceiling: int, growth: float) -> list[int]:
    """The sample sizes of the planned looks: ``first``, then times ``growth`` (rounded up),
    capped at ``ceiling`` (which is always the last look when larger than ``first``)."""
    if first <= 0 or ceiling <= 0:
        raise ValueError(f"looks need positive sizes, got first={first}, ceiling={ceiling}")
    out = [min(first, ceiling)]
    while out[-1] < ceiling:
        out.append(min(ceiling, max(out[-1] + 1, math.ceil(out[-1] * growth))))
    return out


def level(alpha: float, n_looks: int) -> float:
    """Each look's two-sided interval level: 1 - alpha / looks."""
    return 1.0 - alpha / max(n_looks, 1)


def next_look(plan: list[int], now: int) -> int | None:
    """The planned size after ``now`` (None at the ceiling)."""
    return next((n for n in plan if n > now), None)


# stop growing a decision when the sample that would settle it at 80 % power (at its current
# estimate) exceeds this many times what the dataset holds: even all of it would leave the
# interval about twice as wide as its distance from the threshold. Stopping for futility only
# ever ends in "open", so it cannot raise the error rate the plan keeps.
FUTILE = 4.0


@dataclass(frozen=True)
class Open:
    """Why a variant's decision on one metric's sample is still open, and the sample (in that
    metric's unit: chunks, questions) that would close it at 80 % power if the loss is what it
    measures now, and what the dataset holds (None: unknown)."""
    why: str
    needed: int | None = None
    available: int | None = None

    def futile(self) -> bool:
        return (self.needed is not None and self.available is not None
                and self.needed > FUTILE * self.available)

    def merged(self, other: Open) -> Open:
        """Two decisions open on one sample (the recommendation and a claim): it grows while
        either may still be settled: the smaller need counts, and an unknown one (never
        futile) stays unknown."""
        needed = (None if self.needed is None or other.needed is None
                  else min(self.needed, other.needed))
        return Open(f"{self.why}; {other.why}", needed, self.available or other.available)


def held_by(metric: str, details: dict[str, Any]) -> int | None:
    """What a cell's dataset holds, in the unit its sample grows by: chunks of the text (as
    this model's tokenizer cuts it) for perplexity, questions for MMLU; None when the record
    does not say (or the metric's sample is not grown)."""
    if metric == "perplexity" and details.get("tokens_in_text") and details.get("ctx"):
        return int(details["tokens_in_text"]) // int(details["ctx"])
    if metric == "mmlu" and details.get("questions_in_dataset"):
        return int(details["questions_in_dataset"])
    return None
