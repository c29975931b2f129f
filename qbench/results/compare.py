"""``qbench compare BASELINE CANDIDATE``: what changed between two result sets - the CI gate.

Cells are matched by (suite, model, backend, quant, metric) - the cell id, not the hashed key, so
a new library version or metric version still finds its baseline. A baseline and a candidate
score the same tokens and the same questions, so every quality value is compared **paired**:
the noise of a difference is the spread of the per-chunk / per-question differences, never the
two runs' own sampling errors (which are many times larger and hid a +1.9 % PPL regression).

A value **regresses** when its 95 % interval of the change lies entirely on the worse side of a
practical tolerance - statistically real *and* large enough to matter:

============  =========================================================  ==================
value         test                                                       default tolerance
============  =========================================================  ==================
ppl           per-chunk paired t on ln(PPL_cand / PPL_base)              +0.25 % PPL
kld_mean      per-chunk paired t on the mean KLD (``per_chunk_kld``)     +5 % relative
same_top_pct  per-chunk paired t (``per_chunk_same_top``)                 -1 point
mmlu acc      exact McNemar on the flipped questions, p < 0.05           net loss > 1 point
speed         Welch t on ln(tokens/s) from the repetitions' sd           -10 %
memory        no spread measured: the tolerance alone                    +10 % and +64 MiB
other gated   unpaired (conservative) interval from the stored errors    2 %
============  =========================================================  ==================

Why these tolerances: 0.25 % PPL is 2.5 times the harness's PPL fidelity (0.1 %) and below the
smallest quant step (Q8_0 costs +0.41 % on the smoke suite's text); the smoke suite's 8 chunks
vary by ~0.55 % each, a paired half-width of ~0.46 %, so +1 % clears 0.25 % with margin where
0.5 % would leave it on the edge. 5 % of mean KLD is, likewise, 2.5 times the KLD fidelity
target (2 %): per-chunk KLD ratios vary by ~11 % between neighbouring quants, a paired
half-width of ~11 %, so +20 % clears 5 % but not reliably 10 %. 1 MMLU point is twice the
MMLU fidelity target and below the gap between neighbouring quants. 10 % speed is twice
llama-bench's fidelity target and above a dedicated runner's run-to-run drift (a busy machine
also widens the interval through the repetitions' sd). Memory has no repetitions, so only a
change both relative and absolute (10 %, 64 MiB) counts. A deterministic rerun (identical
values) never regresses.

Fallbacks, when a record lacks the paired data (older records, other metrics): the interval is
diff ± 1.96 x sqrt(se_b² + se_c²) from the stored standard errors - *conservative*: for the
same tokens/questions the runs' errors are positively correlated, so the unpaired interval is
wider than the paired one (fewer false alarms, smaller regressions missed).

Speed and memory are compared only when both records were measured on the same hardware
(:func:`qbench.host.envinfo.hardware_id` of the stored environment), else "not compared: other
hardware" - never a regression. Memory is the speed cell's peak (RSS, VRAM): the other cells'
peaks include building the artifact on a cold cache.

A cell ok in the baseline and failed / timed out / crashed / skipped or missing in the
candidate is a regression, unless ``--suite`` says the suite no longer asks for it.
Exit codes: 0 no regression, 2 at least one regression, 1 unreadable or empty input.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qbench.backends import known_backend_info
from qbench.errors import QbenchError
from qbench.metrics import known_metric_info
from qbench.results import stats
from qbench.results.schema import NOT_OK
from qbench.suite.identity import record_cell_id

EXIT_OK, EXIT_USER, EXIT_REGRESSION = 0, 1, 2
# What is gated, in which direction, what is only reported and which metrics belong to the
# hardware: each metric's registry entry (MetricInfo.gated / .reported / .hardware_bound), so a
# plugin metric is gated like a built-in one. Whether a backend's peak RSS is stable enough to
# gate: its BackendInfo.rss_gated.
MEMORY_VALUES = ("peak_rss_mb", "peak_vram_mb")


@dataclass(frozen=True)
class Tolerances:
    """How much worse a value must *surely* be (its whole 95 % interval) to be a regression."""

    ppl_pct: float = 0.25         # PPL increase, %
    kld_pct: float = 5.0          # mean KLD increase, % of the baseline's
    kld_abs: float = 1e-5         # ... and nats (a base compared with itself has KLD ~ 0)
    mmlu_points: float = 1.0      # net accuracy loss, points
    mmlu_alpha: float = 0.05      # McNemar significance level
    same_top_points: float = 1.0  # "same top token" drop, points
    speed_pct: float = 10.0       # tokens/s drop, %
    memory_pct: float = 10.0      # peak memory rise, %
    memory_mb: float = 64.0       # ... and MiB
    other_pct: float = 2.0        # any other gated value, %


@dataclass
class Change:
    """One compared value: the numbers, the test, its interval and the verdict."""

    cell: str
    metric: str
    value: str
    baseline: float | None
    candidate: float | None
    change: float | None          # signed change of the tested quantity, in ``unit``
    ci_low: float | None          # its 95 % interval (None: no interval, tolerance alone)
    ci_high: float | None
    unit: str                     # "%" (relative) or "points"
    tolerance: float | None       # how much worse (in ``unit``, > 0) is tolerated
    test: str
    higher_is_better: bool | None
    gated: bool
    regression: bool
    verdict: str                  # REGRESSION | ok | improved | no change | not compared: ...
    why: str = ""

    @property
    def change_pct(self) -> float | None:
        """The plain relative change of the value, candidate vs baseline, in %."""
        return _rel_pct(self.baseline, self.candidate)


@dataclass
class Comparison:
    baseline: str
    candidate: str
    tolerances: Tolerances = field(default_factory=Tolerances)
    changes: list[Change] = field(default_factory=list)
    newly_failing: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)        # ok in baseline, absent: regression
    no_longer_asked: list[str] = field(default_factory=list)  # absent, and not in --suite
    newly_ok: list[str] = field(default_factory=list)
    only_baseline: list[str] = field(default_factory=list)  # absent, and not ok in baseline
    only_candidate: list[str] = field(default_factory=list)
    env_differences: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regression]

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.newly_failing or self.missing)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for ch, row in zip(self.changes, d["changes"]):
            row["change_pct"] = ch.change_pct
        d["regressions"] = len(self.regressions)
        d["newly_failing_count"] = len(self.newly_failing)
        d["missing_count"] = len(self.missing)
        d["exit_code"] = EXIT_REGRESSION if self.failed else EXIT_OK
        return d


# ------------------------------------------------------------------------------ matching

def cell_id(rec: dict[str, Any]) -> str:
    """model/backend/quant[@file]/metric, as :attr:`qbench.suite.plan.Cell.id` spells it."""
    return record_cell_id(rec)


def cell_key(rec: dict[str, Any]) -> tuple[str, str]:
    return rec["suite"], cell_id(rec)


def _label(key: tuple[str, str]) -> str:
    return "/".join(key)


def _latest(records: Iterable[dict[str, Any]], only: tuple[str, ...]
            ) -> dict[tuple[str, str], dict[str, Any]]:
    """One record per cell id: the latest run's (a folder can keep an older key's record after
    a version change); ``only``: globs on cell ids, as ``qbench run --only``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        key = cell_key(r)
        if only and not any(fnmatch.fnmatchcase(key[1], p) for p in only):
            continue
        old = out.get(key)
        if old is None or (str(r.get("run_id", "")), r["status"] == "ok") >= (
                str(old.get("run_id", "")), old["status"] == "ok"):
            out[key] = r
    return out


