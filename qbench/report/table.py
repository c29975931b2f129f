"""Stored cell records -> one row per variant, with deltas against the model's base.

Pure functions, no I/O. A row carries every number the report shows for one variant (model,
backend, quant): size, bits per weight, PPL, KLD, MMLU (with the paired test against the base),
speed, peak memory, sanity, and the reasons of any failed cell. Nothing is dropped: a variant
whose cells all failed still gets a row with its errors.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

FAILED = ("failed", "timeout", "crashed")
MIB = 2 ** 20

try:  # paired McNemar test + Newcombe CI (qbench/stats.py)
    from ..stats import paired_from_records
except ImportError:  # pragma: no cover - stats.py is written concurrently
    paired_from_records = None  # type: ignore[assignment]


def variant_key(rec: dict[str, Any]) -> tuple[str, str, str, str]:
    v = rec["variant"]
    return (rec["suite"], rec["model"]["id"], v["backend"], variant_label(v))


def variant_label(variant: dict[str, Any]) -> str:
    """The quant name, plus its source when it is a pre-quantized file (two Q4_K_M can differ)."""
    quant = str(variant.get("quant", "?"))
    return quant + (f"@{variant['source']}" if variant.get("source") else "")


def cell_key(rec: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """What identifies a cell across runs: suite, model, backend, variant, metric."""
    return (*variant_key(rec), rec["metric"])


def value_of(rec: dict[str, Any] | None, name: str) -> tuple[float | None, float | None]:
    """(value, stderr) of a stored value; (None, None) unless the cell is ok and has it."""
    if not rec or rec.get("status") != "ok":
        return None, None
    v = (rec.get("values") or {}).get(name) or {}
    val, err = v.get("value"), v.get("stderr")
    if isinstance(val, float) and math.isnan(val):
        val = None
    return val, err


def nominal_bits(backend: str, quant: str) -> float | None:
    """The weight bit width a variant's name promises (F16 -> 16, Q4_K_M -> 4, awq-w4g64 -> 4,
    bnb-int8 -> 8). Measured bits per weight are in ``bpw``; this is for grouping claims."""
    q = quant.split("@", 1)[0].lower()
    if q in ("f32", "fp32", "float32"):
        return 32
    if q in ("f16", "fp16", "bf16", "float16", "bfloat16"):
        return 16
    m = re.match(r"^(?:i?q|tq)(\d)", q)             # Q8_0, Q4_K_M, IQ3_XXS, TQ2_0
    if m:
        return float(m.group(1))
    if "int8" in q or "fp8" in q or q in ("w8", "w8a8", "w8a16"):
        return 8
    if "nf4" in q or "fp4" in q or "int4" in q:
        return 4
    m = re.search(r"w(\d+)", q)                     # awq-w4g64, gptq-w3g128
    if m:
        return float(m.group(1))
    return None


def method_of(backend: str, quant: str) -> str:
    """gguf | awq | gptq | bnb | float (unquantized) | other."""
    q = quant.lower()
    bits = nominal_bits(backend, quant)
    if bits is not None and bits >= 16:
        return "float"
    for name in ("awq", "gptq", "bnb"):
        if q.startswith(name):
            return name
    if backend == "llama.cpp":
        return "gguf"
    return "other"


def _short_error(rec: dict[str, Any]) -> str:
    err = (rec.get("error") or "").strip() or (rec.get("signal") or "") or "no error text"
    return err


def variant_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pivot cells into rows: one per (suite, model, backend, variant), metrics as columns."""
    groups: dict[tuple[str, str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for rec in records:
        groups[variant_key(rec)][rec["metric"]] = rec
    rows = [_row(key, cells) for key, cells in groups.items()]
    _model_facts(rows)
    _add_deltas(rows)
    rows.sort(key=lambda r: (r["suite"], r["model"], not r["is_base"], r["backend"],
                             -(r["bpw"] or r["bits"] or 0), r["quant"]))
    return rows


def _row(key: tuple[str, str, str, str], cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    suite, model, backend, quant = key
    any_rec = next(iter(cells.values()))
    variant = any_rec["variant"]
    row: dict[str, Any] = {
        "suite": suite, "model": model, "backend": backend, "quant": quant,
        "label": f"{model} / {backend} / {quant}",
        "is_base": bool(variant.get("is_base")),
        "bits": nominal_bits(backend, quant), "method": method_of(backend, quant),
        "cells": cells,
        "statuses": {m: c["status"] for m, c in sorted(cells.items())},
        "problems": [{"metric": m, "status": c["status"], "error": _short_error(c)}
                     for m, c in sorted(cells.items()) if c["status"] in FAILED],
        "skipped": [{"metric": m, "error": _short_error(c)}
                    for m, c in sorted(cells.items()) if c["status"] == "skipped"],
    }
    fp = cells.get("footprint")
    row["size_mb"], _ = value_of(fp, "file_size_mb")
    row["bpw"], _ = value_of(fp, "bpw")
    # load-time quantization (bitsandbytes): the file is the float base, the weights in memory
    # are not; plots and the table use the in-memory estimate and say so
    loaded, _ = value_of(fp, "bpw_loaded_estimate")
    row["bpw_file"] = None
    if loaded is not None and row["bpw"] is not None and loaded < row["bpw"] - 0.01:
        row["bpw_file"], row["bpw"] = row["bpw"], loaded
    row["n_params"], _ = value_of(fp, "n_params")
    row["fp16_estimate_mb"], _ = value_of(fp, "fp16_estimate_mb")
    fp_ok = bool(fp and fp["status"] == "ok")
    row["tensor_types"] = (fp.get("details") or {}).get("tensor_types", {}) if fp_ok else {}
    row["shape"] = (fp.get("details") or {}).get("shape", {}) if fp_ok else {}

    ppl = cells.get("perplexity")
    row["ppl"], row["ppl_err"] = value_of(ppl, "ppl")
    row["bpb"], _ = value_of(ppl, "bits_per_byte")
    row["ppl_ctx"] = (ppl or {}).get("options", {}).get("ctx") if ppl else None

    kld = cells.get("kld")
    row["kld"], row["kld_err"] = value_of(kld, "kld_mean")
    row["kld_p99"], _ = value_of(kld, "kld_p99")
    row["same_top"], row["same_top_err"] = value_of(kld, "same_top_pct")
    row["ln_ppl_ratio"], row["ln_ppl_ratio_err"] = value_of(kld, "ln_ppl_ratio")

    mmlu = cells.get("mmlu")
    row["acc"], row["acc_err"] = value_of(mmlu, "acc")
    row["acc_n"] = ((mmlu or {}).get("values", {}).get("acc") or {}).get("n") if mmlu else None

    sp = cells.get("speed")
    row["pp_tps"], _ = value_of(sp, "pp_tokens_per_s")
    row["tg_tps"], _ = value_of(sp, "tg_tokens_per_s")
    spv = (sp or {}).get("values", {}) if sp and sp["status"] == "ok" else {}
    row["pp_sd"] = (spv.get("pp_tokens_per_s") or {}).get("sd")
    row["tg_sd"] = (spv.get("tg_tokens_per_s") or {}).get("sd")

    lm = cells.get("lm_eval")
    row["lm_eval"] = {k: (v.get("value"), v.get("stderr"), v.get("n"))
                      for k, v in ((lm or {}).get("values") or {}).items()
                      if k not in ("score", "docs_per_s")} if lm and lm["status"] == "ok" else {}

    san = cells.get("sanity")
    row["degenerate"] = None          # None: not measured; "": looks fine; text: why it is broken
    row["sanity_text"] = None
    if san and san["status"] == "ok":
        row["degenerate"] = (san.get("details") or {}).get("reason") or ""
        row["sanity_text"] = (san.get("details") or {}).get("output", "")

    measured = [c for c in cells.values() if c.get("metric") != "footprint"]
    rss = [(c.get("memory") or {}).get("peak_rss_mb") for c in measured]
    vram = [(c.get("memory") or {}).get("peak_vram_mb") for c in measured]
    row["peak_rss_mb"] = max((r for r in rss if r), default=None)
    row["peak_vram_mb"] = max((r for r in vram if r), default=None)
    devices = {str((c.get("backend") or {}).get("device")) for c in measured
               if (c.get("backend") or {}).get("device")}
    row["device"] = ", ".join(sorted(devices)) or None

    recipe = ((fp or any_rec).get("artifact") or {}).get("recipe") or {}
    base_recipe = recipe.get("base_recipe", recipe) if isinstance(recipe, dict) else {}
    row["requantized_from"] = (base_recipe.get("input_type")
                               if isinstance(base_recipe, dict) and base_recipe.get("requantized")
                               else None)
    row["imatrix"] = variant.get("imatrix") or None
    return row


def _model_facts(rows: list[dict[str, Any]]) -> None:
    """Parameter count and shape are properties of the model: share them across its rows."""
    params: dict[tuple[str, str], float] = {}
    shapes: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        k = (r["suite"], r["model"])
        if r["n_params"]:
            params[k] = max(params.get(k, 0), r["n_params"])
        if r["shape"] and k not in shapes:
            shapes[k] = r["shape"]
    for r in rows:
        k = (r["suite"], r["model"])
        r["model_params"] = params.get(k)
        r["model_shape"] = shapes.get(k, {})


def _add_deltas(rows: list[dict[str, Any]]) -> None:
    """Deltas against the row marked as the model's base (same suite and model).

    dPPL %: from the KLD cell's ln(PPL_q/PPL_base) and its covariance-corrected error when there
    is one (same tokens, correlated errors); otherwise from the two perplexity cells with their
    errors combined as if independent (an overestimate of the noise). MMLU: the paired exact
    McNemar test on the questions that flipped, when both cells stored per-question correctness.
    """
    # each backend's variants are compared with that backend's base (same engine, tokenizer)
    # (falling back to any base of the model when its backend has none)
    bases = {(r["suite"], r["model"], r["backend"]): r for r in rows if r["is_base"]}
    model_bases: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r["is_base"]:
            model_bases.setdefault((r["suite"], r["model"]), r)
    for r in rows:
        base = (bases.get((r["suite"], r["model"], r["backend"]))
                or model_bases.get((r["suite"], r["model"])))
        r["base_label"] = base["label"] if base else None
        r["dppl_pct"] = r["dppl_err"] = r["dppl_how"] = None
        if r["is_base"]:
            r["dppl_pct"], r["dppl_err"], r["dppl_how"] = 0.0, 0.0, "base"
        elif r["ln_ppl_ratio"] is not None:
            lr, le = r["ln_ppl_ratio"], r["ln_ppl_ratio_err"]
            r["dppl_pct"] = 100.0 * math.expm1(lr)
            r["dppl_err"] = 100.0 * math.exp(lr) * le if le is not None else None
            r["dppl_how"] = "kld: ln(PPL_q/PPL_base), paired error"
        elif base and base["ppl"] and r["ppl"]:
            ratio = r["ppl"] / base["ppl"]
            r["dppl_pct"] = 100.0 * (ratio - 1.0)
            if r["ppl_err"] is not None and base["ppl_err"] is not None:
                r["dppl_err"] = 100.0 * ratio * math.hypot(r["ppl_err"] / r["ppl"],
                                                           base["ppl_err"] / base["ppl"])
            r["dppl_how"] = "perplexity cells, errors combined as independent"
        r["mmlu_paired"] = None
        r["mmlu_note"] = None
        if r["acc"] is None or r["is_base"]:
            continue
        if not base or base["acc"] is None:
            r["mmlu_note"] = "no ok MMLU cell for the base"
            continue
        r["dacc_pts"] = 100.0 * (r["acc"] - base["acc"])
        if paired_from_records is None:
            r["mmlu_note"] = "paired test unavailable (qbench.stats missing)"
            continue
        try:
            r["mmlu_paired"] = paired_from_records(base["cells"]["mmlu"]["details"],
                                                   r["cells"]["mmlu"]["details"])
        except (KeyError, TypeError, ValueError) as exc:
            r["mmlu_note"] = f"no paired test: {exc}"


def memory_of(row: dict[str, Any]) -> tuple[float | None, str | None]:
    """The measured peak memory that limits this variant: VRAM when it used a GPU, else RSS."""
    if row.get("peak_vram_mb"):
        return row["peak_vram_mb"], "peak VRAM"
    if row.get("peak_rss_mb"):
        return row["peak_rss_mb"], "peak RSS"
    return None, None


def type_mix(types: dict[str, dict[str, int]]) -> str:
    """'Q5_0 62% · Q8_0 21% · F32 0.1%' by share of parameters, largest first."""
    if not types:
        return "–"
    total = sum(t.get("params", 0) for t in types.values()) or 1
    parts = []
    for name, t in sorted(types.items(), key=lambda kv: -kv[1].get("params", 0)):
        share = 100 * t.get("params", 0) / total
        parts.append(f"{name} {share:.0f}%" if share >= 1 else f"{name} {share:.1g}%")
    return " · ".join(parts)


def fmt(x: float | None, digits: int = 3) -> str:
    """Significant digits for small numbers, thousands separators for large ones; '–' for none."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "–"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"


def signed(x: float | None, decimals: int = 2, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{decimals}f}{unit}"
