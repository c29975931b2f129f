"""qbench compare: matching cells, regressions beyond threshold AND noise, newly failing cells,
exit codes 0 / 1 / 2, JSON and HTML output."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from qbench.cli import main
from qbench.compare import compare_records
from qbench.report.synthetic import demo_records


def _write(root: Path, records: list[dict]) -> Path:
    for r in records:
        path = root / r["suite"] / "cells" / f"{r['key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    return root / records[0]["suite"]


def _set(records: list[dict], quant: str, metric: str, name: str, **fields: float) -> None:
    for r in records:
        if r["variant"]["quant"] == quant and r["metric"] == metric:
            r["values"][name].update(fields)
            return
    raise AssertionError(f"no {quant} {metric}")


@pytest.fixture
def base() -> list[dict]:
    return demo_records(with_transformers=False)


def test_identical_runs_have_no_regression(base: list[dict]) -> None:
    cmp = compare_records(base, copy.deepcopy(base))
    assert not cmp.failed and cmp.changes
    assert all(c.change_pct == 0 for c in cmp.changes)


def test_ppl_regression_needs_threshold_and_noise(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    ppl = next(r for r in base if r["variant"]["quant"] == "Q4_K_M"
               and r["metric"] == "perplexity")["values"]["ppl"]
    # +5 % with the stored stderr (~1.4): 1.5 / hypot(1.4, 1.4) ~ 0.75 sigma -> within noise
    _set(cand, "Q4_K_M", "perplexity", "ppl", value=ppl["value"] * 1.05)
    cmp = compare_records(base, cand, threshold_pct=2.0, sigma=3.0)
    ch = next(c for c in cmp.changes if c.value == "ppl" and "Q4_K_M" in c.cell)
    assert ch.worse_pct == pytest.approx(5.0) and not ch.regression and "within" in ch.why
    assert not cmp.failed
    # same change with tight errors -> regression
    _set(cand, "Q4_K_M", "perplexity", "ppl", stderr=0.01)
    for r in base:
        if r["variant"]["quant"] == "Q4_K_M" and r["metric"] == "perplexity":
            r["values"]["ppl"]["stderr"] = 0.01
    cmp = compare_records(base, cand, threshold_pct=2.0, sigma=3.0)
    assert [c.value for c in cmp.regressions] == ["ppl"]
    # beyond noise but below the threshold -> no regression
    cmp = compare_records(base, cand, threshold_pct=10.0, sigma=3.0)
    assert not cmp.regressions


def test_direction_follows_higher_is_better(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    _set(cand, "Q8_0", "speed", "tg_tokens_per_s", value=200.0)       # faster: not worse
    _set(cand, "Q4_K_M", "speed", "tg_tokens_per_s", value=60.0)       # 120 -> 60, sd 3.6
    cmp = compare_records(base, cand)
    reg = {c.cell for c in cmp.regressions}
    assert any("Q4_K_M/speed" in c for c in reg)
    assert not any("Q8_0/speed" in c for c in reg)
    slow = next(c for c in cmp.regressions if "Q4_K_M/speed" in c.cell)
    assert slow.noise == pytest.approx((3.6 ** 2 + 3.6 ** 2) ** 0.5)  # speed uses the sd


def test_newly_failing_cell_is_flagged(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    for r in cand:
        if r["variant"]["quant"] == "Q8_0" and r["metric"] == "mmlu":
            r["status"], r["error"], r["values"] = "crashed", "SIGSEGV in the kernel", {}
    cmp = compare_records(base, cand)
    assert cmp.failed and not cmp.regressions
    assert cmp.newly_failing[0]["cell"].endswith("Q8_0/mmlu")
    assert "SIGSEGV" in cmp.newly_failing[0]["error"]


def test_missing_and_fixed_cells(base: list[dict]) -> None:
    cand = [r for r in copy.deepcopy(base) if r["variant"]["quant"] != "Q2_K"]
    for r in cand:
        if r["variant"]["quant"] == "Q6_K" and r["metric"] == "perplexity":
            r["status"], r["error"] = "ok", None
            r["values"] = {"ppl": {"value": 29.0, "stderr": 1.4}}
    cmp = compare_records(base, cand)
    assert any(c.endswith("Q2_K/sanity") for c in cmp.only_baseline)
    assert any(c.endswith("Q6_K/perplexity") for c in cmp.newly_ok)
    assert not cmp.failed


def test_degenerate_output_is_a_regression(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    _set(cand, "Q8_0", "sanity", "degenerate", value=1.0)
    cmp = compare_records(base, cand)
    assert any(c.value == "degenerate" and "Q8_0" in c.cell for c in cmp.regressions)


def test_file_size_changes_are_reported_not_gated(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    _set(cand, "Q8_0", "footprint", "file_size_mb", value=500.0)
    cmp = compare_records(base, cand)
    ch = next(c for c in cmp.changes if c.value == "file_size_mb" and "Q8_0" in c.cell)
    assert not ch.gated and not ch.regression and not cmp.failed


def test_cli_exit_codes_and_outputs(base: list[dict], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a", base)
    b_recs = copy.deepcopy(base)
    assert main(["compare", str(a), str(_write(tmp_path / "same", b_recs))]) == 0
    _set(b_recs, "Q4_K_M", "speed", "tg_tokens_per_s", value=10.0)
    b = _write(tmp_path / "b", b_recs)
    capsys.readouterr()
    out_html = tmp_path / "diff" / "compare.html"
    assert main(["compare", str(a), str(b), "--json", "--out", str(out_html)]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["exit_code"] == 2 and data["regressions"] == 1
    page = out_html.read_text()
    assert "regression" in page and "tg_tokens_per_s" in page and "<script" not in page


def test_cli_unreadable_input_exits_1(tmp_path: Path, base: list[dict]) -> None:
    a = _write(tmp_path / "a", base)
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty), str(a)]) == 1
    newer = copy.deepcopy(base[:1])
    newer[0]["schema_version"] = 99
    assert main(["compare", str(_write(tmp_path / "new", newer)), str(a)]) == 1


def test_hostile_names_are_escaped_in_the_html(base: list[dict], tmp_path: Path) -> None:
    from qbench.compare import render_html
    recs = demo_records(model="<img src=x onerror=alert(1)>", with_transformers=False)
    cand = copy.deepcopy(recs)
    _set(cand, "Q4_K_M", "speed", "tg_tokens_per_s", value=10.0)
    page = render_html(compare_records(recs, cand))
    assert "<img" not in page and "&lt;img src=x" in page
