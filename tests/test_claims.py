"""The advice check: verdict rules, the shipped published tables (every figure cited), and the
verdicts each claim gets from measured and from published evidence - kept apart."""

from __future__ import annotations

import math

import pytest

from qbench.report import claims as C
from qbench.report.synthetic import demo_records, make_record
from qbench.report.table import variant_rows


def _iv(lo: float, hi: float) -> C.Interval:
    return C.Interval(lo, hi, (lo + hi) / 2)


@pytest.mark.parametrize("lo,hi,verdict", [(0.0, 0.4, C.SUPPORTED), (0.6, 0.9, C.CONTRADICTED),
                                           (0.3, 0.7, C.NED)])
def test_at_most(lo: float, hi: float, verdict: str) -> None:
    assert C.at_most(_iv(lo, hi), 0.5) == verdict


def test_near_is_a_factor_of_two() -> None:
    assert C.near(_iv(1.5, 2.5), 2.0) == C.SUPPORTED
    assert C.near(_iv(0.4, 0.7), 2.0) == C.CONTRADICTED
    assert C.near(_iv(0.8, 1.2), 2.0) == C.NED
    assert C.near(_iv(0.40, 0.66), 0.05) == C.CONTRADICTED
    assert C.near(None, 2.0) == C.NED


def test_smaller_and_combine() -> None:
    assert C.smaller(_iv(1, 2), _iv(3, 4)) == C.SUPPORTED
    assert C.smaller(_iv(5, 6), _iv(3, 4)) == C.CONTRADICTED
    assert C.smaller(_iv(2, 3.5), _iv(3, 4)) == C.NED
    assert C.combine([C.SUPPORTED, C.SUPPORTED]) == C.SUPPORTED
    assert C.combine([C.SUPPORTED, C.NED]) == C.NED
    assert C.combine([C.NED, C.CONTRADICTED]) == C.CONTRADICTED
    assert C.combine([]) == C.NED


def test_size_classes() -> None:
    assert C.size_class(8.03e9) == "8B"
    assert C.size_class(70.6e9) == "70B"
    assert C.size_class(134.5e6) is None
    assert C.size_class(None) is None


# ------------------------------------------------------------------ published data integrity

def test_every_published_entry_is_cited() -> None:
    data = C.published()
    sources = data["sources"]
    for sid, s in sources.items():
        for key in ("short", "title", "url", "section", "revision", "verified_from"):
            assert s.get(key), (sid, key)
        assert s["url"].startswith("https://")
    for e in data["entries"]:
        assert e["source"] in sources, e
        assert e["model"] and e["quant"] and e["params_b"] in (8, 70)
        numbers = [k for k in e if k in ("ppl", "ppl_ratio", "kld", "ppl_wikitext2",
                                         "csqa_avg")]
        assert numbers, e


def test_published_values_as_printed() -> None:
    """Spot checks against the cited tables (copied by hand; see the report's sources)."""
    q4 = C._entry("llamacpp-l3-8b-scoreboard", 8, "Q4_K_M")
    assert (q4["ppl"], q4["dppl"], q4["kld"], q4["ppl_ratio"]) == (6.407115, 0.175482,
                                                                   0.031273, 1.028160)
    q8 = C._entry("llamacpp-l3-8b-scoreboard", 8, "Q8_0")
    assert (q8["ppl_ratio"], q8["kld"], q8["same_top_pct"]) == (1.000425, 0.001355, 97.674)
    big = C._entry("llamacpp-l3-8b-vs-70b", 70, "Q4_K_M")
    assert (big["ppl_ratio"], big["kld"]) == (1.050877, 0.055418)
    small = C._entry("llamacpp-l3-8b-vs-70b", 8, "Q4_K_M")
    assert small["ppl_ratio"] == 1.029127
    awq70 = C._entry("arxiv-2404.14047v3", 70, "AWQ W4 g128")
    assert (awq70["ppl_wikitext2"], awq70["csqa_avg"]) == (3.3, 74.9)
    assert C._entry("arxiv-2404.14047v3", 70, "FP16")["csqa_avg"] == 75.3
    assert C._entry("arxiv-2404.14047v3", 70, "AWQ W3 g128")["csqa_avg"] == 73.2