def expected_cells(suite_path: str | Path) -> set[tuple[str, str]]:
    """The cells a suite file asks for (without touching models or data)."""
    from qbench.suite.config import load_suite

    suite = load_suite(suite_path)
    out = set()
    for model in suite.models:
        for variant in suite.variants_for(model):
            quant = variant.quant
            if variant.source:
                quant += "@" + variant.source.rstrip("/").rsplit("/", 1)[-1]
            for metric in suite.metrics:
                if variant.measures(metric):
                    out.add((suite.name, f"{model.id}/{variant.backend}/{quant}/{metric}"))
    return out


# --------------------------------------------------------------------------- arithmetic

def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return None if math.isnan(x) else float(x)


def _rel_pct(b: float | None, c: float | None) -> float | None:
    if b is None or c is None:
        return None
    if b == 0:
        return 0.0 if c == 0 else math.copysign(math.inf, c)
    return 100.0 * (c - b) / abs(b)


def _ln_to_pct(x: float) -> float:
    return 100.0 * math.expm1(x) if x < 700 else math.inf


def _verdict(change: float, low: float | None, high: float | None, tol: float,
             hib: bool) -> tuple[bool, str]:
    """Regression when the whole interval is worse than ``tol``; improved when it is wholly
    better by more than ``tol``. No interval: the point decides."""
    lo, hi = (change, change) if low is None or high is None else (low, high)
    worse_lo, worse_hi = (-hi, -lo) if hib else (lo, hi)   # in the "worse" direction
    if worse_lo > tol:
        return True, "REGRESSION"
    if change == 0 and lo == hi == 0:
        return False, "no change"
    if -worse_hi > tol:
        return False, "improved"
    return False, "ok"


