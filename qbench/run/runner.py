"""`qbench run`: plan the suite, skip finished cells, run the rest one process each, store each
outcome the moment it is known, and show progress.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from qbench.host import envinfo
from qbench.suite.config import Suite
from qbench.run.child import Outcome, run_in_child
from qbench.metrics import metric_module
from qbench.suite.plan import Cell, PlanContext, expand
from qbench.results.schema import SCHEMA_VERSION
from qbench.errors import StoreError
from qbench.results.store import Store


@dataclass(frozen=True)
class WorkItem:
    """One cell to run: its spec, the job the worker reads, where its log goes."""

    cell: Cell
    job: dict[str, Any]
    log_path: Path
    timeout_s: float
    memory_limit_mb: int


class Executor(Protocol):
    """Runs work items and yields each outcome as soon as it is known (order may differ)."""

    name: str

    def run(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, Outcome]]: ...


class LocalExecutor:
    """One cell at a time, each in a child process on this machine."""

    name = "local"

    def run(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, Outcome]]:
        for item in items:
            yield item, run_in_child(item.job, log_path=item.log_path, timeout_s=item.timeout_s,
                                     memory_limit_mb=item.memory_limit_mb)


@dataclass
class RunSummary:
    run_id: str
    counts: dict[str, int] = field(default_factory=dict)   # status -> cells (this run)
    cached: int = 0                                         # finished before, not rerun
    failed_ids: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    recorded_failures: list[str] = field(default_factory=list)  # failed earlier, not rerun

    @property
    def any_failed(self) -> bool:
        """Does the suite, as stored now, hold failed cells? (so a retry of a failing suite
        without --rerun-failed does not turn a CI job green)"""
        return bool(self.failed_ids or self.recorded_failures)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def is_done(record: dict[str, Any] | None, rerun_failed: bool) -> bool:
    """Finished cells are not rerun; failures only with --rerun-failed; 'skipped' is retried
    (its reason, e.g. a missing extra, may be gone) unless the metric does not apply."""
    if record is None:
        return False
    status = record.get("status")
    if status == "ok":
        return True
    if status == "skipped":  # retried (a missing extra may be installed now) unless permanent
        return bool((record.get("details") or {}).get("not_applicable"))
    return not rerun_failed


def kld_keys(cells: list[Cell]) -> dict[tuple[str, Any], str]:
    """(model id, variant) -> the key of that variant's KLD cell."""
    return {(c.model.id, c.variant): c.key for c in cells if c.metric == "kld"}


def companions_for(cell: Cell, suite: Suite, kld_cells: dict[tuple[str, Any], str]
                   ) -> dict[str, Any]:
    """Metrics a cell can serve in its own pass: the perplexity cell computes the KLD
    comparison when the kld metric scores exactly its tokens, and stores it under the key of
    the KLD cell of the same model and variant, which then only reads it (so a result is never
    read by a cell whose key differs: another library version, batch or GPU setting). Not part
    of the perplexity cell's key: its values are the same either way."""
    kld = suite.metrics.get("kld")
    if cell.metric != "perplexity" or kld is None or not cell.variant.measures("kld"):
        return {}
    ppl = cell.options
    if (kld.dataset, kld.ctx, kld.chunks) != (ppl.dataset, ppl.ctx, ppl.chunks):
        return {}
    key = kld_cells.get((cell.model.id, cell.variant))
    return {"kld": dataclasses.asdict(kld) | {"cell_key": key}} if key else {}


def job_for(cell: Cell, suite: Suite, ctx: PlanContext,
            kld_cells: dict[tuple[str, Any], str] | None = None) -> dict[str, Any]:
    base = suite.base_variant(cell.model, cell.variant.backend)
    return {"cell": cell.describe(),
            "companions": companions_for(cell, suite, kld_cells or {}),
            "base_dir": str(ctx.base_dir),
            "base_variant": dataclasses.asdict(base) | {"is_base": True} if base else None,
            "data_dir": str(ctx.data_dir) if ctx.data_dir else None,
            "cache_dir": str(ctx.cache_dir), "device": suite.defaults.device,
            "threads": suite.defaults.threads}


def make_record(cell: Cell, outcome: Outcome, run_id: str, started: str,
                env: dict[str, Any]) -> dict[str, Any]:
    spec = cell.describe()
    res = outcome.result
    return {
        "schema_version": SCHEMA_VERSION, "key": cell.key, "id": cell.id, "suite": cell.suite,
        "run_id": run_id, "model": spec["model"], "variant": spec["variant"],
        "metric": cell.metric, "metric_version": spec["metric_version"],
        "options": spec["options"], "run": spec["run"], "status": outcome.status,
        "error": outcome.error,
        "signal": outcome.signal, "stderr_tail": outcome.stderr_tail,
        "values": res.get("values", {}) if outcome.status == "ok" else {},
        "details": res.get("details", {}), "artifact": res.get("artifact", {}),
        "backend": res.get("backend", {}),
        "memory": {"peak_rss_mb": round(outcome.peak_rss_mb, 1),
                   "peak_vram_mb": (None if outcome.peak_vram_mb is None
                                    else round(outcome.peak_vram_mb, 1)),
                   "torch_max_allocated_mb": (res.get("torch_max_allocated_mb") or
                                              res.get("backend", {}).get(
                                                  "torch_max_allocated_mb")),
                   "vram_note": outcome.vram_note},
        "timings": {"started": started, "wall_s": round(outcome.wall_s, 3),
                    **res.get("timings", {})},
        "env": env,
    }


