"""``qbench compare BASELINE CANDIDATE``: what changed between two result sets - the CI gate.

Cells are matched by (suite, cell id) - the id the plan spells (qbench.suite.plan.cell_ids),
not the hashed key, so a new library or metric version still finds its baseline. Every value
a metric declares gated (qbench.metrics.Value) is compared by the one judge
(:mod:`qbench.results.judge`): paired by chunk or question where the records carry per-item
data and the same pairing identity, Welch t over repetitions for speed and memory.

A value **regresses** when its interval of the change lies wholly on the worse side of its
tolerance - statistically real *and* large enough to matter. The intervals are simultaneous:
with m gated values compared, each is taken at level 1 - alpha/m (Bonferroni; alpha = 0.05 by
default), so an upgrade that moves every value by noise alone fails the gate at most 5 % of the
time, not once per value. Each gated value also states the smallest worsening its data would
catch with 80 % power at that level.

The gate **never passes what it did not compare**. Exit codes:

- 0: values were compared and none regressed;
- 2: a regression (a value, or an ok cell now failed, skipped or missing);
- 4: not comparable - nothing was compared (a renamed suite or model), or a gated value of an ok
  baseline cell is missing, NaN, infinite or a zero throughput in either run, its pairing
  identity changed (another dataset, ctx, chunks, question set: never a paired interval), a
  timing says it is unreliable, or speed/memory were measured on other hardware (unless
  ``--allow-other-hardware``). Each with its reason;
- 1: unreadable input (3, as for every command: a bug in qbench).

Configuration differences (threads, device, batch sizes, library versions) are printed with
their values beside the verdicts they may explain.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qbench.backends import known_backend_info
from qbench.errors import QbenchError
from qbench.metrics import Value, known_metric_info
from qbench.results import judge as J
from qbench.results.schema import NOT_OK
from qbench.suite.identity import record_cell_id

# 3 is every command's 'a bug in qbench' (qbench.cli)
EXIT_OK, EXIT_USER, EXIT_REGRESSION, EXIT_NOT_COMPARABLE = 0, 1, 2, 4
ALPHA = 0.05      # family-wise false-alarm rate of the whole gate


@dataclass(frozen=True)
class Tolerances:
    """Overrides of the metrics' declared tolerances (``metric.value`` -> tolerance, in the
    value's unit) and the gate's family-wise false-alarm rate."""

    values: dict[str, float] = field(default_factory=dict)
    alpha: float = ALPHA
    allow_other_hardware: bool = False

    def of(self, metric: str, spec: Value) -> float:
        return self.values.get(f"{metric}.{spec.name}", spec.tolerance)


@dataclass
class Change:
    """One compared value: the numbers, the test, its interval and the verdict."""

    cell: str
    metric: str
    value: str
    baseline: float | None
    candidate: float | None
    change: float | None          # signed change of the tested quantity, in ``unit``
    ci_low: float | None          # its interval at ``level`` (None: tolerance alone)
    ci_high: float | None
    unit: str                     # "%" (relative) or "points"
    tolerance: float | None       # how much worse (in ``unit``, >= 0) is tolerated
    test: str
    higher_is_better: bool | None
    gated: bool
    regression: bool
    verdict: str                  # REGRESSION | ok | improved | no change | reported | not comparable: ...
    why: str = ""
    level: float = J.LEVEL
    detectable: float | None = None   # smallest worsening caught with 80 % power, in ``unit``
    detectable_how: str = ""
    config: str = ""              # configuration differences of this cell's runs
    comparable: bool = True

    @property
    def change_pct(self) -> float | None:
        """The plain relative change of the value, candidate vs baseline, in %."""
        b, c = self.baseline, self.candidate
        if b is None or c is None or b == 0:
            return None
        return 100.0 * (c - b) / abs(b)


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
    not_comparable: list[str] = field(default_factory=list)  # run-level reasons
    family: int = 0               # gated values compared (the Bonferroni m)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regression]

    @property
    def incomparable(self) -> list[Change]:
        return [c for c in self.changes if c.gated and not c.comparable]

    @property
    def compared(self) -> list[Change]:
        return [c for c in self.changes if c.gated and c.comparable]

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.newly_failing or self.missing)

    @property
    def exit_code(self) -> int:
        """4 first when the runs as a whole do not match (no suite or model in common: their
        'missing' cells say nothing about the code), then 2 on a regression, 4 on any value
        not compared, 0 when values were compared and none regressed."""
        if self.not_comparable:
            return EXIT_NOT_COMPARABLE
        if self.failed:
            return EXIT_REGRESSION
        if self.not_comparable or self.incomparable or not self.compared:
            return EXIT_NOT_COMPARABLE
        return EXIT_OK

    def reasons_not_comparable(self) -> list[str]:
        out = list(self.not_comparable)
        if not self.compared and not self.not_comparable:
            out.append("no value was compared")
        out += [f"{c.cell} {c.value}: {c.why}" for c in self.incomparable]
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for ch, row in zip(self.changes, d["changes"]):
            row["change_pct"] = ch.change_pct
        d["regressions"] = len(self.regressions)
        d["newly_failing_count"] = len(self.newly_failing)
        d["missing_count"] = len(self.missing)
        d["not_comparable_reasons"] = self.reasons_not_comparable()
        d["exit_code"] = self.exit_code
        return d


# ------------------------------------------------------------------------------ matching

def cell_id(rec: dict[str, Any]) -> str:
    """model/backend/variant/metric, as :attr:`qbench.suite.plan.Cell.id` spells it."""
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
    """The cells a suite file asks for, with the ids the plan gives them (without touching
    models or data)."""
    from qbench.suite.config import load_suite
    from qbench.suite.plan import cell_ids

    suite = load_suite(suite_path)
    return {(suite.name, cid) for cid in cell_ids(suite)}


# ------------------------------------------------------------------------ one cell pair

def _same_hardware(b: dict[str, Any], c: dict[str, Any]) -> bool:
    from qbench.host.envinfo import hardware_id
    return hardware_id(b.get("env") or {}) == hardware_id(c.get("env") or {})


def _hardware_bound(metric: str) -> bool:
    info = known_metric_info(metric)
    return info is not None and info.hardware_bound


CONFIG_KEYS = (("run", "threads"), ("run", "device"), ("variant", "batch"),
               ("variant", "ubatch"), ("variant", "n_gpu_layers"), ("backend", "n_batch"),
               ("backend", "n_ubatch"), ("backend", "flash_attn"))


def config_differences(b: dict[str, Any], c: dict[str, Any]) -> str:
    """How the two runs of a cell were configured differently (threads, device, batch sizes,
    the libraries that computed it): what may explain a change that is not the code's."""
    out = []
    for part, key in CONFIG_KEYS:
        x, y = (b.get(part) or {}).get(key), (c.get(part) or {}).get(key)
        if x != y and (x is not None or y is not None):
            out.append(f"{key} {x} → {y}")
    lb, lc = (b.get("env") or {}).get("libraries") or {}, (c.get("env") or {}).get("libraries") or {}
    for lib in sorted(set(lb) | set(lc)):
        if lib != "qbench" and lb.get(lib) != lc.get(lib):
            out.append(f"{lib} {lb.get(lib)} → {lc.get(lib)}")
    vb, vc = b.get("metric_version"), c.get("metric_version")
    if vb != vc:
        out.append(f"metric version {vb} → {vc}")
    return ", ".join(out)


