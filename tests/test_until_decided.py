"""``qbench run --until-decided`` on SmolLM2: only variants whose ΔPPL interval straddles the
tolerated loss get more chunks (with their base), each look scores only its new chunks, and
the run ends with every variant decided at the plan's level or named as open at its ceiling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qbench.cli import main
from qbench.results.sequential import level, looks

SUITE = """
[suite]
name = "ud"
[defaults]
threads = 2
[[models]]
id = "smollm2-135m"
source = "{ref}"
base = "F16"
[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0", "Q2_K"]
metrics = ["perplexity"]
[metrics.perplexity]
dataset = "wikitext-2"
ctx = 256
chunks = 4
[report]
max_loss_pct = 0.5
[decide]
max_chunks = 16
"""
CEILING = 16


def _ppl(out: Path) -> list[dict[str, Any]]:
    return [r for r in (json.loads(p.read_text()) for p in (out / "ud" / "cells").glob("*.json"))
            if r["metric"] == "perplexity"]


@pytest.mark.slow
def test_until_decided_measures_only_what_is_open(tmp_path: Path, data_dir: Path,
                                                  smollm2_ref: str, isolated_env: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QBENCH_DATA_DIR", str(data_dir))
    suite = tmp_path / "ud.toml"
    suite.write_text(SUITE.format(ref=smollm2_ref))
    out = tmp_path / "results"
    assert main(["run", str(suite), "--out", str(out), "--report-dir", str(tmp_path / "rep"),
                 "--until-decided"]) == 0
    text = " ".join(capsys.readouterr().err.split())
    plan = looks(4, CEILING, 2.0)
    assert f"looks at {plan} chunks" in text and f"{100 * level(0.05, len(plan)):.3g} %" in text

    recs = _ppl(out)
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        by_variant.setdefault(r["variant"]["quant"], []).append(r)
    # Q2_K loses ~40 %: decided at the first look, never measured further
    assert [r["details"]["chunks"] for r in by_variant["Q2_K"]] == [4]
    # every grown cell scored only its new chunks, on top of its family's previous look
    for quant, cells in by_variant.items():
        sizes = sorted(r["details"]["chunks"] for r in cells)
        for r in cells:
            d = r["details"]
            prev = max((n for n in sizes if n < d["chunks"]), default=0)
            assert d["chunks_scored_here"] == d["chunks"] - prev, (quant, sizes)
            if prev:
                assert r["decide"]["looks"] == plan and r["decide"]["alpha"] == 0.05
    # the base grew with the variant it is paired with
    assert max(r["details"]["chunks"] for r in by_variant["F16"]) == \
        max(r["details"]["chunks"] for r in by_variant["Q8_0"])
    # the end: decided, or said to be open at the ceiling
    page = (tmp_path / "rep" / "ud.html").read_text()
    q8_max = max(r["details"]["chunks"] for r in by_variant["Q8_0"])
    if "still open at the ceiling" in text:
        assert q8_max == CEILING and "still open at the plan&#39;s ceiling" in page
    elif "not measured further" in text:        # futile: more than the text could decide
        assert "beyond what the data can resolve" in text
        assert "cannot be resolved with this dataset" in page
    else:
        assert "every decision more data can settle is made" in text