def _why(regression: bool, verdict: str, unit: str, tol: float, hib: bool) -> str:
    side = "below" if hib else "above"
    sign = "-" if hib else "+"
    if regression:
        return f"whole interval {side} {sign}{tol:g} {unit}"
    if verdict == "ok":
        return f"interval not wholly {side} {sign}{tol:g} {unit}"
    return ""


def _change(cell: str, metric: str, name: str, b: float | None, c: float | None, *,
            change: float | None, ci: tuple[float, float] | None, unit: str, tol: float,
            test: str, hib: bool, note: str = "") -> Change:
    if change is None:
        return Change(cell, metric, name, b, c, None, None, None, unit, tol, test, hib,
                      True, False, "ok", "no number to compare")
    regression, verdict = _verdict(change, ci[0] if ci else None, ci[1] if ci else None,
                                   tol, hib)
    if b == c and not regression:   # a deterministic rerun
        verdict = "no change"
    why = "; ".join(x for x in (_why(regression, verdict, unit, tol, hib), note) if x)
    return Change(cell, metric, name, b, c, change, ci[0] if ci else None,
                  ci[1] if ci else None, unit, tol, test, hib, True, regression, verdict, why)


def _unpaired(b: dict[str, Any], c: dict[str, Any], scale: float | None) -> tuple[
        float | None, tuple[float, float] | None]:
    """(change, interval) from the stored errors, treating the runs as independent. ``scale``
    None: relative change in %; else the absolute change times ``scale`` (points)."""
    bv, cv = _num(b.get("value")), _num(c.get("value"))
    if bv is None or cv is None:
        return None, None
    se = math.hypot(_num(b.get("stderr")) or 0.0, _num(c.get("stderr")) or 0.0)
    if scale is None:
        if bv == 0:
            return _rel_pct(bv, cv), None
        k = 100.0 / abs(bv)
    else:
        k = scale
    change = (cv - bv) * k
    half = stats.Z95 * se * k
    return change, ((change - half, change + half) if half > 0 else None)


UNPAIRED = "unpaired 95 % interval from the stored errors (conservative)"


# ------------------------------------------------------------------------ per metric

def _ppl(cell: str, b: dict[str, Any], c: dict[str, Any], tol: Tolerances) -> Change:
    bv, cv = (_num((r["values"].get("ppl") or {}).get("value")) for r in (b, c))
    diffs, why = _chunk_ln_ratios(b.get("details") or {}, c.get("details") or {})
    if diffs is None:
        change, ci = _unpaired(b["values"]["ppl"], c["values"]["ppl"], None)
        return _change(cell, "perplexity", "ppl", bv, cv, change=change, ci=ci, unit="%",
                       tol=tol.ppl_pct, test=UNPAIRED, hib=False, note=why)
    p = stats.paired_mean_diff(diffs)
    ci = (_ln_to_pct(p["ci_low"]), _ln_to_pct(p["ci_high"])) if p["n"] > 1 else None
    return _change(cell, "perplexity", "ppl", bv, cv, change=_ln_to_pct(p["mean"]), ci=ci,
                   unit="%", tol=tol.ppl_pct, hib=False,
                   test=f"paired t on per-chunk ln PPL ratio ({p['n']} chunks)")


def _chunk_ln_ratios(bd: dict[str, Any], cd: dict[str, Any]) -> tuple[list[float] | None, str]:
    """Per-chunk ln(PPL_c / PPL_b): from the NLL sums when both have them, else the per-chunk
    PPLs; None (and why) when the chunks are not the same."""
    if bd.get("per_chunk_tokens") and bd.get("per_chunk_tokens") == cd.get("per_chunk_tokens") \
            and len(bd.get("per_chunk_nll_sum") or ()) == len(cd.get("per_chunk_nll_sum") or ()) \
            == len(bd["per_chunk_tokens"]):
        return [(nc - nb) / n for nb, nc, n in zip(bd["per_chunk_nll_sum"],
                                                     cd["per_chunk_nll_sum"],
                                                     bd["per_chunk_tokens"])], ""
    pb, pc = bd.get("per_chunk_ppl"), cd.get("per_chunk_ppl")
    if not pb or not pc:
        return None, "no per-chunk data"
    if len(pb) != len(pc) or bd.get("scored_tokens") != cd.get("scored_tokens"):
        return None, "not the same chunks"
    return [math.log(y) - math.log(x) for x, y in zip(pb, pc)], ""


