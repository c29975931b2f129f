"""One judge: every comparison of two results of one metric value, for every caller.

The regression gate (baseline cell vs candidate cell), the report's deltas and the
recommendation (base variant vs variant), and the advice check all ask the same question - how
much worse is B than A, and how sure are we - so they all ask it here, and one question gets one
interval everywhere. What to compare and how comes from the metric's declared
:class:`qbench.metrics.Value` (direction, how a change is expressed, pairing, spread), never
from its name.

Methods, chosen by the data the two records hold:

- **paired t** over the per-item differences (chunks: per-chunk PPL, KLD, same-top) when both
  records carry the value's per-item data and the pairing identity (dataset hash, ctx, chunks,
  ...) matches; a log-expressed value is differenced on ln. The noise of a paired difference is
  the spread of the differences, never the runs' own sampling errors.
- **exact McNemar** on the flips for 0/1 items (MMLU questions, paired by id), with Newcombe's
  paired interval of the accuracy difference.
- **Welch t on ln** over repeated samples (tokens/s, peak memory per repetition).
- **unpaired** from the stored standard errors, taken as independent (conservative on the same
  items), where a value declares no pairing.

A value that declares a pairing but whose per-item data or identity are missing or differ is
**not comparable** - with the reason - never a wider interval that passes. So are a missing,
NaN, infinite or (for a ratio) non-positive value, and a record whose measurement says it is
unreliable (``record["fitness"]["reliable"]`` false).

Every judgement can say: whether its interval lies wholly beyond, within or across a tolerance;
the smallest worsening its data would catch with 80 % power; and the sample that would resolve
it at 80 % power (two significant figures; "cannot be resolved with this dataset" past the
items the input holds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from scipy import stats as sps

from qbench.metrics import LOG, NONE, POINTS, RELATIVE, REPETITIONS, Value
from qbench.results import stats

LEVEL = 0.95      # a single comparison's interval


@cache
def tq(p: float, df: int | None) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (None: the normal);
    cached - the gate asks for the same few thousands of times."""
    return float(sps.t.ppf(p, df)) if df else float(sps.norm.ppf(p))

POWER = 0.80      # "would catch" and "would resolve" are at this power
BEYOND, WITHIN, ACROSS = "beyond", "within", "across"


