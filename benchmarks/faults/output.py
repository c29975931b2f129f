"""The fault table as Markdown, and its totals: what `main()` prints and writes as JSON."""

from __future__ import annotations

from typing import Any

from .common import Row, yes


# -- output ----------------------------------------------------------------------------------
def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row]) -> str:
    head = ("| fault | expected | observed | survived | finished before | lost after |\n"
            "| --- | --- | --- | --- | --- | --- |")
    body = [f"| {cell(r.fault)} | {cell(r.expected)} | {cell(r.observed)} | "
            f"{yes(r.survived)} | {'' if r.before is None else r.before} | {r.lost} |"
            for r in rows]
    return "\n".join([head, *body])


def totals(rows: list[Row]) -> dict[str, int]:
    return {"faults_tried": len(rows), "survived": sum(r.survived for r in rows),
            "results_lost": sum(r.lost for r in rows)}