def _kld(cell: str, b: dict[str, Any], c: dict[str, Any], tol: Tolerances) -> Change:
    bv, cv = (_num((r["values"].get("kld_mean") or {}).get("value")) for r in (b, c))
    pb = (b.get("details") or {}).get("per_chunk_kld")
    pc = (c.get("details") or {}).get("per_chunk_kld")
    floor = _floor_pct(bv, tol)
    if not pb or not pc or len(pb) != len(pc):
        change, ci = _unpaired(b["values"]["kld_mean"], c["values"]["kld_mean"], None)
        note = "no per-chunk KLD" if not pb or not pc else "not the same chunks"
        return _change(cell, "kld", "kld_mean", bv, cv, change=change, ci=ci, unit="%",
                       tol=floor, test=UNPAIRED, hib=False, note=note)
    p = stats.paired_mean_diff([y - x for x, y in zip(pb, pc)])
    ref = math.fsum(pb) / len(pb)
    if ref <= 0:   # a base against itself (KLD 0): only the absolute floor, in nats
        ci = (p["ci_low"], p["ci_high"]) if p["n"] > 1 else None
        return _change(cell, "kld", "kld_mean", bv, cv, change=p["mean"], ci=ci, unit="nats",
                       tol=tol.kld_abs, hib=False,
                       test=f"paired t on per-chunk mean KLD ({p['n']} chunks), baseline 0")
    k = 100.0 / ref
    ci = (p["ci_low"] * k, p["ci_high"] * k) if p["n"] > 1 else None
    return _change(cell, "kld", "kld_mean", bv, cv, change=p["mean"] * k, ci=ci, unit="%",
                   tol=floor, hib=False, test=f"paired t on per-chunk mean KLD ({p['n']} chunks)")


def _same_top(cell: str, b: dict[str, Any], c: dict[str, Any], tol: Tolerances) -> Change:
    """"Same top token" %, paired on the per-chunk fractions when both records have them."""
    bv, cv = (_num((r["values"].get("same_top_pct") or {}).get("value")) for r in (b, c))
    pb = (b.get("details") or {}).get("per_chunk_same_top")
    pc = (c.get("details") or {}).get("per_chunk_same_top")
    if not pb or not pc or len(pb) != len(pc):
        change, ci = _unpaired(b["values"]["same_top_pct"], c["values"]["same_top_pct"], 1.0)
        return _change(cell, "kld", "same_top_pct", bv, cv, change=change, ci=ci,
                       unit="points", tol=tol.same_top_points, test=UNPAIRED, hib=True)
    p = stats.paired_mean_diff([100.0 * (y - x) for x, y in zip(pb, pc)])
    ci = (p["ci_low"], p["ci_high"]) if p["n"] > 1 else None
    return _change(cell, "kld", "same_top_pct", bv, cv, change=p["mean"], ci=ci,
                   unit="points", tol=tol.same_top_points, hib=True,
                   test=f"paired t on per-chunk same-top fraction ({p['n']} chunks)")


def _floor_pct(base_kld: float | None, tol: Tolerances) -> float:
    """The KLD tolerance in %: the relative one, raised to the absolute floor at tiny KLD."""
    if not base_kld or base_kld <= 0:
        return tol.kld_pct
    return max(tol.kld_pct, 100.0 * tol.kld_abs / base_kld)


def _mmlu(cell: str, b: dict[str, Any], c: dict[str, Any], tol: Tolerances) -> Change:
    bv, cv = (_num((r["values"].get("acc") or {}).get("value")) for r in (b, c))
    bd, cd = b.get("details") or {}, c.get("details") or {}
    note = ""
    if bd.get("question_ids") and cd.get("question_ids"):
        try:
            p = stats.paired_from_records(bd, cd)
        except (ValueError, KeyError) as exc:
            note = str(exc)
        else:
            return _mcnemar(cell, bv, cv, p, tol)
    change, ci = _unpaired(b["values"]["acc"], c["values"]["acc"], 100.0)
    return _change(cell, "mmlu", "acc", bv, cv, change=change, ci=ci, unit="points",
                   tol=tol.mmlu_points, test=UNPAIRED, hib=True,
                   note=note or "no per-question outcomes")


