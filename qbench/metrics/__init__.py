"""The metric registry: what each metric *is*, in one place, for every other part of qbench.

A metric is one module defining ``INFO`` (a :class:`MetricInfo`), an ``Options`` dataclass
(strict, built by :func:`qbench.options.from_table`) and ``run(ctx, options) -> dict``. The
planner, the regression gate, the sharder and the report read what they need from ``INFO``
(gated values and their direction, cost, report columns, whether the number belongs to the
hardware), so adding a metric is its own file plus one registration line: an entry in
``BUILTIN`` here, or, from another package, an entry point in the group ``qbench.metrics``::

    [project.entry-points."qbench.metrics"]
    my_metric = "my_package.my_metric"        # the module, as above

Modules are imported lazily and must not import inference libraries at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any

from qbench.errors import QbenchError

ENTRY_POINT_GROUP = "qbench.metrics"


@dataclass(frozen=True)
class ReportColumn:
    """A value the report's comparison table shows in its own column."""

    value: str                # the stored value's name
    header: str               # column heading
    digits: int = 3           # significant digits


@dataclass(frozen=True)
class MetricInfo:
    name: str
    version: str              # bump when the method changes: it is part of every cell key
    primary: str              # the headline value, e.g. "ppl"
    higher_is_better: bool
    methodology: str          # one paragraph, printed in the report
    implicit: bool = False    # run for every variant even when the suite does not list it
    needs_base: bool = False  # compares against the model's base variant
    # value -> higher is better, for `qbench compare`'s gate (the primary is always gated)
    gated: Mapping[str, bool] = field(default_factory=dict)
    reported: tuple[str, ...] = ()   # values compare shows but never gates
    # the numbers are the machine's as much as the model's: the cell key carries the hardware
    # fingerprint and compare judges them only against the same hardware
    hardware_bound: bool = False
    # the cell loads only the variant (never the base): its peak memory is the variant's own
    own_memory: bool = True
    # the cell loads the variant at all (footprint reads the file only): a worker running a
    # variant's cells runs those that load nothing first (qbench.run.batching)
    loads_model: bool = True
    # relative cost of one cell with these options, per billion parameters at 16 bits
    # (sharding balances on it; only ratios matter)
    cost: Callable[[Any], float] | None = None
    # values the report's table shows generically (metrics without a dedicated view)
    columns: tuple[ReportColumn, ...] = ()

    def gated_values(self) -> dict[str, bool]:
        """Every gated value with its direction, the primary first."""
        return {self.primary: self.higher_is_better} | dict(self.gated)

    def weight(self, options: Any) -> float:
        """This cell's relative cost (1.0 without a cost model)."""
        return float(self.cost(options)) if self.cost is not None else 1.0


# name -> module, in run order: cheap checks (footprint, sanity) before long measurements
BUILTIN: dict[str, str] = {
    "footprint": "qbench.metrics.footprint",
    "sanity": "qbench.metrics.sanity",
    "perplexity": "qbench.metrics.perplexity",
    "kld": "qbench.metrics.kld",
    "mmlu": "qbench.metrics.mmlu",
    "speed": "qbench.metrics.speed",
    "lm_eval": "qbench.metrics.lm_eval_bridge",
}


@cache
def _registered() -> dict[str, str]:
    """Built-in metrics, then those other installed packages register (sorted by name)."""
    from qbench.host.plugins import with_plugins

    return with_plugins(ENTRY_POINT_GROUP, BUILTIN, "metric", lambda _name, target: target)


def metric_names() -> tuple[str, ...]:
    """Every known metric, in run order."""
    return tuple(_registered())


def metric_module(name: str) -> ModuleType:
    """Import the module implementing metric ``name``."""
    return importlib.import_module(_registered()[name])


def metric_info(name: str) -> MetricInfo:
    info = metric_module(name).INFO
    if not isinstance(info, MetricInfo) or info.name != name:
        raise QbenchError(f"metric module {_registered()[name]} must define INFO = "
                          f"MetricInfo(name={name!r}, ...)")
    return info


def known_metric_info(name: str) -> MetricInfo | None:
    """INFO of a metric named in stored records, None when this install does not know it
    (results from a plugin that is not installed here still load and compare)."""
    if name not in _registered():
        return None
    try:
        return metric_info(name)
    except ImportError:
        return None
