"""Evidence that cannot discriminate says so in the report: a base at chance on MMLU reads
"cannot discriminate on this model" (table, advice check, recommendation) with each variant's
answer-letter distribution; a timing taken while other work ran is greyed with its reason and
never ranked by; the suite's own notes reach the page; ``qbench report --suite`` takes the
suite's [report] settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qbench.cli import main
from qbench.report import claims as C
from qbench.report.build import render_suite
from qbench.report.recommend import recommend
from qbench.report.table import variant_rows
from synthetic_records import demo_records


def _letter_biased(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The default suite's picture: every variant answers A to nearly every question."""
    for r in recs:
        if r["metric"] == "mmlu":
            d = r["details"]
            n = len(d["correct"])
            d["predicted"] = ["A"] * (n - 3) + ["B", "C", "D"]
            d["correct"] = [1 if i % 4 == 0 else 0 for i in range(n)]
            r["values"]["acc"]["value"] = sum(d["correct"]) / n
    return recs


def test_mmlu_at_chance_cannot_discriminate_anywhere() -> None:
    recs = _letter_biased(demo_records(with_transformers=False))
    rows = variant_rows(recs)
    q4 = next(r for r in rows if r["quant"] == "Q4_K_M")
    assert "answers A to 282 of 285 questions" in q4["mmlu_fitness"]
    assert q4["mmlu_letters"] == [("A", 282), ("B", 1), ("C", 1), ("D", 1)]
    page = render_suite("demo", recs)
    assert page.count("cannot discriminate on this model") >= 4
    assert "A 282 · B 1 · C 1 · D 1" in page
    c1 = C.check_claims(rows)[0]
    assert c1["measured_summary"]["MMLU"] == C.CANNOT
    [rec] = recommend(rows, budget_gb=None, max_loss_pct=1.0)
    assert "MMLU cannot discriminate on this model" in rec["why"]


def test_a_model_that_can_discriminate_is_judged() -> None:
    rows = variant_rows(demo_records(with_transformers=False))   # 45 % base accuracy
    q2 = next(r for r in rows if r["quant"] == "Q2_K")
    assert q2["mmlu_fitness"] is None and q2["mmlu_paired"]["significant"]


def test_an_unreliable_timing_is_greyed_and_never_ranked() -> None:
    recs = demo_records(with_transformers=False)
    for r in recs:
        if r["metric"] == "speed" and r["variant"]["quant"] == "Q8_0":
            r["fitness"] = {"reliable": False, "rounds": 3,
                            "reasons": ["other processes used 1.7 of 2 cores"]}
    rows = variant_rows(recs)
    q8 = next(r for r in rows if r["quant"] == "Q8_0")
    assert q8["speed_unreliable"].startswith("unreliable measurement: other processes")
    page = render_suite("demo", recs)
    assert 'class="unreliable"' in page and "other processes used 1.7 of 2 cores" in page
    [rec] = recommend(rows, budget_gb=1.0, max_loss_pct=50.0)
    by = {c["row"]["quant"]: c for c in rec["candidates"]}
    assert by["Q8_0"]["tg_rank"] is None and by["F16"]["tg_rank"] == 48.0


def test_suite_notes_and_report_settings_reach_the_page(tmp_path: Path) -> None:
    recs = demo_records(with_transformers=False)
    cells = tmp_path / "results" / "demo" / "cells"
    cells.mkdir(parents=True)
    for r in recs:
        (cells / f"{r['key']}.json").write_text(json.dumps(r))
    runs = tmp_path / "results" / "demo" / "runs"
    runs.mkdir()
    (runs / "20260101T000000Z-demo.json").write_text(json.dumps({
        "run_id": "20260101T000000Z-demo", "suite": "demo", "description": "a demo ladder",
        "notes": ["MMLU here is a smoke signal"], "cells": []}))
    suite = tmp_path / "demo.toml"
    suite.write_text('[suite]\nname = "demo"\n[[models]]\nid = "tiny-135m"\nsource = "m.gguf"\n'
                     'base = "F16"\n[[variants]]\nbackend = "llama.cpp"\nquant = ["F16"]\n'
                     '[metrics.perplexity]\n[report]\nmemory_budget_gib = 0.35\nmax_loss_pct = 2.5\n'
                     'context_tokens = 2048\n')
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    out = tmp_path / "reports"
    assert main(["report", str(tmp_path / "results"), "--out", str(out),
                 "--suite", str(suite)]) == 0
    page = (out / "demo.html").read_text()
    assert "a demo ladder" in page and "MMLU here is a smoke signal" in page
    assert "<b>0.35 GiB</b>" in page and "<b>2.5 %</b>" in page and "<b>2048</b> tokens" in page
    assert main(["report", str(tmp_path / "results"), "--out", str(out), "--suite", str(suite),
                 "--max-loss-pct", "0.7"]) == 0
    assert "<b>0.7 %</b>" in (out / "demo.html").read_text()
