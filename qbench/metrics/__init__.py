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

**Values, not names.** A metric declares the values it stores (:class:`Value`): direction, how
a change is expressed, the default tolerance, the per-item detail that pairs two runs and the
identity that must match for pairing, how its spread is measured, its report column and figure.
One judge (:mod:`qbench.results.judge`) compares two results from these declarations for the
gate, the report, the recommendation and the advice check alike, so no module above
``metrics/`` names a metric's values.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
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


# How a change of a value is expressed (and tested):
LOG = "log"            # a ratio, tested on ln(candidate / reference), shown in %
RELATIVE = "relative"  # the difference in % of the reference's value
POINTS = "points"      # the difference times ``scale`` (a fraction -> percentage points)
CHANGES = (LOG, RELATIVE, POINTS)
# How the noise of a value is measured when no pairing applies:
REPETITIONS = "repetitions"  # the value's own repeated samples (``samples``, else sd and n)
STORED = "stored"            # the stored standard errors of both runs, taken as independent
NONE = "none"                # no spread: never gated (shown as reported)
SPREADS = (REPETITIONS, STORED, NONE)


@dataclass(frozen=True)
class Pairing:
    """How two runs of a metric pair up item by item (the same chunks, the same questions), so
    the noise of a difference is the spread of the per-item differences.

    ``items``: the details key holding one number per item (or a function of the details
    returning them, None when absent). ``ids``: a details key naming each item, to pair by id
    rather than by position. ``binary``: 0/1 outcomes, compared by the flips (exact McNemar).
    ``identity``: details (else options) keys that must be equal in both runs for their items
    to be the same items - a changed dataset is "not comparable", never a paired interval.
    ``available``: how many items the input holds (a function of a record), the ceiling of
    "N would resolve it"."""

    items: str | Callable[[Mapping[str, Any]], Sequence[float] | None]
    unit: str = "items"
    ids: str | None = None
    binary: bool = False
    identity: tuple[str, ...] = ()
    available: Callable[[Mapping[str, Any]], int | None] | None = None
    item_size: Callable[[Mapping[str, Any]], float | None] | None = None  # e.g. tokens a chunk
    # samples nest (the first n chunks of a larger run are a smaller run's; a subset holds a
    # smaller one of the same seed): two runs of different sizes pair on what they share
    nested: bool = False

    def values_of(self, details: Mapping[str, Any]) -> Sequence[float] | None:
        """The per-item numbers of one run (None when the record has none)."""
        if callable(self.items):
            return self.items(details)
        got = details.get(self.items)
        return got if isinstance(got, (list, tuple)) and got else None


@dataclass(frozen=True)
class Value:
    """One stored value of a metric, as every comparison of two results reads it."""

    name: str
    higher_is_better: bool
    change: str = RELATIVE
    scale: float = 1.0            # POINTS: points per stored unit (a fraction -> 100)
    tolerance: float = 2.0        # the worsening tolerated, in the change's unit (%, points)
    floor: float = 0.0            # ... and in the value's own unit: below both is never worse
    pairing: Pairing | None = None
    spread: str = STORED          # the noise when not paired (or paired data are absent)
    gated: bool = True            # False: compared and shown, never a regression
    column: str | None = None     # report column heading (None: no generic column)
    digits: int = 3
    figure: str | None = None     # a figure title: drawn against bits per weight in the report
    # why a record's value cannot discriminate (a base at chance), None when it can
    fitness: Callable[[Mapping[str, Any]], str | None] | None = None
    # a BackendInfo flag that must be true for this value to be gated on that backend (a
    # torch process's peak RSS moves ~30 % between identical runs while its repetitions agree
    # to 0.4 %: no spread measured in one run is its noise)
    backend_gate: str | None = None

    def __post_init__(self) -> None:
        if self.change not in CHANGES:
            raise ValueError(f"Value {self.name}: change must be one of {CHANGES}")
        if self.spread not in SPREADS:
            raise ValueError(f"Value {self.name}: spread must be one of {SPREADS}")

    @property
    def unit(self) -> str:
        """The unit a change is expressed in."""
        return "points" if self.change == POINTS else "%"


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
    # every stored value as comparisons read it (see Value); empty: derived from primary,
    # gated, reported and columns (plugins written before values existed)
    values: tuple[Value, ...] = ()
    # the option that sizes the sample (perplexity: chunks, mmlu: subset) when a larger
    # sample holds the smaller one item for item (the same chunks in order; nested subsets):
    # cells that differ only in it are one family, and a larger one reuses a smaller one's
    # items (qbench.run.runner) instead of scoring them again
    sample_option: str | None = None

    def value_specs(self) -> tuple[Value, ...]:
        """The declared values, the primary first; derived from the older fields when none
        are declared (gated: unpaired from stored errors; reported: never gated)."""
        if self.values:
            return tuple(sorted(self.values, key=lambda v: v.name != self.primary))
        cols = {c.value: c for c in self.columns}
        out = [Value(name, hib, column=cols[name].header if name in cols else None,
                     digits=cols[name].digits if name in cols else 3)
               for name, hib in ({self.primary: self.higher_is_better} | dict(self.gated)).items()
               if name not in self.reported]
        out += [Value(name, False, gated=False, spread=NONE) for name in self.reported
                if name not in {v.name for v in out}]
        return tuple(out)

    def value_spec(self, name: str) -> Value | None:
        return next((v for v in self.value_specs() if v.name == name), None)

    def gated_values(self) -> dict[str, bool]:
        """Every gated value with its direction, the primary first."""
        return {v.name: v.higher_is_better for v in self.value_specs() if v.gated}

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
