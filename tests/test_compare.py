"""qbench compare: paired statistics (per-chunk PPL and KLD, McNemar on MMLU flips), practical
tolerances, speed/memory only on the same hardware, ok cells gone failed/skipped/missing,
exit codes 0 / 1 / 2, JSON and HTML output. Records are synthetic here; the real stored
baseline is exercised in tests/test_gate_baseline.py."""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from qbench.cli import main
from qbench.results.compare import (EXIT_NOT_COMPARABLE, Tolerances, compare_records,
                                    expected_cells)
from synthetic_records import demo_records


def _write(root: Path, records: list[dict]) -> Path:
    for r in records:
        path = root / r["suite"] / "cells" / f"{r['key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    return root / records[0]["suite"]


def _rec(records: list[dict], quant: str, metric: str) -> dict:
    for r in records:
        if r["variant"]["quant"] == quant and r["metric"] == metric:
            return r
    raise AssertionError(f"no {quant} {metric}")


def _set(records: list[dict], quant: str, metric: str, name: str, **fields: float) -> None:
    _rec(records, quant, metric)["values"][name].update(fields)


def _change(cmp, quant: str, value: str):  # type: ignore[no-untyped-def]
    return next(c for c in cmp.changes if c.value == value and f"/{quant}/" in c.cell)


@pytest.fixture
def base() -> list[dict]:
    return demo_records(with_transformers=False)


def _with_chunks(records: list[dict], quant: str, chunk_ppl: list[float],
                 tokens: int = 255) -> None:
    """Give a perplexity record per-chunk data (as the perplexity metric stores it)."""
    r = _rec(records, quant, "perplexity")
    r["details"].update({"per_chunk_ppl": chunk_ppl, "per_chunk_tokens": [tokens] * len(chunk_ppl),
                         "per_chunk_nll_sum": [tokens * math.log(p) for p in chunk_ppl],
                         "scored_tokens": tokens * len(chunk_ppl), "chunks": len(chunk_ppl)})
    nll = sum(r["details"]["per_chunk_nll_sum"]) / (tokens * len(chunk_ppl))
    r["values"]["ppl"]["value"] = math.exp(nll)


def _chunks(seed: int, n: int = 8) -> list[float]:
    rng = random.Random(seed)
    return [30.0 * math.exp(rng.gauss(0, 0.25)) for _ in range(n)]


