"""Which cells share a worker process, and in what order they run there.

The cells of one variant (same model, same variant, consecutive in the plan) run in one worker:
one interpreter start-up, one preparation, one model load (issue 14). Within that batch the
order serves the memory figures, which are per cell but taken in a process that ran the earlier
cells:

1. cells that load nothing (footprint): they pay for preparing the variant's file, whose peak
   (a GPTQ build, say) then lands in a cell whose memory nobody reads;
2. cells that load only the variant (``MetricInfo.own_memory``), the hardware-bound ones
   (speed) first: the report takes a variant's own peak from them, speed first, so speed runs
   as the first loading cell and its window holds the load, as in a process of its own;
3. the rest (perplexity, KLD): they may load the base, which then stays loaded until the
   worker ends, so nothing after them could be inflated by it.

Within a group the plan's order stands (perplexity before KLD: the perplexity pass computes
KLD's comparison, see qbench.metrics.shared_pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from qbench.metrics import known_metric_info
from qbench.suite.plan import Cell

T = TypeVar("T")


def batch_key(cell: Cell) -> tuple[Any, ...]:
    """Cells with equal keys may share a worker: same model (and file), same variant."""
    return (cell.model, cell.model_sha256, cell.variant, cell.is_base)


def rank(metric: str) -> tuple[int, int]:
    """Where a metric's cell runs within its variant's batch (see the module docstring)."""
    info = known_metric_info(metric)
    if info is None:
        return (2, 1)
    group = 0 if not info.loads_model else 1 if info.own_memory else 2
    return (group, 0 if info.hardware_bound else 1)


def run_order(cells: Sequence[Cell]) -> list[Cell]:
    """``cells`` with each run of one variant's consecutive cells reordered for its worker;
    the variants keep their places (each model's base first, as planned)."""
    out: list[Cell] = []
    for group in consecutive(cells, batch_key):
        out.extend(sorted(group, key=lambda c: rank(c.metric)))   # stable: plan order within
    return out


def consecutive(items: Iterable[T], key: Callable[[T], Any]) -> Iterator[list[T]]:
    """Maximal runs of consecutive items with equal keys."""
    run: list[T] = []
    for item in items:
        if run and key(run[-1]) != key(item):
            yield run
            run = []
        run.append(item)
    if run:
        yield run
