"""The recommendation holds at its error bars: a variant is eligible only when the upper end of
its 95 % ΔPPL interval - the one judge's, chunk-paired t, the same the gate uses - is within the
tolerated loss; one whose point passes but whose interval does not is borderline (with the
sample that would resolve it at 80 % power, or "cannot be resolved with this dataset"), never
recommended; two cells not scored on the same chunks are not comparable; a failed MMLU cell is
"MMLU not measured" and never a pass; memory is ranked by weights + KV with a tie band; memory
is the weights in memory (bitsandbytes: not the float file) and the variant's own cell's peak,
not a KLD/perplexity cell that also loaded the base."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
from scipy import stats as sps

from qbench.report.build import render_suite
from qbench.report.recommend import TIE_BAND, kv_cache_mb, loss_verdict, recommend
from synthetic_records import SHAPE, chunk_details, make_record
from qbench.report.table import memory_of, variant_rows

N_CHUNKS, CHUNK_TOKENS = 8, 255
N_TOKENS = N_CHUNKS * CHUNK_TOKENS
MODEL = "m"
BASE_CHUNKS = [18.0, 25.0, 21.0, 30.0, 16.0, 22.0, 27.0, 19.0]
PATTERN = [-1.5, 0.2, -0.6, 1.1, 0.4, -1.0, 1.6, -0.2]     # any fixed spread of 8 chunks


def _shifts(point_pct: float, high_pct: float) -> list[float]:
    """Per-chunk ln ratios whose mean is ln(1 + point) and whose t interval (7 df) ends at
    ln(1 + high): the PPL ratio and its upper bound the test wants."""
    m, sd = statistics.fmean(PATTERN), statistics.stdev(PATTERN)
    lr = math.log1p(point_pct / 100)
    half = math.log1p(high_pct / 100) - lr
    spread = half / sps.t.ppf(0.975, N_CHUNKS - 1) * math.sqrt(N_CHUNKS)
    return [lr + spread * (x - m) / sd for x in PATTERN]


def _ppl_cell(quant: str, chunk_ppl: list[float], *, is_base: bool = False, sha: str = "aa",
              peak: float = 300.0, tokens_in_text: int = 300_000) -> dict[str, Any]:
    nll = sum(math.log(p) for p in chunk_ppl) / len(chunk_ppl)
    ppl = math.exp(nll)
    return make_record(MODEL, "llama.cpp", quant, "perplexity", is_base=is_base, values={
        "ppl": {"value": ppl, "stderr": ppl * 0.05, "n": CHUNK_TOKENS * len(chunk_ppl)}},
        details={"dataset_sha256": sha, "ctx": 512, "tokens_in_text": tokens_in_text,
                 **chunk_details(chunk_ppl, CHUNK_TOKENS)},
        options={"ctx": 512, "chunks": len(chunk_ppl)}, memory={"peak_rss_mb": peak})


def _gguf(quant: str, *, size_mb: float, point_pct: float | None = None,
          high_pct: float | None = None, speed_peak: float = 300.0,
          kld_peak: float | None = None, is_base: bool = False,
          tokens_in_text: int = 300_000) -> list[dict[str, Any]]:
    """A llama.cpp variant: footprint, perplexity (per-chunk), speed and (not for the base) a
    KLD cell."""
    common: dict[str, Any] = {"is_base": is_base}
    recs = [make_record(MODEL, "llama.cpp", quant, "footprint", **common, values={
        "file_size_mb": {"value": size_mb}, "bpw": {"value": 8 * size_mb / 130}},
        details={"shape": SHAPE}, memory={"peak_rss_mb": 50.0})]
    chunks = BASE_CHUNKS if is_base else [
        b * math.exp(d) for b, d in zip(BASE_CHUNKS, _shifts(point_pct or 0.0, high_pct or 0.0))]
    recs.append(_ppl_cell(quant, chunks, is_base=is_base, peak=kld_peak or speed_peak,
                          tokens_in_text=tokens_in_text))
    if not is_base:
        recs.append(make_record(MODEL, "llama.cpp", quant, "kld", **common, values={
            "kld_mean": {"value": 0.01, "stderr": 1e-4, "n": N_TOKENS}},
            details={"scored_tokens": N_TOKENS}, memory={"peak_rss_mb": kld_peak or speed_peak}))
    recs.append(make_record(MODEL, "llama.cpp", quant, "speed", **common, values={
        "tg_tokens_per_s": {"value": 50.0, "sd": 1.0, "n": 3}},
        options={"prompt_tokens": 256, "gen_tokens": 32}, memory={"peak_rss_mb": speed_peak}))
    return recs


def _ladder() -> list[dict[str, Any]]:
    """F16 base; Q8_0 passes at its upper end (+0.30 %, upper +0.60 %); Q6_K is borderline at
    1 % (+0.85 %, upper +1.80 %)."""
    return (_gguf("F16", size_mb=260.0, speed_peak=400.0, is_base=True)
            + _gguf("Q8_0", size_mb=140.0, point_pct=0.30, high_pct=0.60, speed_peak=240.0)
            + _gguf("Q6_K", size_mb=110.0, point_pct=0.85, high_pct=1.80, speed_peak=210.0))


def _by_quant(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["row"]["quant"]: c for c in rec["candidates"]}


# ------------------------------------------------------------------------- the ΔPPL interval

def test_rows_carry_the_judges_chunk_paired_interval() -> None:
    rows = {r["quant"]: r for r in variant_rows(_ladder())}
    q6 = rows["Q6_K"]
    assert q6["dppl_pct"] == pytest.approx(0.85)
    assert q6["dppl_ci_high"] == pytest.approx(1.80)
    assert q6["dppl_ci_low"] < 0.85 - (1.80 - 0.85) + 0.05    # exp(): not symmetric in %
    assert q6["dppl_paired"] == "chunk-paired t, 8 chunks" and q6["dppl_n"] == N_TOKENS
    assert rows["F16"]["dppl_ci_low"] == rows["F16"]["dppl_ci_high"] == 0.0


def _need_80(point_pct: float, high_pct: float, tol: float) -> int:
    """Chunks for 80 % power, from scratch: n (z.975 + z.80)^2 se^2 / gap^2, se (in %) from
    the t interval, rounded up to two significant figures."""
    lr = math.log1p(point_pct / 100)
    se_ln = (math.log1p(high_pct / 100) - lr) / sps.t.ppf(0.975, N_CHUNKS - 1)
    se_pct = 100 * math.exp(lr) * se_ln
    need = N_CHUNKS * ((sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * se_pct
                       / (tol - point_pct)) ** 2
    mag = 10 ** (math.floor(math.log10(need)) - 1)
    return int(math.ceil(need / mag) * mag)


def test_borderline_is_not_recommended_and_says_what_would_resolve_it() -> None:
    [rec] = recommend(variant_rows(_ladder()), budget_gb=None, max_loss_pct=1.0)
    q6 = _by_quant(rec)["Q6_K"]
    assert not q6["eligible"] and q6["borderline"] and q6["loss_status"] == "borderline"
    assert rec["choice"]["row"]["quant"] == "Q8_0"     # the tighter one, passing at +0.60 %
    assert [c["row"]["quant"] for c in rec["borderline"]] == ["Q6_K"]
    text = rec["borderline_text"][0]
    assert "Q6_K is borderline and not recommended" in text and "+1.80" in text
    want = _need_80(0.85, 1.80, 1.0)
    assert q6["resolve"]["n"] == want
    assert f"about {want:,} chunks" in text and "80% power" in text and "now 8" in text


def test_a_sample_larger_than_the_text_cannot_resolve_it() -> None:
    """The text holds 40 chunks of 512 tokens: more cannot be scored, and the page says so."""
    recs = (_gguf("F16", size_mb=260.0, is_base=True, tokens_in_text=40 * 512)
            + _gguf("Q6_K", size_mb=110.0, point_pct=0.85, high_pct=1.80,
                    tokens_in_text=40 * 512))
    [rec] = recommend(variant_rows(recs), budget_gb=None, max_loss_pct=1.0)
    q6 = _by_quant(rec)["Q6_K"]
    assert q6["resolve"]["resolvable"] is False and _need_80(0.85, 1.80, 1.0) > 40
    assert "cannot be resolved with this dataset" in " ".join(q6["reasons"])
    assert "40 available" in " ".join(q6["reasons"])


def test_nothing_eligible_names_best_borderline_and_what_resolves_it() -> None:
    # 0.2 GiB = 204.8 MiB: only Q6_K's estimate (110 + KV) fits, and its peak is set to fit
    recs = (_gguf("F16", size_mb=260.0, speed_peak=400.0, is_base=True)
            + _gguf("Q6_K", size_mb=110.0, point_pct=0.85, high_pct=1.80, speed_peak=100.0))
    [rec] = recommend(variant_rows(recs), budget_gb=0.2, max_loss_pct=1.0)
    assert rec["choice"] is None
    assert "No measured variant" in rec["why"]
    assert "m / llama.cpp / Q6_K" in rec["why"] and "would resolve it" in rec["why"]


def test_tighter_interval_is_recommended_with_a_budget() -> None:
    # 0.35 GiB: F16 does not fit; Q8_0 (+0.30, upper +0.60) is the lowest loss that passes
    [rec] = recommend(variant_rows(_ladder()), budget_gb=0.35, max_loss_pct=1.0)
    assert rec["choice"]["row"]["quant"] == "Q8_0"
    assert "+0.60" in rec["why"] and "chunk-paired t" in rec["why"]
    # at 2 % Q6_K passes at its upper end and, needing least memory, is taken without a budget
    [rec] = recommend(variant_rows(_ladder()), budget_gb=None, max_loss_pct=2.0)
    assert rec["choice"]["row"]["quant"] == "Q6_K" and not rec["borderline"]


def test_loss_above_tolerance_is_a_failure_not_borderline() -> None:
    [rec] = recommend(variant_rows(_ladder()), budget_gb=None, max_loss_pct=0.5)
    q6 = _by_quant(rec)["Q6_K"]
    assert q6["loss_status"] == "fail" and not q6["borderline"]
    assert any("> tolerated 0.5 %" in x for x in q6["reasons"])
    assert _by_quant(rec)["Q8_0"]["borderline"]          # +0.30 passes, +0.60 does not


def test_different_texts_are_not_comparable_and_never_pass() -> None:
    other = [b * math.exp(d) for b, d in zip(BASE_CHUNKS, _shifts(0.3, 0.6))]
    rows = variant_rows([_ppl_cell("F16", BASE_CHUNKS, is_base=True),
                         _ppl_cell("Q8_0", other, sha="bb")])
    q8 = next(r for r in rows if r["quant"] == "Q8_0")
    assert q8["dppl_pct"] is None and "dataset_sha256 changed" in q8["dppl_how"]
    assert loss_verdict(q8, 1.0)["status"] == "unknown"
    [rec] = recommend(rows, budget_gb=None, max_loss_pct=1.0)
    c = _by_quant(rec)["Q8_0"]
    assert not c["eligible"] and any("not comparable" in x for x in c["reasons"])


def test_failed_mmlu_is_not_measured_and_never_a_pass() -> None:
    """Q8_0 passes on PPL, but its MMLU cell failed: it is not recommended, and the page says
    MMLU was not measured (it used to count as 'no significant drop')."""
    recs = _ladder()
    for quant in ("F16", "Q8_0", "Q6_K"):
        recs.append(make_record(MODEL, "llama.cpp", quant, "mmlu", is_base=quant == "F16",
                                status="failed" if quant == "Q8_0" else "ok",
                                error="boom" if quant == "Q8_0" else None,
                                values={"acc": {"value": 0.6, "n": 4}},
                                details={"question_ids": ["a", "b", "c", "d"],
                                         "correct": [1, 1, 0, 1],
                                         "predicted": ["A", "B", "C", "D"], "shots": 0,
                                         "dataset": "mmlu"}))
    [rec] = recommend(variant_rows(recs), budget_gb=0.35, max_loss_pct=2.0)
    q8 = _by_quant(rec)["Q8_0"]
    assert not q8["eligible"] and "MMLU not measured (cell failed)" in q8["reasons"]
    assert rec["choice"]["row"]["quant"] == "Q6_K"
    # at 0.7 % Q6_K fails the loss and F16 does not fit: the reason given for Q8_0, the only
    # one left, is the one that excluded it - MMLU - not the loss tolerance
    [rec] = recommend(variant_rows(recs), budget_gb=0.35, max_loss_pct=0.7)
    assert rec["choice"] is None
    assert "Q8_0: MMLU not measured (cell failed)" in rec["why"]
    assert "Q6_K: ΔPPL +0.85 %" in rec["why"]


def test_mmlu_at_chance_decides_nothing_and_is_said() -> None:
    recs = _ladder()
    ids = [f"q{i}" for i in range(40)]
    for quant in ("F16", "Q8_0", "Q6_K"):
        recs.append(make_record(MODEL, "llama.cpp", quant, "mmlu", is_base=quant == "F16",
                                values={"acc": {"value": 0.25, "n": 40}},
                                details={"question_ids": ids, "correct": [1, 0, 0, 0] * 10,
                                         "predicted": ["A"] * 40, "shots": 0,
                                         "dataset": "mmlu"}))
    [rec] = recommend(variant_rows(recs), budget_gb=None, max_loss_pct=1.0)
    assert rec["choice"]["row"]["quant"] == "Q8_0"
    assert "MMLU cannot discriminate on this model" in rec["why"]
    assert "answers A to 40 of 40" in rec["why"] and "not significant" not in rec["why"]


def test_memory_ties_go_to_the_smaller_loss() -> None:
    """Two files within the tie band: the one with the smaller loss is taken, whatever one
    RSS sample says (Q5 peaks 1.3 MiB lower but loses more)."""
    recs = (_gguf("F16", size_mb=260.0, is_base=True)
            + _gguf("Q4_K_M", size_mb=100.0, point_pct=0.20, high_pct=0.40, speed_peak=201.3)
            + _gguf("Q5_K_M", size_mb=100.0 * (1 + TIE_BAND / 4), point_pct=0.60,
                    high_pct=0.90, speed_peak=200.0))
    [rec] = recommend(variant_rows(recs), budget_gb=None, max_loss_pct=1.0)
    assert rec["choice"]["row"]["quant"] == "Q4_K_M"
    assert "ties within 2 %" in rec["why"]


# ----------------------------------------------------------------------------------- memory

def _hf(quant: str, *, file_mb: float, loaded_mb: float | None, speed_peak: float,
        is_base: bool = False, measured_bytes: int | None = None) -> list[dict[str, Any]]:
    fp_values: dict[str, Any] = {"file_size_mb": {"value": file_mb}, "bpw": {"value": 32.0}}
    if loaded_mb is not None:
        fp_values["loaded_weights_estimate_mb"] = {"value": loaded_mb}
        fp_values["bpw_loaded_estimate"] = {"value": 32.0 * loaded_mb / file_mb}
    backend = {"device": "cpu"}
    if measured_bytes:
        backend["weights_now"] = {"memory_footprint_bytes": measured_bytes}
    return [make_record(MODEL, "transformers", quant, "footprint", is_base=is_base,
                        values=fp_values, details={"shape": SHAPE}),
            make_record(MODEL, "transformers", quant, "perplexity", is_base=is_base, values={
                "ppl": {"value": 20.0, "stderr": 0.01, "n": N_TOKENS}},
                details={"dataset_sha256": "aa", "ctx": 512,
                         **chunk_details(BASE_CHUNKS if is_base else
                                         [b * 1.001 for b in BASE_CHUNKS])},
                memory={"peak_rss_mb": speed_peak}),
            make_record(MODEL, "transformers", quant, "speed", is_base=is_base, values={
                "tg_tokens_per_s": {"value": 20.0}}, backend_info=backend,
                options={"prompt_tokens": 256, "gen_tokens": 32},
                memory={"peak_rss_mb": speed_peak})]


def test_bnb_is_judged_by_its_in_memory_size() -> None:
    # the bnb file is the fp32 base (513 MiB); in memory its weights are ~120 MiB
    recs = (_hf("fp32", file_mb=513.0, loaded_mb=None, speed_peak=800.0, is_base=True)
            + _hf("bnb-nf4", file_mb=513.0, loaded_mb=120.0, speed_peak=300.0))
    rows = variant_rows(recs)
    bnb = next(r for r in rows if r["quant"] == "bnb-nf4")
    assert bnb["size_mb"] == 513.0 and bnb["weights_mb"] == 120.0
    [rec] = recommend(rows, budget_gb=0.45, max_loss_pct=1.0)
    c = _by_quant(rec)["bnb-nf4"]
    assert c["estimate_mb"] == pytest.approx(120.0 + kv_cache_mb(SHAPE, 4096))
    assert c["fits"] and rec["choice"]["row"]["quant"] == "bnb-nf4"


def test_measured_in_memory_weights_win_over_the_estimate() -> None:
    recs = (_hf("fp32", file_mb=513.0, loaded_mb=None, speed_peak=800.0, is_base=True)
            + _hf("bnb-int8", file_mb=513.0, loaded_mb=180.0, speed_peak=300.0,
                  measured_bytes=200 * 2 ** 20))
    bnb = next(r for r in variant_rows(recs) if r["quant"] == "bnb-int8")
    assert bnb["weights_mb"] == pytest.approx(200.0)
    assert "measured" in bnb["weights_how"]


def test_kld_cell_peak_does_not_decide_memory() -> None:
    # Q4's KLD and perplexity cells loaded the base too (700 MiB); its speed cell peaked at 200
    recs = (_gguf("F16", size_mb=260.0, speed_peak=400.0, is_base=True)
            + _gguf("Q4_K_M", size_mb=90.0, point_pct=0.2, high_pct=0.5, speed_peak=200.0,
                    kld_peak=700.0))
    rows = variant_rows(recs)
    q4 = next(r for r in rows if r["quant"] == "Q4_K_M")
    assert q4["peak_rss_mb"] == 700.0                     # the max over cells is still kept
    assert memory_of(q4) == (200.0, "peak RSS (speed cell)")
    [rec] = recommend(rows, budget_gb=0.4, max_loss_pct=1.0)
    c = _by_quant(rec)["Q4_K_M"]
    growth = kv_cache_mb(SHAPE, 4096) - kv_cache_mb(SHAPE, 288)
    assert c["measured_at_ctx_mb"] == pytest.approx(200.0 + growth)
    assert c["fits"] and rec["choice"]["row"]["quant"] == "Q4_K_M"


def test_a_speed_cell_at_depth_peaks_at_its_deepest_context() -> None:
    """A speed cell timed at depths 0 and 8,192 held its largest cache at 8,192 + its tokens:
    the KV growth to the report's context starts there, not at the prompt's 288 tokens."""
    recs = _gguf("Q8_0", size_mb=140.0, speed_peak=300.0, is_base=True)
    for r in recs:
        if r["metric"] == "speed":
            r["options"]["depths"] = [0, 8192]
    [row] = variant_rows(recs)
    [rec] = recommend([row], budget_gb=None, max_loss_pct=1.0, kv_ctx=8192)
    c = rec["candidates"][0]
    assert c["run_ctx"] == 8192 + 256 + 32
    assert c["measured_at_ctx_mb"] == pytest.approx(300.0)    # already deeper than 8,192


def test_a_nan_peak_is_not_a_measurement() -> None:
    """A speed cell whose peak RSS reads NaN measured nothing: the need is the estimate's, not
    whatever max() makes of a NaN, and it never fits a budget on the NaN's account."""
    recs = _gguf("Q8_0", size_mb=140.0, speed_peak=float("nan"), is_base=True)
    recs = [r for r in recs if r["metric"] not in ("perplexity",)]
    [row] = variant_rows(recs)
    assert memory_of(row) == (None, None)
    [rec] = recommend([row], budget_gb=0.1, max_loss_pct=1.0)
    c = rec["candidates"][0]
    assert c["measured_at_ctx_mb"] is None and c["need_mb"] == pytest.approx(c["estimate_mb"])