def test_derived_published_changes() -> None:
    awq70 = C._entry("arxiv-2404.14047v3", 70, "AWQ W4 g128")
    drop = C.pub_acc_drop(awq70)
    assert drop.point == pytest.approx(100 * (1 - 74.9 / 75.3))      # 0.53 %, not 0.05 %
    assert drop.lo == pytest.approx(100 * (1 - 74.95 / 75.25))
    assert drop.hi == pytest.approx(100 * (1 - 74.85 / 75.35))
    q4 = C.pub_ppl(C._entry("llamacpp-l3-8b-scoreboard", 8, "Q4_K_M"))
    assert q4.point == pytest.approx(2.816)
    f16 = C._entry("llamacpp-l3-8b-scoreboard", 8, "F16")
    assert C.pub_ppl(f16).point == pytest.approx(100 * 0.001524 / (6.233160 - 0.001524))
    assert C.pub_acc_drop(C._entry("arxiv-2404.14047v3", 8, "FP16")) is None


# ------------------------------------------------------------------------------ the claims

@pytest.fixture(scope="module")
def one_model_claims() -> list[dict]:
    return C.check_claims(variant_rows(demo_records()))


def test_four_claims_with_thresholds(one_model_claims: list[dict]) -> None:
    assert [c["id"] for c in one_model_claims] == [1, 2, 3, 4]
    for c in one_model_claims:
        assert c["metrics"] and c["thresholds"] and c["measured"] and c["published"]
        for e in c["measured"]:
            assert e["kind"] == "measured" and e["source"] is None
        for e in c["published"]:
            assert e["kind"] == "published" and e["source"] in C.published()["sources"]
            assert e["verdict"] in (C.SUPPORTED, C.CONTRADICTED, C.NED)


def test_claim1_measured_on_synthetic_q8(one_model_claims: list[dict]) -> None:
    c1 = one_model_claims[0]
    assert c1["measured_summary"]["ΔPPL"] == C.SUPPORTED      # +0.06 % ± 0.03
    assert c1["measured_summary"]["KLD"] == C.SUPPORTED
    assert c1["measured_summary"]["MMLU"] == C.NED            # 285 questions: CI too wide
    pub = {(e["source"], e["subject"], e["metric"]): e["verdict"] for e in c1["published"]}
    assert pub[("llamacpp-l3-8b-scoreboard", "LLaMA 3 8B Q8_0", "ΔPPL")] == C.SUPPORTED
    assert pub[("arxiv-2404.14047v3", "LLaMA3-8B SmoothQuant W8A8", "ΔPPL")] == C.CONTRADICTED


def test_claim1_contradicted_by_a_lossy_8bit_variant() -> None:
    recs = demo_records()
    for r in recs:
        if r["variant"]["quant"] == "Q8_0" and r["metric"] == "kld":
            r["values"]["ln_ppl_ratio"] = {"value": math.log(1.02), "stderr": 0.001}
            r["values"]["kld_mean"] = {"value": 0.02, "stderr": 0.0002}
    c1 = C.check_claims(variant_rows(recs))[0]
    assert c1["measured_summary"]["ΔPPL"] == C.CONTRADICTED
    assert c1["measured_summary"]["KLD"] == C.CONTRADICTED


def test_claim2_published_contradicts_the_70b_figure(one_model_claims: list[dict]) -> None:
    c2 = one_model_claims[1]
    assert c2["measured_summary"] == {"ΔPPL": C.NED}            # a 135M model only
    assert any("~8B" in e["subject"] and "no AWQ 4-bit" in e["detail"] for e in c2["measured"])
    seventy = [e for e in c2["published"] if "70B" in e["subject"]]
    assert seventy and all(e["verdict"] == C.CONTRADICTED for e in seventy)
    assert any("+0.53%" in e["detail"] for e in seventy)


def test_claim3_needs_several_model_sizes(one_model_claims: list[dict]) -> None:
    c3 = one_model_claims[2]
    assert set(c3["measured_summary"].values()) == {C.NED}
    assert all("not enough data here" in e["detail"] for e in c3["measured"])
    pub = {(e["source"], e["subject"], e["metric"]): e["verdict"] for e in c3["published"]}
    # llama.cpp: the 70B loses more PPL and KLD at Q4_K_M than the 8B
    assert pub[("llamacpp-l3-8b-vs-70b", "LLaMA 3 8B vs LLaMA 3 70B, Q4_K_M", "ΔPPL")] \
        == C.CONTRADICTED
    assert pub[("llamacpp-l3-8b-vs-70b", "LLaMA 3 8B vs LLaMA 3 70B, Q4_K_M", "KLD")] \
        == C.CONTRADICTED
    # the study: accuracy favours 70B at 3 bits, and its 2.7 % matches
    assert pub[("arxiv-2404.14047v3", "LLaMA3-8B vs LLaMA3-70B, AWQ W3 g128", "accuracy")] \
        == C.SUPPORTED
    assert pub[("arxiv-2404.14047v3", "LLaMA3-70B AWQ W3 g128", "accuracy")] == C.SUPPORTED


