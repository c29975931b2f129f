"""Published evidence as uncertain as it is: the sampling error of published accuracies (item
counts per benchmark, an average's error from its parts, unpaired drops), every published verdict
re-derived here from qbench/data/published.json by a second implementation, and each claim's
published verdict checked against that derivation and against what the issue found."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from qbench.report import claims as C
from qbench.report import published as P

DATA = Path(__file__).resolve().parent.parent / "qbench" / "data" / "published.json"


@lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    """The JSON read straight from the file, not through the code under test."""
    return json.loads(DATA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def claims() -> list[dict]:
    """The claims with no measured rows: published verdicts do not depend on a run."""
    return C.check_claims([])


# ----------------------------------------------------------------------- item counts and error

def test_item_counts_as_read_and_cited() -> None:
    """The counts the issue names, as read from the cited dataset files."""
    b = _data()["benchmarks"]
    assert (b["mmlu"]["items"], b["ifeval"]["items"], b["gsm8k"]["items"]) == (14042, 541, 1319)
    assert (b["arc_challenge"]["items"], b["arc_easy"]["items"], b["piqa"]["items"],
            b["hellaswag"]["items"], b["winogrande"]["items"]) == (1172, 2376, 1838, 10042, 1267)
    assert (b["truthfulqa"]["items"], b["mmlu_pro"]["items"], b["cmmlu"]["items"],
            b["ceval_valid"]["items"]) == (817, 12032, 11582, 1346)
    for key, bench in b.items():
        assert bench["verified_from"], key


def test_one_benchmark_gets_its_binomial_error() -> None:
    spec = {"how": "single", "scale": 100, "parts": [{"label": "mmlu", "bench": "mmlu"}]}
    err = P.figure_error({"mmlu": 65.21}, spec)
    assert err.se == pytest.approx(100 * math.sqrt(0.6521 * 0.3479 / 14042))   # ~0.40 points
    assert err.items == 14042 and not err.assumptions


def test_an_average_gets_its_error_from_its_parts() -> None:
    """Independent benchmarks add variances; two scores on the same items (IFEval prompt- and
    instruction-level) add errors; a part whose score is unknown uses p(1-p) = 1/4, said so."""
    benches = {"a": {"items": 1000, "verified_from": "x"},
               "b": {"items": 400, "verified_from": "x"}}
    sa, sb = math.sqrt(0.8 * 0.2 / 1000), math.sqrt(0.6 * 0.4 / 400)
    two = {"how": "mean", "scale": 1, "parts": [{"label": "x", "bench": "a"},
                                                 {"label": "y", "bench": "b"}]}
    assert P.figure_error({"x": 0.8, "y": 0.6}, two, benches).se == pytest.approx(
        math.hypot(sa, sb) / 2)
    same = {"how": "mean", "scale": 1, "parts": [{"label": "x", "bench": "a", "group": "g"},
                                                  {"label": "y", "bench": "a", "group": "g"}]}
    err = P.figure_error({"x": 0.8, "y": 0.8}, same, benches)
    assert err.se == pytest.approx(sa) and err.items == 1000
    unknown = P.figure_error({"x": 0.8}, two, benches)
    assert unknown.se == pytest.approx(math.hypot(sa, math.sqrt(0.25 / 400)) / 2)
    assert "y" in unknown.assumptions[0] and "1/4" in unknown.assumptions[0]


def test_a_drop_is_compared_unpaired() -> None:
    spec = {"how": "single", "scale": 100, "parts": [{"label": "mmlu", "bench": "mmlu"}]}
    d = P.drop_error(64.53, 65.21, {"mmlu": 64.53}, {"mmlu": 65.21}, spec)
    sq = 100 * math.sqrt(0.6453 * 0.3547 / 14042)
    sb = 100 * math.sqrt(0.6521 * 0.3479 / 14042)
    assert d.se == pytest.approx(100 * math.hypot(sq, 64.53 / 65.21 * sb) / 65.21)   # ~0.87 %
    assert "unpaired" in d.text


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["benchmarks"]["mmlu"].update(items=0), "benchmarks.mmlu"),
    (lambda d: d["sources"]["matt-c1-l3-mmlu"]["accuracy"]["parts"][0].update(bench="nope"),
     "sources.matt-c1-l3-mmlu.accuracy.parts[0]: bench 'nope'"),
    (lambda d: d["sources"]["qwen2-quant-benchmark"]["accuracy"].update(how="median"),
     "sources.qwen2-quant-benchmark.accuracy"),
])
def test_a_bad_edit_of_the_data_fails_with_its_key(mutate: Any, message: str) -> None:
    data = json.loads(DATA.read_text(encoding="utf-8"))
    P.check(data)                                          # the shipped file is valid
    mutate(data)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        P.check(data)


def test_a_missing_entry_is_named() -> None:
    with pytest.raises(KeyError, match="quant='Q9_9'"):
        C._need("llamacpp-l3-8b-scoreboard", 8, "Q9_9")


# ----------------------------------------- a second derivation of every published verdict

def _base_of(e: dict[str, Any]) -> dict[str, Any]:
    name = e.get("base", "FP16")
    return next(b for b in _data()["entries"] if b["source"] == e["source"]
                and b["params_b"] == e["params_b"] and b["quant"] == name
                and b.get("imatrix") is None)


def _se_points(values: dict[str, Any], spec: dict[str, Any]) -> float:
    groups: dict[str, float] = {}
    for part in spec["parts"]:
        v = values.get(part["label"])
        p = 0.5 if v is None else v / spec["scale"]
        n = _data()["benchmarks"][part["bench"]]["items"]
        g = part.get("group", part["bench"])
        groups[g] = groups.get(g, 0.0) + spec["scale"] * math.sqrt(p * (1 - p) / n)
    k = len(spec["parts"]) if spec["how"] == "mean" else 1
    return math.sqrt(sum(x * x for x in groups.values())) / k


def _acc_bounds(e: dict[str, Any], sampling: bool = True) -> tuple[float, float]:
    """The drop's rounding range, widened by 2 unpaired sampling errors unless told not to."""
    spec = _data()["sources"][e["source"]]["accuracy"]
    h = e.get("rounding", 0.0)
    if spec["key"] == "recovery_pct":
        r = e["recovery_pct"]
        b = e.get("base_avg") or spec["base_floor"]
        q = e.get("avg") or b * r / 100
        sq, sb = _se_points(e.get("parts", {}), spec), _se_points(e.get("base_parts", {}), spec)
        lo, hi = 100 - r - h, 100 - r + h
    else:
        base, key = _base_of(e), spec["key"]
        q, b = e[key], base[key]
        sq = _se_points({**e, **e.get("parts", {})}, spec)
        sb = _se_points({**base, **base.get("parts", {})}, spec)
        lo, hi = 100 * (1 - (q + h) / (b - h)), 100 * (1 - (q - h) / (b + h))
    se = 100 * math.sqrt(sq ** 2 + (q / b) ** 2 * sb ** 2) / b if sampling else 0.0
    return lo - 2 * se, hi + 2 * se