def _gated_specs(metric: str, record: dict[str, Any] | None = None) -> list[Value]:
    """The gated values of ``metric`` - on ``record``'s backend, where a value needs the
    backend's say-so (Value.backend_gate)."""
    info = known_metric_info(metric)
    return [v for v in info.value_specs() if v.gated and _backend_gates(v, record)] if info else []


def _reported_specs(metric: str, record: dict[str, Any] | None = None) -> list[Value]:
    info = known_metric_info(metric)
    return ([v for v in info.value_specs() if not v.gated or not _backend_gates(v, record)]
            if info else [])


def _backend_gates(spec: Value, record: dict[str, Any] | None) -> bool:
    if spec.backend_gate is None or record is None:
        return True
    info = known_backend_info((record.get("variant") or {}).get("backend", ""))
    return info is None or bool(getattr(info, spec.backend_gate, True))


def _planned(b: dict[str, Any]) -> list[Value]:
    """The gated values of a baseline cell the gate must compare: those it stored."""
    return [s for s in _gated_specs(b["metric"], b) if s.name in (b.get("values") or {})]


def _not_comparable(label: str, metric: str, spec: Value, b: dict[str, Any],
                    c: dict[str, Any], why: str, tol: float, config: str) -> Change:
    bv = J.number(((b.get("values") or {}).get(spec.name) or {}).get("value"))
    cv = J.number(((c.get("values") or {}).get(spec.name) or {}).get("value"))
    return Change(label, metric, spec.name, bv, cv, None, None, None, spec.unit, tol, "",
                  spec.higher_is_better, True, False, "not comparable", why,
                  config=config, comparable=False)


