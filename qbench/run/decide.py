"""``qbench run SUITE --until-decided``: measure more only where a decision is still open.

After the suite's own sample, ``open_variants`` (given by the caller: the recommendation's
rule, which lives in the report layer) names the variants whose decision is still open at the
sequential plan's level. Exactly those - and their base, which their chunks are paired with -
get the next look's chunks (qbench.results.sequential: the sample times ``growth``, up to
``[decide] max_chunks`` or the text's end); a larger perplexity cell takes the chunks a
smaller one of its family scored (qbench.run.runner.reusable), so a look costs only its new
chunks. It stops when nothing is open or the plan's last look is made; what stayed open at
the ceiling is said, never guessed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

from qbench.errors import QbenchError
from qbench.results.sequential import level, looks, next_look
from qbench.results.store import Store
from qbench.run.executors import Executor
from qbench.run.runner import run_suite
from qbench.suite.config import Suite
from qbench.suite.identity import cell_id, variant_name
from qbench.suite.plan import Cell, PlanContext

SAMPLED = "perplexity"   # the metric whose chunks the plan grows (ΔPPL decides the loss)

# records, the plan's level -> {(model id, backend, variant name): why it is open}
OpenVariants = Callable[[list[dict[str, Any]], float], dict[tuple[str, str, str], str]]


@dataclass
class DecideSummary:
    plan: list[int]
    level: float
    rounds: list[dict[str, Any]] = field(default_factory=list)
    open_at_ceiling: dict[tuple[str, str, str], str] = field(default_factory=dict)
    failed: bool = False


def ceiling(suite: Suite, records: list[dict[str, Any]]) -> int:
    """The plan's last look: [decide] max_chunks, capped by the chunks the text holds (from
    a stored perplexity record)."""
    held = [int(d["tokens_in_text"]) // int(d["ctx"]) for r in records
            if r["metric"] == SAMPLED and r["status"] == "ok"
            for d in [r.get("details") or {}] if d.get("tokens_in_text") and d.get("ctx")]
    if not held:
        raise QbenchError("--until-decided needs an ok perplexity cell (to know how many "
                          "chunks the text holds); none is stored")
    cap = max(held)
    return min(cap, suite.decide.max_chunks) if suite.decide.max_chunks else cap


def run_until_decided(suite: Suite, ctx: PlanContext, store: Store, *,
                      open_variants: OpenVariants, console: Console,
                      executor: Executor | None = None) -> DecideSummary:
    """Grow the sample of the open variants look by look (see the module docstring)."""
    options = suite.metrics.get(SAMPLED)
    if options is None or options.chunks <= 0:
        raise QbenchError("--until-decided grows [metrics.perplexity] chunks: the suite must "
                          "measure perplexity on a positive number of chunks",
                          file=str(suite.path), key="metrics.perplexity.chunks")
    plan = looks(options.chunks, ceiling(suite, store.records()), suite.decide.growth)
    lvl = level(suite.decide.alpha, len(plan))
    out = DecideSummary(plan, lvl)
    spec = {"alpha": suite.decide.alpha, "looks": plan}
    console.print(f"[bold]until decided[/bold]: looks at {plan} chunks, each interval at "
                  f"{100 * lvl:.3g} % (alpha {suite.decide.alpha:g} spent over {len(plan)} "
                  "looks)")
    while True:
        records = store.records()
        open_now = open_variants(records, lvl)
        if not open_now:
            console.print(f"[green]every decision made[/green] after {len(out.rounds)} more "
                          f"look(s): " + ("; ".join(f"{r['chunks']} chunks for "
                                                    f"{', '.join(r['variants'])}"
                                                    for r in out.rounds) or "none needed"))
            return out
        # each open variant's next look, from the chunks it has now
        groups: dict[int, dict[tuple[str, str, str], str]] = {}
        for v, why in open_now.items():
            nxt = next_look(plan, scored_chunks(records, suite.name, v))
            if nxt is None:
                if v not in out.open_at_ceiling:
                    console.print(f"[yellow]still open at the ceiling ({plan[-1]} chunks)"
                                  f"[/yellow]: {escape('/'.join(v))}: {escape(why)}")
                out.open_at_ceiling[v] = why
            else:
                groups.setdefault(nxt, {})[v] = why
        if not groups:
            return out
        nxt = min(groups)
        todo = groups[nxt]
        ids = _cells_for(suite, todo)
        console.print(f"look {plan.index(nxt) + 1} of {len(plan)}: {nxt} chunks for "
                      + escape(", ".join(f"{'/'.join(v)} ({why})" for v, why in todo.items())))
        grown = dataclasses.replace(suite, metrics={**suite.metrics,
                                                    SAMPLED: dataclasses.replace(options,
                                                                                 chunks=nxt)})
        summary = run_suite(grown, ctx, store, only=tuple(ids), console=console,
                            executor=executor, select=_alone,
                            decide=spec | {"look": plan.index(nxt) + 1})
        out.rounds.append({"chunks": nxt, "variants": sorted("/".join(v) for v in todo),
                           "cells": len(ids), "counts": summary.counts})
        if summary.any_failed:
            out.failed = True
            console.print("[red]a cell of this look failed: stopping[/red]")
            return out


def scored_chunks(records: list[dict[str, Any]], suite: str, variant: tuple[str, str, str]
                  ) -> int:
    """The most chunks an ok perplexity cell of ``variant`` (model, backend, name) scored."""
    model, backend, name = variant
    return max((int((r.get("details") or {}).get("chunks") or 0) for r in records
                if r["suite"] == suite and r["metric"] == SAMPLED and r["status"] == "ok"
                and r["model"]["id"] == model and r["variant"].get("backend") == backend
                and variant_name(r["variant"]) == name), default=0)


def _cells_for(suite: Suite, open_now: dict[tuple[str, str, str], str]) -> list[str]:
    """The perplexity cell ids of the open variants and of their bases."""
    ids = set()
    for model in suite.models:
        for variant in suite.variants_for(model):
            if (model.id, variant.backend, variant.name) not in open_now:
                continue
            ids.add(cell_id(model.id, variant.backend, variant.name, SAMPLED))
            base = suite.base_variant(model, variant.backend)
            if base is not None:
                ids.add(cell_id(model.id, base.backend, base.name, SAMPLED))
    return sorted(ids)


def _alone(cells: list[Cell]) -> list[Cell]:
    """A look's perplexity cells score their own chunks only (no shared KLD pass: the KLD
    cells keep the suite's sample)."""
    return [dataclasses.replace(c, companions={}) for c in cells]