def _two_sizes(small_loss: float, large_loss: float) -> list[dict]:
    recs = []
    for model, params, lnr in (("small", 1e9, small_loss), ("large", 9e9, large_loss)):
        for quant, base, ln in (("F16", True, 0.0), ("Q4_K_M", False, lnr)):
            recs.append(make_record(model, "llama.cpp", quant, "footprint", is_base=base,
                                    values={"n_params": {"value": params},
                                            "bpw": {"value": 16 if base else 4.9},
                                            "file_size_mb": {"value": params / 2 ** 20}}))
            recs.append(make_record(model, "llama.cpp", quant, "perplexity", is_base=base,
                                    values={"ppl": {"value": 10 * math.exp(ln),
                                                    "stderr": 0.05}}))
            if not base:
                recs.append(make_record(model, "llama.cpp", quant, "kld", values={
                    "ln_ppl_ratio": {"value": ln, "stderr": 0.0005},
                    "kld_mean": {"value": ln, "stderr": 0.0005}}))
    return recs


@pytest.mark.parametrize("small,large,verdict", [(0.05, 0.02, C.SUPPORTED),
                                                 (0.02, 0.05, C.CONTRADICTED),
                                                 (0.030, 0.0301, C.NED)])
def test_claim3_measured_with_two_sizes(small: float, large: float, verdict: str) -> None:
    c3 = C.check_claims(variant_rows(_two_sizes(small, large)))[2]
    assert c3["measured_summary"]["ΔPPL"] == verdict
    assert c3["measured_summary"]["KLD"] == verdict


def test_claim2_measured_for_an_8b_awq_model() -> None:
    recs = []
    for quant, base, ln in (("fp16", True, 0.0), ("awq-w4g128", False, math.log(1.021))):
        recs.append(make_record("llama-8b", "transformers", quant, "footprint", is_base=base,
                                values={"n_params": {"value": 8.03e9}}))
        recs.append(make_record("llama-8b", "transformers", quant, "perplexity", is_base=base,
                                values={"ppl": {"value": 6.0 * math.exp(ln), "stderr": 0.01}}))
    c2 = C.check_claims(variant_rows(recs))[1]
    eight = [e for e in c2["measured"] if e["subject"].startswith("llama-8b")]
    assert eight and eight[0]["verdict"] == C.SUPPORTED          # +2.1 % vs claimed ~2 %


def test_claim4_separates_own_model_information(one_model_claims: list[dict]) -> None:
    c4 = one_model_claims[3]
    info = [e for e in c4["measured"] if e["verdict"] is None]
    assert info and "Q8_0" in info[0]["detail"]
    assert set(c4["measured_summary"].values()) == {C.NED}
    pub = {(e["source"], e["subject"], e["metric"]): e["verdict"] for e in c4["published"]}
    assert pub[("llamacpp-l3-8b-vs-70b", "LLaMA 3 70B Q4_K_M", "ΔPPL")] == C.CONTRADICTED
    assert pub[("llamacpp-l3-8b-scoreboard", "LLaMA 3 8B Q4_K_M", "ΔPPL")] == C.SUPPORTED


def test_published_summary_names_rows_that_disagree(one_model_claims: list[dict]) -> None:
    c1 = one_model_claims[0]
    line = next(s for s in c1["published_summary"]
                if s["source"] == "arxiv-2404.14047v3" and s["metric"] == "ΔPPL")
    assert line["verdict"] == C.CONTRADICTED
    assert "contradicted: LLaMA3-8B SmoothQuant W8A8" in line["split"]
    assert "AWQ W8" in line["split"].split("not enough data:")[1]


def test_claim3_measured_on_a_size_ladder() -> None:
    """Two synthetic sizes from the demo factory: equal losses, so nothing is decided."""
    recs = demo_records(model="small-0.5b", n_params=0.5e9) + demo_records(
        model="big-7b", n_params=7.6e9, seed=1)
    c3 = C.check_claims(variant_rows(recs))[2]
    subjects = {e["subject"] for e in c3["measured"]}
    assert "small-0.5b vs big-7b, llama.cpp Q4_K_M" in subjects
    assert {e["metric"] for e in c3["measured"]} == {"ΔPPL", "KLD", "MMLU"}
    assert set(c3["measured_summary"].values()) == {C.NED}
