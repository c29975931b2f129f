"""The advice check: each claim of the user's notes, the metrics that bear on it, stated thresholds,
and verdicts - from this run's measurements and, separately, from published tables.

Rules (design.md §2 "Decisions"):

- **Intervals, not points.** Measured numbers: the one judge's 95 % intervals
  (:mod:`qbench.results.judge`, the gate's and the recommendation's too): ΔPPL by t on the
  per-chunk ln PPL ratio, mean KLD by t over its chunks, MMLU through the paired test against
  the base (exact McNemar p, Newcombe CI); a base at chance "cannot discriminate on this model". Published numbers: their stated ±
  (× 2), else the rounding of the printed value (6.6 means 6.55-6.65); a published accuracy also
  carries its test set's binomial sampling error, unpaired (± 2 SE; :mod:`qbench.report.published`).
- An interval entirely on one side of a threshold decides. One that straddles it is
  "indistinguishable at this sample size", with the sample size (tokens, questions) that would
  resolve it at 80 % power (:meth:`qbench.results.judge.Judgement.to_resolve`); for a published table it is "not resolved at
  the published precision". "Not enough data" means there is no number at all.
- **A claim is judged on the metric it is stated in.** A loss stated in percent ("~2 %",
  "2–3 %") is a task-accuracy loss: relative accuracy decides; ΔPPL is shown beside it and does
  not decide (relative PPL moves about ten times as much as relative accuracy: in arXiv
  2404.14047 AWQ 4-bit raises LLaMA3-8B's PPL 16 % and lowers its accuracy 2.3 %). "Lossless"
  and "loses less" are not stated in a metric: ΔPPL, KLD and accuracy all decide.
- **Per method.** Verdicts are given per variant (method); when methods disagree the headline
  says which gave which - never one word that hides the split.
- A base dequantized from a quantized file carries that caveat into every verdict made on it.
- Measured and published evidence are kept apart: no number mixes them. Relative changes of
  published entries are derived here from the raw published values (``qbench/data/published.json``)
  and labelled as derived.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from qbench.metrics import known_metric_info
from qbench.report import published as pubdata
from qbench.results.judge import Judgement, estimate

SUPPORTED, CONTRADICTED, NED = "supported", "contradicted", "not enough data"
UNRESOLVED = "indistinguishable at this sample size"       # measured interval straddles
UNRESOLVED_PUB = "not resolved at the published precision"  # published interval straddles
SPLIT = "split"                                             # a headline whose methods disagree
CANNOT = "cannot discriminate on this model"                # a base at chance: no signal
VERDICTS = (SUPPORTED, CONTRADICTED, UNRESOLVED, UNRESOLVED_PUB, NED, CANNOT)

# thresholds (stated in the report)
SIGMA = 2.0                   # measured intervals without a CI: value ± 2 standard errors
LOSSLESS_PPL_PCT = 0.5        # "lossless": PPL rises by at most 0.5 %
LOSSLESS_KLD = 0.005          # ... and mean KLD from the base at most 0.005 nats
LOSSLESS_MMLU_PTS = 1.0       # ... and the paired 95 % CI of the MMLU drop stays within 1 point
                              #     (a significant drop, exact McNemar p < 0.05, contradicts)
LOSSLESS_ACC_REL_PCT = 0.5    # published accuracy averages (no per-question data): drop <= 0.5 %
ACCEPTABLE_LOSS_PCT = 3.0     # "accepting 2-3 %": accuracy loss at most 3 %
LOW_BITS = 4                  # "low-bit": 4 bits per weight or fewer
SIZE_CLASSES = {"8B": (5e9, 12e9), "70B": (45e9, 110e9)}   # parameter ranges for "~8B", "~70B"
ACC = "accuracy"              # the metric name of a relative task-accuracy drop

THRESHOLDS_TEXT = [
    "Measured intervals are the one judge's 95 % intervals (the regression gate's and the "
    "recommendation's too; in a suite that qbench run --until-decided measured, its sequential "
    "plan's level, e.g. 99.4 %, for every comparison and every test): ΔPPL a t interval on the per-chunk ln PPL ratio against the base, "
    "mean KLD a t interval over its chunks, the MMLU drop Newcombe's paired interval with an "
    f"exact McNemar test on the flipped questions; else value ± {SIGMA:g} "
    "standard errors. A base at chance on MMLU (its interval includes 25 %) or answering one "
    f"letter to 60 % of the questions “{CANNOT}”: neither a pass nor a loss. Published ones use the table's ± (× 2) or the rounding of the printed "
    "value (6.6 means 6.55–6.65). A published accuracy also carries its test set's sampling "
    "error: a binomial standard error per benchmark from its number of items (MMLU 14,042, "
    "GSM8K 1,319, IFEval 541, …; each count cited in the sources), an average's error from its "
    "parts, and, with no per-question data to pair, the unpaired error of a drop (± 2 SE).",
    f"“Lossless”: PPL rises by at most {LOSSLESS_PPL_PCT} %, mean KLD from the base is at most "
    f"{LOSSLESS_KLD} nats, and MMLU shows no significant drop (exact McNemar p < 0.05, or "
    f"1 − the plan's level, contradicts) with the CI of the drop within {LOSSLESS_MMLU_PTS:g} "
    f"point; for published "
    f"accuracy a relative drop of at most {LOSSLESS_ACC_REL_PCT} %. All three metrics decide.",
    "A loss stated in percent (“~X %”, “2–3 %”) is judged on task accuracy (the relative drop "
    "of MMLU or of the published accuracy average): relative PPL moves about ten times as much, "
    "so ΔPPL is shown beside it and does not decide. “~X %” matches when the accuracy drop lies "
    f"within a factor of two of it (X/2 … 2X); “accepting 2–3 %” means at most "
    f"{ACCEPTABLE_LOSS_PCT:g} %.",
    f"“Low-bit”: at most {LOW_BITS} bits per weight. Model sizes: “~8B” is 5–12 B parameters, "
    "“~70B” is 45–110 B.",
    "An interval entirely inside the condition supports it, entirely outside contradicts it; one "
    f"that straddles the threshold is “{UNRESOLVED}” (with the number of tokens or questions "
    f"that would resolve it at 80 % power, or “cannot be resolved with this dataset”) or, for a published table, “{UNRESOLVED_PUB}”. “{NED}”: no number.",
    "Verdicts are per method (variant); where methods disagree the headline names each.",
]


# ---------------------------------------------------------------------------------- intervals

@dataclass(frozen=True)
class Interval:
    """A 95 % interval of a loss; ``se``/``n`` (when known) give the sample size to resolve it."""
    lo: float
    hi: float
    point: float
    how: str = ""
    se: float | None = None
    n: int | None = None
    n_unit: str = ""
    published: bool = False
    judged: Judgement | None = None   # the judge's comparison behind a measured interval
    scale: float = 1.0                # this interval's unit per the judgement's unit

    @classmethod
    def around(cls, value: float, err: float | None, how: str = "", **kw: Any) -> Interval:
        e = SIGMA * err if err else 0.0
        return cls(value - e, value + e, value, how + ("" if err else " (no error estimate)"),
                   se=err or None, **kw)

    @property
    def level_text(self) -> str:
        """"95 %", or the sequential plan's level the judge took the interval at."""
        lvl = self.judged.level if self.judged is not None else 0.95
        return f"{100 * lvl:.3g} %"

    def text(self, unit: str = "%", digits: int = 2) -> str:
        if self.lo == self.hi:
            return f"{self.point:+.{digits}f}{unit}"
        return (f"{self.point:+.{digits}f}{unit} [{self.lo:+.{digits}f}, "
                f"{self.hi:+.{digits}f}]")


def _straddles(iv: Interval) -> str:
    return UNRESOLVED_PUB if iv.published else UNRESOLVED