@dataclass
class Judgement:
    """How a candidate's value compares with a reference's, with its interval at ``level``.

    ``change``/``low``/``high`` are signed candidate-minus-reference in ``unit`` (``%`` of the
    reference, or points, or the value's own unit when the reference is 0); ``se`` and ``df``
    describe the change's error (``df`` None: a normal quantile).
    """

    metric: str
    value: str
    higher_is_better: bool
    reference: float | None
    candidate: float | None
    unit: str
    level: float = LEVEL
    change: float | None = None
    low: float | None = None
    high: float | None = None
    se: float | None = None
    df: int | None = None
    method: str = ""
    n: int | None = None
    n_unit: str = ""
    comparable: bool = True
    reason: str = ""             # not comparable: why
    notes: list[str] = field(default_factory=list)
    p_value: float | None = None
    flips: tuple[int, int] | None = None          # (gained, lost): 0/1 items
    discordant: float | None = None               # share of items that flipped
    available: int | None = None                  # items the input holds (resolve ceiling)
    item_size: float | None = None                # e.g. scored tokens per chunk
    cannot_discriminate: str | None = None        # the reference cannot tell (base at chance)
    same_data: bool = False                       # both runs stored exactly the same numbers
    ln_se: float | None = None                    # a ratio's error on ln (LOG values)
    own_unit: str = ""                            # the stored value's unit (nats, MiB)

    # ------------------------------------------------------------------ reading it

    def worse(self, x: float) -> float:
        """``x`` (a signed change) as a worsening: positive is worse."""
        return -x if self.higher_is_better else x

    @property
    def worse_low(self) -> float | None:
        """The least worsening in the interval."""
        if self.low is None or self.high is None:
            return None
        return min(self.worse(self.low), self.worse(self.high))

    @property
    def worse_high(self) -> float | None:
        """The most worsening in the interval."""
        if self.low is None or self.high is None:
            return None
        return max(self.worse(self.low), self.worse(self.high))

    @property
    def identical(self) -> bool:
        """Both runs stored the same numbers (value, samples, per-item data): a deterministic
        rerun, which no noise can make a regression."""
        return self.comparable and self.same_data

    def against(self, tolerance: float) -> str:
        """BEYOND: the whole interval is worse than ``tolerance``; WITHIN: none of it is;
        ACROSS: it straddles. A change without an interval is judged on its point."""
        if self.change is None:
            raise ValueError(f"{self.metric}.{self.value}: nothing compared ({self.reason})")
        lo, hi = self.worse_low, self.worse_high
        if lo is None or hi is None:
            lo = hi = self.worse(self.change)
        if lo > tolerance:
            return BEYOND
        if hi <= tolerance:
            return WITHIN
        return ACROSS

    def improved_beyond(self, tolerance: float) -> bool:
        """The whole interval is *better* by more than ``tolerance``."""
        hi = self.worse_high
        if hi is None:
            hi = self.worse(self.change or 0.0)
        return -hi > tolerance

    def quantile(self, level: float | None = None) -> float:
        """Two-sided quantile of this judgement's interval (t with ``df``, else normal)."""
        return tq(1 - (1 - (level or self.level)) / 2, self.df)

    def power_quantile(self, power: float = POWER) -> float:
        return tq(power, self.df)

    def detectable(self, tolerance: float, *, se: float | None = None,
                   ln_se: float | None = None, power: float = POWER) -> float | None:
        """The smallest worsening (in ``unit``) whose interval would lie wholly beyond
        ``tolerance`` with probability ``power``, at this judgement's level and error (or
        ``se`` / ``ln_se``, an error assumed from elsewhere). A ratio is worked on ln and
        mapped back, so a drop never reads past -100 %."""
        k = self.quantile() + self.power_quantile(power)
        ln_se = self.ln_se if ln_se is None and se is None else ln_se
        # a ratio (LOG), or a relative change of a positive value given an error on ln
        if ln_se and math.isfinite(ln_se) and self.unit == "%" and tolerance < 100:
            if self.higher_is_better:      # a drop: tolerance -t % is ln(1 - t/100)
                return 100.0 * (1.0 - math.exp(math.log1p(-tolerance / 100) - k * ln_se))
            return 100.0 * math.expm1(math.log1p(tolerance / 100) + k * ln_se)
        se = self.se if se is None else se
        if not se or not math.isfinite(se):
            return None
        return tolerance + k * se

    def to_resolve(self, threshold: float, power: float = POWER) -> dict[str, Any]:
        """The sample (in ``n_unit``) at which the interval would exclude ``threshold`` with
        ``power``, if the change is what it measures now: ``{"n", "text", "resolvable"}``."""
        out: dict[str, Any] = {"n": None, "resolvable": None, "unit": self.n_unit,
                               "text": "the sample that would resolve it is unknown"}
        if self.change is None or not self.n or not self.se or not math.isfinite(self.se):
            return out
        gap = abs(self.worse(self.change) - threshold)
        if gap == 0:
            return out | {"resolvable": False,
                          "text": "the point sits on the threshold: no sample resolves it"}
        z = tq(1 - (1 - self.level) / 2, None) + tq(power, None)
        need = self.n * (z * self.se / gap) ** 2
        n = sig2(max(need, self.n + 1))
        size = f" (about {sig2(n * self.item_size):,} tokens)" if self.item_size else ""
        if self.available is not None and n > self.available:
            return out | {"n": n, "resolvable": False,
                          "text": f"cannot be resolved with this dataset: about {n:,} "
                                  f"{self.n_unit}{size} needed at {power:.0%} power, "
                                  f"{self.available:,} available"}
        return out | {"n": n, "resolvable": True,
                      "text": f"about {n:,} {self.n_unit}{size} would resolve it at "
                              f"{power:.0%} power (now {self.n:,})"}

    def interval_text(self, digits: int = 2) -> str:
        if self.change is None:
            return "not comparable: " + self.reason
        unit = " %" if self.unit == "%" else f" {self.unit}"
        text = f"{self.change:+.{digits}f}{unit}"
        if self.low is not None and self.high is not None:
            text += f" [{self.level:.3g} interval {self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return text

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def sig2(x: float) -> int:
    """``x`` rounded up to two significant figures (a sample size, never understated)."""
    if x <= 0:
        return 0
    mag = 10 ** max(int(math.floor(math.log10(x))) - 1, 0)
    return int(math.ceil(x / mag) * mag)


# ---------------------------------------------------------------------------- reading records

