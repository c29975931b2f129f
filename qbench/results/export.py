"""Flat exports: one row per metric value per cell (suite, model, backend, quant, metric, value,
stderr, n, status, the cell's key and id), as JSONL, CSV or Parquet; failed cells appear with
their status and error and no value. ``qbench.load`` reads the same table as a DataFrame, and
Parquet is written from that typed frame (:func:`qbench.results.frame.to_parquet_bytes`)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

COLUMNS = ("suite", "model", "backend", "quant", "metric", "name", "value", "stderr", "n",
           "unit", "status", "error", "key", "id")


def flat_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records -> rows of COLUMNS: one per value, or one (no value) for a cell without values."""
    rows = []
    for r in records:
        base = {"suite": r["suite"], "model": r["model"]["id"], "backend": r["variant"]["backend"],
                "quant": r["variant"]["quant"], "metric": r["metric"], "status": r["status"],
                "error": r.get("error"), "key": r["key"], "id": r.get("id")}
        values = r.get("values") or {}
        if not values:
            rows.append(base | {"name": None, "value": None, "stderr": None, "n": None,
                                "unit": None})
        for name, v in sorted(values.items()):
            rows.append(base | {"name": name, "value": v.get("value"), "stderr": v.get("stderr"),
                                "n": v.get("n"), "unit": v.get("unit")})
    return rows


def to_jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps({c: row.get(c) for c in COLUMNS}) + "\n" for row in rows)


# what a spreadsheet takes for the start of a formula (OWASP's list): a cell starting with one
# of these, opened in Excel or LibreOffice, would run =HYPERLINK(...), =WEBSERVICE(...), DDE
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell: None empty, numbers as they are, and text that a spreadsheet
    would run as a formula prefixed with a single quote (shown, not evaluated)."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: csv_cell(row.get(c)) for c in COLUMNS})
    return buf.getvalue()

