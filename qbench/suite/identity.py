"""How a cell and a variant are named across runs: the one place that spells a cell's id.

A cell's *key* (qbench.suite.plan) hashes everything that could change its numbers, so it
changes with a library version; its *id* names what is measured (model/backend/quant/metric)
and stays the same, which is how the regression gate and the report match runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def quant_label(quant: str, source: str = "") -> str:
    """The quant, plus the file's name when it is a pre-quantized file (two Q4_K_M from two
    makers are two variants)."""
    return quant + ("@" + source.rstrip("/").rsplit("/", 1)[-1] if source else "")


def cell_id(model_id: str, backend: str, quant: str, source: str, metric: str) -> str:
    """model/backend/quant[@file]/metric."""
    return f"{model_id}/{backend}/{quant_label(quant, source)}/{metric}"


def record_cell_id(rec: Mapping[str, Any]) -> str:
    """The id of a stored record's cell, spelled as the plan spells it."""
    v = rec.get("variant") or {}
    return cell_id(str(rec["model"]["id"]), str(v.get("backend")), str(v.get("quant", "?")),
                   str(v.get("source") or ""), str(rec["metric"]))


def variant_label(variant: Mapping[str, Any]) -> str:
    """A report row's variant: the quant, plus its whole source when pre-quantized (the
    report shows where the file came from)."""
    quant = str(variant.get("quant", "?"))
    return quant + (f"@{variant['source']}" if variant.get("source") else "")


def variant_key(rec: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """What groups a record into a report row: suite, model, backend, variant."""
    v = rec["variant"]
    return (rec["suite"], rec["model"]["id"], v["backend"], variant_label(v))
