"""``qbench compare`` as a command: read the two result sets, compare them
(:mod:`qbench.results.compare` computes every number), and show it - the terminal table and
summary lines, the HTML diff page, JSON - with the exit code the comparison decided."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from qbench.errors import QbenchError
from qbench.results.compare import (EXIT_NOT_COMPARABLE, EXIT_OK, EXIT_USER, Change,
                                    Comparison, _latest, compare_records, expected_cells,
                                    family_level, tolerances_from_args)


def render_html(cmp: Comparison) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("qbench", "report/templates"),
                      autoescape=select_autoescape(["html"]))
    env.filters["num"] = fmt_num
    env.filters["signed"] = fmt_signed
    env.filters["interval"] = fmt_interval
    return env.get_template("compare.html").render(c=cmp, regressions=cmp.regressions,
                                                   alpha=cmp.tolerances.alpha)


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


def fmt_detectable(ch: Change) -> str:
    """'≥ +0.71 %' (80 % power), with how the error was had."""
    if ch.detectable is None:
        return "–" if not ch.gated or not ch.comparable else "unknown"
    sign = "-" if ch.higher_is_better else "+"
    return f"{sign}{ch.detectable:.2g} {ch.unit}" + (
        "" if ch.detectable_how == "error of these data" else " †")


def _shown(cmp: Comparison) -> list[Change]:
    """Every gated value; reported-only values when they moved."""
    return [c for c in cmp.changes if c.gated or c.verdict != "reported" or c.change]


def print_text(cmp: Comparison, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{cmp.baseline} → {cmp.candidate}"))
    for col in ("cell", "value", "baseline", "candidate", "change", "interval", "test",
                "verdict", "detects (80 %)"):
        table.add_column(col, overflow="fold")
    for ch in _shown(cmp):
        mark = (f"[red]{ch.verdict}[/red]" if ch.regression or not ch.comparable
                else escape(ch.verdict))
        if ch.why:
            mark += ": " + escape(ch.why)
        if ch.config:
            mark += f" [yellow]({escape(ch.config)})[/yellow]"
        table.add_row(escape(ch.cell), ch.value, fmt_num(ch.baseline), fmt_num(ch.candidate),
                      fmt_signed(ch.change, ch.unit), fmt_interval(ch), escape(ch.test), mark,
                      fmt_detectable(ch))
    console.print(table)
    _print_cells(cmp, console)


def _print_cells(cmp: Comparison, console: Any) -> None:
    from rich.markup import escape

    for f in cmp.newly_failing:
        console.print(f"[red]REGRESSION: was ok, now {f['status']}[/red]: {escape(f['cell'])}: "
                      f"{escape(f['error'][:200])}")
    for name in cmp.missing:
        console.print(f"[red]REGRESSION: was ok, now missing[/red]: {escape(name)}")
    for name in cmp.newly_ok:
        console.print(f"[green]fixed[/green]: {escape(name)}")
    if cmp.no_longer_asked:
        console.print(f"no longer in the suite ({len(cmp.no_longer_asked)}): "
                      + escape(", ".join(cmp.no_longer_asked[:10])))
    if cmp.only_baseline:
        console.print(f"[yellow]only in baseline, not ok there[/yellow] "
                      f"({len(cmp.only_baseline)}): " + escape(", ".join(cmp.only_baseline[:10])))
    if cmp.only_candidate:
        console.print(f"only in candidate ({len(cmp.only_candidate)}): "
                      + escape(", ".join(cmp.only_candidate[:10])))
    for d in cmp.env_differences:
        console.print(f"[yellow]environment differs[/yellow]: {escape(d)}")
    n_cmp = len(cmp.compared)
    console.print(f"{n_cmp} gated values compared, {cmp.family} of them changed: simultaneous "
                  f"intervals at {100 * family_level(cmp.tolerances.alpha, cmp.family):.4g} % "
                  f"each (Bonferroni over the changed values: family-wise false-alarm rate "
                  f"{cmp.tolerances.alpha:g})")
    if any(c.detectable_how.startswith("error of a change") for c in cmp.changes):
        console.print("detects (80 %): the smallest worsening the gate would catch with 80 % "
                      "power at these intervals; † assuming a change spreads over the chunks or "
                      "questions as the baseline variant's own difference from its base does")
    code = cmp.exit_code
    n = len(cmp.regressions) + len(cmp.newly_failing) + len(cmp.missing)
    if n:
        console.print(f"[red]{n} regression(s)[/red]" + (f" (exit {code})" if code == 2 else ""))
    if cmp.reasons_not_comparable():
        head = "[red]NOT COMPARABLE[/red]" if code == EXIT_NOT_COMPARABLE else "also not comparable"
        console.print(f"{head} (exit {EXIT_NOT_COMPARABLE} unless a regression): "
                      + escape("; ".join(cmp.reasons_not_comparable()[:12])))
    if code == EXIT_OK:
        console.print(f"[green]no regression[/green] ({n_cmp} values compared)")


def run_compare(args: argparse.Namespace, console: Any) -> int:
    """The CLI command (wired in qbench.cli.cmd_compare)."""
    from qbench.results.store import load_results

    try:
        tolerances = tolerances_from_args(args)
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
    cmp = compare_records(baseline, candidate, tolerances=tolerances,
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
    return cmp.exit_code
