"""`qbench run`: plan the suite, skip finished cells, run the rest (the local executor: one worker
process per variant), store each cell's outcome the moment it is known, and show progress.

SIGTERM (what `timeout`, systemd, CI cancellation and Slurm send) and SIGHUP end a run the way
Ctrl-C does: the cells' process trees are killed, temporary folders removed, and the run record
finished with ``interrupted`` and the signal, instead of the process vanishing mid-write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from qbench.errors import StoreError
from qbench.host import envinfo
from qbench.metrics import known_metric_info
from qbench.results.schema import FAILED, make_record
from qbench.results.store import Store
from qbench.run.batching import run_order
from qbench.run.executors import Executor, LocalExecutor, WorkItem
from qbench.run.job import Job
from qbench.suite.config import Suite
from qbench.suite.plan import Cell, PlanContext, expand


@dataclass
class RunSummary:
    run_id: str
    counts: dict[str, int] = field(default_factory=dict)   # status -> cells (this run)
    cached: int = 0                                         # finished before, not rerun
    failed_ids: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    recorded_failures: list[str] = field(default_factory=list)  # failed earlier, not rerun
    # set when every cell this run tried was skipped for a missing dependency: the reasons,
    # whole (each names what to install); the run measured nothing
    missing_dependencies: list[str] = field(default_factory=list)

    @property
    def any_failed(self) -> bool:
        """Does the suite, as stored now, hold failed cells? (so a retry of a failing suite
        without --rerun-failed does not turn a CI job green)"""
        return bool(self.failed_ids or self.recorded_failures)


class Terminated(KeyboardInterrupt):
    """`qbench run` was sent SIGTERM or SIGHUP: unwound like Ctrl-C (cells killed, the record
    finished), and the process exits 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal = signal.Signals(signum).name
        self.exit_code = 128 + signum


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise :class:`Terminated` (once: a second one
    during the clean-up is ignored). Only in the main thread, where Python runs handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGTERM, signal.SIGHUP)

    def handler(signum: int, frame: object) -> None:
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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


def job_for(cell: Cell, suite: Suite, ctx: PlanContext, store: Store | None = None,
            decide: dict[str, Any] | None = None) -> Job:
    """The worker's job for ``cell``: its spec, its base and companions (attached by the
    planner), where things are, and a smaller finished cell of its family to take items from.
    ``decide``: the sequential plan the cell is measured under (--until-decided)."""
    base = cell.base_variant
    spec = cell.describe() | ({"decide": decide} if decide else {})
    return Job(cell=spec, base_dir=str(ctx.base_dir), cache_dir=str(ctx.cache_dir),
               data_dir=str(ctx.data_dir) if ctx.data_dir else None,
               device=suite.defaults.device, threads=int(cell.run["threads"]),
               base_variant=dataclasses.asdict(base) | {"is_base": True} if base else None,
               companions=cell.companions,
               reuse=reusable(store, cell) if store is not None else None)


def reusable(store: Store, cell: Cell) -> dict[str, Any] | None:
    """The largest finished cell of ``cell``'s family with a smaller sample (fewer chunks,
    a smaller nested subset): its items need not be scored again. None when there is none
    (or the metric's sample does not nest)."""
    sample = known_metric_info(cell.metric).sample_option if known_metric_info(cell.metric) \
        else None
    if not cell.family or not sample:
        return None
    want = getattr(cell.options, sample, 0)
    best: tuple[int, dict[str, Any]] | None = None
    for rec in store.records():
        if rec.get("family") != cell.family or rec.get("status") != "ok":
            continue
        n = int((rec.get("options") or {}).get(sample) or 0)
        if 0 < n and (want <= 0 or n < want) and (best is None or n > best[0]):
            best = (n, rec)
    if best is None:
        return None
    return {"key": best[1]["key"], sample: best[0], "details": best[1].get("details") or {}}