def number(x: Any) -> float | None:
    """A finite number, else None (a bool, a string, NaN and infinity are not numbers)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def stored(record: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    v = (record.get("values") or {}).get(name)
    return v if isinstance(v, Mapping) else None


def _lookup(record: Mapping[str, Any], key: str) -> Any:
    details = record.get("details") or {}
    if key in details:
        return details[key]
    return (record.get("options") or {}).get(key)


def unreliable(record: Mapping[str, Any]) -> str | None:
    """Why a record's own measurement is unfit (it says so itself), None when it is fit."""
    fit = record.get("fitness")
    if isinstance(fit, Mapping) and fit.get("reliable") is False:
        reasons = fit.get("reasons") or []
        return "unreliable measurement" + (": " + "; ".join(map(str, reasons)) if reasons else "")
    return None


# --------------------------------------------------------------------------------- the judge

def judge(metric: str, spec: Value, reference: Mapping[str, Any], candidate: Mapping[str, Any],
          *, level: float = LEVEL) -> Judgement:
    """Compare ``candidate``'s value ``spec`` with ``reference``'s (two ok records of
    ``metric``)."""
    rv, cv = stored(reference, spec.name), stored(candidate, spec.name)
    rx = number(rv.get("value")) if rv else None
    cx = number(cv.get("value")) if cv else None
    j = Judgement(metric, spec.name, spec.higher_is_better, rx, cx, spec.unit, level=level,
                  own_unit=str((rv or {}).get("unit") or ""))
    if spec.fitness is not None:
        j.cannot_discriminate = spec.fitness(reference)
    for who, rec, v, x in (("reference", reference, rv, rx), ("candidate", candidate, cv, cx)):
        why = _unusable(spec, v, x)
        if why:
            return _not(j, f"{who}'s {spec.name} {why}")
        bad = unreliable(rec)
        if bad:
            return _not(j, f"{who}: {bad}")
    assert rx is not None and cx is not None
    j.same_data = same_data(spec, reference, candidate)
    if spec.pairing is not None:
        return _paired(j, spec, reference, candidate)
    if spec.spread == REPETITIONS:
        return _repetitions(j, spec, rv or {}, cv or {})
    if spec.spread == NONE:
        j.method = "no spread: the tolerance alone"
        j.change = _express(spec, rx, cx)
        return j
    return _unpaired(j, spec, rv or {}, cv or {})


