"""The advice check: each claim of the user's notes, the metrics that bear on it, stated thresholds,
and a verdict per metric - from this run's measurements and, separately, from published tables.

Verdicts are ``supported``, ``contradicted`` or ``not enough data``. They are decided on
intervals, never on bare point estimates:

- measured numbers: value ± 2 standard errors (dPPL from the paired KLD-cell error where there is
  one); MMLU through the paired test against the base (exact McNemar p, 95 % Newcombe CI);
- published numbers: their stated ± (× 2) where the table gives one, else the rounding of the
  printed value (e.g. 6.6 means 6.55-6.65).

An interval entirely on one side of a threshold decides; one that straddles it is "not enough
data". Measured and published evidence are evaluated and shown separately: no number mixes them.
Relative changes of published entries are derived here from the raw published values (in
``qbench/data/published.json``) and are labelled as derived.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

SUPPORTED, CONTRADICTED, NED = "supported", "contradicted", "not enough data"

# thresholds (stated in the report)
SIGMA = 2.0                   # measured intervals: value ± 2 standard errors
LOSSLESS_PPL_PCT = 0.5        # "lossless": PPL rises by at most 0.5 %
LOSSLESS_KLD = 0.005          # ... and mean KLD from the base at most 0.005 nats
LOSSLESS_MMLU_PTS = 1.0       # ... and the paired 95 % CI of the MMLU drop stays within 1 point
                              #     (a significant drop, exact McNemar p < 0.05, contradicts)
LOSSLESS_ACC_REL_PCT = 0.5    # published accuracy averages (no per-question data): drop <= 0.5 %
ACCEPTABLE_LOSS_PCT = 3.0     # "accepting 2-3 %": loss at most 3 %
LOW_BITS = 4                  # "low-bit": 4 bits per weight or fewer
SIZE_CLASSES = {"8B": (5e9, 12e9), "70B": (45e9, 110e9)}   # parameter ranges for "~8B", "~70B"

THRESHOLDS_TEXT = [
    f"Measured intervals are value ± {SIGMA:g} standard errors; published ones use the table's "
    "± (× 2) or, for values printed with one decimal, the rounding (6.6 means 6.55–6.65).",
    f"“Lossless”: PPL rises by at most {LOSSLESS_PPL_PCT} %, mean KLD from the base is at most "
    f"{LOSSLESS_KLD} nats, and MMLU shows no significant drop (exact McNemar p < 0.05 "
    f"contradicts) with the 95 % CI of the drop within {LOSSLESS_MMLU_PTS:g} point; for published "
    f"accuracy averages a relative drop of at most {LOSSLESS_ACC_REL_PCT} %.",
    "A stated loss “~X %” matches when the evidence lies within a factor of two of it "
    "(X/2 … 2X).",
    f"“Accepting 2–3 %”: a loss of at most {ACCEPTABLE_LOSS_PCT:g} %.",
    f"“Low-bit”: at most {LOW_BITS} bits per weight. Model sizes: “~8B” is 5–12 B parameters, "
    "“~70B” is 45–110 B.",
    "An interval entirely inside the condition supports it, entirely outside contradicts it; "
    "one that straddles the threshold is “not enough data”.",
]


# ---------------------------------------------------------------------------------- intervals

@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    point: float
    how: str = ""

    @classmethod
    def around(cls, value: float, err: float | None, how: str = "") -> Interval:
        e = SIGMA * err if err else 0.0
        return cls(value - e, value + e, value, how + ("" if err else " (no error estimate)"))

    def text(self, unit: str = "%", digits: int = 2) -> str:
        if self.lo == self.hi:
            return f"{self.point:+.{digits}f}{unit}"
        return (f"{self.point:+.{digits}f}{unit} [{self.lo:+.{digits}f}, "
                f"{self.hi:+.{digits}f}]")


def at_most(iv: Interval | None, thr: float) -> str:
    if iv is None:
        return NED
    if iv.hi <= thr:
        return SUPPORTED
    if iv.lo > thr:
        return CONTRADICTED
    return NED


def near(iv: Interval | None, x: float) -> str:
    """Does the interval lie within a factor of two of the stated loss x (> 0)?"""
    if iv is None:
        return NED
    lo, hi = x / 2, 2 * x
    if lo <= iv.lo and iv.hi <= hi:
        return SUPPORTED
    if iv.hi < lo or iv.lo > hi:
        return CONTRADICTED
    return NED


def smaller(larger_model: Interval | None, smaller_model: Interval | None) -> str:
    """Is the larger model's loss smaller than the smaller model's?"""
    if larger_model is None or smaller_model is None:
        return NED
    if larger_model.hi < smaller_model.lo:
        return SUPPORTED
    if larger_model.lo > smaller_model.hi:
        return CONTRADICTED
    return NED


def combine(verdicts: list[str]) -> str:
    """All supported -> supported; any contradicted -> contradicted; otherwise not enough."""
    if not verdicts:
        return NED
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return NED


def size_class(n_params: float | None) -> str | None:
    if not n_params:
        return None
    for name, (lo, hi) in SIZE_CLASSES.items():
        if lo <= n_params <= hi:
            return name
    return None


# ------------------------------------------------------------------------ measured evidence

def measured_ppl(row: dict[str, Any]) -> Interval | None:
    if row.get("dppl_pct") is None or row.get("is_base"):
        return None
    return Interval.around(row["dppl_pct"], row.get("dppl_err"), row.get("dppl_how") or "")


def measured_kld(row: dict[str, Any]) -> Interval | None:
    if row.get("kld") is None:
        return None
    return Interval.around(row["kld"], row.get("kld_err"), "mean KLD")


def measured_mmlu_drop_pts(row: dict[str, Any]) -> Interval | None:
    """Accuracy drop vs the base in points with the paired 95 % CI (positive = worse)."""
    p = row.get("mmlu_paired")
    if not p:
        return None
    return Interval(-100 * p["ci_high"], -100 * p["ci_low"], -100 * p["diff"],
                    f"paired, McNemar p = {p['p_value']:.3g}")


def measured_mmlu_drop_rel(row: dict[str, Any]) -> Interval | None:
    """The same drop relative to the base's accuracy, in %."""
    p = row.get("mmlu_paired")
    if not p or not p.get("acc_base"):
        return None
    b = 100 * p["acc_base"]
    pts = measured_mmlu_drop_pts(row)
    assert pts is not None
    return Interval(100 * pts.lo / b, 100 * pts.hi / b, 100 * pts.point / b, pts.how)