def _mcnemar(cell: str, bv: float | None, cv: float | None, p: dict[str, Any],
             tol: Tolerances) -> Change:
    """Regression: significant flips (exact McNemar) with a net loss beyond the tolerance."""
    change = 100.0 * p["diff"]
    lost, gained = p["flips_lost"], p["flips_gained"]
    regression = p["p_value"] < tol.mmlu_alpha and lost > gained and -change > tol.mmlu_points
    if regression:
        verdict, why = "REGRESSION", (f"net loss of {lost - gained} questions, p < "
                                      f"{tol.mmlu_alpha:g}, > {tol.mmlu_points:g} points")
    elif lost == gained == 0:
        verdict, why = "no change", ""
    elif p["p_value"] < tol.mmlu_alpha and gained > lost and change > tol.mmlu_points:
        verdict, why = "improved", ""
    else:
        verdict = "ok"
        why = ("flips not significant" if p["p_value"] >= tol.mmlu_alpha
               else f"net change within {tol.mmlu_points:g} points")
    return Change(cell, "mmlu", "acc", bv, cv, change, 100.0 * p["ci_low"],
                  100.0 * p["ci_high"], "points", tol.mmlu_points,
                  f"exact McNemar: {lost} lost, {gained} gained of {p['n']}, "
                  f"p = {p['p_value']:.3g}", True, True, regression, verdict, why)


def _speed(cell: str, name: str, b: dict[str, Any], c: dict[str, Any], tol: Tolerances
           ) -> Change:
    bv, cv = _num(b.get("value")), _num(c.get("value"))
    if not bv or not cv or bv <= 0 or cv <= 0:
        return _change(cell, "speed", name, bv, cv, change=None, ci=None, unit="%",
                       tol=tol.speed_pct, test="", hib=True)
    (vb, nb), (vc, nc) = _rel_var(b, bv), _rel_var(c, cv)
    diff = math.log(cv / bv)
    se2 = vb / nb + vc / nc
    if se2 <= 0:
        return _change(cell, "speed", name, bv, cv, change=_ln_to_pct(diff), ci=None,
                       unit="%", tol=tol.speed_pct, hib=True, test="no spread stored: "
                       "the tolerance alone")
    half = stats.t975(_welch_df(vb, nb, vc, nc)) * math.sqrt(se2)
    return _change(cell, "speed", name, bv, cv, change=_ln_to_pct(diff),
                   ci=(_ln_to_pct(diff - half), _ln_to_pct(diff + half)), unit="%",
                   tol=tol.speed_pct, hib=True,
                   test=f"Welch t on ln tokens/s ({int(nb)} + {int(nc)} repetitions)")


def _welch_df(vb: float, nb: float, vc: float, nc: float) -> int:
    """Welch-Satterthwaite degrees of freedom (at least 1: three repetitions are few)."""
    se2 = vb / nb + vc / nc
    denom = sum((v / n) ** 2 / (n - 1) for v, n in ((vb, nb), (vc, nc)) if n > 1)
    return max(1, int(se2 ** 2 / denom)) if denom > 0 else 1


def _rel_var(v: dict[str, Any], mean: float) -> tuple[float, float]:
    """(relative variance of one repetition, repetitions) from the stored sd (or stderr)."""
    n = float(_num(v.get("n")) or len(v.get("samples") or ()) or 1)
    sd = _num(v.get("sd"))
    if sd is None and _num(v.get("stderr")) is not None:
        sd = float(v["stderr"]) * math.sqrt(n)
    return ((sd or 0.0) / mean) ** 2, max(n, 1.0)


def _memory(cell: str, name: str, bv: float, cv: float, tol: Tolerances) -> Change:
    change = _rel_pct(bv, cv) or 0.0
    worse = change > tol.memory_pct and cv - bv > tol.memory_mb
    verdict = "REGRESSION" if worse else ("no change" if cv == bv else "ok")
    why = (f"> +{tol.memory_pct:g} % and > +{tol.memory_mb:g} MiB" if worse else "")
    return Change(cell, "memory", name, bv, cv, change, None, None, "%", tol.memory_pct,
                  f"no spread measured: +{tol.memory_pct:g} % and +{tol.memory_mb:g} MiB",
                  False, True, worse, verdict, why)


