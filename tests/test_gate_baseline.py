"""The regression gate on the committed baseline of the default suite (results/baselines/smoke).

Fast tests edit copies of the real stored records the way the issue's audit did and check the
gate's exit code and reason for each: what it never compared is *not comparable* (exit 4) -
a renamed suite or model, a NaN, a zero throughput, a value gone, another dataset, per-chunk
data gone, other hardware - never a pass; an ok cell gone missing or skipped and a real change
are regressions (exit 2), with a configuration change (threads) named beside the verdict. How
often the gate catches a given change, and how often it cries wolf, is measured with realistic
noise in tests/test_gate_power.py. The slow test runs a fresh slice of the suite and gates it
against the baseline: what every submission's test run checks. Regenerate the baseline as
results/baselines/README.md says when numbers move on purpose.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from qbench.cli import main
from qbench.results.compare import cell_id, expected_cells
from qbench.results.store import load_results

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "results" / "baselines" / "smoke"
SUITE = REPO / "suites" / "smoke.toml"
MODEL = "smollm2-135m"
# the fresh slice: base and one variant, every metric but speed (timing on a shared CI machine
# is not a regression signal; speed on other hardware is tested on stored records below)
SLICE_METRICS = ("footprint", "sanity", "perplexity", "kld", "mmlu")
SLICE = tuple(f"{MODEL}/llama.cpp/{q}/{m}" for q in ("F16", "Q8_0") for m in SLICE_METRICS)
GGUF_LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


@pytest.fixture(scope="module")
def stored() -> list[dict[str, Any]]:
    """The committed baseline's records (a missing baseline is a failure, not a skip)."""
    assert (BASELINE / "cells").is_dir(), f"no baseline at {BASELINE}: see its README.md"
    return load_results([BASELINE])


@pytest.fixture
def records(stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return copy.deepcopy(stored)


def _cell(records: list[dict[str, Any]], quant: str, metric: str,
          backend: str = "llama.cpp") -> dict[str, Any]:
    [rec] = [r for r in records if cell_id(r) == f"{MODEL}/{backend}/{quant}/{metric}"]
    return rec


def _write(root: Path, records: list[dict[str, Any]]) -> Path:
    cells = root / "smoke" / "cells"
    cells.mkdir(parents=True)
    for r in records:
        (cells / f"{r['key']}.json").write_text(json.dumps(r))
    return root / "smoke"


def _gate(tmp_path: Path, candidate: list[dict[str, Any]], *extra: str,
          baseline: Path = BASELINE) -> tuple[int, dict[str, Any]]:
    """``qbench compare BASELINE CANDIDATE --suite smoke.toml --json``: (exit code, result)."""
    cand = _write(tmp_path / "candidate", candidate)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["compare", str(baseline), str(cand), "--suite", str(SUITE), "--json",
                   *extra])
    return rc, json.loads(out.getvalue())


def _regressed(result: dict[str, Any]) -> set[str]:
    return {f"{c['cell'].split('/', 1)[1]}:{c['value']}" for c in result["changes"]
            if c["regression"]}


# ------------------------------------------------------------------- the stored baseline

def _declared_gaps() -> set[str]:
    """Cells knowingly absent from the baseline (results/baselines/smoke/GAPS: a cell id per
    line, '#' comments give the reason). Must match the real gaps exactly, both ways."""
    path = BASELINE / "GAPS"
    if not path.exists():
        return set()
    return {line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()}


def test_baseline_is_complete_and_ok(stored: list[dict[str, Any]]) -> None:
    """Every cell the default suite asks for is in the baseline, and ok (a cell not ok in the
    baseline would never be expected, hiding its failures)."""
    ids = {cell_id(r) for r in stored}
    missing = {i for _, i in expected_cells(SUITE)} - ids
    gaps = _declared_gaps()
    assert not (gaps & ids), f"declared gaps now in the baseline: {sorted(gaps & ids)} - " \
        "remove them from results/baselines/smoke/GAPS"
    assert missing == gaps, f"baseline lacks {sorted(missing - gaps)}: regenerate " \
        "(results/baselines/README.md), or declare them with the reason in GAPS"
    assert all(r["status"] == "ok" for r in stored), [cell_id(r) for r in stored
                                                      if r["status"] != "ok"]
    ppl = _cell(stored, "Q8_0", "perplexity")["details"]
    assert ppl["scored_tokens"] == 2040 and len(ppl["per_chunk_ppl"]) == 8