def _ppl_bounds(e: dict[str, Any]) -> tuple[float, float]:
    if "ppl_ratio" in e:
        return (100 * (e["ppl_ratio"] - 1 - 2 * e["ppl_ratio_err"]),
                100 * (e["ppl_ratio"] - 1 + 2 * e["ppl_ratio_err"]))
    if "dppl" in e:
        base = e["ppl"] - e["dppl"]
        return (100 * (e["dppl"] - 2 * e["dppl_err"]) / base,
                100 * (e["dppl"] + 2 * e["dppl_err"]) / base)
    h, b = e.get("rounding", 0.0), _base_of(e)
    if "ppl_wikitext2" in e:
        q, bq = e["ppl_wikitext2"], b["ppl_wikitext2"]
        return 100 * ((q - h) / (bq + h) - 1), 100 * ((q + h) / (bq - h) - 1)
    s = math.sqrt((e["ppl_err"] / e["ppl"]) ** 2 + (b["ppl_err"] / b["ppl"]) ** 2)
    return (100 * ((e["ppl"] - h) / (b["ppl"] + h) * math.exp(-2 * s) - 1),
            100 * ((e["ppl"] + h) / (b["ppl"] - h) * math.exp(2 * s) - 1))


def _kld_bounds(e: dict[str, Any]) -> tuple[float, float]:
    return e["kld"] - 2 * e["kld_err"], e["kld"] + 2 * e["kld_err"]


BOUNDS = {"ΔPPL": _ppl_bounds, "KLD": _kld_bounds, C.ACC: _acc_bounds}


def _expected(ev: dict[str, Any]) -> str:
    entries = [_data()["entries"][i] for i in ev["entries"]]
    bounds = [BOUNDS[ev["metric"]](e) for e in entries]
    rule = ev["rule"]
    if rule["kind"] == "smaller":
        (s_lo, s_hi), (l_lo, l_hi) = bounds
        return (C.SUPPORTED if l_hi < s_lo else C.CONTRADICTED if l_lo > s_hi
                else C.UNRESOLVED_PUB)
    (lo, hi), x = bounds[0], rule["x"]
    if rule["kind"] == "at_most":
        return C.SUPPORTED if hi <= x else C.CONTRADICTED if lo > x else C.UNRESOLVED_PUB
    if x / 2 <= lo and hi <= 2 * x:
        return C.SUPPORTED
    return C.CONTRADICTED if hi < x / 2 or lo > 2 * x else C.UNRESOLVED_PUB


