"""Incremental cells: raising ``chunks`` or ``subset`` scores only the new chunks or questions,
and the larger cell holds exactly what a fresh run of that size computes (SmolLM2, real
llama.cpp). Doubling the sample costs the new half, not the whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qbench.cli import main

SUITE = """
[suite]
name = "inc"
[defaults]
threads = 2
[[models]]
id = "smollm2-135m"
source = "{ref}"
base = "F16"
[[variants]]
backend = "llama.cpp"
quant = ["F16"]
metrics = ["perplexity", "mmlu"]
[metrics.perplexity]
dataset = "wikitext-2"
ctx = 256
chunks = {chunks}
[metrics.mmlu]
subset = {subset}
"""


def _records(out: Path) -> dict[str, dict[str, Any]]:
    recs = [json.loads(p.read_text()) for p in (out / "inc" / "cells").glob("*.json")]
    return {(r["metric"], r["options"].get("chunks") or r["options"].get("subset")): r
            for r in recs}


@pytest.mark.slow
def test_a_larger_sample_scores_only_what_is_new(tmp_path: Path, data_dir: Path,
                                                 smollm2_ref: str, isolated_env: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QBENCH_DATA_DIR", str(data_dir))
    small = tmp_path / "small.toml"
    small.write_text(SUITE.format(ref=smollm2_ref, chunks=4, subset=57))
    large = tmp_path / "large.toml"
    large.write_text(SUITE.format(ref=smollm2_ref, chunks=8, subset=114))
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    assert main(["run", str(small), "--out", str(grown), "--no-report"]) == 0
    assert main(["run", str(large), "--out", str(grown), "--no-report"]) == 0
    assert main(["run", str(large), "--out", str(fresh), "--no-report"]) == 0
    g, f = _records(grown), _records(fresh)

    ppl4, ppl8, ppl8_fresh = g[("perplexity", 4)], g[("perplexity", 8)], f[("perplexity", 8)]
    d = ppl8["details"]
    assert d["chunks_scored_here"] == 4 and d["chunks_reused_from"] == ppl4["key"]
    assert ppl8_fresh["details"]["chunks_scored_here"] == 8
    assert ppl8["family"] == ppl4["family"] == ppl8_fresh["family"] and ppl8["key"] != ppl4["key"]
    for k in ("per_chunk_nll_sum", "per_chunk_nll_sumsq", "per_chunk_tokens", "per_chunk_bytes"):
        assert d[k] == pytest.approx(ppl8_fresh["details"][k], rel=1e-9), k
        assert d[k][:4] == ppl4["details"][k], k
    for name in ("ppl", "mean_nll", "bits_per_byte"):
        assert ppl8["values"][name]["value"] == pytest.approx(
            ppl8_fresh["values"][name]["value"], rel=1e-9)
    assert ppl8["values"]["ppl"]["stderr"] == pytest.approx(
        ppl8_fresh["values"]["ppl"]["stderr"], rel=1e-9)

    m57, m114, m114_fresh = g[("mmlu", 57)], g[("mmlu", 114)], f[("mmlu", 114)]
    md = m114["details"]
    assert md["questions_scored_here"] == 57 and md["questions_reused_from"] == m57["key"]
    assert md["question_ids"] == m114_fresh["details"]["question_ids"]
    assert md["correct"] == m114_fresh["details"]["correct"]
    assert md["predicted"] == m114_fresh["details"]["predicted"]
    assert set(m57["details"]["question_ids"]) < set(md["question_ids"])