def at_most(iv: Interval | None, thr: float) -> str:
    if iv is None:
        return NED
    if iv.hi <= thr:
        return SUPPORTED
    if iv.lo > thr:
        return CONTRADICTED
    return _straddles(iv)


def near(iv: Interval | None, x: float) -> str:
    """Does the interval lie within a factor of two of the stated loss x (> 0)?"""
    if iv is None:
        return NED
    lo, hi = x / 2, 2 * x
    if lo <= iv.lo and iv.hi <= hi:
        return SUPPORTED
    if iv.hi < lo or iv.lo > hi:
        return CONTRADICTED
    return _straddles(iv)


def smaller(larger_model: Interval | None, smaller_model: Interval | None) -> str:
    """Is the larger model's loss smaller than the smaller model's?"""
    if larger_model is None or smaller_model is None:
        return NED
    if larger_model.hi < smaller_model.lo:
        return SUPPORTED
    if larger_model.lo > smaller_model.hi:
        return CONTRADICTED
    return _straddles(larger_model)


def combine(verdicts: list[str]) -> str:
    """One method's verdicts (several rows or models): any contradicted -> contradicted; all
    supported -> supported; otherwise straddling (if any interval straddles) or not enough."""
    if not verdicts:
        return NED
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    for v in (UNRESOLVED, UNRESOLVED_PUB, CANNOT):
        if v in verdicts:
            return v
    return NED


@dataclass(frozen=True)
class Rule:
    """A loss condition: ``at_most`` x, or ``near`` x (within a factor of two)."""
    kind: str
    x: float

    def judge(self, iv: Interval | None) -> str:
        return at_most(iv, self.x) if self.kind == "at_most" else near(iv, self.x)

    def thresholds(self) -> tuple[float, ...]:
        return (self.x,) if self.kind == "at_most" else (self.x / 2, 2 * self.x)

    def text(self) -> str:
        return (f"threshold ≤ {self.x:g} %" if self.kind == "at_most"
                else f"claimed ~{self.x:g} % (matches {self.x / 2:g} … {2 * self.x:g} %)")


def _resolutions(iv: Interval, thresholds: Iterable[float]) -> list[dict[str, Any]]:
    """The judge's answer, per straddled threshold, to "what sample would resolve it" (80 %
    power, two significant figures, capped by what the input holds)."""
    if iv.judged is None:
        return []
    return [iv.judged.to_resolve(t / iv.scale) for t in thresholds if iv.lo <= t <= iv.hi]


def needed_n(iv: Interval | None, thresholds: Iterable[float]) -> int | None:
    """Sample size (in ``iv.n_unit``) at which the interval would no longer straddle any of the
    thresholds it straddles now (the largest of them, at 80 % power); None when unknown."""
    if iv is None or iv.published or not iv.n:
        return None
    need = [r["n"] for r in _resolutions(iv, thresholds)]
    known = [k for k in need if k is not None]
    return max(known) if known and len(known) == len(need) else None


def _resolve_note(iv: Interval | None, thresholds: Iterable[float]) -> tuple[str, int | None]:
    """("; about N tokens would resolve it (now n)", N) for a straddling measured interval."""
    if iv is None or iv.published:
        return "", None
    thr = [t for t in thresholds if iv.lo <= t <= iv.hi]
    if not thr:
        return "", None
    n = needed_n(iv, thr)
    res = _resolutions(iv, thr)
    if n is not None and any(r["resolvable"] is False for r in res):
        worst = max((r for r in res if r["n"]), key=lambda r: r["n"])
        return f"; {worst['text']}", n
    if n is None:
        return (f"; interval straddles the threshold (n = {iv.n:,} {iv.n_unit}; the size that "
                "would resolve it is unknown)" if iv.n else
                "; interval straddles the threshold (sample size unknown)"), None
    return f"; about {n:,} {iv.n_unit} would resolve it at 80 % power (now {iv.n:,})", n


def size_class(n_params: float | None) -> str | None:
    if not n_params:
        return None
    for name, (lo, hi) in SIZE_CLASSES.items():
        if lo <= n_params <= hi:
            return name
    return None


# ------------------------------------------------------------------------ measured evidence

def _cell_details(row: dict[str, Any], metric: str) -> dict[str, Any]:
    cell = (row.get("cells") or {}).get(metric) or {}
    return (cell.get("details") or {}) if cell.get("status") == "ok" else {}


def measured_ppl(row: dict[str, Any]) -> Interval | None:
    """ΔPPL % with the judge's 95 % interval (t on the per-chunk ln PPL ratio)."""
    j: Judgement | None = row.get("dppl_judged")
    if row.get("is_base") or j is None or j.change is None:
        return None
    if j.low is None or j.high is None:
        return Interval.around(j.change, None, j.method, n=j.n, n_unit=j.n_unit, judged=j)
    return Interval(j.low, j.high, j.change, f"chunk-paired t, {j.n} chunks", se=j.se, n=j.n,
                    n_unit=j.n_unit, judged=j)


def measured_kld(row: dict[str, Any]) -> Interval | None:
    """Mean KLD (nats) with the judge's 95 % interval over its chunks."""
    cell = (row.get("cells") or {}).get("kld")
    info = known_metric_info("kld")
    spec = info.value_spec("kld_mean") if info else None
    if row.get("kld") is None or not cell or cell.get("status") != "ok" or spec is None:
        return None
    j = estimate("kld", spec, cell)
    if j.low is None or j.high is None:
        return Interval.around(row["kld"], row.get("kld_err"), "mean KLD")
    return Interval(j.low, j.high, j.change or 0.0, f"mean KLD, {j.method}", se=j.se, n=j.n,
                    n_unit=j.n_unit, judged=j)


def measured_mmlu_drop_pts(row: dict[str, Any]) -> Interval | None:
    """Accuracy drop vs the base in points with the judge's paired 95 % interval (positive =
    worse); None when the base cannot discriminate (a model at chance)."""
    j: Judgement | None = (row.get("judged") or {}).get("mmlu.acc")
    p = row.get("mmlu_paired")
    if not p or j is None or j.change is None or row.get("mmlu_fitness"):
        return None
    return Interval(-j.high, -j.low, -j.change, f"paired, McNemar p = {p['p_value']:.3g}",
                    se=j.se, n=j.n, n_unit="questions", judged=j)


def measured_mmlu_drop_rel(row: dict[str, Any]) -> Interval | None:
    """The same drop relative to the base's accuracy, in %."""
    p = row.get("mmlu_paired")
    pts = measured_mmlu_drop_pts(row)
    if not p or not p.get("acc_base") or pts is None:
        return None
    b = 100 * p["acc_base"]
    return Interval(100 * pts.lo / b, 100 * pts.hi / b, 100 * pts.point / b, pts.how,
                    se=100 * pts.se / b if pts.se else None, n=pts.n, n_unit="questions",
                    judged=pts.judged, scale=100 / b)


def mmlu_lossless(row: dict[str, Any]) -> str:
    """Lossless on MMLU: no significant drop (exact McNemar) and the drop's interval within
    LOSSLESS_MMLU_PTS. Both at the level the judge took the interval at: 95 %, or the
    sequential plan's when --until-decided grew the questions (a McNemar test at 5 % after
    every look would call a lossless variant's drop significant far more often than 5 %)."""
    p = row.get("mmlu_paired")
    if not p:
        return NED
    if row.get("mmlu_fitness"):
        return CANNOT
    iv = measured_mmlu_drop_pts(row)
    lvl = iv.judged.level if iv is not None and iv.judged is not None else 0.95
    return lossless_on_mmlu(p["p_value"], p["diff"], iv.hi if iv else None, lvl)