def _generic(cell: str, metric: str, name: str, b: dict[str, Any], c: dict[str, Any],
             hib: bool, tol: Tolerances) -> Change:
    bv, cv = _num(b.get("value")), _num(c.get("value"))
    scale, unit, t = (1.0, "points", tol.same_top_points) if name == "same_top_pct" else (
        None, "%", tol.other_pct)
    change, ci = _unpaired(b, c, scale)
    return _change(cell, metric, name, bv, cv, change=change, ci=ci, unit=unit, tol=t,
                   test=UNPAIRED if ci else "no stored error: the tolerance alone", hib=hib)


def _reported(cell: str, metric: str, name: str, b: dict[str, Any], c: dict[str, Any]
              ) -> Change | None:
    bv, cv = _num(b.get("value")), _num(c.get("value"))
    if bv is None or cv is None:
        return None
    return Change(cell, metric, name, bv, cv, _rel_pct(bv, cv), None, None, "%", None,
                  "reported, not gated", None, False, False, "reported")


def _other_hardware(cell: str, metric: str, name: str, bv: Any, cv: Any) -> Change:
    return Change(cell, metric, name, _num(bv), _num(cv), _rel_pct(_num(bv), _num(cv)), None,
                  None, "%", None, "", None, False, False, "not compared: other hardware",
                  "measured on different hardware (CPU, flags, cores or GPUs)")


# ------------------------------------------------------------------------ one cell pair

def _direction(metric: str, name: str) -> bool | None:
    """Higher is better (True/False) for a gated value; None: only reported. A metric this
    install does not know (a plugin's, not installed here) is reported, never gated."""
    info = known_metric_info(metric)
    return None if info is None else info.gated_values().get(name)


def _value_names(metric: str) -> list[str]:
    """The values compared for ``metric``: the gated ones (primary first), then the reported."""
    info = known_metric_info(metric)
    if info is None:
        return []
    names = list(info.gated_values())
    return names + [n for n in info.reported if n not in names]


def _reported_only(metric: str, name: str) -> bool:
    info = known_metric_info(metric)
    return info is not None and name in info.reported


def _hardware_bound(metric: str) -> bool:
    info = known_metric_info(metric)
    return info is not None and info.hardware_bound


def _rss_gated(record: dict[str, Any]) -> bool:
    info = known_backend_info((record.get("variant") or {}).get("backend", ""))
    return info is None or info.rss_gated


def _same_hardware(b: dict[str, Any], c: dict[str, Any]) -> bool:
    from qbench.host.envinfo import hardware_id
    return hardware_id(b.get("env") or {}) == hardware_id(c.get("env") or {})


def compare_cell(label: str, b: dict[str, Any], c: dict[str, Any], tol: Tolerances
                 ) -> list[Change]:
    """Every compared value of one cell that is ok in both runs."""
    metric = b["metric"]
    hw_ok = not _hardware_bound(metric) or _same_hardware(b, c)
    bvals, cvals = b.get("values") or {}, c.get("values") or {}
    out: list[Change] = []
    for name in _value_names(metric):
        if name not in bvals or name not in cvals:
            continue
        ch = _one_value(label, metric, name, b, c, tol, hw_ok)
        if ch is not None:
            out.append(ch)
    if _hardware_bound(metric):
        out.extend(_memory_changes(label, b, c, tol, hw_ok))
    note = _version_note(b, c)
    for ch in out:
        ch.why = "; ".join(x for x in (ch.why, note) if x)
    return out


def _one_value(label: str, metric: str, name: str, b: dict[str, Any], c: dict[str, Any],
               tol: Tolerances, hw_ok: bool) -> Change | None:
    bv, cv = b["values"][name], c["values"][name]
    if _reported_only(metric, name):
        return _reported(label, metric, name, bv, cv)
    if not hw_ok:
        return _other_hardware(label, metric, name, bv.get("value"), cv.get("value"))
    if metric == "perplexity" and name == "ppl":
        return _ppl(label, b, c, tol)
    if metric == "kld" and name == "kld_mean":
        return _kld(label, b, c, tol)
    if metric == "kld" and name == "same_top_pct":
        return _same_top(label, b, c, tol)
    if metric == "mmlu" and name == "acc":
        return _mmlu(label, b, c, tol)
    if metric == "speed":
        return _speed(label, name, bv, cv, tol)
    hib = _direction(metric, name)
    if hib is None:
        return _reported(label, metric, name, bv, cv)
    return _generic(label, metric, name, bv, cv, hib, tol)