def same_data(spec: Value, reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> bool:
    """Whether two records hold exactly the same numbers for ``spec`` (its stored value and,
    when it pairs, its per-item data and ids)."""
    if stored(reference, spec.name) != stored(candidate, spec.name):
        return False
    if spec.pairing is None:
        return True
    rd, cd = reference.get("details") or {}, candidate.get("details") or {}
    if spec.pairing.ids and rd.get(spec.pairing.ids) != cd.get(spec.pairing.ids):
        return False
    return spec.pairing.values_of(rd) == spec.pairing.values_of(cd)


def estimate(metric: str, spec: Value, record: Mapping[str, Any], *, level: float = LEVEL
             ) -> Judgement:
    """One record's own value with its interval (not a change): a t interval over its
    per-item data where the value declares a pairing (chunks: t, as every paired comparison),
    else the stored standard error (normal). ``change`` holds the value, in its own unit."""
    v = stored(record, spec.name)
    x = number(v.get("value")) if v else None
    j = Judgement(metric, spec.name, spec.higher_is_better, None, x,
                  str((v or {}).get("unit") or "value"), level=level, own_unit=str(
                      (v or {}).get("unit") or ""))
    if x is None:
        return _not(j, f"{spec.name} {_unusable(spec, v, x) or 'is missing'}")
    j.change = x
    items = spec.pairing.values_of(record.get("details") or {}) if spec.pairing else None
    finite = [y for y in (number(i) for i in items or ()) if y is not None]
    if spec.pairing is not None and len(finite) >= 2 and len(finite) == len(items or ()):
        p = stats.paired_mean_diff(finite)
        q = tq(1 - (1 - level) / 2, p["df"])
        j.n, j.df, j.n_unit, j.se = p["n"], p["df"], spec.pairing.unit, p["se"]
        j.low, j.high = x - q * p["se"], x + q * p["se"]
        j.method = f"t over {p['n']} {spec.pairing.unit}"
        if spec.pairing.available is not None:
            j.available = spec.pairing.available(record)
        return j
    err = number((v or {}).get("stderr"))
    if err:
        q = tq(1 - (1 - level) / 2, None)
        j.low, j.high, j.se = x - q * err, x + q * err, err
        j.n = int(number((v or {}).get("n")) or 0) or None
        j.method = "normal interval from the stored error"
    else:
        j.method = "no error stored"
    return j


def _not(j: Judgement, reason: str) -> Judgement:
    j.comparable = False
    j.reason = reason
    return j


def _unusable(spec: Value, v: Mapping[str, Any] | None, x: float | None) -> str:
    if v is None:
        return "is missing"
    raw = v.get("value")
    if x is None:
        return f"is not a finite number ({raw!r})"
    if spec.change == LOG and x <= 0:
        return f"is {x:g}: a ratio needs a positive value"
    return ""


def _express(spec: Value, ref: float, x: float) -> float:
    """The change from ``ref`` to ``x`` as the value expresses it."""
    if spec.change == LOG:
        return 100.0 * math.expm1(math.log(x / ref))
    if spec.change == RELATIVE:
        return 100.0 * (x - ref) / abs(ref) if ref else x - ref
    return (x - ref) * spec.scale


def _relative_unit(j: Judgement, spec: Value, ref_mean: float) -> float:
    """Percent per unit of the value for RELATIVE changes; at a zero reference the change is
    stated in the value's own unit (a base against itself has KLD 0)."""
    if ref_mean:
        return 100.0 / abs(ref_mean)
    if j.unit == "%":
        j.unit = j.own_unit or "value"
        j.notes.append(f"reference is 0: change in {j.unit}, against the absolute floor")
    return 1.0


def _from_diffs(j: Judgement, spec: Value, diffs: Sequence[float], ref_mean: float,
                method: str) -> Judgement:
    """Paired t over per-item differences (on ln for LOG values), mapped to the unit."""
    p = stats.paired_mean_diff(list(diffs))
    j.n, j.df = p["n"], (p["df"] or None)
    if spec.change == RELATIVE:
        _relative_unit(j, spec, ref_mean)   # states the unit (the value's own at 0)
    if p["n"] < 2:
        j.method = method + " (one item: no interval)"
        j.change = _map(j, spec, p["mean"], ref_mean)
        return j
    q = tq(1 - (1 - j.level) / 2, p["df"])
    j.change = _map(j, spec, p["mean"], ref_mean)
    j.low = _map(j, spec, p["mean"] - q * p["se"], ref_mean)
    j.high = _map(j, spec, p["mean"] + q * p["se"], ref_mean)
    j.se = _se(spec, p["mean"], p["se"], ref_mean)
    j.ln_se = p["se"] if spec.change == LOG else None
    j.method = method
    return j


def _map(j: Judgement, spec: Value, d: float, ref_mean: float) -> float:
    if spec.change == LOG:
        return 100.0 * math.expm1(d) if d < 700 else math.inf
    if spec.change == RELATIVE:
        return 100.0 * d / abs(ref_mean) if ref_mean else d
    return d * spec.scale


def _se(spec: Value, d: float, se: float, ref_mean: float) -> float:
    """The change's standard error in its unit (delta method at the point for LOG)."""
    if spec.change == LOG:
        return 100.0 * math.exp(d) * se
    if spec.change == RELATIVE:
        return 100.0 * se / abs(ref_mean) if ref_mean else se
    return se * spec.scale


def _identity(spec: Value, reference: Mapping[str, Any], candidate: Mapping[str, Any]
              ) -> str:
    """Why the two records' items are not the same items ('' when they are)."""
    assert spec.pairing is not None
    for key in spec.pairing.identity:
        a, b = _lookup(reference, key), _lookup(candidate, key)
        if a is None and b is None:
            continue
        if a is None or b is None:
            side = "reference" if a is None else "candidate"
            return f"{key} not recorded in the {side}: cannot check that the items are the same"
        if a != b:
            return f"{key} changed ({_short(a)} → {_short(b)})"
    return ""


def _short(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return f"{len(x)} values"
    s = str(x)
    return s[:12] + "…" if len(s) > 16 else s


def _paired(j: Judgement, spec: Value, reference: Mapping[str, Any],
            candidate: Mapping[str, Any]) -> Judgement:
    pairing = spec.pairing
    assert pairing is not None
    j.n_unit = pairing.unit
    if pairing.available is not None:
        j.available = pairing.available(reference)
    if pairing.item_size is not None:
        j.item_size = pairing.item_size(reference)
    why = _identity(spec, reference, candidate)
    if why:
        return _not(j, f"not the same {pairing.unit}: {why}")
    rd, cd = reference.get("details") or {}, candidate.get("details") or {}
    ri, ci = pairing.values_of(rd), pairing.values_of(cd)
    if ri is None or ci is None:
        side = "reference" if ri is None else "candidate"
        return _not(j, f"no per-{pairing.unit.rstrip('s')} data in the {side}: cannot pair")
    if pairing.ids:
        rids, cids = rd.get(pairing.ids) or [], cd.get(pairing.ids) or []
        if len(rids) != len(ri) or len(cids) != len(ci):
            return _not(j, f"{pairing.ids} do not match the per-item data")
        rmap, cmap = dict(zip(rids, ri)), dict(zip(cids, ci))
        shared = set(rmap) & set(cmap)
        nests = pairing.nested and (shared == set(rmap) or shared == set(cmap))
        if set(rmap) != set(cmap) and not nests:
            return _not(j, f"not the same {pairing.unit}: {len(set(rmap) ^ set(cmap))} ids "
                           "differ")
        if set(rmap) != set(cmap):
            j.notes.append(f"paired on the {len(shared)} {pairing.unit} both scored "
                           f"({len(rmap)} and {len(cmap)})")
        order = sorted(shared)
        ri, ci = [rmap[k] for k in order], [cmap[k] for k in order]
    elif len(ri) != len(ci):
        if not pairing.nested:
            return _not(j, f"not the same {pairing.unit}: {len(ri)} vs {len(ci)}")
        k = min(len(ri), len(ci))   # in order: the first k are the same items
        j.notes.append(f"paired on the first {k} {pairing.unit} ({len(ri)} and {len(ci)})")
        ri, ci = ri[:k], ci[:k]
    if pairing.binary:
        return _flips(j, spec, ri, ci)
    rf = [number(x) for x in ri]
    cf = [number(x) for x in ci]
    if any(x is None for x in rf + cf):
        return _not(j, f"a per-{pairing.unit.rstrip('s')} value is not a finite number")
    if spec.change == LOG:
        if any(x <= 0 for x in rf + cf):   # type: ignore[operator]
            return _not(j, "a per-item value is not positive: no ratio")
        diffs = [math.log(c) - math.log(r) for r, c in zip(rf, cf)]  # type: ignore[arg-type]
        what = f"ln {spec.name} ratio"
    else:
        diffs = [c - r for r, c in zip(rf, cf)]  # type: ignore[operator]
        what = spec.name
    ref_mean = math.fsum(rf) / len(rf)   # type: ignore[arg-type]
    return _from_diffs(j, spec, diffs, ref_mean,
                       f"paired t on per-{pairing.unit.rstrip('s')} {what} "
                       f"({len(diffs)} {pairing.unit})")


def _flips(j: Judgement, spec: Value, ri: Sequence[Any], ci: Sequence[Any]) -> Judgement:
    """Exact McNemar on the flipped items, Newcombe's paired interval at the level."""
    p = stats.paired_accuracy(ri, ci)
    z = tq(1 - (1 - j.level) / 2, None)
    both = sum(1 for a, b in zip(ri, ci) if a and b)
    neither = sum(1 for a, b in zip(ri, ci) if not a and not b)
    lo, hi = stats.newcombe_paired_ci(both, p["flips_gained"], p["flips_lost"], neither, z)
    # newcombe_paired_ci(first = candidate-only right) gives candidate - reference
    j.n, j.df = p["n"], None
    j.flips = (p["flips_gained"], p["flips_lost"])
    j.discordant = (p["flips_gained"] + p["flips_lost"]) / p["n"]
    j.change, j.low, j.high = p["diff"] * spec.scale, lo * spec.scale, hi * spec.scale
    # the error of a paired difference of proportions, from the discordant share
    j.se = spec.scale * math.sqrt(max(j.discordant - p["diff"] ** 2, 0.0) / p["n"]) or None
    j.p_value = p["p_value"]
    j.method = (f"exact McNemar on the flips ({p['flips_lost']} lost, {p['flips_gained']} "
                f"gained of {p['n']} {j.n_unit}, p = {p['p_value']:.2g}); Newcombe paired "
                "interval")
    return j


def _samples(v: Mapping[str, Any]) -> tuple[list[float], float | None, int]:
    """(positive samples, sd, n) of a repeated value."""
    samples = [x for x in (number(s) for s in v.get("samples") or []) if x is not None and x > 0]
    n = len(samples) or int(number(v.get("n")) or 1)
    sd = number(v.get("sd"))
    if sd is None and number(v.get("stderr")) is not None:
        sd = float(v["stderr"]) * math.sqrt(n)
    return samples, sd, n


def _ln_moments(v: Mapping[str, Any], mean: float) -> tuple[float, float, int]:
    """(mean of ln, variance of ln of one sample, n) from the samples, else the sd."""
    samples, sd, n = _samples(v)
    if len(samples) >= 2:
        logs = [math.log(s) for s in samples]
        m = math.fsum(logs) / len(logs)
        return m, math.fsum((x - m) ** 2 for x in logs) / (len(logs) - 1), len(logs)
    return math.log(mean), ((sd or 0.0) / mean) ** 2, max(n, 1)


def _repetitions(j: Judgement, spec: Value, rv: Mapping[str, Any], cv: Mapping[str, Any]
                 ) -> Judgement:
    """Welch t on ln over the two runs' repetitions (independent runs: never paired)."""
    assert j.reference is not None and j.candidate is not None
    j.n_unit = "repetitions"
    if j.reference <= 0 or j.candidate <= 0:
        return _not(j, "a repeated value must be positive")
    mb, vb, nb = _ln_moments(rv, j.reference)
    mc, vc, nc = _ln_moments(cv, j.candidate)
    diff = math.log(j.candidate / j.reference)
    se2 = (vb / nb if nb > 1 else 0.0) + (vc / nc if nc > 1 else 0.0)
    j.n = min(nb, nc)
    j.change = 100.0 * math.expm1(diff)
    if se2 <= 0:
        j.method = "no spread stored: the tolerance alone"
        return j
    denom = sum((v / n) ** 2 / (n - 1) for v, n in ((vb, nb), (vc, nc)) if n > 1)
    j.df = max(1, int(se2 ** 2 / denom)) if denom > 0 else 1
    q = tq(1 - (1 - j.level) / 2, j.df)
    half = q * math.sqrt(se2)
    j.low, j.high = 100.0 * math.expm1(diff - half), 100.0 * math.expm1(diff + half)
    j.se = 100.0 * math.exp(diff) * math.sqrt(se2)
    j.ln_se = math.sqrt(se2)
    j.method = f"Welch t on ln {spec.name} ({nb} + {nc} repetitions)"
    return j


def _unpaired(j: Judgement, spec: Value, rv: Mapping[str, Any], cv: Mapping[str, Any]
              ) -> Judgement:
    """The two runs' stored errors as independent: wider than paired on the same items."""
    assert j.reference is not None and j.candidate is not None
    rx, cx = j.reference, j.candidate
    eb, ec = number(rv.get("stderr")) or 0.0, number(cv.get("stderr")) or 0.0
    j.n = int(number(cv.get("n")) or 0) or None
    if spec.change == LOG:
        diff = math.log(cx / rx)
        se = math.hypot(eb / rx, ec / cx)
        j.change = 100.0 * math.expm1(diff)
        if se > 0:
            q = tq(1 - (1 - j.level) / 2, None)
            j.low, j.high = 100.0 * math.expm1(diff - q * se), 100.0 * math.expm1(diff + q * se)
            j.se = 100.0 * math.exp(diff) * se
            j.ln_se = se
    else:
        k = spec.scale if spec.change == POINTS else _relative_unit(j, spec, rx)
        j.change = (cx - rx) * k
        se = math.hypot(eb, ec) * k
        if se > 0:
            q = tq(1 - (1 - j.level) / 2, None)
            j.low, j.high, j.se = j.change - q * se, j.change + q * se, se
    j.method = ("unpaired normal interval from the stored errors (conservative)" if j.se
                else "no stored error: the tolerance alone")
    return j


def tolerance_in_unit(j: Judgement, spec: Value, tolerance: float) -> float:
    """The tolerance in the judgement's unit, raised to the value's absolute ``floor``
    (a relative tolerance of a tiny reference would call noise a regression)."""
    if not spec.floor or j.reference is None:
        return tolerance
    if j.unit not in ("%", "points"):   # a zero reference: the change is in its own unit
        return spec.floor
    if spec.change in (RELATIVE, LOG) and j.reference:
        return max(tolerance, 100.0 * spec.floor / abs(j.reference))
    return max(tolerance, spec.floor * spec.scale)