def _from_judgement(label: str, spec: Value, j: J.Judgement, tol: float, config: str,
                    hint: tuple[float, float | None] | None) -> Change:
    if not j.comparable or j.change is None:
        return Change(label, j.metric, spec.name, j.reference, j.candidate, None, None, None,
                      j.unit, tol, j.method, spec.higher_is_better, True, False,
                      "not comparable", j.reason or "nothing to compare", level=j.level,
                      config=config, comparable=False)
    tol_u = J.tolerance_in_unit(j, spec, tol)
    where = j.against(tol_u)
    side = "below" if spec.higher_is_better else "above"
    sign = "-" if spec.higher_is_better else "+"
    bound = f"{sign}{tol_u:.3g} {j.unit}"
    notes = list(j.notes)
    if j.cannot_discriminate:
        notes.append("the baseline cannot discriminate on this model ("
                     + j.cannot_discriminate + "): a change is one of behaviour, not quality")
    if where == J.BEYOND:
        verdict, why, regression = "REGRESSION", f"whole interval {side} {bound}", True
    elif j.identical:
        verdict, why, regression = "no change", "", False
    elif j.improved_beyond(tol_u):
        verdict, why, regression = "improved", "", False
    else:
        verdict, regression = "ok", False
        why = f"interval not wholly {side} {bound}" if where == J.ACROSS else ""
    # the baseline's reference spread first (stable, see reference_spreads), else these data
    det = (j.detectable(tol_u, se=hint[0], ln_se=hint[1]) if hint and j.unit in ("%", "points")
           else j.detectable(tol_u))
    det_how = ("" if det is None else "error of these data" if not hint else
               "error of a change spread like the baseline variant's own vs its base")
    return Change(label, j.metric, spec.name, j.reference, j.candidate, j.change, j.low,
                  j.high, j.unit, tol_u, j.method, spec.higher_is_better, True, regression,
                  verdict, "; ".join(x for x in (why, *notes) if x), level=j.level,
                  detectable=det, detectable_how=det_how, config=config)


def _reported(label: str, metric: str, spec: Value, b: dict[str, Any], c: dict[str, Any]
              ) -> Change | None:
    bv = J.number(((b.get("values") or {}).get(spec.name) or {}).get("value"))
    cv = J.number(((c.get("values") or {}).get(spec.name) or {}).get("value"))
    if bv is None or cv is None:
        return None
    pct = 100.0 * (cv - bv) / abs(bv) if bv else None
    return Change(label, metric, spec.name, bv, cv, pct, None, None, "%", None,
                  "reported, not gated", None, False, False, "reported")


# ------------------------------------------------------------------------ whole runs

def _base_of(by: dict[tuple[str, str], dict[str, Any]], rec: dict[str, Any]
             ) -> dict[str, Any] | None:
    """The ok record of the same metric for ``rec``'s base variant in the same run."""
    for r in by.values():
        if (r["status"] == "ok" and r["metric"] == rec["metric"] and r["suite"] == rec["suite"]
                and (r.get("variant") or {}).get("is_base")
                and r["model"]["id"] == rec["model"]["id"]
                and r["variant"].get("backend") == rec["variant"].get("backend")):
            return r
    return None