def _expected_headline(evidence: list[dict[str, Any]]) -> dict[str, str]:
    """Per claim part and metric: each method's rows combined (any contradicted, all supported,
    else not resolved or not enough data), then one verdict if the methods agree, else split."""
    by: dict[str, dict[str, list[str]]] = {}
    for ev in evidence:
        if ev["verdict"] is None:
            continue
        v = _expected(ev) if ev["verdict"] != C.NED else C.NED
        key = f"{ev['part']} | {ev['metric']}" if ev["part"] else ev["metric"]
        by.setdefault(key, {}).setdefault(ev["group"], []).append(v)
    out = {}
    for key, groups in by.items():
        per = set()
        for vs in groups.values():
            per.add(C.CONTRADICTED if C.CONTRADICTED in vs else C.SUPPORTED
                    if all(v == C.SUPPORTED for v in vs) else C.UNRESOLVED_PUB
                    if C.UNRESOLVED_PUB in vs else C.NED)
        out[key] = per.pop() if len(per) == 1 else C.SPLIT
    return out


def test_every_published_verdict_follows_from_the_numbers(claims: list[dict]) -> None:
    checked, seen = 0, set()
    for c in claims:
        for ev in c["published"]:
            seen.update(ev["entries"])
            if ev["verdict"] in (None, C.NED):
                continue
            assert ev["verdict"] == _expected(ev), (c["id"], ev["subject"], ev["metric"])
            checked += 1
    assert checked > 100
    # the rows issue 26 added are each judged (or shown) somewhere
    imat, arx = "wiki.train 400 chunks", "arxiv-2404.14047v3"
    for key in (("llamacpp-pr6745-l3-70b-imatrix", 70, "Q8_0", None),
                ("llamacpp-pr6745-l3-70b-imatrix", 70, "Q4_K_M", imat),
                ("llamacpp-pr6745-l3-70b-imatrix", 70, "Q3_K_M", imat),
                ("llamacpp-pr6745-l3-70b-imatrix", 70, "Q3_K_L", imat),
                *((arx, 70, q, None) for q in ("RTN W3 g128", "SliM-LLM W3 g128",
                                               "QuIP W3 (no group)")),
                (arx, 8, "RTN W4 g128", None), (arx, 8, "GPTQ W4 (no group)", None),
                *(("intel-autoround-qwen25", b, "AutoRound INT4 g128", None)
                  for b in (7, 14, 32, 72)),
                ("intel-autoround-llama3-8b", 8, "AutoRound W4 g128", None),
                ("neuralmagic-qwen25-72b-w8a8", 72, "INT8 W8A8", None),
                ("neuralmagic-qwen25-3b-w4a16", 3, "INT4 W4A16 g64", None)):
        i = next(i for i, e in enumerate(_data()["entries"])
                 if (e["source"], e["params_b"], e["quant"], e.get("imatrix")) == key)
        assert i in seen, key


# ------------------------------------------------------------- each claim's published verdict

@pytest.mark.parametrize("cid", [1, 2, 3, 4])
def test_each_claims_published_verdict_follows_from_the_json(claims: list[dict],
                                                             cid: int) -> None:
    c = claims[cid - 1]
    assert c["published_verdicts"] == _expected_headline(c["published"])


def test_claim1_published_accuracy_is_not_resolved_at_its_precision(claims: list[dict]) -> None:
    """bitsandbytes int8 on matt-c1's MMLU (65.21 -> 64.53, 14,042 questions): by rounding alone
    the drop is above 0.5 % (the old verdict: contradicted); with each score's sampling error
    (~0.4 points) the interval straddles it. No published accuracy resolves a 0.5 % change,
    while llama.cpp's PPL/KLD still decide: Q8_0 lossless, SmoothQuant W8A8 not."""
    int8 = next(e for e in _data()["entries"]
                if e["quant"] == "transformers 8bit (bitsandbytes int8)")
    lo_round, _ = _acc_bounds(int8, sampling=False)
    lo, hi = _acc_bounds(int8)
    assert lo_round > C.LOSSLESS_ACC_REL_PCT and lo < C.LOSSLESS_ACC_REL_PCT < hi
    c1 = claims[0]
    assert c1["published_verdicts"][C.ACC] == C.UNRESOLVED_PUB
    assert c1["published_verdicts"]["KLD"] == C.SUPPORTED
    ppl = next(h for h in c1["published_headline"] if h["metric"] == "ΔPPL")
    parts = {p["group"]: p["verdict"] for p in ppl["parts"]}
    assert ppl["verdict"] == C.SPLIT
    assert parts["LLaMA 3 8B Q8_0"] == C.SUPPORTED
    assert parts["LLaMA3-8B SmoothQuant W8A8"] == C.CONTRADICTED
    assert parts["Llama 3 70B Q8_0"] == C.UNRESOLVED_PUB      # PR #6745: two unpaired ±


