"""``qbench run SUITE --until-decided``: measure more only where a decision is still open.

After the suite's own sample, ``open_variants`` (given by the caller: the report's rules,
qbench.report.open_decisions) names the decisions still open at the sequential plan's level,
each with the metric whose sample settles it: perplexity chunks (a ΔPPL interval) or MMLU
questions. Exactly those variants - and their base, which they are paired with - get that
metric's next look (qbench.results.sequential: the sample times ``growth``, up to the [decide]
ceiling or the dataset's end); a larger cell takes the items a smaller one of its family scored
(qbench.run.runner.reusable), so a look costs only its new chunks or questions. It stops when
nothing is open or every open decision has reached its last look; one that would need far more
than the dataset holds (``Open.futile``) is not grown further; what stayed open is said, never
guessed.

One level for every look of every metric: 1 - alpha / K, K the largest number of looks any
grown metric's plan has (earlier runs' looks included), so each metric's plan spends at most
alpha.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

from qbench.errors import QbenchError
from qbench.results.sequential import FUTILE, Open, held_by, level, looks, next_look
from qbench.results.store import Store
from qbench.run.executors import Executor
from qbench.run.runner import run_suite
from qbench.suite.config import Suite
from qbench.suite.identity import cell_id, variant_name
from qbench.suite.plan import Cell, PlanContext

__all__ = ["FUTILE", "Open", "SAMPLES", "DecideSummary", "Sample", "run_until_decided"]

Variant = tuple[str, str, str]        # (model id, backend, variant name)
DecisionKey = tuple[str, str, str, str]   # a Variant and the metric whose sample settles it


@dataclass(frozen=True)
class Sample:
    """A metric whose sample the plan grows: the option that sizes it, its unit, the detail a
    record states its size in, and what its dataset holds."""
    metric: str
    option: str
    unit: str
    size_key: str
    holder: str                       # "the text", "the dataset"

    def size(self, record: dict[str, Any]) -> int:
        return int((record.get("details") or {}).get(self.size_key) or 0)

    def held(self, details: dict[str, Any]) -> int | None:
        return held_by(self.metric, details)


SAMPLES = {"perplexity": Sample("perplexity", "chunks", "chunks", "chunks", "the text"),
           "mmlu": Sample("mmlu", "subset", "questions", "n", "the dataset")}

# records, the plan's level -> {(model id, backend, variant name, metric): why it is open}
OpenVariants = Callable[[list[dict[str, Any]], float], dict[DecisionKey, Open]]


@dataclass
class DecideSummary:
    plans: dict[str, list[int]]       # metric -> the sizes of its planned looks
    level: float
    rounds: list[dict[str, Any]] = field(default_factory=list)
    open_at_ceiling: dict[DecisionKey, str] = field(default_factory=dict)
    futile: dict[DecisionKey, str] = field(default_factory=dict)
    failed: bool = False
    stalled: set[DecisionKey] = field(default_factory=set)   # a look added nothing to them

    @property
    def plan(self) -> list[int]:
        """The perplexity plan (the chunks of each look)."""
        return self.plans.get("perplexity", [])


def _ok(records: list[dict[str, Any]], suite: str, metric: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("suite", suite) == suite and r["metric"] == metric
            and r["status"] == "ok"]


def ceiling(suite: Suite, records: list[dict[str, Any]], sample: Sample) -> int | None:
    """The plan's last look for ``sample``: what its dataset holds (from a stored ok record),
    capped by [decide] max_chunks and max_tokens (perplexity) or max_questions (MMLU). None:
    no ok record says what the dataset holds."""
    oks = _ok(records, suite.name, sample.metric)
    held = [n for r in oks if (n := sample.held(r.get("details") or {}))]
    if not held:
        return None
    caps = [max(held)]
    spec = suite.decide
    if sample.metric == "perplexity":
        if spec.max_chunks:
            caps.append(spec.max_chunks)
        per_chunk = [int(d["scored_tokens"]) / int(d["chunks"]) for r in oks
                     for d in [r.get("details") or {}] if d.get("scored_tokens") and
                     d.get("chunks")]
        if spec.max_tokens and per_chunk:
            caps.append(max(1, int(spec.max_tokens // max(per_chunk))))
    elif sample.metric == "mmlu" and spec.max_questions:
        caps.append(spec.max_questions)
    return min(caps)


def plans_for(suite: Suite, records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The looks of every metric the plan can grow: measured with a sample that is a part of
    its dataset (MMLU ``subset = 0`` is every question: nothing to grow)."""
    out = {}
    for metric, sample in SAMPLES.items():
        options = suite.metrics.get(metric)
        first = int(getattr(options, sample.option, 0) or 0) if options is not None else 0
        top = ceiling(suite, records, sample) if first > 0 else None
        if top is not None:
            out[metric] = looks(first, top, suite.decide.growth)
    if "perplexity" not in out and "mmlu" not in out:
        raise QbenchError("--until-decided grows [metrics.perplexity] chunks or [metrics.mmlu] "
                          "subset: the suite must measure one of them on a positive sample, "
                          "with an ok cell stored (it tells how much the dataset holds)",
                          file=str(suite.path), key="metrics")
    return out