def test_base_peak_may_come_from_its_perplexity_cell() -> None:
    recs = [r for r in _gguf("F16", size_mb=260.0, speed_peak=400.0, is_base=True)
            if r["metric"] != "speed"]
    [row] = variant_rows(recs)
    assert memory_of(row) == (400.0, "peak RSS (perplexity cell)")


# ----------------------------------------------------------------------------------- report

def test_page_shows_interval_and_borderline() -> None:
    page = render_suite("s", _ladder(), budget_gb=None, max_loss_pct=1.0)
    assert "+1.80]" in page and "chunk-paired t, 8 chunks, 2,040 tok" in page
    assert 'class="warn borderline"' in page and "Q6_K is borderline" in page
    assert "Take m / llama.cpp / Q8_0." in page


def test_variants_table_shows_own_peak_and_the_max() -> None:
    recs = (_gguf("F16", size_mb=260.0, speed_peak=400.0, is_base=True)
            + _gguf("Q4_K_M", size_mb=90.0, point_pct=0.2, high_pct=0.5, speed_peak=200.0,
                    kld_peak=700.0))
    page = render_suite("s", recs)
    variants = page.split('id="variants"', 1)[1].split("</table>", 1)[0]
    assert "<td>200<br>" in variants and "speed" in variants and "max 700" in variants
