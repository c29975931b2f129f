"""Which decisions are still open, and on which sample: the rule ``qbench run --until-decided``
grows by, taken from the report's own rules so that the run stops exactly when the report
would decide.

Two kinds of decision: the recommendation's (a variant whose ΔPPL interval straddles the
tolerated loss and that nothing else rules out: it fits the budget, is not degenerate, has no
MMLU drop) and each claim's measured verdict (a ΔPPL or MMLU interval that straddles the claim's
threshold: "indistinguishable at this sample size"). A ΔPPL decision is settled by more
perplexity chunks, an MMLU one by more questions; a KLD verdict is not grown (its cells keep
the suite's sample), and an MMLU verdict on a base that cannot discriminate is no decision at
all, so it never asks for questions.
"""

from __future__ import annotations

from typing import Any

from qbench.report.claims import ACC, UNRESOLVED, check_claims
from qbench.report.recommend import recommend
from qbench.report.table import variant_rows
from qbench.results.sequential import Open, held_by
from qbench.suite.identity import variant_name

# (model id, backend, variant name, metric whose sample settles it)
DecisionKey = tuple[str, str, str, str]

# a claim's evidence line -> the metric whose sample settles it
GROWN_BY = {"ΔPPL": "perplexity", "MMLU": "mmlu", ACC: "mmlu"}


def open_decisions(records: list[dict[str, Any]], level: float, *, tol: float,
                   budget_gib: float | None, kv_ctx: int) -> dict[DecisionKey, Open]:
    """The decisions open in ``records`` (one suite's) with intervals at ``level``."""
    rows = variant_rows(records, level=level)
    out: dict[DecisionKey, Open] = {}

    def add(key: DecisionKey, state: Open) -> None:
        out[key] = out[key].merged(state) if key in out else state

    for rec in recommend(rows, budget_gb=budget_gib, max_loss_pct=tol, kv_ctx=kv_ctx):
        for c in rec["candidates"]:
            if c["open"]:
                r, resolve = c["row"], c.get("resolve") or {}
                add(row_key(r, "perplexity"), Open(
                    f"recommendation: {c['interval']}", resolve.get("n"),
                    resolve.get("available")))
    by_label = {r["label"]: r for r in rows}
    for claim in check_claims(rows):
        for e in claim["measured"]:
            metric = GROWN_BY.get(e["metric"])
            row = by_label.get(e["subject"])
            if (e["verdict"] != UNRESOLVED or metric is None or row is None
                    or row.get("is_base")):
                continue
            add(row_key(row, metric), Open(f"claim {claim['id']}: {_first_clause(e['detail'])}",
                                           e.get("n_needed"), available(row, metric)))
    return out


def row_key(row: dict[str, Any], metric: str) -> DecisionKey:
    """The decision key of a report row: its model, backend and variant id part."""
    any_cell = next(iter(row["cells"].values()))
    return (row["model"], row["backend"], variant_name(any_cell["variant"]), metric)


def available(row: dict[str, Any], metric: str) -> int | None:
    """What the row's dataset holds for ``metric``: chunks of the text, or MMLU questions."""
    cell = (row.get("cells") or {}).get(metric) or {}
    return held_by(metric, cell.get("details") or {})


def _first_clause(detail: str) -> str:
    """The measured interval of an evidence line, without its threshold and resolve notes."""
    return detail.split(";")[0]