def run_until_decided(suite: Suite, ctx: PlanContext, store: Store, *,
                      open_variants: OpenVariants, console: Console,
                      executor: Executor | None = None) -> DecideSummary:
    """Grow the samples of the open decisions look by look (see the module docstring)."""
    plans = plans_for(suite, store.records())
    # looks an earlier run made under another plan (another ceiling) were spent too
    spent = {m: sorted(set(plan) | _looked_at(store.records(), suite.name, SAMPLES[m]))
             for m, plan in plans.items()}
    earlier = {m: sorted(set(spent[m]) - set(plan)) for m, plan in plans.items()}
    n_looks = max(len(s) for s in spent.values())
    lvl = level(suite.decide.alpha, n_looks)
    out = DecideSummary(plans, lvl)
    specs = {m: {"alpha": suite.decide.alpha, "looks": spent[m], "n_looks": n_looks}
             for m in plans}
    console.print("[bold]until decided[/bold]: "
                  + " and ".join(f"looks at {plan} {SAMPLES[m].unit}"
                                 + (f" (and {earlier[m]} of an earlier plan)" if earlier[m]
                                    else "") for m, plan in plans.items())
                  + f", each interval at {100 * lvl:.3g} % (alpha {suite.decide.alpha:g} "
                  f"per metric, spent over {n_looks} looks)")
    while True:
        records = store.records()
        open_now = open_variants(records, lvl)
        if not open_now:
            console.print(f"[green]every decision more data can settle is made[/green] after "
                          f"{len(out.rounds)} more "
                          f"look(s): " + ("; ".join(f"{r['size']} {r['unit']} for "
                                                    f"{', '.join(r['variants'])}"
                                                    for r in out.rounds) or "none needed"))
            return out
        groups = _next_looks(open_now, records, suite.name, plans, out, console)
        if not groups:
            console.print(f"[yellow]stopped with {len(open_now)} decision(s) open[/yellow] "
                          f"after {len(out.rounds)} more look(s): {len(out.open_at_ceiling)} at "
                          f"the ceiling, {len(out.futile)} beyond what the data can resolve")
            return out
        for metric in plans:            # each metric's smallest next look, then look again
            sizes = [n for m, n in groups if m == metric]
            if not sizes:
                continue
            nxt = min(sizes)
            todo = groups[(metric, nxt)]
            plan, sample = plans[metric], SAMPLES[metric]
            ids = _cells_for(suite, todo, metric)
            console.print(f"look {_look(plan, nxt)} of {len(plan)}: {nxt} {sample.unit} "
                          "for " + escape(", ".join(f"{'/'.join(v)} ({why})"
                                                     for v, why in todo.items())))
            options = suite.metrics[metric]
            grown = dataclasses.replace(suite, metrics={**suite.metrics, metric: dataclasses.
                                                        replace(options, **{sample.option: nxt})})
            summary = run_suite(grown, ctx, store, only=tuple(ids), console=console,
                                executor=executor, select=_alone,
                                decide=specs[metric] | {"look": _look(plan, nxt)})
            out.rounds.append({"metric": metric, "size": nxt, "unit": sample.unit,
                               "variants": sorted("/".join(v) for v in todo),
                               "cells": len(ids), "counts": summary.counts})
            if summary.any_failed:
                out.failed = True
                console.print("[red]a cell of this look failed: stopping[/red]")
                return out
            after = store.records()
            for v in todo:              # a look that scored nothing new is never asked again
                if scored(after, suite.name, v, sample) <= scored(records, suite.name, v, sample):
                    out.stalled.add((*v, metric))