def _memory_changes(label: str, b: dict[str, Any], c: dict[str, Any], tol: Tolerances,
                    hw_ok: bool) -> list[Change]:
    out = []
    for name in MEMORY_VALUES:
        bv = _num((b.get("memory") or {}).get(name))
        cv = _num((c.get("memory") or {}).get(name))
        if bv is None or cv is None:
            continue
        if hw_ok and name == "peak_rss_mb" and not _rss_gated(b):
            out.append(_reported(label, "memory", name, {"value": bv}, {"value": cv}))
            continue
        out.append(_memory(label, name, bv, cv, tol) if hw_ok
                   else _other_hardware(label, "memory", name, bv, cv))
    return out


def _version_note(b: dict[str, Any], c: dict[str, Any]) -> str:
    vb, vc = b.get("metric_version"), c.get("metric_version")
    return f"metric version {vb} → {vc}" if vb != vc else ""


# ------------------------------------------------------------------------ whole runs

def compare_records(baseline: list[dict[str, Any]], candidate: list[dict[str, Any]], *,
                    tolerances: Tolerances | None = None,
                    expected: set[tuple[str, str]] | None = None, only: tuple[str, ...] = (),
                    baseline_name: str = "", candidate_name: str = "") -> Comparison:
    """The pure comparison of two record lists. ``expected``: the (suite, cell id) pairs the
    suite asks for now (None: every cell ok in the baseline); ``only``: cell id globs."""
    tol = tolerances or Tolerances()
    b_by, c_by = _latest(baseline, only), _latest(candidate, only)
    out = Comparison(baseline=baseline_name, candidate=candidate_name, tolerances=tol)
    out.only_candidate = sorted(_label(k) for k in c_by.keys() - b_by.keys())
    for key in sorted(b_by.keys() - c_by.keys()):
        if b_by[key]["status"] != "ok":
            out.only_baseline.append(_label(key))
        elif expected is None or key in expected:
            out.missing.append(_label(key))
        else:
            out.no_longer_asked.append(_label(key))
    for key in sorted(b_by.keys() & c_by.keys()):
        _compare_pair(out, key, b_by[key], c_by[key], tol, expected)
    out.env_differences = _env_differences(list(b_by.values()), list(c_by.values()))
    return out


def _compare_pair(out: Comparison, key: tuple[str, str], b: dict[str, Any], c: dict[str, Any],
                  tol: Tolerances, expected: set[tuple[str, str]] | None) -> None:
    label = _label(key)
    if b["status"] == "ok" and c["status"] in NOT_OK:
        if expected is not None and key not in expected:
            out.no_longer_asked.append(label)
        else:
            out.newly_failing.append({"cell": label, "status": c["status"],
                                      "error": (c.get("error") or "")[:500]})
        return
    if b["status"] != "ok" and c["status"] == "ok":
        out.newly_ok.append(label)
    if b["status"] == "ok" and c["status"] == "ok":
        out.changes.extend(compare_cell(label, b, c, tol))


def _env_differences(baseline: list[dict[str, Any]], candidate: list[dict[str, Any]]
                     ) -> list[str]:
    def summary(recs: list[dict[str, Any]]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {"cpu": set(), "gpus": set(), "libraries": set()}
        for r in recs:
            env = r.get("env") or {}
            out["cpu"].add(str(env.get("cpu")))
            out["gpus"].add(json.dumps([g.get("name") if isinstance(g, dict) else g
                                        for g in env.get("gpus") or []]))
            out["libraries"].add(json.dumps(env.get("libraries") or {}, sort_keys=True))
        return out

    b, c = summary(baseline), summary(candidate)
    return [f"{k}: {sorted(b[k])} → {sorted(c[k])}" for k in b if b[k] != c[k]]


# ------------------------------------------------------------------------------- rendering

def render_html(cmp: Comparison) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("qbench", "report/templates"),
                      autoescape=select_autoescape(["html"]))
    env.filters["num"] = fmt_num
    env.filters["signed"] = fmt_signed
    env.filters["interval"] = fmt_interval
    return env.get_template("compare.html").render(c=cmp, regressions=cmp.regressions)


def fmt_num(x: float | None) -> str:
    if x is None:
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.5g}"