def headline(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"[red]{record['status']}[/red]: {escape((record.get('error') or '')[:160])}"
    info = known_metric_info(record["metric"])
    if info is None:
        return "ok"
    v = record["values"].get(info.primary, {})
    if v.get("value") is None:
        return "ok"
    err = f" ± {v['stderr']:.4g}" if v.get("stderr") else ""
    return f"{info.primary} = {v['value']:.4g}{err}"


def run_suite(suite: Suite, ctx: PlanContext, store: Store, *, only: tuple[str, ...] = (),
              rerun_failed: bool = False, console: Console | None = None,
              executor: Executor | None = None,
              select: Callable[[list[Cell]], list[Cell]] | None = None,
              decide: dict[str, Any] | None = None) -> RunSummary:
    """Run every cell of ``suite`` not already done; ``select`` narrows the plan (sharding);
    ``decide``: the sequential plan these cells are measured under (stored with them)."""
    console = console or Console(stderr=True)
    executor = executor or LocalExecutor()
    cells = expand(suite, ctx, only=only)   # companions attached on the whole plan
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
            if record and record["status"] in FAILED:
                summary.recorded_failures.append(cell.id)
        else:
            todo.append(cell)
    todo = run_order(todo)   # each variant's cells in the order its worker runs them
    manifest: dict[str, Any] = {"run_id": run_id, "suite": suite.name,
                                "suite_file": str(suite.path), "started": _now(),
                                "description": suite.suite.description,
                                "notes": list(suite.suite.notes),
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
    with terminate_as_interrupt(), Progress(*columns, console=console,
                                            transient=False) as progress:
        task = progress.add_task("starting", total=len(todo))
        items = [WorkItem(c, job_for(c, suite, ctx, store, decide), store.log_path(c.key),
                          suite.defaults.timeout_s, suite.defaults.memory_limit_mb,
                          tmp_dir=store.tmp_dir) for c in todo]
        if items:
            progress.update(task, description=(f"[cyan]{escape(items[0].cell.id)}[/cyan]"
                                               if executor.name == "local"
                                               else f"[cyan]running on {executor.name}[/cyan]"))
        started = _now()
        outcomes = executor.run(items)
        missing: dict[str, None] = {}          # reasons of skips for a missing dependency
        n_missing = 0
        stop: BaseException | None = None
        try:
            for n_done, (item, outcome) in enumerate(outcomes, start=1):
                cell = item.cell
                record = make_record(item.job.cell, outcome, run_id, started, env)
                store.save(record)
                summary.counts[outcome.status] = summary.counts.get(outcome.status, 0) + 1
                if outcome.status in FAILED:
                    summary.failed_ids.append(cell.id)
                if outcome.status == "skipped" and not (
                        record.get("details") or {}).get("not_applicable"):
                    missing[record.get("error") or "a dependency is missing"] = None
                    n_missing += 1
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
        except BaseException as exc:
            stop = exc
            raise
        finally:
            close = getattr(outcomes, "close", None)
            if close is not None:
                close()        # the executor kills what still runs before the record is final
            summary.wall_s = time.monotonic() - t_start
            manifest.update(finished=_now(), wall_s=round(summary.wall_s, 2),
                            counts=summary.counts, interrupted=len(manifest["cells"]) < len(todo))
            if isinstance(stop, Terminated):
                manifest["signal"] = stop.signal
            elif isinstance(stop, KeyboardInterrupt):
                manifest["signal"] = "SIGINT"
            try:
                store.save_run(run_id, manifest)
            except (OSError, StoreError) as exc:  # never mask the error that ended the run
                console.print(f"[yellow]could not write the run record: {escape(str(exc))}")
    if todo and n_missing == len(todo):
        summary.missing_dependencies = list(missing)
        console.print(f"[red]nothing was measured[/red]: all {len(todo)} cell(s) were skipped "
                      "because a dependency is missing:")
        for reason in missing:       # whole: the install command is at its end
            console.print(f"  {escape(reason)}", soft_wrap=True)
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