def headline(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"[red]{record['status']}[/red]: {escape((record.get('error') or '')[:160])}"
    info = metric_module(record["metric"]).INFO
    v = record["values"].get(info.primary, {})
    if v.get("value") is None:
        return "ok"
    err = f" ± {v['stderr']:.4g}" if v.get("stderr") else ""
    return f"{info.primary} = {v['value']:.4g}{err}"


def run_suite(suite: Suite, ctx: PlanContext, store: Store, *, only: tuple[str, ...] = (),
              rerun_failed: bool = False, console: Console | None = None,
              executor: Executor | None = None,
              select: Callable[[list[Cell]], list[Cell]] | None = None) -> RunSummary:
    """Run every cell of ``suite`` not already done; ``select`` narrows the plan (sharding)."""
    console = console or Console(stderr=True)
    executor = executor or LocalExecutor()
    cells = expand(suite, ctx, only=only)
    if select is not None:
        cells = select(cells)
    run_id = new_run_id()
    summary = RunSummary(run_id)
    t_start = time.monotonic()
    env = envinfo.collect()
    todo = []
    for cell in cells:
        record = store.load(cell.key)
        if is_done(record, rerun_failed):
            summary.cached += 1
            if record and record["status"] in ("failed", "timeout", "crashed"):
                summary.recorded_failures.append(cell.id)
        else:
            todo.append(cell)
    manifest: dict[str, Any] = {"run_id": run_id, "suite": suite.name,
                                "suite_file": str(suite.path), "started": _now(),
                                "cells_planned": len(cells), "cached": summary.cached,
                                "cells": [], "env": env, "finished": None}

    def checkpoint() -> None:
        """The run record on disk after every cell: a kill -9 leaves it, unfinished."""
        try:
            store.save_run(run_id, manifest)
        except (OSError, StoreError) as exc:
            console.print(f"[yellow]could not write the run record: {escape(str(exc))}")

    if todo:
        checkpoint()
    console.print(f"[bold]{suite.name}[/bold]: {len(cells)} cells, {summary.cached} already "
                  f"done, {len(todo)} to run (run {run_id})")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=len(todo))
        # the KLD cells the perplexity cells serve, even those --only / --shard left out
        keys = kld_keys(expand(suite, ctx) if (only or select is not None) else cells)
        items = [WorkItem(c, job_for(c, suite, ctx, keys), store.log_path(c.key),
                          suite.defaults.timeout_s, suite.defaults.memory_limit_mb) for c in todo]
        if items:
            progress.update(task, description=(f"[cyan]{escape(items[0].cell.id)}[/cyan]"
                                               if executor.name == "local"
                                               else f"[cyan]running on {executor.name}[/cyan]"))
        started = _now()
        try:
            for n_done, (item, outcome) in enumerate(executor.run(items), start=1):
                cell = item.cell
                record = make_record(cell, outcome, run_id, started, env)
                store.save(record)
                summary.counts[outcome.status] = summary.counts.get(outcome.status, 0) + 1
                if outcome.status in ("failed", "timeout", "crashed"):
                    summary.failed_ids.append(cell.id)
                manifest["cells"].append({"id": cell.id, "key": cell.key,
                                          "status": outcome.status, "wall_s": outcome.wall_s})
                checkpoint()
                progress.console.print(f"  {escape(cell.id)}: {headline(record)} "
                                       f"[dim]({outcome.wall_s:.1f} s)[/dim]")
                progress.advance(task)
                started = _now()
                if executor.name == "local" and n_done < len(items):
                    progress.update(
                        task, description=f"[cyan]{escape(items[n_done].cell.id)}[/cyan]")
        finally:
            summary.wall_s = time.monotonic() - t_start
            manifest.update(finished=_now(), wall_s=round(summary.wall_s, 2),
                            counts=summary.counts, interrupted=len(manifest["cells"]) < len(todo))
            try:
                store.save_run(run_id, manifest)
            except (OSError, StoreError) as exc:  # never mask the error that ended the run
                console.print(f"[yellow]could not write the run record: {escape(str(exc))}")
    return summary


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cell_rows(cells: list[Cell], store: Store) -> list[dict[str, Any]]:
    """For `qbench plan`: each cell and its stored status."""
    rows = []
    for c in cells:
        rec = store.load(c.key)
        rows.append({"id": c.id, "key": c.key, "status": rec["status"] if rec else "todo",
                     "base": c.is_base, **({"options": dataclasses.asdict(c.options)})})
    return rows


def default_cache_dir(suite_default: str = "", cli: str | None = None) -> Path:
    import os
    for candidate in (cli, os.environ.get("QBENCH_CACHE_DIR"), suite_default):
        if candidate:
            return Path(candidate).expanduser().resolve()
    return Path("~/.cache/qbench").expanduser()
