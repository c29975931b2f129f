"""Executors: what runs a list of cells and reports each outcome as soon as it is known.

The runner hands an executor work items and stores outcomes in the order they arrive; how cells
run is the executor's business: :class:`LocalExecutor` one child process at a time on this
machine, :class:`qbench.run.ray_executor.RayExecutor` as Ray tasks on a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qbench.results.schema import Outcome
from qbench.run.child import run_in_child
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
    """One cell at a time, each in a child process on this machine."""

    name = "local"

    def run(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, Outcome]]:
        for item in items:
            yield item, run_in_child(item.job, log_path=item.log_path, timeout_s=item.timeout_s,
                                     memory_limit_mb=item.memory_limit_mb)
