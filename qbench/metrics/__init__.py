"""Metric registry. Each metric module defines ``INFO`` (a :class:`MetricInfo`), an ``Options``
dataclass (strict, built by :func:`qbench.options.from_table`) and ``run(ctx, options) -> dict``.

Modules are imported lazily and must not import inference libraries at import time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class MetricInfo:
    name: str
    version: str              # bump when the method changes: it is part of every cell key
    primary: str              # the headline value, e.g. "ppl"
    higher_is_better: bool
    methodology: str          # one paragraph, printed in the report
    implicit: bool = False    # run for every variant even when the suite does not list it
    needs_base: bool = False  # compares against the model's base variant


_MODULES = {
    "footprint": "qbench.metrics.footprint",
    "sanity": "qbench.metrics.sanity",
    "perplexity": "qbench.metrics.perplexity",
    "kld": "qbench.metrics.kld",
    "mmlu": "qbench.metrics.mmlu",
    "speed": "qbench.metrics.speed",
    "lm_eval": "qbench.metrics.lm_eval_bridge",
}

METRIC_NAMES: tuple[str, ...] = tuple(_MODULES)


def metric_module(name: str) -> ModuleType:
    """Import the module implementing metric ``name``."""
    return importlib.import_module(_MODULES[name])


def metric_info(name: str) -> MetricInfo:
    return metric_module(name).INFO
