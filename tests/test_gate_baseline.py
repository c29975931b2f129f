"""The regression gate on the committed baseline of the default suite (results/baselines/smoke).

Fast tests perturb copies of the real stored records the way real regressions move them and
check that ``qbench compare`` fails (exit 2) on each - +1 % PPL on the 2,040 scored tokens,
+20 % mean KLD, a 3-point MMLU drop on 285 questions, an ok cell gone missing or skipped - and
passes the baseline against itself and speed measured on other hardware. The slow test runs a
fresh slice of the suite (F16 + Q8_0 on llama.cpp, every metric but speed) and gates it against
the baseline: what every submission's test run checks. Regenerate the baseline as
results/baselines/README.md says when numbers move on purpose.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
import statistics
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


def test_baseline_against_itself_passes(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    rc, res = _gate(tmp_path, records)
    assert rc == 0 and res["exit_code"] == 0
    gated = [c for c in res["changes"] if c["gated"]]
    assert len(gated) > 50 and all(c["verdict"] == "no change" for c in gated)
    assert not res["missing"] and not res["newly_failing"]


# -------------------------------------------------------------------------- perplexity

def _chunk_ln_ratios(records: list[dict[str, Any]], quant: str) -> list[float]:
    """Per-chunk ln(PPL_quant / PPL_F16) of the stored records."""
    base = _cell(records, "F16", "perplexity")["details"]["per_chunk_ppl"]
    other = _cell(records, quant, "perplexity")["details"]["per_chunk_ppl"]
    return [math.log(o / b) for b, o in zip(base, other)]


def realistic_spread(records: list[dict[str, Any]], target: float) -> float:
    """The per-chunk spread of a real loss of mean ln-ratio ``target``: the sd over chunks of
    ln(PPL_quant / PPL_F16) of the stored GGUF variant whose mean is closest to ``target``."""
    stats_ = [(statistics.fmean(d), statistics.stdev(d))
              for d in (_chunk_ln_ratios(records, q) for q in GGUF_LADDER)]
    return min(stats_, key=lambda ms: abs(math.log(abs(ms[0]) / target)))[1]


def _centred_draws(n: int, mean: float, spread: float, seed: int) -> list[float]:
    """``n`` normal draws standardised to exactly this ``mean`` and sample sd ``spread``: each
    chunk its own factor, the cell as a whole moving by exactly the stated amount with exactly
    the stated spread (so the outcome depends on the data's spread, not on a lucky seed)."""
    rng = random.Random(seed)
    draws = [rng.gauss(0.0, 1.0) for _ in range(n)]
    m, sd = statistics.fmean(draws), statistics.stdev(draws)
    return [mean + spread * (x - m) / sd for x in draws]


def perturb_ppl(rec: dict[str, Any], factor: float, spread: float, seed: int) -> None:
    """Scale each chunk's PPL by its own factor exp(N(ln factor, spread)) (centred: the
    cell's PPL moves by ``factor``); recompute the per-chunk NLL sums and the cell's PPL."""
    d = rec["details"]
    lns = _centred_draws(len(d["per_chunk_ppl"]), math.log(factor), spread, seed)
    d["per_chunk_ppl"] = [p * math.exp(x) for p, x in zip(d["per_chunk_ppl"], lns)]
    d["per_chunk_nll_sum"] = [s + n * x for s, n, x in zip(d["per_chunk_nll_sum"],
                                                            d["per_chunk_tokens"], lns)]
    mean_nll = sum(d["per_chunk_nll_sum"]) / sum(d["per_chunk_tokens"])
    rec["values"]["mean_nll"]["value"] = mean_nll
    rec["values"]["ppl"]["value"] = math.exp(mean_nll)


@pytest.mark.parametrize("quant", GGUF_LADDER)
def test_one_percent_ppl_fails(tmp_path: Path, records: list[dict[str, Any]],
                               quant: str) -> None:
    spread = realistic_spread(records, math.log(1.01))
    rec = _cell(records, quant, "perplexity")
    before = rec["values"]["ppl"]["value"]
    perturb_ppl(rec, 1.01, spread, seed=GGUF_LADDER.index(quant))
    assert rec["values"]["ppl"]["value"] / before == pytest.approx(1.01, rel=1e-9)
    rc, res = _gate(tmp_path, records)
    assert rc == 2 and _regressed(res) == {f"{MODEL}/llama.cpp/{quant}/perplexity:ppl"}


def test_tenth_of_a_percent_ppl_passes(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    """Below the 0.25 % tolerance: not a reason to fail CI."""
    rec = _cell(records, "Q4_K_M", "perplexity")
    perturb_ppl(rec, 1.001, realistic_spread(records, math.log(1.001)), seed=1)
    rc, res = _gate(tmp_path, records)
    assert rc == 0, _regressed(res)


# --------------------------------------------------------------------------------- KLD

def perturb_kld(rec: dict[str, Any], factor: float, spread: float, seed: int) -> None:
    """Scale each chunk's mean KLD by its own factor exp(N(ln factor, spread)), centred."""
    d = rec["details"]
    lns = _centred_draws(len(d["per_chunk_kld"]), math.log(factor), spread, seed)
    d["per_chunk_kld"] = [k * math.exp(x) for k, x in zip(d["per_chunk_kld"], lns)]
    rec["values"]["kld_mean"]["value"] = statistics.fmean(d["per_chunk_kld"])


def kld_chunk_spread(records: list[dict[str, Any]]) -> float:
    """How much per-chunk KLD moves, relatively, between neighbouring GGUF variants: the sd
    over chunks of ln(KLD_next / KLD_this), the median over the ladder."""
    sds = []
    for a, b in zip(GGUF_LADDER, GGUF_LADDER[1:]):
        ka = _cell(records, a, "kld")["details"]["per_chunk_kld"]
        kb = _cell(records, b, "kld")["details"]["per_chunk_kld"]
        sds.append(statistics.stdev(math.log(y / x) for x, y in zip(ka, kb)))
    return statistics.median(sds)


@pytest.mark.parametrize("quant", GGUF_LADDER)
def test_twenty_percent_kld_fails(tmp_path: Path, records: list[dict[str, Any]],
                                  quant: str) -> None:
    rec = _cell(records, quant, "kld")
    assert len(rec["details"].get("per_chunk_kld") or ()) == 8, "baseline lacks per-chunk KLD"
    perturb_kld(rec, 1.2, kld_chunk_spread(records), seed=10 + GGUF_LADDER.index(quant))
    rc, res = _gate(tmp_path, records)
    assert rc == 2 and f"{MODEL}/llama.cpp/{quant}/kld:kld_mean" in _regressed(res)


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
    [row] = [c for c in res["changes"] if c["cell"].endswith("Q4_K_M/mmlu")]
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


def test_speed_on_other_hardware_is_not_compared(tmp_path: Path,
                                                 records: list[dict[str, Any]]) -> None:
    _halve_speed(records)
    for r in records:
        r["env"] = dict(r["env"], cpu="Some other CPU", cpu_cores_logical=64)
        if r["metric"] == "speed":
            r["memory"]["peak_rss_mb"] = (r["memory"].get("peak_rss_mb") or 0) * 3
    rc, res = _gate(tmp_path, records)
    assert rc == 0
    speed = [c for c in res["changes"] if c["metric"] in ("speed", "memory")]
    assert speed and all(c["verdict"] == "not compared: other hardware" for c in speed)


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


def test_transformers_rss_is_reported_not_gated_but_llamacpp_rss_is(
        tmp_path: Path, records: list[dict[str, Any]]) -> None:
    """A torch process's peak RSS varies run to run (+29 % measured on an identical rerun), so
    it is shown, never gated; llama.cpp's (mmap'd weights) still gates."""
    def bump(quant: str, backend: str) -> list[dict[str, Any]]:
        cand = copy.deepcopy(records)
        cell = _cell(cand, quant, "speed", backend)
        cell["memory"]["peak_rss_mb"] = cell["memory"]["peak_rss_mb"] * 1.5 + 100
        return cand
    rc, res = _gate(tmp_path / "t", bump("bnb-nf4", "transformers"))
    assert rc == 0, res
    rc, res = _gate(tmp_path / "l", bump("Q8_0", "llama.cpp"))
    assert rc == 2