def _next_looks(open_now: dict[DecisionKey, Open], records: list[dict[str, Any]], suite: str,
                plans: dict[str, list[int]], out: DecideSummary, console: Console
                ) -> dict[tuple[str, int], dict[Variant, str]]:
    """The open decisions that may grow, grouped by (metric, size of their next look); the
    others are noted (and said once) in ``out`` as futile or at their ceiling."""
    groups: dict[tuple[str, int], dict[Variant, str]] = {}
    for key, state in open_now.items():
        *v, metric = key
        variant: Variant = (v[0], v[1], v[2])
        name = f"{'/'.join(variant)} ({SAMPLES[metric].unit if metric in SAMPLES else metric})"
        plan = plans.get(metric)
        nxt = _capped(next_look(plan, now := scored(records, suite, variant, SAMPLES[metric])),
                      now, held(records, suite, variant, SAMPLES[metric])) if plan else None
        if state.futile():
            if key not in out.futile:
                console.print(f"[yellow]not measured further[/yellow]: {escape(name)}: "
                              f"{escape(state.why)}; about {state.needed:,} "
                              f"{SAMPLES[metric].unit} would decide it at 80 % power, "
                              f"{SAMPLES[metric].holder} holds {state.available:,}")
            out.futile[key] = state.why
        elif nxt is None or key in out.stalled:
            if key not in out.open_at_ceiling:
                top = f"{plan[-1]} {SAMPLES[metric].unit}" if plan else "not grown"
                console.print(f"[yellow]still open at the ceiling ({top})[/yellow]: "
                              f"{escape(name)}: {escape(state.why)}")
            out.open_at_ceiling[key] = state.why
        else:
            groups.setdefault((metric, nxt), {})[variant] = state.why
    return groups


def _look(plan: list[int], size: int) -> int:
    """The look (1-based) a sample of ``size`` is: the first planned size that holds it (a
    variant capped at its own dataset's end makes that look early)."""
    return next(i for i, n in enumerate(plan, start=1) if n >= size)


def _capped(nxt: int | None, now: int, own: int | None) -> int | None:
    """The next look of a variant whose own dataset holds ``own`` (its model's tokenizer cuts
    the text into fewer chunks than another model's): at most that, None once it is reached
    (else the same look would be asked for again and again, and nothing would grow)."""
    if nxt is None or own is None:
        return nxt
    return None if now >= own else min(nxt, own)


def _of(records: list[dict[str, Any]], suite: str, variant: Variant, sample: Sample
        ) -> list[dict[str, Any]]:
    model, backend, name = variant
    return [r for r in _ok(records, suite, sample.metric)
            if r["model"]["id"] == model and r["variant"].get("backend") == backend
            and variant_name(r["variant"]) == name]


def scored(records: list[dict[str, Any]], suite: str, variant: Variant, sample: Sample) -> int:
    """The largest sample an ok cell of ``variant`` (model, backend, name) scored."""
    return max((sample.size(r) for r in _of(records, suite, variant, sample)), default=0)


def held(records: list[dict[str, Any]], suite: str, variant: Variant, sample: Sample
         ) -> int | None:
    """What ``variant``'s own dataset holds (chunks of the text as its tokenizer cuts it, or
    questions), from its ok cells; None when none says."""
    sizes = [n for r in _of(records, suite, variant, sample)
             if (n := sample.held(r.get("details") or {}))]
    return max(sizes) if sizes else None


def _looked_at(records: list[dict[str, Any]], suite: str, sample: Sample) -> set[int]:
    """The sizes at which a look of --until-decided scored a cell of ``sample``'s metric."""
    return {sample.size(r) for r in _ok(records, suite, sample.metric)
            if r.get("decide") and sample.size(r)}


def _cells_for(suite: Suite, open_now: dict[Variant, str], metric: str) -> list[str]:
    """The ``metric`` cell ids of the open variants and of their bases."""
    ids = set()
    for model in suite.models:
        for variant in suite.variants_for(model):
            if (model.id, variant.backend, variant.name) not in open_now:
                continue
            ids.add(cell_id(model.id, variant.backend, variant.name, metric))
            base = suite.base_variant(model, variant.backend)
            if base is not None:
                ids.add(cell_id(model.id, base.backend, base.name, metric))
    return sorted(ids)


def _alone(cells: list[Cell]) -> list[Cell]:
    """A look's perplexity cells score their own chunks only (no shared KLD pass: the KLD
    cells keep the suite's sample)."""
    return [dataclasses.replace(c, companions={}) for c in cells]
