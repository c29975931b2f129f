"""Tables of the values a metric declares with a report column beyond those the main table
shows: for KLD, its confidence buckets, its 99.9 % tail and top-k agreement.

Generic over the registry: a metric the main table gives columns of its own (``DEDICATED``)
and that declares ``Value.column`` on further values gets one table, a row per variant with an
ok cell, a column per declared value (± its stored error), and - for a metric measured against
the base - the floor verdict of its primary value (qbench.report.floor). No value is named here.
"""

from __future__ import annotations

from typing import Any

from qbench.metrics import known_metric_info, metric_names
from qbench.report.table import DEDICATED, value_of


def detail_tables(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table per dedicated metric with declared columns that some row has values for:
    {metric, columns: [(value, header, digits)], rows: [{label, is_base, cells: [(v, err)],
    floor}], floor_key}."""
    present = {m for r in rows for m in r["cells"]}
    out = []
    for metric in [m for m in metric_names() if m in present and m in DEDICATED]:
        info = known_metric_info(metric)
        if info is None:
            continue
        cols = [(v.name, v.column, v.digits) for v in info.value_specs() if v.column]
        if not cols:
            continue
        body = []
        for r in rows:
            cell = r["cells"].get(metric)
            if not cell or cell.get("status") != "ok":
                continue
            vals = [value_of(cell, name) for name, _, _ in cols]
            if all(v is None for v, _ in vals):
                continue
            floor_key = f"{metric}.{info.primary}" if info.needs_base else None
            body.append({"label": r["label"], "quant": r["quant"], "is_base": r["is_base"],
                         "cells": vals,
                         "floor": (r.get("floor") or {}).get(floor_key) if floor_key else None})
        if body:
            out.append({"metric": metric, "columns": cols, "rows": body,
                        "needs_base": info.needs_base, "primary": info.primary})
    return out
