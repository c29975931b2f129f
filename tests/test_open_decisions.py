"""What ``--until-decided`` grows is exactly what the report would leave open: a recommendation
whose ΔPPL interval straddles the tolerance (more chunks) and a claim verdict whose measured
interval straddles its threshold (more chunks for ΔPPL, more questions for MMLU); an MMLU
verdict on a base that cannot discriminate is no decision and asks for nothing."""

from __future__ import annotations

from typing import Any

import pytest

from synthetic_records import LADDER, demo_records

from qbench.report.open_decisions import open_decisions

KEY_Q8_MMLU = ("tiny-135m", "llama.cpp", "Q8_0", "mmlu")


def _records(**kw: Any) -> list[dict[str, Any]]:
    recs = demo_records(with_failures=False, with_transformers=False, **kw)
    for r in recs:                      # as a real MMLU cell states it
        if r["metric"] == "mmlu":
            r["details"]["questions_in_dataset"] = 14042
    return recs


def test_a_claim_whose_mmlu_interval_straddles_grows_questions() -> None:
    out = open_decisions(_records(), 0.95, tol=50.0, budget_gib=None, kv_ctx=4096)
    # Q8_0 loses one question of 285: its drop's interval straddles claim 1's 1 point
    state = out[KEY_Q8_MMLU]
    assert state.why.startswith("claim 1: drop") and state.available == 14042
    assert state.needed is not None and 285 < state.needed < 14042 and not state.futile()
    # at 50 % tolerated loss every ΔPPL is decided: nothing asks for chunks
    assert [k for k in out if k[3] == "perplexity"] == []


def test_a_recommendation_at_its_tolerance_grows_chunks() -> None:
    tol = 100 * (LADDER["Q4_K_M"][1])        # Q4_K_M's true ln ratio, in % (about its ΔPPL)
    out = open_decisions(_records(), 0.95, tol=tol, budget_gib=None, kv_ctx=4096)
    state = out[("tiny-135m", "llama.cpp", "Q4_K_M", "perplexity")]
    assert state.why.startswith("recommendation: ΔPPL")


def test_a_base_at_chance_asks_for_no_questions() -> None:
    recs = _records()
    for r in recs:                          # every variant answers a quarter right: chance
        if r["metric"] == "mmlu":
            n = len(r["details"]["correct"])
            shift = 1 if r["variant"]["quant"] == "Q8_0" else 0
            r["details"]["correct"] = [int((i + shift) % 4 == 0) for i in range(n)]
            r["values"]["acc"]["value"] = sum(r["details"]["correct"]) / n
    out = open_decisions(recs, 0.95, tol=50.0, budget_gib=None, kv_ctx=4096)
    assert KEY_Q8_MMLU not in out


def test_the_plans_level_is_the_one_judged_at() -> None:
    """A look's interval is the plan's (99.4 % for 8 looks at alpha 0.05), not 95 %: a variant
    decided at 95 % can be open at the plan's level, and the why says the level."""
    recs = _records()
    key = ("tiny-135m", "llama.cpp", "Q4_K_M", "perplexity")
    at95 = open_decisions(recs, 0.95, tol=3.4, budget_gib=None, kv_ctx=4096)
    at994 = open_decisions(recs, 0.99375, tol=3.4, budget_gib=None, kv_ctx=4096)
    assert key not in at95 and key in at994            # upper ends +3.35 / +3.57 % (seed 0)
    assert "[99.4 %:" in at994[key].why
    assert "(99.4 % CI," in at994[KEY_Q8_MMLU].why


def test_the_report_judges_a_sequential_suite_at_the_plans_level_throughout() -> None:
    """Once --until-decided measured any cell of a suite, the loop judged every comparison at
    the plan's level; the report does the same, also for variants it never grew - else a
    variant the loop left decided could read otherwise on the page (the MMLU rule's McNemar
    test is at the judged level, so 95 % and 99.4 % can disagree)."""
    from qbench.report.table import variant_rows

    recs = _records()
    plan = {"alpha": 0.05, "looks": [16, 32], "n_looks": 8, "look": 2}
    for r in recs:
        if r["metric"] == "perplexity" and r["variant"]["quant"] in ("F16", "Q8_0"):
            r["decide"] = plan
    rows = {r["quant"]: r for r in variant_rows(recs)}
    assert rows["Q4_K_M"]["judged"]["perplexity.ppl"].level == pytest.approx(1 - 0.05 / 8)
    assert rows["Q4_K_M"]["judged"]["mmlu.acc"].level == pytest.approx(1 - 0.05 / 8)
    assert rows["Q4_K_M"]["mmlu_paired"]["level"] == pytest.approx(1 - 0.05 / 8)
    other = {r["quant"]: r for r in variant_rows(_records())}      # no plan: 95 %
    assert other["Q4_K_M"]["judged"]["perplexity.ppl"].level == pytest.approx(0.95)
