"""How often the gate catches a real change, and how often it cries wolf - measured, not asserted.

Each rate is counted over SEEDS independent draws of realistic, uncentred noise built from the
committed baseline's own spreads (tests/gate_noise.py): nothing forces a sample's mean or sd.
Two scenarios: a regression *alone* (a deterministic CPU rerun of the same build: only the
regressed cell moves), and the **family-wise** false-alarm rate of a rerun in which every gated
value moved by noise and nothing truly changed (a library upgrade that re-rounds every kernel).
The README's "What the gate can detect" states these figures; a failure here means a promise
there no longer holds on the committed baseline.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gate_noise import (cell, kld_spreads, move_kld, move_ppl, move_repetitions, null_run,
                        smallest_step_spread)
from qbench.results.compare import compare_records
from qbench.results.store import load_results

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "results" / "baselines" / "smoke"
MODEL = "smollm2-135m"
LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
SEEDS = 100


@pytest.fixture(scope="module")
def stored() -> list[dict[str, Any]]:
    return load_results([BASELINE])


def _rate(stored: list[dict[str, Any]], quant: str, metric: str, value: str,
          move: Callable[[dict[str, Any], random.Random], None], seed0: int) -> float:
    """Share of SEEDS reruns in which the gate calls ``value`` of ``quant``'s ``metric`` a
    regression after ``move`` (only that cell changed)."""
    hits = 0
    for seed in range(SEEDS):
        rng = random.Random(seed0 + seed)
        cand = copy.deepcopy(stored)
        move(cell(cand, MODEL, "llama.cpp", quant, metric), rng)
        cmp = compare_records(stored, cand)
        hits += any(c.regression and c.value == value and c.cell.endswith(f"/{quant}/{metric}")
                    for c in cmp.changes)
    return hits / SEEDS


def test_family_wise_false_alarms_stay_under_five_percent(stored: list[dict[str, Any]]) -> None:
    """Every gated value redrawn (quality at the smallest real step's per-chunk spread, MMLU
    flipping at the stored discordance, timings at their own spread): at most 5 % of reruns
    fail the gate (Bonferroni over the values that changed)."""
    alarms, family = 0, 0
    for seed in range(SEEDS):
        cand = null_run(stored, MODEL, LADDER, random.Random(seed))
        cmp = compare_records(stored, cand)
        family = max(family, cmp.family)
        alarms += bool(cmp.regressions)
    print(f"\nfalse alarms: {alarms}/{SEEDS} reruns, {family} gated values changed")
    assert family > 40                     # the scenario really moved (nearly) everything
    assert alarms / SEEDS <= 0.05


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_one_percent_ppl_is_caught_when_alone(stored: list[dict[str, Any]], quant: str) -> None:
    spread = smallest_step_spread(stored)
    rate = _rate(stored, quant, "perplexity", "ppl",
                 lambda rec, rng: move_ppl(rec, 0.01, spread, rng), 1000)
    print(f"\n+1 % PPL on {quant} (per-chunk sd {spread:.4f}), alone: caught {rate:.0%}")
    assert rate >= 0.90


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_thirty_percent_kld_is_caught_when_alone(stored: list[dict[str, Any]],
                                                 quant: str) -> None:
    """+30 % mean KLD is promised; +20 % is measured and stated as what it is (~85 % on the
    committed baseline's 8 chunks: not 90)."""
    s_kld, _ = kld_spreads(stored, MODEL, LADDER)
    rates = {eff: _rate(stored, quant, "kld", "kld_mean",
                        lambda rec, rng: move_kld(rec, eff, s_kld, 0.0, rng), 2000)
             for eff in (0.20, 0.30)}
    print(f"\nKLD on {quant} (per-chunk sd of ln {s_kld:.3f}), alone: +20 % caught "
          f"{rates[0.20]:.0%}, +30 % caught {rates[0.30]:.0%}")
    assert rates[0.30] >= 0.90 and 0.6 <= rates[0.20] <= rates[0.30]


def test_the_stated_detectable_change_is_caught_about_80_percent_of_the_time(
        stored: list[dict[str, Any]]) -> None:
    """The gate says which worsening it would catch with 80 % power; drawing that change
    (alone, at the same spread) must be caught about that often - the statement is checked,
    not assumed."""
    spread = smallest_step_spread(stored)
    rng = random.Random(7)
    cand = copy.deepcopy(stored)
    move_ppl(cell(cand, MODEL, "llama.cpp", "Q8_0", "perplexity"), 0.0, spread, rng)
    [ch] = [c for c in compare_records(stored, cand).changes
            if c.value == "ppl" and c.cell.endswith("/Q8_0/perplexity")]
    assert ch.detectable is not None and ch.detectable > ch.tolerance
    stated = ch.detectable / 100
    rate = _rate(stored, "Q8_0", "perplexity", "ppl",
                 lambda rec, r: move_ppl(rec, stated, spread, r), 3000)
    print(f"\nstated detectable +{100 * stated:.2f} % PPL: caught {rate:.0%} (80 % promised)")
    assert 0.60 <= rate <= 0.97


def test_a_thirty_percent_slower_generation_is_caught_on_a_quiet_baseline(
        stored: list[dict[str, Any]]) -> None:
    """tg -30 % on the base variant, redrawn at its stored repetition spread, alone."""
    rate = _rate(stored, "F16", "speed", "tg_tokens_per_s",
                 lambda rec, rng: move_repetitions(rec, -0.30, rng), 4000)
    print(f"\ntg -30 % on F16, alone: caught {rate:.0%}")
    assert rate >= 0.90