def test_baseline_timings_are_reliable_and_from_one_run(stored: list[dict[str, Any]]) -> None:
    """Its speed cells are compared with every later run's: taken in one run, under the
    machine lock, undisturbed (results/baselines/README.md)."""
    assert len({r["run_id"] for r in stored}) == 1, sorted({r["run_id"] for r in stored})
    speed = [r for r in stored if r["metric"] == "speed"]
    assert speed and all(r["metric_version"] == "4" for r in speed)
    for r in speed:
        fit = r.get("fitness") or {}
        assert fit.get("reliable") is True, (cell_id(r), fit.get("reasons"))
        assert (r.get("lock") or {}).get("mode") == "exclusive", cell_id(r)
        assert "peak_rss_mb" in r["values"], cell_id(r)


def test_baseline_against_itself_passes(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    rc, res = _gate(tmp_path, records)
    assert rc == 0 and res["exit_code"] == 0
    gated = [c for c in res["changes"] if c["gated"]]
    assert len(gated) > 50 and all(c["verdict"] == "no change" for c in gated)
    assert not res["missing"] and not res["newly_failing"]


# ----------------------------------------------------------------- nothing incomparable passes

def _not_comparable(res: dict[str, Any]) -> str:
    return " | ".join(res["not_comparable_reasons"])


def test_renamed_suite_is_not_comparable(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    """Audit: 'no regression (0 values compared)' with all 68 cells 'no longer in the suite'."""
    for r in records:
        r["suite"] = "smoke2"
    cand = _write(tmp_path / "candidate", records).parent / "smoke2"
    (tmp_path / "candidate" / "smoke").rename(cand)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["compare", str(BASELINE), str(cand), "--json"])
    res = json.loads(out.getvalue())
    assert rc == 4 and "no suite in common" in _not_comparable(res)
    assert "smoke2" in _not_comparable(res) and "'smoke'" in _not_comparable(res)


def test_renamed_model_is_not_comparable(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    for r in records:
        r["model"]["id"] = "smollm2-renamed"
    rc, res = _gate(tmp_path, records)
    assert rc == 4 and res["missing"]            # listed, but they say nothing of the code
    assert "smollm2-renamed" in _not_comparable(res) and "renamed?" in _not_comparable(res)


def test_nan_kld_is_not_comparable(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    rec = _cell(records, "Q4_K_M", "kld")
    rec["values"]["kld_mean"]["value"] = math.nan
    rec["details"]["per_chunk_kld"] = [math.nan] * len(rec["details"]["per_chunk_kld"])
    rc, res = _gate(tmp_path, records)
    assert rc == 4 and "Q4_K_M/kld kld_mean: candidate's kld_mean is not a finite number" \
        in _not_comparable(res)


def test_zero_throughput_is_not_comparable(tmp_path: Path,
                                           records: list[dict[str, Any]]) -> None:
    rec = _cell(records, "Q4_K_M", "speed")
    for name in ("pp_tokens_per_s", "tg_tokens_per_s"):
        v = rec["values"][name]
        v.update(value=0.0, samples=[0.0] * len(v.get("samples") or [0]), sd=0.0)
    rc, res = _gate(tmp_path, records)
    assert rc == 4 and "tg_tokens_per_s is 0: a ratio needs a positive value" \
        in _not_comparable(res)


def test_gated_values_removed_are_not_comparable(tmp_path: Path,
                                                 records: list[dict[str, Any]]) -> None:
    for quant, metric, name in (("Q8_0", "perplexity", "ppl"), ("Q8_0", "mmlu", "acc"),
                                ("Q8_0", "kld", "kld_mean")):
        del _cell(records, quant, metric)["values"][name]
    rc, res = _gate(tmp_path, records)
    why = _not_comparable(res)
    assert rc == 4 and why.count("candidate's") == 3 and "is missing" in why


def test_another_dataset_is_not_comparable(tmp_path: Path,
                                           records: list[dict[str, Any]]) -> None:
    """Audit: another dataset's chunks, PPL x 1.2, passed as a 'paired' interval."""
    rec = _cell(records, "Q4_K_M", "perplexity")
    rec["details"]["dataset_sha256"] = "0" * 64
    rec["details"]["per_chunk_ppl"] = [p * 1.2 for p in rec["details"]["per_chunk_ppl"][::-1]]
    rec["details"]["per_chunk_nll_sum"] = [
        s + n * math.log(1.2) for s, n in zip(rec["details"]["per_chunk_nll_sum"][::-1],
                                              rec["details"]["per_chunk_tokens"])]
    rec["values"]["ppl"]["value"] *= 1.2
    rc, res = _gate(tmp_path, records)
    assert rc == 4 and "not the same chunks: dataset_sha256 changed" in _not_comparable(res)
    [row] = [c for c in res["changes"] if c["cell"].endswith("Q4_K_M/perplexity")
             and c["value"] == "ppl"]
    assert row["ci_low"] is None and not row["regression"]      # never a paired interval


def test_missing_per_chunk_data_is_not_comparable(tmp_path: Path,
                                                  records: list[dict[str, Any]]) -> None:
    rec = _cell(records, "Q4_K_M", "perplexity")
    for k in ("per_chunk_ppl", "per_chunk_nll_sum"):
        rec["details"].pop(k)
    rec["values"]["ppl"]["value"] *= 1.1
    rc, res = _gate(tmp_path, records)
    assert rc == 4 and "no per-chunk data in the candidate: cannot pair" in _not_comparable(res)


def test_suite_ids_are_the_plans_for_every_suite() -> None:
    """The gate's expected cells are the ids the plan gives (+imatrix=, +kv=, @label
    included): checked against a full expand() of every suite in suites/, with the file
    hashing stubbed (no model or download needed)."""
    import qbench.suite.plan as plan
    from qbench.suite.config import load_suite

    for path in sorted((REPO / "suites").glob("*.toml")):
        suite = load_suite(path)
        ctx = plan.PlanContext(path.parent, None, Path("/nonexistent"),
                               env={"cpu": "x", "cpu_cores_physical": 2})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(plan, "model_identity", lambda m, c: "0" * 64)
            mp.setattr(plan, "converter_identity", lambda m, c: None)
            mp.setattr(plan, "variant_inputs", lambda v, c, f="": {})
            mp.setattr(plan, "libraries", lambda v: {})
            planned = {(suite.name, c.id) for c in plan.expand(suite, ctx)}
        assert expected_cells(path) == planned, path.name
        assert any("+" in i or "@" in i for _, i in planned) or path.name in (
            "smoke.toml", "qwen2.5-size-ladder.toml", "sizes.toml"), path.name


# -------------------------------------------------------------------------------- MMLU

def mmlu_pair(rec: dict[str, Any], n: int, lost: int, gained: int
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A baseline/candidate pair of ``n`` questions grown from a stored MMLU record (its
    outcomes repeated under new ids), the candidate with ``lost`` right answers turned wrong
    and ``gained`` wrong ones turned right, spread over the questions."""
    d = rec["details"]
    reps = -(-n // len(d["correct"]))
    ids = [f"{q}#{k}" for k in range(reps) for q in d["question_ids"]][:n]
    correct = (list(d["correct"]) * reps)[:n]
    base = copy.deepcopy(rec)
    base["details"].update(question_ids=ids, correct=correct, n=n)
    base["values"]["acc"].update(value=sum(correct) / n, n=n)
    cand = copy.deepcopy(base)
    flipped = list(correct)
    right = [i for i, c in enumerate(correct) if c][::-1]
    wrong = [i for i, c in enumerate(correct) if not c]
    for i in right[:lost]:
        flipped[i] = 0
    for i in wrong[:gained]:
        flipped[i] = 1
    cand["details"]["correct"] = flipped
    cand["values"]["acc"]["value"] = sum(flipped) / n
    return base, cand


def test_three_point_mmlu_drop_on_285_fails(tmp_path: Path, records: list[dict[str, Any]]
                                            ) -> None:
    """-3.2 points (11 lost, 2 gained of 285): McNemar p = 0.022 -> exit 2. The stored
    57-question cells are too small for that: the pair is grown to 285 from a stored one."""
    rec = _cell(records, "Q8_0", "mmlu")
    base_rec, cand_rec = mmlu_pair(rec, 285, lost=11, gained=2)
    assert 100 * (cand_rec["values"]["acc"]["value"] - base_rec["values"]["acc"]["value"]) \
        == pytest.approx(-3.16, abs=0.01)
    baseline = [r for r in records if r is not rec] + [base_rec]
    b_dir = _write(tmp_path / "baseline", baseline)
    rc, res = _gate(tmp_path, [r for r in records if r is not rec] + [cand_rec],
                    baseline=b_dir)
    assert rc == 2 and _regressed(res) == {f"{MODEL}/llama.cpp/Q8_0/mmlu:acc"}
    [row] = [c for c in res["changes"] if c["regression"]]
    assert "11 lost, 2 gained of 285" in row["test"]


def test_two_questions_on_57_are_not_a_regression(tmp_path: Path,
                                                  records: list[dict[str, Any]]) -> None:
    """The stored 57-question subset: 2 answers lost (-3.5 points) is p = 0.5, not evidence."""
    rec = _cell(records, "Q4_K_M", "mmlu")
    right = [i for i, c in enumerate(rec["details"]["correct"]) if c]
    for i in right[:2]:
        rec["details"]["correct"][i] = 0
    rec["values"]["acc"]["value"] -= 2 / len(rec["details"]["correct"])
    rc, res = _gate(tmp_path, records)
    assert rc == 0
    [row] = [c for c in res["changes"] if c["cell"].endswith("Q4_K_M/mmlu")
             and c["value"] == "acc"]
    assert "2 lost, 0 gained" in row["test"] and row["verdict"] == "ok"


# ------------------------------------------------------------------------- cell status

def test_ok_cell_gone_missing_fails(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    gone = _cell(records, "Q4_K_M", "perplexity")
    rc, res = _gate(tmp_path, [r for r in records if r is not gone])
    assert rc == 2 and res["missing"] == [f"smoke/{MODEL}/llama.cpp/Q4_K_M/perplexity"]


def test_ok_cell_now_skipped_fails(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    rec = _cell(records, "fp32", "mmlu", backend="transformers")
    rec.update(status="skipped", values={}, error="transformers is not installed")
    rc, res = _gate(tmp_path, records)
    assert rc == 2
    assert [f["status"] for f in res["newly_failing"]] == ["skipped"]


def test_cells_the_suite_dropped_may_go(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    text = SUITE.read_text().replace('"Q3_K_M", "Q2_K"]', '"Q3_K_M"]')
    assert text != SUITE.read_text()
    suite = tmp_path / "smoke.toml"
    suite.write_text(text)
    kept = [r for r in records if r["variant"]["quant"] != "Q2_K"]
    rc, res = _gate(tmp_path, kept, "--suite", str(suite))
    assert rc == 0 and res["no_longer_asked"] and not res["missing"]


# ----------------------------------------------------------------------- speed, memory

def _halve_speed(records: list[dict[str, Any]]) -> None:
    for r in records:
        if r["metric"] == "speed":
            for name in ("pp_tokens_per_s", "tg_tokens_per_s"):
                v = r["values"][name]
                v["value"] /= 2
                v["samples"] = [s / 2 for s in v.get("samples") or ()]
                v["sd"] = (v.get("sd") or 0.0) / 2


def test_speed_halved_on_the_same_hardware_fails(tmp_path: Path,
                                                 records: list[dict[str, Any]]) -> None:
    _halve_speed(records)
    rc, res = _gate(tmp_path, records)
    assert rc == 2
    assert {c["metric"] for c in res["changes"] if c["regression"]} == {"speed"}


def test_speed_on_other_hardware_is_not_comparable(tmp_path: Path,
                                                  records: list[dict[str, Any]]) -> None:
    _halve_speed(records)
    for r in records:
        r["env"] = dict(r["env"], cpu="Some other CPU", cpu_cores_logical=64)
    rc, res = _gate(tmp_path, records)
    assert rc == 4 and "measured on other hardware" in _not_comparable(res)
    rc, res = _gate(tmp_path / "allowed", records, "--allow-other-hardware")
    assert rc == 0
    speed = [c for c in res["changes"] if c["metric"] == "speed" and c["verdict"] != "reported"]
    assert speed and all(c["verdict"] == "not compared: other hardware" for c in speed)


def test_threads_change_is_named_beside_the_verdict(tmp_path: Path,
                                                   records: list[dict[str, Any]]) -> None:
    """Audit: threads 2 -> 1 halved tokens/s and the gate called it a code regression without
    a word about threads."""
    _halve_speed(records)
    for r in records:
        r.setdefault("run", {})["threads"] = 1
    rc, res = _gate(tmp_path, records)
    assert rc == 2
    reg = [c for c in res["changes"] if c["regression"]]
    assert reg and all("threads 2 → 1" in c["config"] for c in reg)
    text = io.StringIO()
    cand = _write(tmp_path / "text", records)
    from rich.console import Console
    from qbench.results.compare import compare_records
    from qbench.results.gate import print_text
    print_text(compare_records(load_results([BASELINE]), load_results([cand])),
               Console(file=text, width=400))
    assert "threads 2 → 1" in text.getvalue()


# ------------------------------------------------------------------ a fresh run (slow)

@pytest.mark.slow
def test_fresh_slice_passes_the_gate(tmp_path: Path, data_dir: Path, smollm2_ref: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Run F16 + Q8_0 (perplexity, KLD, MMLU, sanity, footprint) of the default suite now and
    gate it against the committed baseline: the code of this submission must not regress."""
    monkeypatch.setenv("QBENCH_DATA_DIR", str(data_dir))
    monkeypatch.delenv("QBENCH_FAULT", raising=False)
    out = tmp_path / "fresh"
    only = [a for p in SLICE for a in ("--only", p)]
    assert main(["run", str(SUITE), "--out", str(out), "--no-report", *only]) == 0
    fresh = load_results([out / "smoke"])
    assert {cell_id(r) for r in fresh} == set(SLICE)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["compare", str(BASELINE), str(out / "smoke"), "--suite", str(SUITE),
                   "--json", *only])
    res = json.loads(buf.getvalue())
    assert rc == 0, [c for c in res["changes"] if c["regression"]] + res["newly_failing"]
    tests = {c["value"]: c["test"] for c in res["changes"] if c["gated"]}
    assert "paired t" in tests["ppl"] and "McNemar" in tests["acc"]
    assert "per-chunk" in tests["kld_mean"]


def test_memory_is_gated_on_its_repetitions_where_it_is_stable(
        tmp_path: Path, records: list[dict[str, Any]]) -> None:
    """Peak RSS per speed repetition is judged on its spread like speed - for llama.cpp, whose
    mmap'd weights give the same peak run after run. A torch process's peak is shown, never
    gated: identical reruns of the default suite moved bnb-nf4's 1,163 -> 1,520 MiB (+31 %)
    while its repetitions agreed to 0.4 % (BackendInfo.rss_gated)."""
    def bump(quant: str, backend: str) -> list[dict[str, Any]]:
        cand = copy.deepcopy(records)
        v = _cell(cand, quant, "speed", backend)["values"]["peak_rss_mb"]
        v.update(value=v["value"] * 1.5, samples=[x * 1.5 for x in v["samples"]])
        return cand
    rc, res = _gate(tmp_path / "l", bump("Q8_0", "llama.cpp"))
    assert rc == 2, res
    assert _regressed(res) == {f"{MODEL}/llama.cpp/Q8_0/speed:peak_rss_mb"}
    rc, res = _gate(tmp_path / "t", bump("bnb-nf4", "transformers"))
    assert rc == 0, _regressed(res)
    [row] = [c for c in res["changes"] if c["cell"].endswith("bnb-nf4/speed")
             and c["value"] == "peak_rss_mb"]
    assert row["verdict"] == "reported" and not row["gated"] and row["change"] > 49
