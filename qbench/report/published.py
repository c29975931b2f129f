"""The shipped published tables (``qbench/data/published.json``) and the sampling error of their
accuracy figures.

Why this module: a published accuracy is a proportion over a finite test set, so two models'
scores differ by chance even when they are equally good. Counting only the rounding of the printed
value (65.21 means 65.205-65.215) makes a 0.7-point gap on MMLU look decisive when MMLU's 14,042
questions alone give each score a standard error of about 0.4 points. Here each accuracy figure
gets its binomial standard error from the number of items behind it (cited per benchmark in the
JSON's ``benchmarks``), an average gets its error from its parts, and a drop between two models
gets the unpaired error of the difference: no source publishes per-question results, so the
(smaller) paired error cannot be computed. Where a part's score or a count is not known, the
assumption made is stated and carried into the verdict's text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

DATA_FILE = "qbench/data/published.json"
MAX_VARIANCE = 0.25        # p(1 - p) <= 1/4: the bound used where a part's score is unknown


@lru_cache(maxsize=1)
def load() -> dict[str, Any]:
    """The published tables, checked so that a bad edit fails here with the key that is wrong."""
    text = resources.files("qbench").joinpath("data/published.json").read_text(encoding="utf-8")
    data = json.loads(text)
    check(data)
    return data


def check(data: Mapping[str, Any]) -> None:
    """Every accuracy spec names known benchmarks with a positive item count."""
    benches = data.get("benchmarks") or {}
    for key, b in benches.items():
        if not isinstance(b.get("items"), int) or b["items"] <= 0 or not b.get("verified_from"):
            raise ValueError(f"{DATA_FILE}: benchmarks.{key}: expected a positive integer "
                             f"'items' and a 'verified_from' citation, got {b!r}")
    for sid, src in (data.get("sources") or {}).items():
        spec = src.get("accuracy")
        if spec is None:
            continue
        if spec.get("how") not in ("mean", "single") or not spec.get("parts"):
            raise ValueError(f"{DATA_FILE}: sources.{sid}.accuracy: expected 'how' of 'mean' "
                             f"or 'single' and a non-empty 'parts' list, got {spec!r}")
        for i, part in enumerate(spec["parts"]):
            if part.get("bench") not in benches:
                raise ValueError(f"{DATA_FILE}: sources.{sid}.accuracy.parts[{i}]: bench "
                                 f"{part.get('bench')!r} is not in 'benchmarks' "
                                 f"(known: {', '.join(sorted(benches))})")


def accuracy_spec(source: str) -> dict[str, Any] | None:
    """How a source's accuracy figure is made: its key, its parts and their benchmarks."""
    return load()["sources"][source].get("accuracy")


@dataclass(frozen=True)
class FigureError:
    """The sampling standard error of one published accuracy figure, in the figure's unit."""
    se: float
    items: int                      # distinct items behind the figure (parts on one set count once)
    assumptions: tuple[str, ...] = ()


def figure_error(values: Mapping[str, Any], spec: Mapping[str, Any],
                 benchmarks: Mapping[str, Any] | None = None) -> FigureError:
    """Binomial standard error of a figure that is one benchmark's accuracy or the mean of
    several. ``values`` maps each part's label to its printed score (None or absent: unknown).

    Parts scored on the same items (``group``, default the benchmark; IFEval's prompt- and
    instruction-level scores) are taken as fully correlated, so their errors add; different
    benchmarks are independent, so their variances add. A score that is not known uses the
    largest binomial variance, p(1 - p) = 1/4."""
    benches = benchmarks if benchmarks is not None else load()["benchmarks"]
    scale = float(spec.get("scale", 100.0))
    group_se: dict[str, float] = {}
    group_n: dict[str, int] = {}
    unknown: list[str] = []
    for part in spec["parts"]:
        n = benches[part["bench"]]["items"]
        value = values.get(part["label"])
        if value is None:
            var = MAX_VARIANCE
            unknown.append(part["label"])
        else:
            p = min(max(float(value) / scale, 0.0), 1.0)
            var = p * (1.0 - p)
        group = part.get("group", part["bench"])
        group_se[group] = group_se.get(group, 0.0) + scale * math.sqrt(var / n)
        group_n[group] = n
    k = len(spec["parts"]) if spec["how"] == "mean" else 1
    se = math.sqrt(sum(s * s for s in group_se.values())) / k
    notes = [f"score of {', '.join(unknown)} not published or not read: p(1 - p) = 1/4 "
             "(the largest binomial variance) used"] if unknown else []
    return FigureError(se, sum(group_n.values()), tuple(notes))


@dataclass(frozen=True)
class DropError:
    """The sampling error of a relative accuracy drop (%), unpaired, and how it was made."""
    se: float                       # standard error of 100 * (1 - q / b), in %
    items: int
    text: str
    assumptions: tuple[str, ...] = ()


def drop_error(q: float, b: float, q_values: Mapping[str, Any], b_values: Mapping[str, Any],
               spec: Mapping[str, Any]) -> DropError:
    """Unpaired standard error of the relative drop 100 (1 - q/b) of figure q against base b,
    by the delta method: 100 sqrt(se_q^2 + (q/b)^2 se_b^2) / b."""
    eq, eb = figure_error(q_values, spec), figure_error(b_values, spec)
    se = 100.0 * math.hypot(eq.se, (q / b) * eb.se) / b
    assumptions = tuple(dict.fromkeys((*eq.assumptions, *eb.assumptions,
                                       *spec.get("assumptions", ()))))
    unit = "" if spec.get("scale", 100.0) == 100.0 else f" (scale {spec['scale']:g})"
    parts = len(spec["parts"])
    what = "1 benchmark" if parts == 1 else f"{parts} parts"
    text = (f"sampling SE {se:.2f} % (unpaired, binomial: {what}, {eq.items:,} items; "
            f"SE of each score {eq.se:.3g} / {eb.se:.3g}{unit})")
    return DropError(se, eq.items, text, assumptions)
