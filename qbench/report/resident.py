"""Resident bytes: what a variant holds in memory to run at the report's context, the x axis
the Pareto plots offer beside bits per weight.

Bits per weight hide the tensors people choose: the token embedding and the output layer are a
small share of the parameters of a large model but a large one of a small model (SmolLM2-135M:
28 M of its 135 M parameters sit in its tied embedding), and their type moves quality far more
than their share (llama.cpp #1003, #1256, PR #5650, PR #6239). exllamav3 plots against the
weights' total size including the output layer for that reason. Here: every weight tensor's
bytes (a GGUF's tensors, embedding and output included; a transformers variant's measured
in-memory footprint) plus the KV cache at the report's context, at the variant's cache type.
"""

from __future__ import annotations

from typing import Any

from qbench.report.recommend import kv_cache_mb

MIB = 2 ** 20


def weights_mb(row: dict[str, Any]) -> tuple[float | None, str]:
    """The weights' bytes in MiB and how they were known: a GGUF's tensor bytes (every tensor,
    token embedding and output included; no metadata or tokenizer), else the row's weights in
    memory (measured by torch, the load-time estimate, or the file)."""
    if row.get("tensor_bytes"):
        return float(row["tensor_bytes"]) / MIB, "all weight tensors in the file"
    if row.get("weights_mb") is not None:
        return float(row["weights_mb"]), str(row.get("weights_how") or "weights")
    return None, "no weights size"


def resident_mb(row: dict[str, Any], kv_ctx: int) -> tuple[float | None, str]:
    """Weights + the KV cache at ``kv_ctx`` tokens (the variant's cache type), in MiB, with how
    it was computed; None when either part is unknown."""
    weights, how = weights_mb(row)
    kv = kv_cache_mb(row.get("model_shape") or {}, kv_ctx, row.get("kv_bytes") or 2.0)
    if weights is None or kv is None:
        return None, how if weights is None else "no model shape for the KV cache"
    return weights + kv, f"{how} ({weights:.1f} MiB) + KV cache at {kv_ctx:,} tokens ({kv:.1f} MiB)"


def add_resident(rows: list[dict[str, Any]], kv_ctx: int) -> None:
    """``row["resident_mb"]`` and ``row["resident_how"]`` for every row."""
    for r in rows:
        r["resident_mb"], r["resident_how"] = resident_mb(r, kv_ctx)
        r["resident_ctx"] = kv_ctx