def reference_spreads(by: dict[tuple[str, str], dict[str, Any]]
                      ) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(cell label, value) -> (se, ln se) a change of that value would have on these chunks or
    questions: the paired error of the baseline variant against its base (the spread a real
    change of the weights brings) - for a metric measured against the base itself (KLD),
    against its nearest neighbour among the other variants - and the median of those over the
    model's variants for the base. What "the smallest change it would catch" assumes: more
    stable than the spread of one rerun's differences (8 chunks give an sd good to +-25 %)."""
    out: dict[tuple[str, str], tuple[float, float | None]] = {}
    groups: dict[tuple[str, str, str, str], list[tuple[float, float | None]]] = {}
    ok = {k: r for k, r in by.items() if r["status"] == "ok"}
    for key, rec in ok.items():
        info = known_metric_info(rec["metric"])
        for spec in _gated_specs(rec["metric"]):
            if spec.pairing is None:
                continue
            if info is not None and info.needs_base and spec.change != "points":
                got = _neighbour_spread(rec, spec, [
                    r for r in ok.values() if r is not rec and r["metric"] == rec["metric"]
                    and r["model"]["id"] == rec["model"]["id"]
                    and r["variant"].get("backend") == rec["variant"].get("backend")])
            else:
                base = _base_of(by, rec)
                j = (J.judge(rec["metric"], spec, base, rec)
                     if base is not None and base is not rec else None)
                got = ((j.se, j.ln_se) if j is not None and j.comparable and j.se
                       and j.unit in ("%", "points") else None)
            if got is None:
                continue
            out[(_label(key), spec.name)] = got
            groups.setdefault((rec["suite"], rec["model"]["id"], rec["metric"], spec.name),
                              []).append(got)
    for key, rec in ok.items():
        for spec in _gated_specs(rec["metric"]):
            got = groups.get((rec["suite"], rec["model"]["id"], rec["metric"], spec.name))
            if spec.pairing is not None and got and (_label(key), spec.name) not in out:
                ses = sorted(got, key=lambda x: x[0])
                out[(_label(key), spec.name)] = ses[len(ses) // 2]
    return out


def _neighbour_spread(rec: dict[str, Any], spec: Value, others: list[dict[str, Any]]
                      ) -> tuple[float, float] | None:
    """For a value measured against the base (mean KLD: the base's own is ~0), the relative
    spread a change brings: the median over the other variants of the sd over items of
    ln(other / this), as the error of a mean over these items (on ln, and in %)."""
    assert spec.pairing is not None
    mine = spec.pairing.values_of(rec.get("details") or {}) or []
    sds = []
    for r in others:
        theirs = spec.pairing.values_of(r.get("details") or {}) or []
        if len(theirs) != len(mine) or len(mine) < 2:
            continue
        if any(not (isinstance(x, (int, float)) and x > 0) for x in (*mine, *theirs)):
            continue
        sds.append(statistics.stdev(math.log(b / a) for a, b in zip(mine, theirs)))
    if not sds:
        return None
    ln_se = statistics.median(sds) / math.sqrt(len(mine))
    return 100.0 * ln_se, ln_se


def _renamed(b_by: dict[tuple[str, str], dict[str, Any]],
             c_by: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Run-level reasons the two sides cannot be compared: no suite or model in common."""
    out = []
    bs, cs = {k[0] for k in b_by}, {k[0] for k in c_by}
    if bs and cs and not bs & cs:
        out.append(f"no suite in common: baseline {sorted(bs)}, candidate {sorted(cs)} "
                   "(renamed? compare results of the same suite)")
        return out
    for suite in sorted(bs & cs):
        bm = {r["model"]["id"] for k, r in b_by.items() if k[0] == suite}
        cm = {r["model"]["id"] for k, r in c_by.items() if k[0] == suite}
        if bm - cm and cm - bm:
            out.append(f"suite {suite}: models {sorted(bm - cm)} only in the baseline and "
                       f"{sorted(cm - bm)} only in the candidate (renamed?)")
    return out


def family_size(pairs: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> int:
    """How many gated values could raise a false alarm: those whose stored numbers differ
    between the runs (an identical value - a deterministic rerun - cannot)."""
    return sum(1 for _, b, c in pairs for spec in _planned(b)
               if not J.same_data(spec, b, c))


def family_level(alpha: float, m: int) -> float:
    """The two-sided level of each of ``m`` simultaneous intervals such that the chance of any
    false regression (one tail each) is at most ``alpha`` (Bonferroni: alpha/m a tail)."""
    return 1.0 - 2.0 * alpha / max(m, 1)


def compare_records(baseline: list[dict[str, Any]], candidate: list[dict[str, Any]], *,
                    tolerances: Tolerances | None = None,
                    expected: set[tuple[str, str]] | None = None, only: tuple[str, ...] = (),
                    baseline_name: str = "", candidate_name: str = "") -> Comparison:
    """The pure comparison of two record lists. ``expected``: the (suite, cell id) pairs the
    suite asks for now (None: every cell ok in the baseline); ``only``: cell id globs."""
    tol = tolerances or Tolerances()
    b_by, c_by = _latest(baseline, only), _latest(candidate, only)
    out = Comparison(baseline=baseline_name, candidate=candidate_name, tolerances=tol)
    out.not_comparable = _renamed(b_by, c_by)
    out.only_candidate = sorted(_label(k) for k in c_by.keys() - b_by.keys())
    for key in sorted(b_by.keys() - c_by.keys()):
        if b_by[key]["status"] != "ok":
            out.only_baseline.append(_label(key))
        elif expected is None or key in expected:
            out.missing.append(_label(key))
        else:
            out.no_longer_asked.append(_label(key))
    pairs = []
    for key in sorted(b_by.keys() & c_by.keys()):
        b, c = b_by[key], c_by[key]
        label = _label(key)
        if b["status"] == "ok" and c["status"] in NOT_OK:
            if expected is not None and key not in expected:
                out.no_longer_asked.append(label)
            else:
                out.newly_failing.append({"cell": label, "status": c["status"],
                                          "error": (c.get("error") or "")[:500]})
        elif b["status"] != "ok" and c["status"] == "ok":
            out.newly_ok.append(label)
        elif b["status"] == "ok" and c["status"] == "ok":
            pairs.append((label, b, c))
    out.family = family_size(pairs)
    level = family_level(tol.alpha, out.family)
    spreads = reference_spreads(b_by)
    for label, b, c in pairs:
        out.changes.extend(_compare_pair(label, b, c, tol, level, spreads))
    out.env_differences = _env_differences(list(b_by.values()), list(c_by.values()))
    return out


def _compare_pair(label: str, b: dict[str, Any], c: dict[str, Any], tol: Tolerances,
                  level: float, spreads: dict[tuple[str, str], float]) -> list[Change]:
    metric = b["metric"]
    config = config_differences(b, c)
    other_hw = _hardware_bound(metric) and not _same_hardware(b, c)
    out: list[Change] = []
    for spec in _planned(b):
        t = tol.of(metric, spec)
        if other_hw:
            ch = _not_comparable(label, metric, spec, b, c, "measured on other hardware "
                                 "(CPU, cores or GPUs differ): not compared", t, config)
            if tol.allow_other_hardware:
                ch.gated, ch.verdict = False, "not compared: other hardware"
            out.append(ch)
            continue
        j = J.judge(metric, spec, b, c, level=level)
        out.append(_from_judgement(label, spec, j, t, config, spreads.get((label, spec.name))))
    for spec in _reported_specs(metric, b):
        ch = _reported(label, metric, spec, b, c)
        if ch is not None:
            out.append(ch)
    return out


def _env_differences(baseline: list[dict[str, Any]], candidate: list[dict[str, Any]]
                     ) -> list[str]:
    def summary(recs: list[dict[str, Any]]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {"cpu": set(), "gpus": set(), "libraries": set(),
                                    "threads": set()}
        for r in recs:
            env = r.get("env") or {}
            out["cpu"].add(str(env.get("cpu")))
            out["gpus"].add(json.dumps([g.get("name") if isinstance(g, dict) else g
                                        for g in env.get("gpus") or []]))
            out["libraries"].add(json.dumps(env.get("libraries") or {}, sort_keys=True))
            out["threads"].add(str((r.get("run") or {}).get("threads")))
        return out

    b, c = summary(baseline), summary(candidate)
    return [f"{k}: {sorted(b[k])} → {sorted(c[k])}" for k in b if b[k] != c[k]]


# ------------------------------------------------------------------------------- the command

LEGACY_FLAGS = {   # the CLI's older per-metric options -> the values they set
    "ppl_pct": ("perplexity.ppl",), "kld_pct": ("kld.kld_mean",),
    "mmlu_points": ("mmlu.acc",), "same_top_points": ("kld.same_top_pct",),
    "speed_pct": ("speed.tg_tokens_per_s", "speed.pp_tokens_per_s"),
    "memory_pct": ("speed.peak_rss_mb", "speed.peak_vram_mb"),
}


def tolerances_from_args(args: argparse.Namespace) -> Tolerances:
    """The CLI's tolerance options: ``--tolerance metric.value=X`` and the named shortcuts."""
    values: dict[str, float] = {}
    for flag, names in LEGACY_FLAGS.items():
        x = getattr(args, f"tol_{flag}", None)
        if x is not None:
            values.update({n: float(x) for n in names})
    for item in getattr(args, "tolerance", None) or ():
        name, sep, x = item.partition("=")
        try:
            t = float(x)
        except ValueError:
            t = math.nan
        if not sep or "." not in name or not math.isfinite(t) or t < 0:
            raise QbenchError(f"--tolerance {item!r}: expected METRIC.VALUE=X with X a "
                              "finite number >= 0 (e.g. perplexity.ppl=0.5)")
        values[name] = t
    alpha = getattr(args, "alpha", None)
    if alpha is not None and not 0 < alpha < 1:
        raise QbenchError(f"--alpha {alpha}: expected a number between 0 and 1")
    return Tolerances(values=values, alpha=alpha if alpha is not None else ALPHA,
                      allow_other_hardware=bool(getattr(args, "allow_other_hardware", False)))
