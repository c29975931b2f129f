"""Executors: what runs a list of cells and reports each outcome as soon as it is known.

The runner hands an executor work items and stores outcomes in the order they arrive; how cells
run is the executor's business: :class:`LocalExecutor` one worker process at a time on this
machine, one per variant (qbench.run.batching), :class:`qbench.run.ray_executor.RayExecutor`
as Ray tasks on a cluster, one per cell.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qbench.results.schema import Outcome
from qbench.run.batching import batch_key, consecutive
from qbench.run.child import CellRun, run_cells
from qbench.run.job import Job
from qbench.suite.plan import Cell


@dataclass(frozen=True)
class WorkItem:
    """One cell to run: its spec, the job the worker reads, where its log goes."""

    cell: Cell
    job: Job
    log_path: Path
    timeout_s: float
    memory_limit_mb: int


class Executor(Protocol):
    """Runs work items and yields each outcome as soon as it is known (order may differ)."""

    name: str

    def run(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, Outcome]]: ...


class LocalExecutor:
    """One cell at a time, in the order given, on this machine: consecutive cells of one
    variant share a worker process (one start-up, one model load) while they go well; a cell
    that crashes, hangs or fails unexpectedly ends its worker and the rest go on in a fresh
    one (qbench.run.child). ``batch=False``: a process per cell, as before issue 14."""

    name = "local"

    def __init__(self, batch: bool = True) -> None:
        self.batch = batch

    def run(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, Outcome]]:
        def key(item: WorkItem) -> object:
            return (batch_key(item.cell), item.memory_limit_mb) if self.batch else id(item)

        for group in consecutive(items, key):
            runs = [CellRun(i.job, i.log_path, i.timeout_s) for i in group]
            for index, outcome in run_cells(runs, memory_limit_mb=group[0].memory_limit_mb):
                yield group[index], outcome