def lossless_on_mmlu(p_value: float, diff: float, drop_hi: float | None, lvl: float) -> str:
    """The MMLU side of "lossless" from a paired comparison: ``diff`` the accuracy change
    (variant - base), ``drop_hi`` the upper end of the drop's interval in points, at ``lvl``."""
    if p_value < 1 - lvl and diff < 0:
        return CONTRADICTED
    return SUPPORTED if drop_hi is not None and drop_hi <= LOSSLESS_MMLU_PTS else UNRESOLVED


def _ev(kind: str, metric: str, subject: str, verdict: str | None, detail: str,
        source: str | None = None, *, group: str | None = None, decides: bool = True,
        caveats: Iterable[str] = (), n_needed: int | None = None, n_now: int | None = None,
        n_unit: str = "", entries: Iterable[int] = (), rule: dict[str, Any] | None = None,
        note: str | None = None, part: str = "") -> dict[str, Any]:
    """One line of evidence. ``decides`` False: shown beside the deciding metric (verdict
    None). ``caveats``: what every reader of this verdict must know (a dequantized base)."""
    return {"kind": kind, "metric": metric, "subject": subject, "group": group or subject,
            "verdict": verdict if decides else None, "decides": decides, "detail": detail,
            "source": source, "caveats": list(caveats), "n_needed": n_needed, "n_now": n_now,
            "n_unit": n_unit, "entries": list(entries), "rule": rule,
            "note": note or (None if decides else "shown beside, does not decide"),
            "part": part}


def _part(evidence: list[dict[str, Any]], part: str) -> list[dict[str, Any]]:
    """Tag evidence with the part of a claim it bears on (``~8B → 4-bit, ≤ 3 %``)."""
    for e in evidence:
        e["part"] = part
    return evidence


def method_label(row: dict[str, Any]) -> str:
    """The method a verdict is given for: backend and variant (``llama.cpp Q8_0``)."""
    return f"{row['backend']} {row['quant']}"


def base_caveats(row: dict[str, Any], by_label: dict[str, dict[str, Any]]) -> list[str]:
    """The dequantized-base caveat for a row measured against such a base (see build.py's
    base notes): rows carry ``requantized_from`` when their base was made from a quantized
    file."""
    base = by_label.get(row.get("base_label") or "")
    src = (base or {}).get("requantized_from") or row.get("requantized_from")
    if not src:
        return []
    name = (base or {}).get("label") or "the base"
    return [f"base {name} was dequantized from a {src} file: the loss is relative to that base, "
            "not to the original model's precision"]


def _lossless_measured(rows: list[dict[str, Any]], by_label: dict[str, dict[str, Any]]
                       ) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        g, cav = method_label(r), base_caveats(r, by_label)
        ppl = measured_ppl(r)
        if ppl:
            note, n = _resolve_note(ppl, (LOSSLESS_PPL_PCT,))
            out.append(_ev("measured", "ΔPPL", r["label"], at_most(ppl, LOSSLESS_PPL_PCT),
                           f"ΔPPL {ppl.text()} ({ppl.how}); threshold ≤ {LOSSLESS_PPL_PCT} %"
                           + note, group=g, caveats=cav, n_needed=n, n_now=ppl.n,
                           n_unit=ppl.n_unit))
        kld = measured_kld(r)
        if kld:
            note, n = _resolve_note(kld, (LOSSLESS_KLD,))
            out.append(_ev("measured", "KLD", r["label"], at_most(kld, LOSSLESS_KLD),
                           f"mean KLD {kld.point:.5f} [{kld.lo:.5f}, {kld.hi:.5f}] nats; "
                           f"threshold ≤ {LOSSLESS_KLD}" + note, group=g, caveats=cav,
                           n_needed=n, n_now=kld.n, n_unit=kld.n_unit))
        if r.get("mmlu_paired") and r.get("mmlu_fitness"):
            out.append(_ev("measured", "MMLU", r["label"], CANNOT,
                           f"the base {r['mmlu_fitness']}: MMLU on this model measures letter "
                           "bias, not knowledge, and decides nothing", group=g, caveats=cav))
        elif r.get("mmlu_paired"):
            d = measured_mmlu_drop_pts(r)
            assert d is not None
            v = mmlu_lossless(r)
            note, n = _resolve_note(d, (LOSSLESS_MMLU_PTS,)) if v == UNRESOLVED else ("", None)
            out.append(_ev("measured", "MMLU", r["label"], v,
                           f"drop {d.text(' pts', 1)} ({d.level_text} CI, {d.how}); lossless "
                           f"needs no significant drop and CI within {LOSSLESS_MMLU_PTS:g} point"
                           + note,
                           group=g, caveats=cav, n_needed=n, n_now=d.n, n_unit="questions"))
        elif r.get("mmlu_note"):
            out.append(_ev("measured", "MMLU", r["label"], NED, r["mmlu_note"], group=g,
                           caveats=cav))
        out += _problems(r, g, cav, ("perplexity", "kld", "mmlu"))
    return out


def _problems(r: dict[str, Any], group: str, cav: list[str], metrics: tuple[str, ...]
              ) -> list[dict[str, Any]]:
    names = {"perplexity": "ΔPPL", "kld": "KLD", "mmlu": "MMLU"}
    return [_ev("measured", names.get(p["metric"], p["metric"]), r["label"], NED,
                f"cell {p['status']}: {p['error'][:160]}", group=group, caveats=cav)
            for p in r.get("problems", []) if p["metric"] in metrics]