def mmlu_lossless(row: dict[str, Any]) -> str:
    p = row.get("mmlu_paired")
    if not p:
        return NED
    if p["significant"] and p["diff"] < 0:
        return CONTRADICTED
    iv = measured_mmlu_drop_pts(row)
    return SUPPORTED if iv and iv.hi <= LOSSLESS_MMLU_PTS else NED


def _ev(kind: str, metric: str, subject: str, verdict: str, detail: str,
        source: str | None = None) -> dict[str, Any]:
    return {"kind": kind, "metric": metric, "subject": subject, "verdict": verdict,
            "detail": detail, "source": source}


def _lossless_measured(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        ppl = measured_ppl(r)
        if ppl:
            out.append(_ev("measured", "ΔPPL", r["label"], at_most(ppl, LOSSLESS_PPL_PCT),
                           f"ΔPPL {ppl.text()} ({ppl.how}); threshold ≤ {LOSSLESS_PPL_PCT} %"))
        kld = measured_kld(r)
        if kld:
            out.append(_ev("measured", "KLD", r["label"], at_most(kld, LOSSLESS_KLD),
                           f"mean KLD {kld.point:.5f} [{kld.lo:.5f}, {kld.hi:.5f}] nats; "
                           f"threshold ≤ {LOSSLESS_KLD}"))
        if r.get("mmlu_paired"):
            d = measured_mmlu_drop_pts(r)
            assert d is not None
            out.append(_ev("measured", "MMLU", r["label"], mmlu_lossless(r),
                           f"drop {d.text(' pts', 1)} (95 % CI, {d.how}); lossless needs no "
                           f"significant drop and CI within {LOSSLESS_MMLU_PTS:g} point"))
        elif r.get("mmlu_note"):
            out.append(_ev("measured", "MMLU", r["label"], NED, r["mmlu_note"]))
        for p in r.get("problems", []):
            if p["metric"] in ("perplexity", "kld", "mmlu"):
                out.append(_ev("measured", p["metric"], r["label"], NED,
                               f"cell {p['status']}: {p['error'][:160]}"))
    return out


def _loss_measured(rows: list[dict[str, Any]], check: Any, what: str) -> list[dict[str, Any]]:
    """dPPL % and relative MMLU drop of ``rows`` judged by ``check(interval)``."""
    out = []
    for r in rows:
        ppl = measured_ppl(r)
        if ppl:
            out.append(_ev("measured", "ΔPPL", r["label"], check(ppl),
                           f"ΔPPL {ppl.text()} ({ppl.how}); {what}"))
        acc = measured_mmlu_drop_rel(r)
        if acc:
            out.append(_ev("measured", "MMLU", r["label"], check(acc),
                           f"relative accuracy drop {acc.text()} (paired 95 % CI); {what}"))
    return out


def _summary(evidence: list[dict[str, Any]]) -> dict[str, str]:
    by_metric: dict[str, list[str]] = {}
    for e in evidence:
        if e["verdict"] is None:
            continue
        by_metric.setdefault(e["metric"], []).append(e["verdict"])
    return {m: combine(v) for m, v in by_metric.items()}


# ----------------------------------------------------------------------- published evidence

@lru_cache(maxsize=1)
def published() -> dict[str, Any]:
    """The shipped reference tables (qbench/data/published.json)."""
    text = resources.files("qbench").joinpath("data/published.json").read_text(encoding="utf-8")
    return json.loads(text)


def _entry(source: str, model_b: int, quant: str, imatrix: Any = None) -> dict[str, Any] | None:
    for e in published()["entries"]:
        if (e["source"] == source and e["params_b"] == model_b and e["quant"] == quant
                and e.get("imatrix") == imatrix):
            return e
    return None


def _rounded(v: float, h: float) -> tuple[float, float]:
    return v - h, v + h


def pub_ppl(e: dict[str, Any]) -> Interval | None:
    """dPPL % of a published entry against its table's 16-bit base (derived)."""
    if "ppl_ratio" in e:
        return Interval.around(100 * (e["ppl_ratio"] - 1), 100 * e["ppl_ratio_err"],
                               "published PPL ratio ± 2×its error")
    if "dppl" in e:
        base = e["ppl"] - e["dppl"]
        return Interval.around(100 * e["dppl"] / base, 100 * e["dppl_err"] / base,
                               "published ΔPPL / (PPL − ΔPPL) ± 2×its error")
    if "ppl_wikitext2" in e:
        b = _entry(e["source"], e["params_b"], "FP16")
        if b is None or b is e:
            return None
        h = e.get("rounding", 0.0)
        q_lo, q_hi = _rounded(e["ppl_wikitext2"], h)
        b_lo, b_hi = _rounded(b["ppl_wikitext2"], h)
        return Interval(100 * (q_lo / b_hi - 1), 100 * (q_hi / b_lo - 1),
                        100 * (e["ppl_wikitext2"] / b["ppl_wikitext2"] - 1),
                        f"WikiText2 PPL {b['ppl_wikitext2']} → {e['ppl_wikitext2']}, range from "
                        "rounding")
    return None


def pub_kld(e: dict[str, Any]) -> Interval | None:
    if "kld" not in e:
        return None
    return Interval.around(e["kld"], e.get("kld_err"), "published mean KLD ± 2×its error")


def pub_acc_drop(e: dict[str, Any]) -> Interval | None:
    """Relative drop (%) of the published CommonSenseQA average against FP16 (derived)."""
    if "csqa_avg" not in e:
        return None
    b = _entry(e["source"], e["params_b"], "FP16")
    if b is None or b is e:
        return None
    h = e.get("rounding", 0.0)
    q_lo, q_hi = _rounded(e["csqa_avg"], h)
    b_lo, b_hi = _rounded(b["csqa_avg"], h)
    return Interval(100 * (1 - q_hi / b_lo), 100 * (1 - q_lo / b_hi),
                    100 * (1 - e["csqa_avg"] / b["csqa_avg"]),
                    f"CommonSenseQA avg {b['csqa_avg']} → {e['csqa_avg']}, range from rounding")


def _subject(e: dict[str, Any]) -> str:
    return f"{e['model']} {e['quant']}" + (f" (imatrix {e['imatrix']})" if e.get("imatrix")
                                           else "")


def _pub_lossless(e: dict[str, Any] | None) -> list[dict[str, Any]]:
    if e is None:
        return []
    out, src, subj = [], e["source"], _subject(e)
    ppl = pub_ppl(e)
    if ppl:
        out.append(_ev("published", "ΔPPL", subj, at_most(ppl, LOSSLESS_PPL_PCT),
                       f"derived ΔPPL {ppl.text()} ({ppl.how}); threshold ≤ "
                       f"{LOSSLESS_PPL_PCT} %", src))
    kld = pub_kld(e)
    if kld:
        out.append(_ev("published", "KLD", subj, at_most(kld, LOSSLESS_KLD),
                       f"mean KLD {e['kld']} ± {e.get('kld_err')}; threshold ≤ {LOSSLESS_KLD}",
                       src))
    acc = pub_acc_drop(e)
    if acc:
        out.append(_ev("published", "accuracy", subj, at_most(acc, LOSSLESS_ACC_REL_PCT),
                       f"derived relative drop {acc.text()} ({acc.how}); threshold ≤ "
                       f"{LOSSLESS_ACC_REL_PCT} %", src))
    return out


def _pub_loss(e: dict[str, Any] | None, check: Any, what: str) -> list[dict[str, Any]]:
    if e is None:
        return []
    out, src, subj = [], e["source"], _subject(e)
    ppl = pub_ppl(e)
    if ppl:
        out.append(_ev("published", "ΔPPL", subj, check(ppl),
                       f"derived ΔPPL {ppl.text()} ({ppl.how}); {what}", src))
    acc = pub_acc_drop(e)
    if acc:
        out.append(_ev("published", "accuracy", subj, check(acc),
                       f"derived relative drop {acc.text()} ({acc.how}); {what}", src))
    return out


def _pub_size_compare(small: dict[str, Any] | None, large: dict[str, Any] | None
                      ) -> list[dict[str, Any]]:
    if small is None or large is None:
        return []
    out, src = [], large["source"]
    subj = f"{small['model']} vs {large['model']}, {large['quant']}"
    for metric, fn, unit in (("ΔPPL", pub_ppl, "%"), ("KLD", pub_kld, " nats"),
                             ("accuracy", pub_acc_drop, "%")):
        a, b = fn(small), fn(large)
        if a is None or b is None:
            continue
        digits = 4 if metric == "KLD" else 2
        out.append(_ev("published", metric, subj, smaller(b, a),
                       f"{small['model']}: {a.text(unit, digits)}; {large['model']}: "
                       f"{b.text(unit, digits)} (derived; larger model must lose less)", src))
    return out


# ----------------------------------------------------------------------------- the claims

def check_claims(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The four claims with measured (this run) and published evidence, each with verdicts."""
    variants = [r for r in rows if not r["is_base"]]
    models = sorted({(r["model"], r.get("model_params")) for r in rows},
                    key=lambda m: m[1] or 0)
    model_text = ", ".join(f"{m} ({p / 1e9:.2g} B parameters)" if p else f"{m} (size unknown)"
                           for m, p in models) or "none"
    claims = [_claim1(variants), _claim2(variants, model_text),
              _claim3(variants, models, model_text), _claim4(variants, rows, model_text)]
    for c in claims:
        c["measured_summary"] = _summary(c["measured"])
        c["published_summary"] = _by_source(c["published"])
    return claims


def _by_source(evidence: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (source, metric): the combined verdict and, when its rows disagree, which
    rows gave which verdict (a W8A8 row must not hide behind a weight-only one)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in evidence:
        groups.setdefault((e["source"], e["metric"]), []).append(e)
    out = []
    for (source, metric), evs in groups.items():
        verdicts = [e["verdict"] for e in evs]
        split = ""
        if len(set(verdicts)) > 1:
            split = "; ".join(f"{v}: " + ", ".join(e["subject"] for e in evs if e["verdict"] == v)
                              for v in (CONTRADICTED, NED, SUPPORTED) if v in verdicts)
        out.append({"source": source, "short": published()["sources"][source]["short"],
                    "metric": metric, "verdict": combine(verdicts), "split": split})
    return out


def _claim1(variants: list[dict[str, Any]]) -> dict[str, Any]:
    eight = [r for r in variants if r["bits"] == 8]
    measured = _lossless_measured(eight)
    if not measured:
        measured = [_ev("measured", m, "this run", NED, "no 8-bit variant with an ok "
                        f"{m} cell in this run") for m in ("ΔPPL", "KLD", "MMLU")]
    pub = (_pub_lossless(_entry("llamacpp-l3-8b-scoreboard", 8, "Q8_0"))
           + _pub_lossless(_entry("llamacpp-l3-8b-vs-70b", 8, "Q8_0"))
           + _pub_lossless(_entry("llamacpp-l3-8b-vs-70b", 70, "Q8_0"))
           + _pub_lossless(_entry("arxiv-2404.14047v3", 8, "AWQ W8 (no group)"))
           + _pub_lossless(_entry("arxiv-2404.14047v3", 8, "SmoothQuant W8A8"))
           + _pub_lossless(_entry("arxiv-2404.14047v3", 70, "SmoothQuant W8A8")))
    return {"id": 1, "text": "8-bit quantization is a free lunch: lossless.",
            "metrics": "ΔPPL %, mean KLD and MMLU (paired test) of every 8-bit variant "
                       "(Q8_0, int8, W8) against its model's base",
            "thresholds": f"lossless = ΔPPL ≤ {LOSSLESS_PPL_PCT} %, KLD ≤ {LOSSLESS_KLD} nats, "
                          f"no significant MMLU drop and its 95 % CI within "
                          f"{LOSSLESS_MMLU_PTS:g} point (published accuracy: drop ≤ "
                          f"{LOSSLESS_ACC_REL_PCT} %)",
            "measured": measured, "published": pub,
            "notes": ["SmoothQuant W8A8 also quantizes activations: it is 8-bit, but not "
                      "weight-only; it is listed because the claim is about 8-bit in general.",
                      "Values printed with one decimal (arXiv 2404.14047) cannot resolve a "
                      "0.5 % PPL change: there the rounding alone gives “not enough data”."]}


def _claim2(variants: list[dict[str, Any]], model_text: str) -> dict[str, Any]:
    awq4 = [r for r in variants if r["method"] == "awq" and r["bits"] == 4]
    stated = {"8B": 2.0, "70B": 0.05}
    measured: list[dict[str, Any]] = []
    for cls, x in stated.items():
        sel = [r for r in awq4 if size_class(r.get("model_params")) == cls]
        if sel:
            measured += _loss_measured(sel, lambda iv, x=x: near(iv, x),
                                       f"claimed ~{x:g} % for ~{cls}")
        else:
            measured.append(_ev("measured", "ΔPPL", f"~{cls} AWQ 4-bit", NED,
                                f"no AWQ 4-bit variant of a ~{cls} model in this run "
                                f"(models: {model_text})"))
    for r in awq4:
        if size_class(r.get("model_params")) is None:
            ppl = measured_ppl(r)
            measured.append(_ev("measured", "ΔPPL", r["label"], None,
                                "for information, not a ~8B/~70B model: ΔPPL "
                                + (ppl.text() if ppl else "not measured")))
    pub = []
    for b, x in ((8, 2.0), (70, 0.05)):
        pub += _pub_loss(_entry("arxiv-2404.14047v3", b, "AWQ W4 g128"),
                         lambda iv, x=x: near(iv, x), f"claimed ~{x:g} %")
    return {"id": 2, "text": "AWQ 4-bit costs an 8B model ~2 %, a 70B model only ~0.05 %.",
            "metrics": "ΔPPL % and relative MMLU drop of AWQ 4-bit variants of ~8B and ~70B "
                       "models (published: WikiText2 PPL and the CommonSenseQA average)",
            "thresholds": "a stated loss ~X % matches within a factor of two (X/2 … 2X)",
            "measured": measured, "published": pub,
            "notes": ["The paper's text says: “"
                      + published()["sources"]["arxiv-2404.14047v3"]["quote"]
                      + "” — that is a statement across methods and metrics, not the AWQ rows.",
                      "The ~0.05 % figure for 70B is not in the study's tables: its AWQ W4 g128 "
                      "row for LLaMA3-70B shows a 0.53 % lower CommonSenseQA average "
                      "(75.3 → 74.9) and a higher WikiText2 PPL (2.9 → 3.3)."]}


def _claim3(variants: list[dict[str, Any]], models: list[tuple[str, float | None]],
            model_text: str) -> dict[str, Any]:
    sizes = sorted({p for _, p in models if p})
    measured: list[dict[str, Any]] = []
    if len(sizes) < 2:
        for metric in ("ΔPPL", "KLD", "MMLU"):
            measured.append(_ev("measured", metric, "this run", NED,
                                f"not enough data here: the claim compares model sizes and "
                                f"this run has {len(sizes) or 'no'} measured size"
                                f"{'s' if len(sizes) != 1 else ''} ({model_text})"))
    else:
        low = [r for r in variants if r["bits"] is not None and r["bits"] <= LOW_BITS
               and r.get("model_params")]
        by_quant: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in low:
            by_quant.setdefault((r["backend"], r["quant"]), []).append(r)
        for (backend, quant), sel in sorted(by_quant.items()):
            sel = sorted(sel, key=lambda r: r["model_params"])
            for a, b in zip(sel, sel[1:]):
                if a["model_params"] == b["model_params"]:
                    continue
                for metric, fn in (("ΔPPL", measured_ppl), ("KLD", measured_kld),
                                   ("MMLU", measured_mmlu_drop_rel)):
                    ia, ib = fn(a), fn(b)
                    if ia and ib:
                        unit, d = (" nats", 4) if metric == "KLD" else ("%", 2)
                        measured.append(_ev(
                            "measured", metric, f"{a['model']} vs {b['model']}, {backend} {quant}",
                            smaller(ib, ia), f"{a['model']}: {ia.text(unit, d)}; {b['model']}: "
                            f"{ib.text(unit, d)} (larger model must lose less)"))
        if not measured:
            measured.append(_ev("measured", "ΔPPL", "this run", NED, "no low-bit variant was "
                                "measured on more than one model size"))
    seventy_awq3 = [r for r in variants if r["method"] == "awq" and r["bits"] == 3
                    and size_class(r.get("model_params")) == "70B"]
    measured += _loss_measured(seventy_awq3, lambda iv: near(iv, 2.7), "claimed 2.7 %")
    pub = []
    for q in ("AWQ W4 g128", "AWQ W3 g128"):
        pub += _pub_size_compare(_entry("arxiv-2404.14047v3", 8, q),
                                 _entry("arxiv-2404.14047v3", 70, q))
    for q in ("Q4_K_M", "Q2_K"):
        pub += _pub_size_compare(_entry("llamacpp-l3-8b-vs-70b", 8, q),
                                 _entry("llamacpp-l3-8b-vs-70b", 70, q))
    pub += _pub_loss(_entry("arxiv-2404.14047v3", 70, "AWQ W3 g128"),
                     lambda iv: near(iv, 2.7), "claimed 2.7 % for 70B AWQ 3-bit")
    return {"id": 3, "text": "The larger the model, the smaller the low-bit loss; AWQ 3-bit 70B "
                             "loses only 2.7 %.",
            "metrics": "ΔPPL %, KLD and the relative MMLU drop (paired 95 % CI) of the same "
                       "low-bit variant on models of different sizes; for the 2.7 % figure, the "
                       "loss of a ~70B AWQ 3-bit variant",
            "thresholds": "“smaller loss” = the larger model's interval lies entirely below "
                          "the smaller model's; ~2.7 % matches within 1.35 … 5.4 %",
            "measured": measured, "published": pub,
            "notes": ["Relative PPL changes of models with different base perplexities are "
                      "not the same kind of loss as accuracy drops; the sources disagree by "
                      "metric: accuracy favours the larger model, perplexity and KLD do not."]}


def _claim4(variants: list[dict[str, Any]], rows: list[dict[str, Any]],
            model_text: str) -> dict[str, Any]:
    subclaims = [("8B", 8, "lossless"), ("70B", 4, "lossless"), ("8B", 4, "acceptable"),
                 ("70B", 3, "acceptable")]
    measured: list[dict[str, Any]] = []
    for cls, bits, kind in subclaims:
        sel = [r for r in variants if size_class(r.get("model_params")) == cls
               and r["bits"] == bits]
        what = ("no loss" if kind == "lossless" else f"loss ≤ {ACCEPTABLE_LOSS_PCT:g} %")
        if not sel:
            measured.append(_ev("measured", "ΔPPL", f"~{cls} at {bits}-bit ({what})", NED,
                                f"no {bits}-bit variant of a ~{cls} model in this run "
                                f"(models: {model_text})"))
        elif kind == "lossless":
            measured += _lossless_measured(sel)
        else:
            measured += _loss_measured(sel, lambda iv: at_most(iv, ACCEPTABLE_LOSS_PCT),
                                       f"threshold ≤ {ACCEPTABLE_LOSS_PCT:g} %")
    measured += _own_model_info(rows)
    acceptable = (lambda iv: at_most(iv, ACCEPTABLE_LOSS_PCT))
    what = f"threshold ≤ {ACCEPTABLE_LOSS_PCT:g} %"
    pub = (_pub_lossless(_entry("llamacpp-l3-8b-scoreboard", 8, "Q8_0"))
           + _pub_lossless(_entry("arxiv-2404.14047v3", 8, "AWQ W8 (no group)"))
           + _pub_lossless(_entry("llamacpp-l3-8b-vs-70b", 70, "Q4_K_M"))
           + _pub_lossless(_entry("arxiv-2404.14047v3", 70, "AWQ W4 g128"))
           + _pub_loss(_entry("llamacpp-l3-8b-scoreboard", 8, "Q4_K_M"), acceptable, what)
           + _pub_loss(_entry("llamacpp-l3-8b-vs-70b", 8, "Q4_K_M"), acceptable, what)
           + _pub_loss(_entry("arxiv-2404.14047v3", 8, "AWQ W4 g128"), acceptable, what)
           + _pub_loss(_entry("arxiv-2404.14047v3", 70, "AWQ W3 g128"), acceptable, what))
    return {"id": 4, "text": "For no loss: 8B → 8-bit, 70B → 4-bit; accepting 2–3 %: 8B → "
                             "4-bit, 70B → 3-bit.",
            "metrics": "the lossless test (claim 1) for 8B at 8 bits and 70B at 4 bits; "
                       "ΔPPL % and relative MMLU drop for 8B at 4 bits and 70B at 3 bits",
            "thresholds": f"lossless as in claim 1; “accepting 2–3 %” = loss ≤ "
                          f"{ACCEPTABLE_LOSS_PCT:g} %",
            "measured": measured, "published": pub,
            "notes": ["Lines marked “for information” say what this run's data recommends for "
                      "its own model; they are not evidence about 8B or 70B models."]}


def _own_model_info(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each model of this run: the fewest bits that measured lossless / within 3 %."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        sel = [r for r in rows if r["model"] == model and not r["is_base"]
               and r["bits"] is not None and measured_ppl(r)]
        if not sel:
            continue
        sel.sort(key=lambda r: (r["bits"], r.get("bpw") or 0))
        lossless = [r for r in sel if at_most(measured_ppl(r), LOSSLESS_PPL_PCT) == SUPPORTED
                    and (measured_kld(r) is None
                         or at_most(measured_kld(r), LOSSLESS_KLD) == SUPPORTED)]
        ok3 = [r for r in sel if at_most(measured_ppl(r), ACCEPTABLE_LOSS_PCT) == SUPPORTED]
        def name(found: list[dict[str, Any]]) -> str:
            return f"{found[0]['quant']} ({found[0]['bits']:g}-bit)" if found else "none"

        text = (f"fewest bits with measured no loss: {name(lossless)}; "
                f"fewest bits within {ACCEPTABLE_LOSS_PCT:g} %: {name(ok3)}")
        out.append(_ev("measured", "ΔPPL", f"{model} (for information)", None, text))
    return out