def _scaled(chunks: list[float], factor: float, spread: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [p * factor * math.exp(rng.gauss(0, spread)) for p in chunks]


# --------------------------------------------------------------------- deterministic reruns

def test_identical_runs_have_no_regression(base: list[dict]) -> None:
    _with_chunks(base, "Q8_0", _chunks(1))
    cmp = compare_records(base, copy.deepcopy(base))
    assert not cmp.failed and cmp.changes
    gated = [c for c in cmp.changes if c.gated]
    assert gated and all(c.verdict == "no change" and not c.change for c in gated)
    assert not cmp.missing and not cmp.newly_failing


# --------------------------------------------------------------------------- perplexity

def test_ppl_paired_catches_one_percent(base: list[dict]) -> None:
    """+1 % on every chunk (each its own factor, spread 0.2 %) is far outside the paired noise
    though the runs' own standard errors are ~5 %: a regression."""
    chunks = _chunks(2)
    _with_chunks(base, "Q8_0", chunks)
    cand = copy.deepcopy(base)
    _with_chunks(cand, "Q8_0", _scaled(chunks, 1.01, 0.002, seed=3))
    ch = _change(compare_records(base, cand), "Q8_0", "ppl")
    assert ch.regression and ch.verdict == "REGRESSION"
    assert "paired t" in ch.test and ch.ci_low > 0.25
    assert ch.change == pytest.approx(100 * (ch.candidate / ch.baseline - 1), rel=1e-6)


def test_ppl_small_or_noisy_change_passes(base: list[dict]) -> None:
    chunks = _chunks(4)
    _with_chunks(base, "Q8_0", chunks)
    real_but_small = copy.deepcopy(base)     # +0.15 %, surely real, below the 0.25 % tolerance
    _with_chunks(real_but_small, "Q8_0", _scaled(chunks, 1.0015, 0.0005, seed=5))
    ch = _change(compare_records(base, real_but_small), "Q8_0", "ppl")
    assert ch.ci_low > 0 and not ch.regression
    noisy = copy.deepcopy(base)              # +1 % on average, but chunks move by +-3 %
    _with_chunks(noisy, "Q8_0", _scaled(chunks, 1.01, 0.03, seed=6))
    ch = _change(compare_records(base, noisy), "Q8_0", "ppl")
    assert ch.ci_low < 0.25 < ch.ci_high and not ch.regression
    better = copy.deepcopy(base)
    _with_chunks(better, "Q8_0", _scaled(chunks, 0.98, 0.002, seed=7))
    assert _change(compare_records(base, better), "Q8_0", "ppl").verdict == "improved"


def test_ppl_tolerance_is_an_option(base: list[dict]) -> None:
    chunks = _chunks(8)
    _with_chunks(base, "Q8_0", chunks)
    cand = copy.deepcopy(base)
    _with_chunks(cand, "Q8_0", _scaled(chunks, 1.01, 0.002, seed=9))
    assert _change(compare_records(base, cand), "Q8_0", "ppl").regression
    loose = compare_records(base, cand, tolerances=Tolerances({"perplexity.ppl": 2.0}))
    assert not _change(loose, "Q8_0", "ppl").regression


def test_ppl_without_chunks_is_not_comparable(base: list[dict]) -> None:
    """Per-chunk data gone (PPL x 1.1): the items cannot be paired nor their identity checked,
    so the value is not comparable (exit 4) - never an unpaired interval that passes."""
    cand = copy.deepcopy(base)
    r = _rec(cand, "Q4_K_M", "perplexity")
    for k in ("per_chunk_ppl", "per_chunk_nll_sum"):
        r["details"].pop(k)
    r["values"]["ppl"]["value"] *= 1.1
    cmp = compare_records(base, cand)
    ch = _change(cmp, "Q4_K_M", "ppl")
    assert not ch.comparable and not ch.regression and "no per-chunk data" in ch.why
    assert cmp.exit_code == 4 and not cmp.failed


def test_more_chunks_of_the_same_text_pair_on_the_chunks_both_scored(base: list[dict]) -> None:
    """Chunks are cut in order: a candidate that scored 16 chunks of the same text pairs with
    an 8-chunk baseline on the first 8; another text is not comparable."""
    chunks = _chunks(10, n=16)
    _with_chunks(base, "Q8_0", chunks[:8])
    cand = copy.deepcopy(base)
    _with_chunks(cand, "Q8_0", _scaled(chunks[:8], 1.0, 0.0, seed=1) + chunks[8:])
    ch = _change(compare_records(base, cand), "Q8_0", "ppl")
    assert ch.comparable and "paired on the first 8 chunks (8 and 16)" in ch.why
    assert ch.change == pytest.approx(0.0, abs=1e-9) and "8 chunks" in ch.test
    _rec(cand, "Q8_0", "perplexity")["details"]["dataset_sha256"] = "ff" * 32
    ch = _change(compare_records(base, cand), "Q8_0", "ppl")
    assert not ch.comparable and "not the same chunks: dataset_sha256 changed" in ch.why


# ---------------------------------------------------------------------------------- KLD

def _with_kld_chunks(records: list[dict], quant: str, per_chunk: list[float]) -> None:
    r = _rec(records, quant, "kld")
    r["details"]["per_chunk_kld"] = per_chunk
    r["values"]["kld_mean"]["value"] = sum(per_chunk) / len(per_chunk)


def test_kld_paired_rise(base: list[dict]) -> None:
    rng = random.Random(12)
    chunks = [0.03 * math.exp(rng.gauss(0, 0.3)) for _ in range(8)]
    _with_kld_chunks(base, "Q4_K_M", chunks)
    same = compare_records(base, copy.deepcopy(base))
    assert _change(same, "Q4_K_M", "kld_mean").verdict == "no change"
    up = copy.deepcopy(base)
    _with_kld_chunks(up, "Q4_K_M", [k * 1.2 * math.exp(rng.gauss(0, 0.03)) for k in chunks])
    ch = _change(compare_records(base, up), "Q4_K_M", "kld_mean")
    assert ch.regression and "per-chunk" in ch.test and ch.ci_low > 10
    small = copy.deepcopy(base)
    _with_kld_chunks(small, "Q4_K_M", [k * 1.03 for k in chunks])
    assert not _change(compare_records(base, small), "Q4_K_M", "kld_mean").regression


def test_same_top_paired_on_chunks(base: list[dict]) -> None:
    rng = random.Random(13)
    chunks = [0.9 + rng.uniform(-0.03, 0.03) for _ in range(8)]
    r = _rec(base, "Q4_K_M", "kld")
    r["details"]["per_chunk_same_top"] = chunks
    cand = copy.deepcopy(base)
    rc = _rec(cand, "Q4_K_M", "kld")
    rc["details"]["per_chunk_same_top"] = [x - 0.03 + rng.uniform(-0.002, 0.002) for x in chunks]
    rc["values"]["same_top_pct"]["value"] -= 3.0
    ch = _change(compare_records(base, cand), "Q4_K_M", "same_top_pct")
    assert ch.regression and ch.unit == "points" and "per-chunk" in ch.test
    assert ch.change == pytest.approx(-3.0, abs=0.1)


def test_kld_without_chunks_is_not_comparable(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    kld = _rec(base, "Q4_K_M", "kld")["values"]["kld_mean"]
    _set(cand, "Q4_K_M", "kld", "kld_mean", value=kld["value"] * 1.5)
    _rec(cand, "Q4_K_M", "kld")["details"].pop("per_chunk_kld")
    ch = _change(compare_records(base, cand), "Q4_K_M", "kld_mean")
    assert not ch.comparable and "no per-chunk data in the candidate" in ch.why


def test_tiny_kld_needs_the_absolute_floor(base: list[dict]) -> None:
    """At KLD ~1e-6 a doubling is 1e-6 nats: below the absolute floor, not a regression."""
    _with_kld_chunks(base, "Q8_0", [1e-6 * (1 + i / 10) for i in range(8)])
    cand = copy.deepcopy(base)
    _with_kld_chunks(cand, "Q8_0", [2e-6 * (1 + i / 10) for i in range(8)])
    ch = _change(compare_records(base, cand), "Q8_0", "kld_mean")
    assert ch.change == pytest.approx(100.0) and not ch.regression
    assert ch.tolerance == pytest.approx(100 * 1e-5 / 1.35e-6)


# --------------------------------------------------------------------------------- MMLU

def _mmlu_pair(n: int, lost: int, gained: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    recs = demo_records(with_transformers=False, n_questions=n, seed=seed)
    cand = copy.deepcopy(recs)
    r = _rec(cand, "Q8_0", "mmlu")
    correct = r["details"]["correct"]
    right = [i for i, c in enumerate(correct) if c]
    wrong = [i for i, c in enumerate(correct) if not c]
    for i in right[:lost]:
        correct[i] = 0
    for i in wrong[:gained]:
        correct[i] = 1
    r["values"]["acc"]["value"] = sum(correct) / n
    return recs, cand


@pytest.mark.parametrize("lost,gained,regression", [
    (11, 2, True),     # -3.2 points on 285, p = 0.022
    (9, 0, True),      # -3.2 points, nothing gained
    (5, 5, False),     # churn, no net change
    (3, 0, False),     # -1.1 points, p = 0.25: not significant
])
def test_mmlu_mcnemar_on_flips(lost: int, gained: int, regression: bool) -> None:
    b, c = _mmlu_pair(285, lost, gained)
    ch = _change(compare_records(b, c), "Q8_0", "acc")
    assert ch.regression is regression
    assert f"{lost} lost, {gained} gained of 285" in ch.test
    assert ch.change == pytest.approx(100 * (gained - lost) / 285)


def test_mmlu_significant_but_below_tolerance_passes() -> None:
    b, c = _mmlu_pair(2000, 20, 0)     # -1 point, p ~ 2e-6
    ch = _change(compare_records(b, c), "Q8_0", "acc")
    assert "p = " in ch.test and not ch.regression
    assert _change(compare_records(b, c, tolerances=Tolerances({"mmlu.acc": 0.5})), "Q8_0",
                   "acc").regression


def test_mmlu_other_questions_are_not_comparable(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    r = _rec(cand, "Q8_0", "mmlu")
    r["details"]["question_ids"] = [f"x{i}" for i in range(len(r["details"]["correct"]))]
    ch = _change(compare_records(base, cand), "Q8_0", "acc")
    assert not ch.comparable and "not the same questions" in ch.why


# -------------------------------------------------------------------------- speed, memory

def test_a_timing_taken_under_load_is_not_comparable(base: list[dict]) -> None:
    """A candidate speed cell flagged unreliable (other work ran in its windows) is never a
    pass or a regression, even with tokens/s unchanged."""
    cand = copy.deepcopy(base)
    r = _rec(cand, "Q8_0", "speed")
    r["fitness"] = {"reliable": False, "reasons": ["other processes used 1.6 cores"],
                    "rounds": 3, "windows": []}
    cmp = compare_records(base, cand)
    ch = _change(cmp, "Q8_0", "tg_tokens_per_s")
    assert not ch.comparable and not ch.regression
    assert cmp.exit_code == EXIT_NOT_COMPARABLE and ch in cmp.incomparable

def test_speed_direction_and_interval(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    _set(cand, "Q8_0", "speed", "tg_tokens_per_s", value=200.0)       # faster: not worse
    _set(cand, "Q4_K_M", "speed", "tg_tokens_per_s", value=60.0)       # 120 -> 60, sd 3 %
    _set(cand, "Q6_K", "speed", "tg_tokens_per_s", value=95 * 0.95)    # -5 %: tolerated
    cmp = compare_records(base, cand)
    reg = {c.cell for c in cmp.regressions}
    assert any("Q4_K_M/speed" in c for c in reg)
    assert not any("Q8_0/speed" in c or "Q6_K/speed" in c for c in reg)
    slow = _change(cmp, "Q4_K_M", "tg_tokens_per_s")
    assert "Welch" in slow.test and slow.ci_low < slow.change < slow.ci_high < -10


def test_busy_machine_spread_widens_the_speed_interval(base: list[dict]) -> None:
    """-22 % with a quiet machine's 3 % sd is a regression; with a busy machine's 10 % sd in
    both runs the interval reaches past -10 % and it passes."""
    cand = copy.deepcopy(base)
    _set(cand, "Q4_K_M", "speed", "tg_tokens_per_s", value=120 * 0.78,
         samples=[120 * 0.78 * f for f in (0.97, 1.0, 1.03)])
    assert _change(compare_records(base, cand), "Q4_K_M", "tg_tokens_per_s").regression
    for recs, mean in ((base, 120.0), (cand, 120 * 0.78)):
        _set(recs, "Q4_K_M", "speed", "tg_tokens_per_s", sd=0.10 * mean,
             samples=[mean * f for f in (0.9, 1.0, 1.1)])
    assert not _change(compare_records(base, cand), "Q4_K_M", "tg_tokens_per_s").regression


def test_speed_and_memory_on_other_hardware_are_not_comparable(base: list[dict]) -> None:
    """Other hardware: speed and memory are not compared - which makes the comparison 'not
    comparable' (exit 4) unless the user says other hardware is expected."""
    cand = copy.deepcopy(base)
    for r in cand:
        r["env"] = dict(r["env"], cpu="Another CPU @ 2.0GHz")
    _set(cand, "Q4_K_M", "speed", "tg_tokens_per_s", value=10.0)
    _set(cand, "Q4_K_M", "speed", "peak_rss_mb", value=5000.0)
    cmp = compare_records(base, cand)
    assert not cmp.failed and cmp.exit_code == 4
    for name in ("tg_tokens_per_s", "peak_rss_mb"):
        ch = _change(cmp, "Q4_K_M", name)
        assert not ch.comparable and "other hardware" in ch.why
    assert _change(cmp, "Q4_K_M", "ppl").comparable     # quality still compared
    assert any(d.startswith("cpu:") for d in cmp.env_differences)
    allowed = compare_records(base, cand, tolerances=Tolerances(allow_other_hardware=True))
    ch = _change(allowed, "Q4_K_M", "tg_tokens_per_s")
    assert ch.verdict == "not compared: other hardware" and not ch.gated
    assert allowed.exit_code == 0


def test_memory_is_judged_on_its_repetitions_with_a_floor(base: list[dict]) -> None:
    """Peak RSS per repetition: +50 % is a regression; +13 % on 100 MiB is above the 10 %
    tolerance but below the 16 MiB floor."""
    for recs in (base,):
        _set(recs, "Q4_K_M", "speed", "peak_rss_mb", value=100.0, samples=[99.5, 100.0, 100.5])
    cand = copy.deepcopy(base)
    _set(cand, "Q4_K_M", "speed", "peak_rss_mb", value=150.0, samples=[149.5, 150.0, 150.5])
    ch = _change(compare_records(base, cand), "Q4_K_M", "peak_rss_mb")
    assert ch.regression and ch.change == pytest.approx(50.0) and "Welch" in ch.test
    _set(cand, "Q4_K_M", "speed", "peak_rss_mb", value=113.0, samples=[112.5, 113.0, 113.5])
    ch = _change(compare_records(base, cand), "Q4_K_M", "peak_rss_mb")
    assert not ch.regression and ch.tolerance == pytest.approx(16.0)


# ---------------------------------------------------------------------------- cell status

@pytest.mark.parametrize("status", ["crashed", "timeout", "failed", "skipped"])
def test_ok_cell_now_not_ok_is_a_regression(base: list[dict], status: str) -> None:
    cand = copy.deepcopy(base)
    r = _rec(cand, "Q8_0", "mmlu")
    r["status"], r["error"], r["values"] = status, "SIGSEGV in the kernel", {}
    cmp = compare_records(base, cand)
    assert cmp.failed and not cmp.regressions
    assert cmp.newly_failing[0]["cell"].endswith("Q8_0/mmlu")
    assert cmp.newly_failing[0]["status"] == status
    assert "SIGSEGV" in cmp.newly_failing[0]["error"]


def test_missing_cells_fail_unless_the_suite_dropped_them(base: list[dict]) -> None:
    cand = [r for r in copy.deepcopy(base) if r["variant"]["quant"] != "Q2_K"]
    cmp = compare_records(base, cand)
    assert cmp.failed and any(c.endswith("Q2_K/sanity") for c in cmp.missing)
    # the crashed baseline cell (Q2_K has none; Q6_K/perplexity crashed) is not expected
    expected = {("demo", r["id"]) for r in cand}
    cmp = compare_records(base, cand, expected=expected)
    assert not cmp.failed and any(c.endswith("Q2_K/sanity") for c in cmp.no_longer_asked)


def test_fixed_cells_and_cells_only_in_candidate(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    r = _rec(cand, "Q6_K", "perplexity")
    r["status"], r["error"] = "ok", None
    r["values"] = {"ppl": {"value": 29.0, "stderr": 1.4}}
    new = copy.deepcopy(_rec(cand, "Q8_0", "sanity"))
    new["variant"]["quant"], new["id"] = "Q5_K_M", new["id"].replace("Q8_0", "Q5_K_M")
    cmp = compare_records(base, cand + [new])
    assert any(c.endswith("Q6_K/perplexity") for c in cmp.newly_ok)
    assert any(c.endswith("Q5_K_M/sanity") for c in cmp.only_candidate)
    assert not cmp.failed


def test_latest_record_of_a_cell_wins(base: list[dict]) -> None:
    """A folder keeps an old key's record after a version change; the newest run decides."""
    cand = copy.deepcopy(base)
    old = copy.deepcopy(_rec(cand, "Q8_0", "mmlu"))
    old["key"], old["run_id"] = "oldkey", "20250101T000000Z-old"
    old["status"], old["values"] = "failed", {}
    cmp = compare_records(base, [old] + cand)
    assert not cmp.failed
    assert compare_records(base, cand + [dict(old, run_id="20270101T000000Z-new")]).failed


def test_degenerate_output_is_a_regression(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    _set(cand, "Q8_0", "sanity", "degenerate", value=1.0)
    cmp = compare_records(base, cand)
    assert any(c.value == "degenerate" and "Q8_0" in c.cell for c in cmp.regressions)


def test_file_size_changes_are_reported_not_gated(base: list[dict]) -> None:
    cand = copy.deepcopy(base)
    _set(cand, "Q8_0", "footprint", "file_size_mb", value=500.0)
    cmp = compare_records(base, cand)
    ch = _change(cmp, "Q8_0", "file_size_mb")
    assert not ch.gated and not ch.regression and not cmp.failed


# ---------------------------------------------------------------------------------- CLI

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
    [row] = [c for c in data["changes"] if c["regression"]]
    assert row["value"] == "tg_tokens_per_s" and "Welch" in row["test"]
    assert row["ci_high"] < -10 and row["verdict"] == "REGRESSION"
    page = out_html.read_text()
    assert "regression" in page and "tg_tokens_per_s" in page and "<script" not in page
    assert main(["compare", str(a), str(b), "--speed-tol-pct", "95"]) == 0


def test_cli_prints_each_value_with_its_test(base: list[dict], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    b_recs = copy.deepcopy(base)
    _set(b_recs, "Q4_K_M", "speed", "tg_tokens_per_s", value=10.0)
    a, b = _write(tmp_path / "a", base), _write(tmp_path / "b", b_recs)
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    for text in ("interval", "Welch", "McNemar", "REGRESSION", "1 regression(s)",
                 "simultaneous intervals at 90 % each", "family-wise false-alarm rate 0.05",
                 "detects (80 %)"):
        assert text in err, text


def test_cli_only_restricts_both_sides(base: list[dict], tmp_path: Path) -> None:
    a = _write(tmp_path / "a", base)
    part = [r for r in copy.deepcopy(base) if r["variant"]["quant"] == "Q8_0"]
    b = _write(tmp_path / "b", part)
    assert main(["compare", str(a), str(b)]) == 2                 # the rest is missing
    assert main(["compare", str(a), str(b), "--only", "*/Q8_0/*"]) == 0
    assert main(["compare", str(a), str(b), "--only", "*/nothing/*"]) == 1


def test_cli_suite_says_what_is_asked_for(base: list[dict], tmp_path: Path,
                                          write_suite: Callable[..., Path]) -> None:
    suite = write_suite("""
        [suite]
        name = "demo"
        [[models]]
        id = "tiny-135m"
        source = "/models/tiny.gguf"
        base = "F16"
        [[variants]]
        backend = "llama.cpp"
        quant = ["F16", "Q8_0", "Q6_K", "Q4_K_M"]
        [metrics.perplexity]
        [metrics.kld]
        [metrics.mmlu]
        [metrics.speed]
        """)
    ids = {i for _, i in expected_cells(suite)}
    assert "tiny-135m/llama.cpp/Q8_0/kld" in ids and not any("Q2_K" in i for i in ids)
    a = _write(tmp_path / "a", base)
    b = _write(tmp_path / "b", [r for r in copy.deepcopy(base)
                                if r["variant"]["quant"] != "Q2_K"])
    assert main(["compare", str(a), str(b)]) == 2
    assert main(["compare", str(a), str(b), "--suite", str(suite)]) == 0
    assert main(["compare", str(a), str(b), "--suite", str(tmp_path / "none.toml")]) == 1


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
    from qbench.results.gate import render_html
    recs = demo_records(model="<img src=x onerror=alert(1)>", with_transformers=False)
    cand = copy.deepcopy(recs)
    _set(cand, "Q4_K_M", "speed", "tg_tokens_per_s", value=10.0)
    page = render_html(compare_records(recs, cand))
    assert "<img" not in page and "&lt;img src=x" in page


def test_base_kld_of_zero_uses_the_absolute_floor(base: list[dict]) -> None:
    """A base compared with itself has KLD 0: a change is judged in nats, not in %."""
    _with_kld_chunks(base, "Q8_0", [0.0] * 8)
    same = compare_records(base, copy.deepcopy(base))
    assert _change(same, "Q8_0", "kld_mean").verdict == "no change"
    tiny = copy.deepcopy(base)
    _with_kld_chunks(tiny, "Q8_0", [1e-7 * (1 + i % 2) for i in range(8)])
    ch = _change(compare_records(base, tiny), "Q8_0", "kld_mean")
    assert ch.unit == "nats" and not ch.regression
    broken = copy.deepcopy(base)
    _with_kld_chunks(broken, "Q8_0", [0.01 * (1 + i % 2) for i in range(8)])
    assert _change(compare_records(base, broken), "Q8_0", "kld_mean").regression
