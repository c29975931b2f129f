"""Executors: what runs a list of cells and reports each outcome as soon as it is known.

The runner hands an executor work items and stores outcomes in the order they arrive; how cells
run is the executor's business: :class:`LocalExecutor` one worker process at a time on this
machine, one per variant (qbench.run.batching), :class:`qbench.run.ray_executor.RayExecutor`
as Ray tasks on a cluster, one per cell.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qbench.errors import QbenchError
from qbench.metrics import known_metric_info
from qbench.results.schema import Outcome
from qbench.run.batching import batch_key, consecutive
from qbench.run.child import CellRun, run_cells
from qbench.run.job import Job
from qbench.run.prefetch import Prefetch
from qbench.suite.plan import Cell


@dataclass(frozen=True)
class WorkItem:
    """One cell to run: its spec, the job the worker reads, where its log goes."""

    cell: Cell
    job: Job
    log_path: Path
    timeout_s: float
    memory_limit_mb: int
    tmp_dir: Path | None = None     # temporary folders: the results folder's .scratch/


class Executor(Protocol):
    """Runs work items and yields each outcome as soon as it is known (order may differ)."""

    name: str

    def run(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, Outcome]]: ...


class LocalExecutor:
    """One cell at a time, in the order given, on this machine: consecutive cells of one
    variant share a worker process (one start-up, one model load) while they go well; a cell
    that crashes, hangs or fails unexpectedly ends its worker and the rest go on in a fresh
    one (qbench.run.child). ``batch=False``: a process per cell, as before issue 14.

    ``prepare_ahead`` (CPU runs): once a variant's hardware-bound cells are done, a helper
    process makes the next variant's file while the rest of this variant's cells run
    (qbench.run.prefetch); the next variant's worker starts after the helper has ended."""

    name = "local"

    def __init__(self, batch: bool = True, prepare_ahead: bool = True) -> None:
        self.batch = batch
        self.prepare_ahead = prepare_ahead and batch

    def run(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, Outcome]]:
        def key(item: WorkItem) -> object:
            return (batch_key(item.cell), item.memory_limit_mb) if self.batch else id(item)

        groups = list(consecutive(items, key))
        ahead: Prefetch | None = None
        try:
            for g, group in enumerate(groups):
                waited = None
                if ahead is not None:        # the helper made this variant's file: let it end
                    waited = ahead.finish(group[0].timeout_s)
                    ahead = None
                nxt = groups[g + 1][0] if g + 1 < len(groups) else None
                may_start = (self.prepare_ahead and nxt is not None
                             and on_cpu(group[0]) and on_cpu(nxt))
                timed_left = sum(hardware_bound(i) for i in group)
                running_at_start = False
                runs = [CellRun(i.job, i.log_path, i.timeout_s, i.tmp_dir) for i in group]
                for index, outcome in run_cells(runs, memory_limit_mb=group[0].memory_limit_mb):
                    item = group[index]
                    timings = outcome.result.setdefault("timings", {})
                    if waited is not None and index == 0:
                        timings["prepared_ahead"] = waited
                    if ahead is not None and (running_at_start or ahead.running()):
                        timings["alongside"] = f"preparing {ahead.cell_id}'s variant ahead"
                    timed_left -= hardware_bound(item)
                    if may_start and timed_left == 0 and index < len(group) - 1:
                        assert nxt is not None
                        may_start = False
                        ahead = start_helper(nxt)
                    running_at_start = ahead is not None and ahead.running()
                    yield item, outcome
        finally:
            if ahead is not None:     # Ctrl-C or the consumer stopping: no build left behind
                ahead.cancel()


def start_helper(item: WorkItem) -> Prefetch | None:
    """The helper for ``item``'s variant, with the worker's memory cap; None if it cannot be
    started (a speed-up is never worth a cell's result: the cell builds its file itself)."""
    try:
        return Prefetch(item.job.replace(memory_limit_mb=item.memory_limit_mb), ahead_log(item),
                        tmp_dir=item.tmp_dir)
    except (OSError, QbenchError) as exc:
        print(f"qbench: could not prepare {item.cell.id}'s variant ahead ({exc}); its first "
              "cell will", file=sys.stderr)
        return None


def ahead_log(item: WorkItem) -> Path:
    """The helper's log: beside the cells' logs, in a folder of its own (one log per cell
    stays the rule of the logs folder)."""
    return item.log_path.parent / "prepare-ahead" / item.log_path.name


def on_cpu(item: WorkItem) -> bool:
    """Whether ``item`` runs on the CPU (as resolved for its key): only there is a build
    beside a cell harmless to the cell's memory."""
    return item.job.run_device == "cpu"


def hardware_bound(item: WorkItem) -> bool:
    """A cell that times the hardware (speed): nothing may run beside it."""
    info = known_metric_info(item.cell.metric)
    return bool(info and info.hardware_bound)