def test_claim2_published_cannot_resolve_a_005_percent_loss(claims: list[dict]) -> None:
    """LLaMA3-70B AWQ W4 g128 drops 0.53 %: by rounding alone entirely above 0.1 % (the old
    verdict: contradicted); its test sets' sampling error reaches below it."""
    awq70 = next(e for e in _data()["entries"] if e["source"] == "arxiv-2404.14047v3"
                 and e["params_b"] == 70 and e["quant"] == "AWQ W4 g128")
    assert _acc_bounds(awq70, sampling=False)[0] > 0.1 > _acc_bounds(awq70)[0]
    c2 = claims[1]
    assert c2["published_verdicts"] == {"~8B: ~2 % | accuracy": C.UNRESOLVED_PUB,
                                        "~70B: ~0.05 % | accuracy": C.UNRESOLVED_PUB}
    assert any("one statement about both perplexity and CommonSenseQA" in n
               for n in c2["notes"])


def test_claim3_is_split_by_metric_and_method(claims: list[dict]) -> None:
    """On perplexity the 70B loses more at the same llama.cpp type (with an imatrix: Q4_K_M
    +4.83 % vs the 8B's +2.43 %, Q3_K_M +18.75 % vs +8.07 %) and for every arXiv method but RTN;
    on accuracy no method shows the larger model losing more."""
    c3 = claims[2]
    v = c3["published_verdicts"]
    assert v["larger loses less | ΔPPL"] == C.SPLIT
    assert v["larger loses less | KLD"] == C.CONTRADICTED
    assert v["larger loses less | accuracy"] == C.SPLIT
    lines = {h["metric"]: {p["group"]: p["verdict"] for p in h["parts"]}
             for h in c3["published_headline"] if h["part"] == "larger loses less"}
    ppl, acc = lines["ΔPPL"], lines[C.ACC]
    for q in ("Q4_K_M", "Q3_K_M"):
        assert ppl[f"llama.cpp {q} with an imatrix"] == C.CONTRADICTED
    imat = next(e for e in c3["published"] if e["group"] == "llama.cpp Q4_K_M with an imatrix")
    assert "+2.43%" in imat["detail"] and "+4.83%" in imat["detail"]
    assert ppl["arXiv RTN W4 g128"] == C.SUPPORTED and ppl["arXiv AWQ W4 g128"] == C.CONTRADICTED
    assert C.CONTRADICTED not in acc.values() and acc["arXiv RTN W3 g128"] == C.SUPPORTED
    for family in ("Qwen2 GPTQ-Int4", "Qwen2.5 AutoRound INT4 g128",
                   "Llama-3.1 Neural Magic GPTQ W4A16", "llama.cpp Q2_K"):
        assert family in acc or family in ppl, family
    note = c3["notes"][0]
    assert note.startswith("Published, split by metric") and "RTN" in note
    assert c3["published_verdicts"]["~70B AWQ 3-bit: 2.7 % | accuracy"] == C.UNRESOLVED_PUB


def test_claim4_70b_at_3_bits_depends_on_the_method(claims: list[dict]) -> None:
    """RTN (48.0 from 75.3, -36 %) and GPTQ (-6.2 %) lose more than 3 %; AWQ, SliM-LLM and QuIP
    (-2.8, -2.7, -3.7 %) straddle 3 % once sampling error counts."""
    c4 = claims[3]
    line = next(h for h in c4["published_headline"]
                if h["part"].startswith("~70B → 3-bit") and h["metric"] == C.ACC)
    parts = {p["group"]: p["verdict"] for p in line["parts"]}
    assert line["verdict"] == C.SPLIT
    assert parts["LLaMA3-70B RTN W3 g128"] == parts["LLaMA3-70B GPTQ W3 g128"] == C.CONTRADICTED
    for q in ("AWQ W3 g128", "SliM-LLM W3 g128", "QuIP W3 (no group)"):
        assert parts[f"LLaMA3-70B {q}"] == C.UNRESOLVED_PUB, q
    v = c4["published_verdicts"]
    assert v["~70B → 4-bit: no loss | ΔPPL"] == C.CONTRADICTED
    assert v["~70B → 4-bit: no loss | accuracy"] == C.UNRESOLVED_PUB
    assert v["~8B → 4-bit: loss ≤ 3 % | accuracy"] == C.SPLIT
    assert any(n.startswith("Published, ~70B → 3-bit") for n in c4["notes"])
