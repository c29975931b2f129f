"""``qbench compare BASELINE CANDIDATE``: what changed between two result sets - the CI gate.

Cells are matched by (suite, model, backend, variant, metric). For each gated value a change is a
**regression** when it is worse than the baseline by more than ``--threshold-pct`` (relative)
*and* by more than ``--sigma`` × the combined noise sqrt(se_base² + se_candidate²), where the
noise of a value is its stored standard error - or, for speed, the standard deviation over
repetitions. Worse follows the metric's direction (``higher_is_better``). A cell that was ok in
the baseline and failed, timed out or crashed in the candidate is a regression too.

Exit codes: 0 no regression, 2 at least one regression, 1 unreadable or empty input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import QbenchError

EXIT_OK, EXIT_USER, EXIT_REGRESSION = 0, 1, 2
FAILED = ("failed", "timeout", "crashed")

# metric -> {value name: higher_is_better}; the metric's primary value is always gated too
GATED: dict[str, dict[str, bool]] = {
    "perplexity": {"ppl": False},
    "kld": {"kld_mean": False, "same_top_pct": True},
    "mmlu": {"acc": True},
    "speed": {"pp_tokens_per_s": True, "tg_tokens_per_s": True},
    "sanity": {"degenerate": False},
}
# values only reported, never gated: sizes change when a recipe changes, on purpose; bits per
# byte moves with PPL (gated) but has no stored error; a ratio near 0 has no useful relative change
REPORTED: dict[str, tuple[str, ...]] = {"footprint": ("file_size_mb", "bpw"),
                                       "perplexity": ("bits_per_byte",),
                                       "kld": ("ln_ppl_ratio",)}


@dataclass
class Change:
    cell: str
    metric: str
    value: str
    baseline: float | None
    candidate: float | None
    noise: float | None           # sigma-free combined noise sqrt(se_b^2 + se_c^2)
    change_pct: float | None      # signed relative change, candidate vs baseline
    worse_pct: float | None       # relative change in the "worse" direction (> 0: worse)
    z: float | None               # |difference| / combined noise
    higher_is_better: bool | None
    gated: bool
    regression: bool
    why: str = ""


@dataclass
class Comparison:
    baseline: str
    candidate: str
    threshold_pct: float
    sigma: float
    changes: list[Change] = field(default_factory=list)
    newly_failing: list[dict[str, Any]] = field(default_factory=list)
    newly_ok: list[str] = field(default_factory=list)
    only_baseline: list[str] = field(default_factory=list)
    only_candidate: list[str] = field(default_factory=list)
    env_differences: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regression]

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.newly_failing)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["regressions"] = len(self.regressions)
        d["newly_failing_count"] = len(self.newly_failing)
        d["exit_code"] = EXIT_REGRESSION if self.failed else EXIT_OK
        return d


def cell_key(rec: dict[str, Any]) -> tuple[str, str, str, str, str]:
    v = rec.get("variant") or {}
    quant = str(v.get("quant", "?")) + (f"@{v['source']}" if v.get("source") else "")
    return (rec["suite"], rec["model"]["id"], str(v.get("backend")), quant, rec["metric"])


def _label(key: tuple[str, ...]) -> str:
    return "/".join(key)


def _direction(metric: str, name: str) -> bool | None:
    if name in GATED.get(metric, {}):
        return GATED[metric][name]
    try:
        from .metrics import metric_info
        info = metric_info(metric)
    except (KeyError, ImportError, AttributeError):
        return None
    return info.higher_is_better if name == info.primary else None


def _noise(metric: str, v: dict[str, Any]) -> float | None:
    if metric == "speed":
        return v.get("sd") if v.get("sd") is not None else v.get("stderr")
    return v.get("stderr")


def compare_values(key: tuple[str, ...], metric: str, name: str, b: dict[str, Any],
                   c: dict[str, Any], *, threshold_pct: float, sigma: float,
                   gated: bool) -> Change | None:
    bv, cv = b.get("value"), c.get("value")
    if not isinstance(bv, (int, float)) or not isinstance(cv, (int, float)):
        return None
    if any(isinstance(x, float) and math.isnan(x) for x in (bv, cv)):
        return None
    hib = _direction(metric, name)
    nb, nc = _noise(metric, b), _noise(metric, c)
    noise = math.hypot(nb or 0.0, nc or 0.0) if (nb is not None or nc is not None) else None
    diff = cv - bv
    change_pct = 100.0 * diff / abs(bv) if bv else (0.0 if diff == 0 else math.copysign(
        math.inf, diff))
    worse_pct = None
    if hib is not None:
        worse_pct = -change_pct if hib else change_pct
    z = abs(diff) / noise if noise else (0.0 if diff == 0 else math.inf)
    regression = False
    why = ""
    if gated and hib is not None and worse_pct is not None and worse_pct > threshold_pct:
        beyond_noise = noise is None or noise == 0 or abs(diff) > sigma * noise
        if beyond_noise:
            regression = True
            why = (f"{worse_pct:.2f} % worse (> {threshold_pct:g} %) and "
                   + (f"{z:.1f} σ (> {sigma:g})" if noise else "no stored noise"))
        else:
            why = f"{worse_pct:.2f} % worse but within {sigma:g} × noise ({z:.1f} σ)"
    return Change(cell=_label(key), metric=metric, value=name, baseline=bv, candidate=cv,
                  noise=noise, change_pct=change_pct, worse_pct=worse_pct,
                  z=None if math.isinf(z) else z, higher_is_better=hib, gated=gated,
                  regression=regression, why=why)


def compare_records(baseline: list[dict[str, Any]], candidate: list[dict[str, Any]], *,
                    threshold_pct: float = 2.0, sigma: float = 3.0, baseline_name: str = "",
                    candidate_name: str = "") -> Comparison:
    """The pure comparison of two record lists."""
    b_by = {cell_key(r): r for r in baseline}
    c_by = {cell_key(r): r for r in candidate}
    out = Comparison(baseline=baseline_name, candidate=candidate_name,
                     threshold_pct=threshold_pct, sigma=sigma)
    out.only_baseline = sorted(_label(k) for k in b_by.keys() - c_by.keys())
    out.only_candidate = sorted(_label(k) for k in c_by.keys() - b_by.keys())
    for key in sorted(b_by.keys() & c_by.keys()):
        b, c = b_by[key], c_by[key]
        metric = key[-1]
        if b["status"] == "ok" and c["status"] in FAILED:
            out.newly_failing.append({"cell": _label(key), "status": c["status"],
                                      "error": (c.get("error") or "")[:500]})
            continue
        if b["status"] in FAILED and c["status"] == "ok":
            out.newly_ok.append(_label(key))
        if b["status"] != "ok" or c["status"] != "ok":
            continue
        gated = GATED.get(metric, {})
        names = list(gated) + [n for n in REPORTED.get(metric, ()) if n not in gated]
        try:
            from .metrics import metric_info
            primary = metric_info(metric).primary
            if primary not in names:
                names.insert(0, primary)
        except (KeyError, ImportError, AttributeError):
            pass
        bvals, cvals = b.get("values") or {}, c.get("values") or {}
        for name in names:
            if name in bvals and name in cvals:
                ch = compare_values(key, metric, name, bvals[name], cvals[name],
                                    threshold_pct=threshold_pct, sigma=sigma,
                                    gated=name not in REPORTED.get(metric, ()))
                if ch:
                    out.changes.append(ch)
    out.env_differences = _env_differences(baseline, candidate)
    return out


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
    return env.get_template("compare.html").render(c=cmp, regressions=cmp.regressions)


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.4g}"


def print_text(cmp: Comparison, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{cmp.baseline} → {cmp.candidate} (threshold {cmp.threshold_pct:g} %, "
                        f"{cmp.sigma:g} σ)")
    for col in ("cell", "value", "baseline", "candidate", "change %", "σ", ""):
        table.add_column(col, overflow="fold")
    shown = [c for c in cmp.changes if c.regression or (c.change_pct and abs(c.change_pct) > 0)]
    for ch in shown:
        mark = "[red]REGRESSION[/red]" if ch.regression else ("" if not ch.why else ch.why)
        table.add_row(ch.cell, ch.value, _fmt(ch.baseline), _fmt(ch.candidate),
                      "–" if ch.change_pct is None else f"{ch.change_pct:+.2f}",
                      _fmt(ch.z), mark)
    console.print(table)
    for f in cmp.newly_failing:
        console.print(f"[red]newly failing[/red]: {f['cell']}: {f['status']}: {f['error'][:200]}")
    for name in cmp.newly_ok:
        console.print(f"[green]fixed[/green]: {name}")
    if cmp.only_baseline:
        console.print(f"[yellow]only in baseline[/yellow] ({len(cmp.only_baseline)}): "
                      + ", ".join(cmp.only_baseline[:10]))
    if cmp.only_candidate:
        console.print(f"only in candidate ({len(cmp.only_candidate)}): "
                      + ", ".join(cmp.only_candidate[:10]))
    for d in cmp.env_differences:
        console.print(f"[yellow]environment differs[/yellow]: {d}")
    n = len(cmp.regressions) + len(cmp.newly_failing)
    console.print(f"[red]{n} regression(s)[/red]" if n else
                  f"[green]no regression[/green] ({len(cmp.changes)} values compared)")


def run_compare(args: argparse.Namespace, console: Any) -> int:
    """The CLI command (wired in qbench.cli.cmd_compare)."""
    from .store import load_results

    try:
        baseline = load_results([Path(args.baseline)])
        candidate = load_results([Path(args.candidate)])
    except (QbenchError, OSError, ValueError) as exc:
        print(f"qbench compare: error: {exc}", file=sys.stderr)
        return EXIT_USER
    for name, recs in ((args.baseline, baseline), (args.candidate, candidate)):
        if not recs:
            print(f"qbench compare: error: {name}: no readable cell records", file=sys.stderr)
            return EXIT_USER
    cmp = compare_records(baseline, candidate, threshold_pct=args.threshold_pct,
                          sigma=args.sigma, baseline_name=str(args.baseline),
                          candidate_name=str(args.candidate))
    if getattr(args, "out", None):
        from .fsutil import atomic_write_text
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
