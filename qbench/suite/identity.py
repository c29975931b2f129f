"""How a cell and a variant are named across runs: the one place that spells a cell's id.

A cell's *key* (qbench.suite.plan) hashes everything that could change its numbers, so it
changes with a library version; its *id* names what is measured (model/backend/quant/metric)
and stays the same, which is how the regression gate and the report match runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _short(ref: str) -> str:
    """A dataset name as is; a file path as its file name without extension."""
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "/" in ref or "." in name else name


def quant_label(quant: str, source: str = "", *, tag: str = "", imatrix: str = "",
                kv_cache: str = "", output: str = "", token_embd: str = "",
                whole_source: bool = False) -> str:
    """The variant's name: the quant; for a pre-quantized file its label (e.g. its maker) or
    file name (two Q4_K_M from two makers are two variants); ``+imatrix=TEXT`` when built with
    an importance matrix; ``+output=TYPE`` / ``+token_embd=TYPE`` with the output /
    token-embedding tensor's type set (llama-quantize --output-tensor-type /
    --token-embedding-type); ``+kv=TYPE`` with a non-default KV-cache type. A plain variant's
    name is its quant alone, so ids and keys of existing results never change."""
    name = quant
    if source:
        name += "@" + (tag or (source if whole_source else source.rstrip("/").rsplit("/", 1)[-1]))
    if imatrix:
        name += f"+imatrix={_short(imatrix)}"
    if output:
        name += f"+output={output}"
    if token_embd:
        name += f"+token_embd={token_embd}"
    if kv_cache:
        name += f"+kv={kv_cache}"
    return name


def variant_name(variant: Mapping[str, Any], *, whole_source: bool = False) -> str:
    """:func:`quant_label` of a stored variant (a record's ``variant``)."""
    return quant_label(str(variant.get("quant", "?")), str(variant.get("source") or ""),
                       tag=str(variant.get("tag") or ""), imatrix=str(variant.get("imatrix") or ""),
                       kv_cache=str(variant.get("kv_cache") or ""),
                       output=str(variant.get("output_tensor_type") or ""),
                       token_embd=str(variant.get("token_embedding_type") or ""),
                       whole_source=whole_source)


def cell_id(model_id: str, backend: str, variant_name: str, metric: str) -> str:
    """model/backend/variant/metric."""
    return f"{model_id}/{backend}/{variant_name}/{metric}"


def record_point(rec: Mapping[str, Any]) -> str:
    """Which of its metric's listed contexts a stored record measured ('ctx=8192'), '' for the
    main one (qbench.metrics.depth): read from the id the plan stored with it, since the
    record's options hold its context but not whether that context was listed first."""
    metric = str(rec.get("metric") or "")
    tail = str(rec.get("id") or "").rsplit("/", 1)[-1]
    return tail[len(metric) + 1:] if metric and tail.startswith(metric + "@") else ""


def record_cell_id(rec: Mapping[str, Any]) -> str:
    """The id of a stored record's cell, spelled as the plan spells it."""
    v = rec.get("variant") or {}
    point = record_point(rec)
    return cell_id(str(rec["model"]["id"]), str(v.get("backend")), variant_name(v),
                   str(rec["metric"]) + (f"@{point}" if point else ""))


def variant_label(variant: Mapping[str, Any]) -> str:
    """A report row's variant: its name, with the whole source when pre-quantized and not
    labelled (the report shows where the file came from)."""
    return variant_name(variant, whole_source=True)


def variant_key(rec: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """What groups a record into a report row: suite, model, backend, variant."""
    v = rec["variant"]
    return (rec["suite"], rec["model"]["id"], v["backend"], variant_label(v))