def _loss_measured(rows: list[dict[str, Any]], rule: Rule, what: str,
                   by_label: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """A loss stated in percent: the relative MMLU drop decides; ΔPPL is shown beside it."""
    out = []
    for r in rows:
        g, cav = method_label(r), base_caveats(r, by_label)
        acc = measured_mmlu_drop_rel(r)
        if r.get("mmlu_paired") and r.get("mmlu_fitness"):
            out.append(_ev("measured", ACC, r["label"], CANNOT,
                           f"the base {r['mmlu_fitness']}: MMLU on this model measures letter "
                           "bias, not knowledge", group=g, caveats=cav))
        elif acc:
            note, n = _resolve_note(acc, rule.thresholds())
            out.append(_ev("measured", ACC, r["label"], rule.judge(acc),
                           f"relative MMLU drop {acc.text()} (paired {acc.level_text} CI); "
                           f"{what}" + note, group=g, caveats=cav, n_needed=n, n_now=acc.n,
                           n_unit="questions"))
        else:
            out.append(_ev("measured", ACC, r["label"], NED,
                           r.get("mmlu_note") or "no paired MMLU result for this variant "
                           "and its base", group=g, caveats=cav))
        ppl = measured_ppl(r)
        if ppl:
            out.append(_ev("measured", "ΔPPL", r["label"], None,
                           f"ΔPPL {ppl.text()} ({ppl.how}); a loss stated in % is judged on "
                           "accuracy, not on PPL", group=g, decides=False, caveats=cav))
        out += _problems(r, g, cav, ("mmlu",))
    return out


# ------------------------------------------------------------------------------- headlines

def headline(evidence: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per metric (deciding evidence only): one verdict per method, and a line of text that
    names each method when they disagree (``SPLIT``) and the sample size that would resolve an
    interval that straddles."""
    by_metric: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for e in evidence:
        if e["verdict"] is None:
            continue
        by_metric.setdefault((e.get("part", ""), e["metric"]), {}).setdefault(
            e["group"], []).append(e)
    lines = []
    for (part, metric), groups in by_metric.items():
        parts = []
        for group, evs in groups.items():
            v = combine([e["verdict"] for e in evs])
            needs = [e for e in evs if e["verdict"] == v and e.get("n_needed")]
            need = max(needs, key=lambda e: e["n_needed"]) if needs else None
            parts.append({"group": group, "verdict": v,
                          "caveat": any(e["caveats"] for e in evs),
                          "n_needed": need["n_needed"] if need else None,
                          "n_now": need["n_now"] if need else None,
                          "n_unit": need["n_unit"] if need else ""})
        verdicts = {p["verdict"] for p in parts}
        verdict = verdicts.pop() if len(verdicts) == 1 else SPLIT
        caveats = sorted({c for evs in groups.values() for e in evs for c in e["caveats"]})

        def part_text(p: dict[str, Any]) -> str:
            t = p["verdict"]
            if p["n_needed"]:
                t += (f" (n = {p['n_now']:,} {p['n_unit']}; about {p['n_needed']:,} would "
                      "resolve it)")
            return t + (" †" if p["caveat"] else "")

        if verdict == SPLIT:
            text = "; ".join(f"{p['group']}: {part_text(p)}" for p in parts)
        elif len(parts) == 1:
            text = f"{parts[0]['group']}: {part_text(parts[0])}"
        else:
            text = part_text({**parts[0], "n_needed": max(
                (p["n_needed"] or 0 for p in parts), default=0) or None, "caveat": False,
                "n_now": max((p["n_now"] or 0 for p in parts), default=0),
                "n_unit": next((p["n_unit"] for p in parts if p["n_unit"]), "")})
            text += " (" + ", ".join(p["group"] + (" †" if p["caveat"] else "")
                                     for p in parts) + ")"
        lines.append({"part": part, "metric": metric, "verdict": verdict, "parts": parts,
                      "text": text, "caveats": caveats,
                      "key": f"{part} | {metric}" if part else metric})
    return lines


# ----------------------------------------------------------------------- published evidence

def published() -> dict[str, Any]:
    """The shipped reference tables (qbench/data/published.json), checked on first load."""
    return pubdata.load()


def _entry(source: str, model_b: float, quant: str, imatrix: Any = None
           ) -> dict[str, Any] | None:
    for e in published()["entries"]:
        if (e["source"] == source and e["params_b"] == model_b and e["quant"] == quant
                and e.get("imatrix") == imatrix):
            return e
    return None


def _need(source: str, model_b: float, quant: str, imatrix: Any = None) -> dict[str, Any]:
    """An entry a claim is built on: a missing one is a data error, named, not a silent gap."""
    e = _entry(source, model_b, quant, imatrix)
    if e is None:
        raise KeyError(f"{pubdata.DATA_FILE}: no entry source={source!r} params_b={model_b!r} "
                       f"quant={quant!r} imatrix={imatrix!r}")
    return e


def entry_index(e: dict[str, Any]) -> int:
    return next(i for i, x in enumerate(published()["entries"]) if x is e)


def base_entry(e: dict[str, Any]) -> dict[str, Any] | None:
    """The entry an entry's loss is taken against: its ``base`` (default FP16), same source and
    model size; None for a base itself."""
    b = _entry(e["source"], e["params_b"], e.get("base", "FP16"))
    return None if b is None or b is e else b


def _rounded(v: float, h: float) -> tuple[float, float]:
    return v - h, v + h


def pub_ppl(e: dict[str, Any]) -> Interval | None:
    """dPPL % of a published entry against its table's 16-bit base (derived)."""
    if "ppl_ratio" in e:
        return Interval.around(100 * (e["ppl_ratio"] - 1), 100 * e["ppl_ratio_err"],
                               "published PPL ratio ± 2×its error", published=True)
    if "dppl" in e:
        base = e["ppl"] - e["dppl"]
        return Interval.around(100 * e["dppl"] / base, 100 * e["dppl_err"] / base,
                               "published ΔPPL / (PPL − ΔPPL) ± 2×its error", published=True)
    if "ppl_wikitext2" in e:
        b = base_entry(e)
        if b is None:
            return None
        h = e.get("rounding", 0.0)
        q_lo, q_hi = _rounded(e["ppl_wikitext2"], h)
        b_lo, b_hi = _rounded(b["ppl_wikitext2"], h)
        return Interval(100 * (q_lo / b_hi - 1), 100 * (q_hi / b_lo - 1),
                        100 * (e["ppl_wikitext2"] / b["ppl_wikitext2"] - 1),
                        f"WikiText2 PPL {b['ppl_wikitext2']} → {e['ppl_wikitext2']}, range from "
                        "rounding", published=True)
    if "ppl" in e and "ppl_err" in e:
        return _pub_ppl_unpaired(e)
    return None


def _pub_ppl_unpaired(e: dict[str, Any]) -> Interval | None:
    """Two PPLs each printed with its own ± (no paired error): the ratio's log error combines
    them as independent, which overstates the noise of a difference on the same text."""
    b = base_entry(e)
    if b is None or "ppl_err" not in b:
        return None
    h = e.get("rounding", 0.0)
    q, bq = e["ppl"], b["ppl"]
    s = math.hypot(e["ppl_err"] / q, b["ppl_err"] / bq)
    lo = math.log((q - h) / (bq + h)) - SIGMA * s
    hi = math.log((q + h) / (bq - h)) + SIGMA * s
    return Interval(100 * math.expm1(lo), 100 * math.expm1(hi), 100 * (q / bq - 1),
                    f"PPL {bq} ± {b['ppl_err']} → {q} ± {e['ppl_err']}, errors combined "
                    f"unpaired (± {SIGMA:g}×)", se=100 * s, published=True)


def pub_kld(e: dict[str, Any]) -> Interval | None:
    if "kld" not in e:
        return None
    return Interval.around(e["kld"], e.get("kld_err"), "published mean KLD ± 2×its error",
                           published=True)


def _printed(v: float, half_width: float) -> str:
    """A value with as many decimals as it was printed with (its rounding half-width says)."""
    digits = max(0, round(-math.log10(2 * half_width))) if half_width else 0
    return f"{v:.{digits}f}" if half_width else f"{v:g}"


def _with_parts(e: dict[str, Any]) -> dict[str, Any]:
    """An entry's scores by part label: its ``parts`` over its own keys (Qwen2's mmlu, ...)."""
    return {**e, **(e.get("parts") or {})}


def pub_acc_drop(e: dict[str, Any]) -> Interval | None:
    """Relative accuracy drop (%) of a published entry against its base (derived): from a
    stated recovery (100 − recovery), else from the accuracy of the entry and of its base. The
    range of the printed values' rounding is widened by ± 2 unpaired sampling errors of the test
    set(s) behind the figure (:mod:`qbench.report.published`)."""
    spec = pubdata.accuracy_spec(e["source"])
    if spec is None or spec["key"] not in e:
        return None
    h = e.get("rounding", 0.0)
    if spec["key"] == "recovery_pct":
        r = e["recovery_pct"]
        lo, hi, point = 100 - (r + h), 100 - (r - h), 100 - r
        b = e.get("base_avg") or spec.get("base_floor")
        if not b:
            return None
        q = e.get("avg") or b * r / 100
        err = pubdata.drop_error(q, b, e.get("parts") or {}, e.get("base_parts") or {}, spec)
        extra = (f"; {e['recovery_of'].split(' (')[0].replace('v1', 'v2')} recovery "
                 f"{e['recovery_v2_pct']} %" if "recovery_v2_pct" in e else "")
        what = (f"{e.get('recovery_of', spec['name'])} recovery {r} % (drop = 100 − recovery)"
                + extra)
    else:
        key = spec["key"]
        base = base_entry(e)
        if base is None or key not in base:
            return None
        q, b = e[key], base[key]
        q_lo, q_hi = _rounded(q, h)
        b_lo, b_hi = _rounded(b, h)
        lo, hi, point = 100 * (1 - q_hi / b_lo), 100 * (1 - q_lo / b_hi), 100 * (1 - q / b)
        err = pubdata.drop_error(q, b, _with_parts(e), _with_parts(base), spec)
        what = f"{spec['name']} {_printed(b, h)} → {_printed(q, h)}"
    w = SIGMA * err.se
    assumed = ("; assumed: " + "; ".join(err.assumptions)) if err.assumptions else ""
    return Interval(lo - w, hi + w, point,
                    f"{what}; interval = rounding ± {SIGMA:g} × {err.text}{assumed}",
                    se=err.se, n=err.items, n_unit="items", published=True)


def _subject(e: dict[str, Any]) -> str:
    return f"{e['model']} {e['quant']}" + (f" (imatrix {e['imatrix']})" if e.get("imatrix")
                                           else "")


def _pub_lossless(e: dict[str, Any] | None) -> list[dict[str, Any]]:
    if e is None:
        return []
    out, src, subj, idx = [], e["source"], _subject(e), [entry_index(e)]
    rule = {"kind": "at_most"}
    ppl = pub_ppl(e)
    if ppl:
        out.append(_ev("published", "ΔPPL", subj, at_most(ppl, LOSSLESS_PPL_PCT),
                       f"derived ΔPPL {ppl.text()} ({ppl.how}); threshold ≤ "
                       f"{LOSSLESS_PPL_PCT} %", src, entries=idx,
                       rule=rule | {"x": LOSSLESS_PPL_PCT}))
    kld = pub_kld(e)
    if kld:
        out.append(_ev("published", "KLD", subj, at_most(kld, LOSSLESS_KLD),
                       f"mean KLD {e['kld']} ± {e.get('kld_err')}; threshold ≤ {LOSSLESS_KLD}",
                       src, entries=idx, rule=rule | {"x": LOSSLESS_KLD}))
    acc = pub_acc_drop(e)
    if acc:
        out.append(_ev("published", ACC, subj, at_most(acc, LOSSLESS_ACC_REL_PCT),
                       f"derived relative drop {acc.text()} ({acc.how}); threshold ≤ "
                       f"{LOSSLESS_ACC_REL_PCT} %", src, entries=idx,
                       rule=rule | {"x": LOSSLESS_ACC_REL_PCT}))
    return out


def _pub_loss(e: dict[str, Any] | None, rule: Rule) -> list[dict[str, Any]]:
    """A loss stated in percent, from a published entry: accuracy decides, ΔPPL shown."""
    if e is None:
        return []
    out, src, subj, idx = [], e["source"], _subject(e), [entry_index(e)]
    acc = pub_acc_drop(e)
    if acc:
        out.append(_ev("published", ACC, subj, rule.judge(acc),
                       f"derived relative drop {acc.text()} ({acc.how}); {rule.text()}", src,
                       entries=idx, rule={"kind": rule.kind, "x": rule.x}))
    else:
        out.append(_ev("published", ACC, subj, NED, "no accuracy figure in this table: a "
                       "loss stated in % is not judged on PPL", src, entries=idx))
    ppl = pub_ppl(e)
    if ppl:
        out.append(_ev("published", "ΔPPL", subj, None,
                       f"derived ΔPPL {ppl.text()} ({ppl.how}); shown beside, does not decide",
                       src, decides=False, entries=idx))
    return out


def _pub_size_compare(small: dict[str, Any] | None, large: dict[str, Any] | None,
                      method: str | None = None) -> list[dict[str, Any]]:
    """The same method on a smaller and a larger model: does the larger lose less? Per metric;
    the method (``group``) is named so that a split by method or metric shows."""
    if small is None or large is None:
        return []
    out, src = [], large["source"]
    subj = f"{small['model']} vs {large['model']}, {large['quant']}"
    group = method or f"{published()['sources'][src]['short']}: {large['quant']}"
    across = ("" if small["source"] == src else
              f"; across sources: the smaller model from "
              f"{published()['sources'][small['source']]['short']}")
    for metric, fn, unit in (("ΔPPL", pub_ppl, "%"), ("KLD", pub_kld, " nats"),
                             (ACC, pub_acc_drop, "%")):
        a, b = fn(small), fn(large)
        if a is None or b is None:
            continue
        digits = 4 if metric == "KLD" else 2
        out.append(_ev("published", metric, subj, smaller(b, a),
                       f"{small['model']}: {a.text(unit, digits)}; {large['model']}: "
                       f"{b.text(unit, digits)} (derived; larger model must lose less){across}",
                       src, group=group, entries=[entry_index(small), entry_index(large)],
                       rule={"kind": "smaller"}))
    return out


def _items_behind(evidence: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The test sets behind a claim's published accuracies, with their cited item counts: the
    reader sees where each sampling error comes from."""
    keys: dict[str, None] = {}
    for e in evidence:
        if e["metric"] == ACC and e["source"]:
            spec = pubdata.accuracy_spec(e["source"]) or {"parts": []}
            keys.update((p["bench"], None) for p in spec["parts"])
    benches = published()["benchmarks"]
    return [{"key": k, **benches[k]} for k in keys]


def _by_source(evidence: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (source, metric): per-row verdicts, named when they disagree."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for e in evidence:
        if e["verdict"] is None:
            continue
        groups.setdefault((e["source"], e.get("part", ""), e["metric"]), []).append(e)
    out = []
    for (source, part, metric), evs in groups.items():
        line = headline(evs)[0]
        out.append({"source": source, "short": published()["sources"][source]["short"],
                    "part": part, "metric": metric, "verdict": line["verdict"],
                    "text": line["text"],
                    "parts": line["parts"],
                    "split": line["text"] if line["verdict"] == SPLIT else ""})
    return out


# ----------------------------------------------------------------------------- the claims

def check_claims(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The four claims with measured (this run) and published evidence, each with verdicts."""
    by_label = {r["label"]: r for r in rows}
    variants = [r for r in rows if not r["is_base"]]
    models = sorted({(r["model"], r.get("model_params")) for r in rows},
                    key=lambda m: m[1] or 0)
    model_text = ", ".join(f"{m} ({p / 1e9:.2g} B parameters)" if p else f"{m} (size unknown)"
                           for m, p in models) or "none"
    claims = [_claim1(variants, by_label), _claim2(variants, model_text, by_label),
              _claim3(variants, models, model_text, by_label),
              _claim4(variants, rows, model_text, by_label)]
    for c in claims:
        c["measured_headline"] = headline(c["measured"])
        c["measured_summary"] = {h["key"]: h["verdict"] for h in c["measured_headline"]}
        c["measured_caveats"] = sorted({x for e in c["measured"] for x in e["caveats"]})
        c["published_summary"] = _by_source(c["published"])
        c["published_headline"] = headline(c["published"])
        c["published_verdicts"] = {h["key"]: h["verdict"] for h in c["published_headline"]}
        c["published_items"] = _items_behind(c["published"])
    return claims


def _claim1(variants: list[dict[str, Any]], by_label: dict[str, dict[str, Any]]
            ) -> dict[str, Any]:
    eight = [r for r in variants if r["bits"] == 8]
    measured = _lossless_measured(eight, by_label)
    if not measured:
        measured = [_ev("measured", m, "this run", NED, "no 8-bit variant with an ok "
                        f"{m} cell in this run") for m in ("ΔPPL", "KLD", "MMLU")]
    pub: list[dict[str, Any]] = []
    for args in (("llamacpp-l3-8b-scoreboard", 8, "Q8_0"), ("llamacpp-l3-8b-vs-70b", 8, "Q8_0"),
                 ("llamacpp-l3-8b-vs-70b", 70, "Q8_0"),
                 ("arxiv-2404.14047v3", 8, "AWQ W8 (no group)"),
                 ("arxiv-2404.14047v3", 8, "GPTQ W8 (no group)"),
                 ("arxiv-2404.14047v3", 8, "SmoothQuant W8A8"),
                 ("arxiv-2404.14047v3", 70, "SmoothQuant W8A8"),
                 ("matt-c1-l3-mmlu", 8, "GGUF Q8_0"),
                 ("matt-c1-l3-mmlu", 8, "transformers 8bit (bitsandbytes int8)"),
                 ("matt-c1-l3-mmlu", 8, "EXL2 8.0 bpw"),
                 *(("qwen2-quant-benchmark", b, "GPTQ-Int8") for b in (0.5, 1.5, 7, 72)),
                 ("llamacpp-pr6745-l3-70b-imatrix", 70, "Q8_0"),
                 ("neuralmagic-qwen25-72b-w8a8", 72, "INT8 W8A8")):
        pub += _pub_lossless(_need(*args))
    return {"id": 1, "text": "8-bit quantization is a free lunch: lossless.",
            "metrics": "ΔPPL %, mean KLD and MMLU (paired test) of every 8-bit variant "
                       "(Q8_0, int8, W8) against its model's base, per method",
            "thresholds": f"lossless = ΔPPL ≤ {LOSSLESS_PPL_PCT} %, KLD ≤ {LOSSLESS_KLD} nats, "
                          f"no significant MMLU drop and its 95 % CI within "
                          f"{LOSSLESS_MMLU_PTS:g} point (published accuracy: drop ≤ "
                          f"{LOSSLESS_ACC_REL_PCT} %); all three decide",
            "measured": measured, "published": pub,
            "notes": ["Each 8-bit method is judged on its own: llama.cpp's Q8_0 and "
                      "bitsandbytes' LLM.int8 are different algorithms, and one can be "
                      "lossless while the other is not.",
                      "SmoothQuant W8A8 and Neural Magic's W8A8 also quantize activations: "
                      "they are 8-bit, but not weight-only; they are listed because the claim "
                      "is about 8-bit in general.",
                      _verdicts_note(pub, "", ACC) + " A published accuracy can hardly "
                      "resolve a 0.5 % change: each score carries its test set's sampling "
                      "error (MMLU's 14,042 questions alone give about 0.4 points per score, "
                      "and a drop compared unpaired about 1.7 % relative at 2 SE); only "
                      "paired per-question data, which no source publishes, could decide it."]}


def _claim2(variants: list[dict[str, Any]], model_text: str,
            by_label: dict[str, dict[str, Any]]) -> dict[str, Any]:
    awq4 = [r for r in variants if r["method"] == "awq" and r["bits"] == 4]
    stated = {"8B": 2.0, "70B": 0.05}
    measured: list[dict[str, Any]] = []
    for cls, x in stated.items():
        sel = [r for r in awq4 if size_class(r.get("model_params")) == cls]
        part = f"~{cls}: ~{x:g} %"
        if sel:
            measured += _part(_loss_measured(sel, Rule("near", x),
                                             f"claimed ~{x:g} % for ~{cls}", by_label), part)
        else:
            measured.append(_ev("measured", ACC, f"~{cls} AWQ 4-bit", NED,
                                f"no AWQ 4-bit variant of a ~{cls} model in this run "
                                f"(models: {model_text})", part=part))
    for r in awq4:
        if size_class(r.get("model_params")) is None:
            ppl, acc = measured_ppl(r), measured_mmlu_drop_rel(r)
            measured.append(_ev("measured", ACC, r["label"], None,
                                "not a ~8B/~70B model: relative MMLU drop "
                                + (acc.text() if acc else "not measured") + "; ΔPPL "
                                + (ppl.text() if ppl else "not measured"), decides=False,
                                caveats=base_caveats(r, by_label), note="for information"))
    pub: list[dict[str, Any]] = []
    for b, qb, x, cls in ((8, 7, 2.0, "8B"), (70, 72, 0.05, "70B")):
        part = f"~{cls}: ~{x:g} %"
        for q in ("AWQ W4 g128", "AWQ W4 (no group)"):
            pub += _part(_pub_loss(_entry("arxiv-2404.14047v3", b, q), Rule("near", x)), part)
        pub += _part(_pub_loss(_entry("qwen2-quant-benchmark", qb, "AWQ"), Rule("near", x)),
                     part)
    nogroup = _entry("arxiv-2404.14047v3", 8, "AWQ W4 (no group)")
    ng_acc = pub_acc_drop(nogroup) if nogroup else None
    ng_ppl = pub_ppl(nogroup) if nogroup else None
    notes = ["The paper's text says: “" + published()["sources"]["arxiv-2404.14047v3"]["quote"]
             + "” — one statement about both perplexity and CommonSenseQA accuracy, across "
             "4-bit methods."]
    if ng_acc and ng_ppl:
        notes.append("The likely source of “~2 %” is the study's AWQ 4-bit row without "
                     f"grouping for LLaMA3-8B: accuracy drop {ng_acc.text()} (derived), while its "
                     f"WikiText2 PPL rose {ng_ppl.text()}: the two metrics differ about tenfold, "
                     "which is why a % loss is judged on accuracy.")
    seventy = [pub_acc_drop(_need("arxiv-2404.14047v3", 70, "AWQ W4 g128")),
               pub_acc_drop(_need("qwen2-quant-benchmark", 72, "AWQ"))]
    notes.append("The ~0.05 % figure for 70B is in none of the shipped tables: LLaMA3-70B's "
                 "AWQ W4 g128 row and Qwen2-72B's AWQ row print larger drops ("
                 + ", ".join(f"{iv.point:.2f} %" for iv in seventy if iv) + "), but their "
                 "test sets' sampling error (± "
                 + ", ".join(f"{SIGMA * iv.se:.1f}" for iv in seventy if iv and iv.se)
                 + " % at 2 SE) is far wider than the 0.025–0.1 % a “~0.05 %” needs: no "
                 "published accuracy table can decide it.")
    return {"id": 2, "text": "AWQ 4-bit costs an 8B model ~2 %, a 70B model only ~0.05 %.",
            "metrics": "the relative accuracy drop (MMLU; published: CommonSenseQA or the "
                       "table's average) of AWQ 4-bit variants of ~8B and ~70B models; ΔPPL is "
                       "shown beside it and does not decide",
            "thresholds": "a stated loss ~X % matches when the accuracy drop lies within a "
                          "factor of two (X/2 … 2X)",
            "measured": measured, "published": pub,
            "notes": notes}


def _claim3(variants: list[dict[str, Any]], models: list[tuple[str, float | None]],
            model_text: str, by_label: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sizes = sorted({p for _, p in models if p})
    measured: list[dict[str, Any]] = []
    if len(sizes) < 2:
        for metric in ("ΔPPL", "KLD", ACC):
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
                cav = sorted(set(base_caveats(a, by_label)) | set(base_caveats(b, by_label)))
                for metric, fn in (("ΔPPL", measured_ppl), ("KLD", measured_kld),
                                   (ACC, measured_mmlu_drop_rel)):
                    ia, ib = fn(a), fn(b)
                    if ia and ib:
                        unit, d = (" nats", 4) if metric == "KLD" else ("%", 2)
                        n, note = _compare_n(ia, ib)
                        measured.append(_ev(
                            "measured", metric, f"{a['model']} vs {b['model']}, {backend} {quant}",
                            smaller(ib, ia), f"{a['model']}: {ia.text(unit, d)}; {b['model']}: "
                            f"{ib.text(unit, d)} (larger model must lose less)" + note,
                            group=f"{backend} {quant}", caveats=cav, n_needed=n,
                            n_now=min(ia.n or 0, ib.n or 0) or None, n_unit=ia.n_unit))
        if not measured:
            measured.append(_ev("measured", "ΔPPL", "this run", NED, "no low-bit variant was "
                                "measured on more than one model size"))
    seventy_awq3 = [r for r in variants if r["method"] == "awq" and r["bits"] == 3
                    and size_class(r.get("model_params")) == "70B"]
    for e in measured:
        e["part"] = "larger loses less"
    measured += _part(_loss_measured(seventy_awq3, Rule("near", 2.7), "claimed 2.7 %",
                                     by_label), "~70B AWQ 3-bit: 2.7 %")
    pub = _claim3_published()
    return {"id": 3, "text": "The larger the model, the smaller the low-bit loss; AWQ 3-bit 70B "
                             "loses only 2.7 %.",
            "metrics": "ΔPPL %, KLD and the relative accuracy drop of the same low-bit variant "
                       "on models of different sizes, per method; for the 2.7 % figure, the "
                       "relative accuracy drop of a ~70B AWQ 3-bit variant (ΔPPL shown beside)",
            "thresholds": "“smaller loss” = the larger model's interval lies entirely below "
                          "the smaller model's; ~2.7 % matches within 1.35 … 5.4 %",
            "measured": measured, "published": pub,
            "notes": [_split_note(pub, "larger loses less"),
                      "Relative PPL changes of models with different base perplexities are "
                      "not the same kind of loss as accuracy drops, so the claim is judged on "
                      "each metric apart and the split is named, not averaged away.",
                      *_averages_notes(),
                      "Size families quantized by one method: LLaMA3 8B/70B (arXiv 2404.14047, "
                      "five methods), Qwen2 0.5B–72B (GPTQ-Int4, AWQ), Qwen2.5 7B–72B (Intel "
                      "AutoRound INT4), Llama-3.1 8B/70B (Neural Magic w4a16), llama.cpp 8B/70B "
                      "(one draft table; and, with an imatrix, two runs from different posts): "
                      "each step up in size is compared."]}


ARXIV = "arxiv-2404.14047v3"
ARXIV_LOW_BIT = ("RTN W4 g128", "RTN W3 g128", "GPTQ W4 g128", "GPTQ W3 g128", "AWQ W4 g128",
                 "AWQ W3 g128", "SliM-LLM W4 g128", "SliM-LLM W3 g128", "QuIP W4 (no group)",
                 "QuIP W3 (no group)")
IMATRIX_8B, IMATRIX_70B = "WT 10m", "wiki.train 400 chunks"


def _claim3_published() -> list[dict[str, Any]]:
    """Every shipped size family, each step up in size, per method and metric."""
    pub: list[dict[str, Any]] = []
    for q in ARXIV_LOW_BIT:
        pub += _pub_size_compare(_need(ARXIV, 8, q), _need(ARXIV, 70, q), f"arXiv {q}")
    for q in ("Q4_K_M", "Q2_K"):
        pub += _pub_size_compare(_need("llamacpp-l3-8b-vs-70b", 8, q),
                                 _need("llamacpp-l3-8b-vs-70b", 70, q), f"llama.cpp {q}")
    for q in ("Q4_K_M", "Q3_K_M"):
        pub += _pub_size_compare(_need("llamacpp-l3-8b-scoreboard", 8, q, IMATRIX_8B),
                                 _need("llamacpp-pr6745-l3-70b-imatrix", 70, q, IMATRIX_70B),
                                 f"llama.cpp {q} with an imatrix")
    for q in ("GPTQ-Int4", "AWQ"):
        family = [_need("qwen2-quant-benchmark", b, q) for b in (0.5, 1.5, 7, 72)]
        for a, b in zip(family, family[1:]):
            pub += _pub_size_compare(a, b, f"Qwen2 {q}")
    family = [_need("intel-autoround-qwen25", b, "AutoRound INT4 g128") for b in (7, 14, 32, 72)]
    for a, b in zip(family, family[1:]):
        pub += _pub_size_compare(a, b, "Qwen2.5 AutoRound INT4 g128")
    pub += _pub_size_compare(_need("neuralmagic-l31-8b-w4a16", 8, "GPTQ W4A16 (g128)"),
                             _need("neuralmagic-l31-70b-w4a16", 70, "GPTQ W4A16"),
                             "Llama-3.1 Neural Magic GPTQ W4A16")
    _part(pub, "larger loses less")
    small = _need("neuralmagic-qwen25-3b-w4a16", 3, "INT4 W4A16 g64")
    iv = pub_acc_drop(small)
    if iv:
        pub.append(_ev("published", ACC, _subject(small), None,
                       f"derived relative drop {iv.text()} ({iv.how}); no larger Qwen2.5 w4a16 "
                       "card is shipped to compare it with", small["source"], decides=False,
                       entries=[entry_index(small)], note="for information",
                       part="larger loses less"))
    pub += _part(_pub_loss(_need(ARXIV, 70, "AWQ W3 g128"), Rule("near", 2.7)),
                 "~70B AWQ 3-bit: 2.7 %")
    return pub


def _averages_notes() -> list[str]:
    """What the printed averages hide, derived from the rows printed beside them."""
    nm = _need("neuralmagic-l31-8b-w4a16", 8, "GPTQ W4A16 (g128)")
    q, b = nm["parts"], nm["base_parts"]
    seven = 100 * (sum(q.values()) / len(q)) / (sum(b.values()) / len(b))
    ar = _need("intel-autoround-qwen25", 72, "BF16")
    ar_q = _need("intel-autoround-qwen25", 72, "AutoRound INT4 g128")
    rows_mean = sum(ar["parts"].values()) / len(ar["parts"])
    return [f"Neural Magic's 8B card averages {len(q) - 1} of its {len(q)} OpenLLM v1 rows "
            f"(recovery {nm['recovery_pct']} %); over all {len(q)} the recovery is "
            f"{seven:.2f} % (derived), while the 70B card's average reportedly covers all "
            "seven: the two recoveries are not on the same tasks.",
            f"Intel's Qwen2.5-72B card prints a BF16 Avg of {ar['avg']}, but its 16 rows average "
            f"{rows_mean:.4f} (derived): against that, the INT4 gain is "
            f"{100 * (ar_q['avg'] / rows_mean - 1):+.2f} % instead of "
            f"{100 * (ar_q['avg'] / ar['avg'] - 1):+.2f} %. The printed Avg is judged."]


SPLIT_WORDS = {SUPPORTED: "the larger model loses less (supported)",
               CONTRADICTED: "the larger model loses more (contradicted)",
               UNRESOLVED_PUB: UNRESOLVED_PUB, NED: NED}


def _split_note(evidence: list[dict[str, Any]], part: str) -> str:
    """The published verdict per metric, with the methods behind each verdict named, and the
    split between metrics said in one sentence (computed from the rows, not written in)."""
    lines = headline([e for e in evidence if e.get("part") == part])
    per_metric, counts = [], {}
    for h in lines:
        by_v: dict[str, list[str]] = {}
        for p in h["parts"]:
            by_v.setdefault(p["verdict"], []).append(p["group"])
        counts[h["metric"]] = {v: len(gs) for v, gs in by_v.items()}
        per_metric.append(f"{h['metric']}: " + "; ".join(
            f"{SPLIT_WORDS.get(v, v)} for {', '.join(gs)}" for v, gs in by_v.items()))

    def share(metric: str, verdict: str) -> str:
        c = counts.get(metric, {})
        return f"{c.get(verdict, 0)} of {sum(c.values())}"

    summary = (f"Published, split by metric: on ΔPPL the larger model loses more for "
               f"{share('ΔPPL', CONTRADICTED)} compared methods (less for "
               f"{share('ΔPPL', SUPPORTED)}), on KLD more for {share('KLD', CONTRADICTED)}; on "
               f"accuracy it loses less for {share(ACC, SUPPORTED)} compared methods and more "
               f"for {share(ACC, CONTRADICTED)}, the rest {UNRESOLVED_PUB}. Per metric and "
               "method — ")
    return summary + " | ".join(per_metric) + "."


def _compare_n(ia: Interval, ib: Interval) -> tuple[int | None, str]:
    """Sample size at which the difference of two losses measured on the same n would no longer
    straddle zero (their errors combined as independent: an overestimate)."""
    if not (ia.se and ib.se and ia.n and ib.n) or not (ib.lo <= ia.hi and ia.lo <= ib.hi):
        return None, ""
    diff = Judgement("claim 3", "loss difference", False, None, None, "%",
                     change=ib.point - ia.point, se=math.hypot(ia.se, ib.se),
                     n=min(ia.n, ib.n), n_unit=ia.n_unit)
    res = diff.to_resolve(0.0)
    if res["n"] is None:
        return None, ""
    return res["n"], f"; {res['text']}"


def _claim4(variants: list[dict[str, Any]], rows: list[dict[str, Any]],
            model_text: str, by_label: dict[str, dict[str, Any]]) -> dict[str, Any]:
    subclaims = [("8B", 8, "lossless"), ("70B", 4, "lossless"), ("8B", 4, "acceptable"),
                 ("70B", 3, "acceptable")]
    acceptable = Rule("at_most", ACCEPTABLE_LOSS_PCT)
    measured: list[dict[str, Any]] = []
    for cls, bits, kind in subclaims:
        sel = [r for r in variants if size_class(r.get("model_params")) == cls
               and r["bits"] == bits]
        what = ("no loss" if kind == "lossless" else f"loss ≤ {ACCEPTABLE_LOSS_PCT:g} %")
        part = f"~{cls} → {bits}-bit: {what}"
        if not sel:
            measured.append(_ev("measured", "ΔPPL" if kind == "lossless" else ACC,
                                f"~{cls} at {bits}-bit ({what})", NED,
                                f"no {bits}-bit variant of a ~{cls} model in this run "
                                f"(models: {model_text})", part=part))
        elif kind == "lossless":
            measured += _part(_lossless_measured(sel, by_label), part)
        else:
            measured += _part(_loss_measured(sel, acceptable, acceptable.text(), by_label),
                              part)
    measured += _own_model_info(rows, by_label)
    what3 = f"loss ≤ {ACCEPTABLE_LOSS_PCT:g} %"
    a = ARXIV
    imat = "llamacpp-pr6745-l3-70b-imatrix"
    ar8 = ("intel-autoround-llama3-8b", 8, "AutoRound W4 g128")
    published_parts: dict[str, list[tuple[Any, ...]]] = {
        "~8B → 8-bit: no loss": [("llamacpp-l3-8b-scoreboard", 8, "Q8_0"),
                                 (a, 8, "AWQ W8 (no group)"),
                                 ("matt-c1-l3-mmlu", 8, "GGUF Q8_0"),
                                 ("matt-c1-l3-mmlu", 8, "transformers 8bit (bitsandbytes int8)"),
                                 ("qwen2-quant-benchmark", 7, "GPTQ-Int8")],
        "~70B → 4-bit: no loss": [("llamacpp-l3-8b-vs-70b", 70, "Q4_K_M"),
                                  (imat, 70, "Q4_K_M", IMATRIX_70B),
                                  *((a, 70, q) for q in ARXIV_LOW_BIT if " W4 " in q),
                                  ("neuralmagic-l31-70b-w4a16", 70, "GPTQ W4A16"),
                                  ("qwen2-quant-benchmark", 72, "GPTQ-Int4"),
                                  ("qwen2-quant-benchmark", 72, "AWQ"),
                                  ("intel-autoround-qwen25", 72, "AutoRound INT4 g128")],
        f"~8B → 4-bit: {what3}": [("llamacpp-l3-8b-scoreboard", 8, "Q4_K_M"),
                                  ("llamacpp-l3-8b-vs-70b", 8, "Q4_K_M"),
                                  *((a, 8, q) for q in ARXIV_LOW_BIT if " W4 " in q),
                                  (a, 8, "AWQ W4 (no group)"),
                                  (a, 8, "GPTQ W4 (no group)"),
                                  ("matt-c1-l3-mmlu", 8, "GGUF Q4_K_M"),
                                  ("matt-c1-l3-mmlu", 8, "transformers 4bit nf4 (bitsandbytes)"),
                                  ("neuralmagic-l31-8b-w4a16", 8, "GPTQ W4A16 (g128)"),
                                  ("qwen2-quant-benchmark", 7, "GPTQ-Int4"),
                                  ("qwen2-quant-benchmark", 7, "AWQ"),
                                  ("intel-autoround-qwen25", 7, "AutoRound INT4 g128"),
                                  ar8],
        f"~70B → 3-bit: {what3}": [*((a, 70, q) for q in ARXIV_LOW_BIT if " W3 " in q),
                                   (imat, 70, "Q3_K_M", IMATRIX_70B),
                                   (imat, 70, "Q3_K_L", IMATRIX_70B)],
    }
    pub: list[dict[str, Any]] = []
    for part, entries in published_parts.items():
        for args in entries:
            e = _need(*args)
            pub += _part(_pub_lossless(e) if part.endswith("no loss")
                         else _pub_loss(e, acceptable), part)
    return {"id": 4, "text": "For no loss: 8B → 8-bit, 70B → 4-bit; accepting 2–3 %: 8B → "
                             "4-bit, 70B → 3-bit.",
            "metrics": "the lossless test (claim 1) for 8B at 8 bits and 70B at 4 bits; the "
                       "relative accuracy drop for 8B at 4 bits and 70B at 3 bits (ΔPPL shown "
                       "beside, not deciding)",
            "thresholds": f"lossless as in claim 1; “accepting 2–3 %” = accuracy loss ≤ "
                          f"{ACCEPTABLE_LOSS_PCT:g} %",
            "measured": measured, "published": pub,
            "notes": ["Lines marked “for information” say what this run's data recommends for "
                      "its own model; they are not evidence about 8B or 70B models.",
                      "llama.cpp's tables have no accuracy, so they cannot decide a “2–3 %” "
                      "loss: their ΔPPL is shown beside.",
                      *(_verdicts_note(pub, part, metric) for part, metric in (
                          ("~70B → 4-bit: no loss", "ΔPPL"),
                          ("~70B → 4-bit: no loss", ACC),
                          (f"~8B → 4-bit: {what3}", ACC),
                          (f"~70B → 3-bit: {what3}", ACC)))]}


def _verdicts_note(evidence: list[dict[str, Any]], part: str, metric: str) -> str:
    """Published rows of one claim part and metric, grouped by verdict, each row named: the
    verdict that depends on the method says which method gave which."""
    by_v: dict[str, list[str]] = {}
    for e in evidence:
        if e.get("part") == part and e["metric"] == metric and e["verdict"] is not None:
            by_v.setdefault(e["verdict"], []).append(e["subject"])
    return (f"Published, {part + ', ' if part else ''}{metric}: " + "; ".join(
        f"{v} for {', '.join(dict.fromkeys(subjects))}" for v, subjects in by_v.items()) + ".")


def _own_model_info(rows: list[dict[str, Any]], by_label: dict[str, dict[str, Any]]
                    ) -> list[dict[str, Any]]:
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
        ok3 = [r for r in sel
               if Rule("at_most", ACCEPTABLE_LOSS_PCT).judge(measured_mmlu_drop_rel(r))
               == SUPPORTED]

        def name(found: list[dict[str, Any]]) -> str:
            return f"{found[0]['quant']} ({found[0]['bits']:g}-bit)" if found else "none"

        text = (f"fewest bits with measured no loss (ΔPPL and KLD): {name(lossless)}; fewest "
                f"bits with an MMLU drop within {ACCEPTABLE_LOSS_PCT:g} %: {name(ok3)}")
        cav = sorted({c for r in sel for c in base_caveats(r, by_label)})
        out.append(_ev("measured", "ΔPPL", f"{model} (for information)", None,
                       text, decides=False, caveats=cav,
                       note="for information"))
    return out

