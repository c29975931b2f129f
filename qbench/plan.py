"""Expand a suite into cells (model x variant x metric), each with a stable content key.

The key changes when anything that could change the number changes: the model file's sha256,
the variant's parameters, the metric's options and version, the dataset's content, and the
version of the backend library. A finished cell with the same key is never recomputed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .backends import BACKENDS
from .config import ModelSpec, Suite, VariantSpec
from .errors import QbenchError
from .metrics import METRIC_NAMES, metric_module
from .sources import locate, sha256_file


@dataclass(frozen=True)
class PlanContext:
    """Where relative paths, data and artifacts live for this run."""

    base_dir: Path
    data_dir: Path | None
    cache_dir: Path


@dataclass(frozen=True)
class Cell:
    suite: str
    model: ModelSpec
    variant: VariantSpec
    metric: str
    options: Any
    is_base: bool
    model_sha256: str
    key: str

    @property
    def id(self) -> str:
        quant = self.variant.quant
        if self.variant.source:  # a pre-quantized file: tell it apart from a built one
            quant += "@" + self.variant.source.rstrip("/").rsplit("/", 1)[-1]
        return f"{self.model.id}/{self.variant.backend}/{quant}/{self.metric}"

    def describe(self) -> dict[str, Any]:
        """The JSON-able spec stored with every result."""
        return {
            "id": self.id, "key": self.key, "suite": self.suite, "metric": self.metric,
            "model": dataclasses.asdict(self.model) | {"sha256": self.model_sha256},
            "variant": dataclasses.asdict(self.variant) | {"is_base": self.is_base},
            "options": dataclasses.asdict(self.options),
            "metric_version": metric_module(self.metric).INFO.version,
        }


def library_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not-installed"


def model_identity(model: ModelSpec, ctx: PlanContext) -> str:
    """sha256 of the model's local file, or the hub reference when not downloaded yet."""
    local = locate(model.source, base_dir=ctx.base_dir)
    if local is None:
        return f"ref:{model.source}"
    return sha256_file(local.path, ctx.cache_dir)


def _base_label(suite: Suite, model: ModelSpec, variant: VariantSpec) -> str | None:
    base = suite.base_variant(model, variant.backend)
    return base.label if base else None


def _key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _in_run_order(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """Registry order: cheap checks (footprint, sanity) before the long measurements."""
    return [(name, metrics[name]) for name in METRIC_NAMES if name in metrics]


def expand(suite: Suite, ctx: PlanContext, *, only: tuple[str, ...] = ()) -> list[Cell]:
    """All cells of ``suite`` in run order: per model, its base variant first."""
    cells: list[Cell] = []
    extras_memo: dict[str, dict[str, Any]] = {}
    for model in suite.models:
        sha = model_identity(model, ctx)
        bases = {suite.base_variant(model, v.backend) for v in suite.variants_for(model)}
        variants = sorted(suite.variants_for(model), key=lambda v: v not in bases)
        for variant in variants:
            lib = BACKENDS[variant.backend].distribution
            for metric, options in _in_run_order(suite.metrics):
                if not variant.measures(metric):
                    continue
                module = metric_module(metric)
                if metric not in extras_memo:
                    key_extras = getattr(module, "key_extras", None)
                    extras_memo[metric] = key_extras(options, ctx) if key_extras else {}
                key = _key({
                    "model": {"id": model.id, "sha256": sha},
                    "variant": variant.params(),
                    "base": _base_label(suite, model, variant),
                    "metric": metric, "metric_version": module.INFO.version,
                    "options": dataclasses.asdict(options), "extras": extras_memo[metric],
                    "library": {lib: library_version(lib)},
                })
                cells.append(Cell(suite.name, model, variant, metric, options,
                                  variant in bases, sha, key))
    if only:
        cells = [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in only)]
        if not cells:
            raise QbenchError(f"--only {' '.join(only)} matches no cell of suite "
                              f"'{suite.name}' (cell ids look like model/backend/quant/metric)")
    return cells