def fmt_signed(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    if math.isinf(x):
        return ("+∞" if x > 0 else "-∞") + (f" {unit}" if unit else "")
    return f"{x:+.3g}" + (f" {unit}" if unit else "")


def fmt_interval(ch: Change) -> str:
    if ch.ci_low is None or ch.ci_high is None:
        return "–"
    return f"[{fmt_signed(ch.ci_low)}, {fmt_signed(ch.ci_high)}] {ch.unit}"


def _shown(cmp: Comparison) -> list[Change]:
    """Every gated value and hardware skip; reported-only values when they moved."""
    return [c for c in cmp.changes if c.gated or c.verdict != "reported" or c.change]


def print_text(cmp: Comparison, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{cmp.baseline} → {cmp.candidate}")
    for col in ("cell", "value", "baseline", "candidate", "change", "95 % interval", "test",
                "verdict"):
        table.add_column(col, overflow="fold")
    for ch in _shown(cmp):
        mark = f"[red]{ch.verdict}[/red]" if ch.regression else ch.verdict
        if ch.why:
            mark += f": {ch.why}"
        table.add_row(ch.cell, ch.value, fmt_num(ch.baseline), fmt_num(ch.candidate),
                      fmt_signed(ch.change, ch.unit), fmt_interval(ch), ch.test, mark)
    console.print(table)
    _print_cells(cmp, console)


def _print_cells(cmp: Comparison, console: Any) -> None:
    for f in cmp.newly_failing:
        console.print(f"[red]REGRESSION: was ok, now {f['status']}[/red]: {f['cell']}: "
                      f"{f['error'][:200]}")
    for name in cmp.missing:
        console.print(f"[red]REGRESSION: was ok, now missing[/red]: {name}")
    for name in cmp.newly_ok:
        console.print(f"[green]fixed[/green]: {name}")
    if cmp.no_longer_asked:
        console.print(f"no longer in the suite ({len(cmp.no_longer_asked)}): "
                      + ", ".join(cmp.no_longer_asked[:10]))
    if cmp.only_baseline:
        console.print(f"[yellow]only in baseline, not ok there[/yellow] "
                      f"({len(cmp.only_baseline)}): " + ", ".join(cmp.only_baseline[:10]))
    if cmp.only_candidate:
        console.print(f"only in candidate ({len(cmp.only_candidate)}): "
                      + ", ".join(cmp.only_candidate[:10]))
    for d in cmp.env_differences:
        console.print(f"[yellow]environment differs[/yellow]: {d}")
    n = len(cmp.regressions) + len(cmp.newly_failing) + len(cmp.missing)
    console.print(f"[red]{n} regression(s)[/red]" if n else
                  f"[green]no regression[/green] ({len(cmp.changes)} values compared)")


# ------------------------------------------------------------------------------- the command

def tolerances_from_args(args: argparse.Namespace) -> Tolerances:
    """The CLI's tolerance options (absent ones keep the defaults)."""
    names = {f.name for f in Tolerances.__dataclass_fields__.values()}  # type: ignore[attr-defined]
    given = {n: getattr(args, f"tol_{n}") for n in names
             if getattr(args, f"tol_{n}", None) is not None}
    return Tolerances(**given)


def run_compare(args: argparse.Namespace, console: Any) -> int:
    """The CLI command (wired in qbench.cli.cmd_compare)."""
    from qbench.results.store import load_results

    try:
        baseline = load_results([Path(args.baseline)])
        candidate = load_results([Path(args.candidate)])
        expected = expected_cells(args.suite) if getattr(args, "suite", None) else None
    except (QbenchError, OSError, ValueError) as exc:
        print(f"qbench compare: error: {exc}", file=sys.stderr)
        return EXIT_USER
    for name, recs in ((args.baseline, baseline), (args.candidate, candidate)):
        if not recs:
            print(f"qbench compare: error: {name}: no readable cell records", file=sys.stderr)
            return EXIT_USER
    only = tuple(getattr(args, "only", None) or ())
    if only and not _latest(baseline, only):
        print(f"qbench compare: error: --only {' '.join(only)} matches no cell of "
              f"{args.baseline} (cell ids look like model/backend/quant/metric)",
              file=sys.stderr)
        return EXIT_USER
    cmp = compare_records(baseline, candidate, tolerances=tolerances_from_args(args),
                          expected=expected, only=only,
                          baseline_name=str(args.baseline), candidate_name=str(args.candidate))
    if getattr(args, "out", None):
        from qbench.host.fsutil import atomic_write_text
        out = Path(args.out)
        if out.suffix.lower() != ".html":
            out = out / "compare.html"
        atomic_write_text(out, render_html(cmp))
        console.print(f"wrote {out}")
    if getattr(args, "json", False):
        print(json.dumps(cmp.to_json(), indent=1, default=str))
    else:
        print_text(cmp, console)
    return EXIT_REGRESSION if cmp.failed else EXIT_OK
