"""How a comparison reads: the terminal table and summary lines, and the HTML diff page, of a
:class:`qbench.results.compare.Comparison` (the gate's numbers are computed there, shown here)."""

from __future__ import annotations

import math
from typing import Any

from qbench.results.compare import (EXIT_NOT_COMPARABLE, EXIT_OK, Change, Comparison,
                                    family_level)


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
