"""Stored cell records -> one row per variant (pure functions; no I/O)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

FAILED = ("failed", "timeout", "crashed")


def variant_key(rec: dict[str, Any]) -> tuple[str, str, str, str]:
    v = rec["variant"]
    return (rec["suite"], rec["model"]["id"], v["backend"], v["quant"] + (
        f"@{v['source']}" if v.get("source") else ""))


def _val(rec: dict[str, Any] | None, name: str) -> tuple[float | None, float | None]:
    if not rec or rec.get("status") != "ok":
        return None, None
    v = rec.get("values", {}).get(name) or {}
    return v.get("value"), v.get("stderr")


def variant_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pivot cells into rows: one per (suite, model, backend, quant), metrics as columns."""
    groups: dict[tuple[str, str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for rec in records:
        groups[variant_key(rec)][rec["metric"]] = rec
    rows = []
    for (suite, model, backend, quant), cells in groups.items():
        any_rec = next(iter(cells.values()))
        row: dict[str, Any] = {
            "suite": suite, "model": model, "backend": backend, "quant": quant,
            "is_base": bool(any_rec["variant"].get("is_base")),
            "problems": [f"{m}: {c['status']}: {c.get('error') or ''}".strip()
                         for m, c in sorted(cells.items()) if c["status"] in FAILED],
            "skipped": [f"{m}: {c.get('error') or ''}" for m, c in sorted(cells.items())
                        if c["status"] == "skipped"],
            "statuses": {m: c["status"] for m, c in cells.items()},
        }
        fp = cells.get("footprint")
        row["size_mb"], _ = _val(fp, "file_size_mb")
        row["bpw"], _ = _val(fp, "bpw")
        row["n_params"], _ = _val(fp, "n_params")
        row["tensor_types"] = (fp or {}).get("details", {}).get("tensor_types", {}) \
            if fp and fp["status"] == "ok" else {}
        row["ppl"], row["ppl_err"] = _val(cells.get("perplexity"), "ppl")
        row["bpb"], _ = _val(cells.get("perplexity"), "bits_per_byte")
        sp = cells.get("speed")
        row["pp_tps"], _ = _val(sp, "pp_tokens_per_s")
        row["tg_tps"], _ = _val(sp, "tg_tokens_per_s")
        row["pp_sd"] = ((sp or {}).get("values", {}).get("pp_tokens_per_s") or {}).get("sd")
        row["tg_sd"] = ((sp or {}).get("values", {}).get("tg_tokens_per_s") or {}).get("sd")
        san = cells.get("sanity")
        row["degenerate"] = None
        if san and san["status"] == "ok":
            row["degenerate"] = san["details"].get("reason")
            row["sanity_text"] = san["details"].get("output", "")
        rss = [c.get("memory", {}).get("peak_rss_mb") for c in cells.values()
               if c.get("metric") != "footprint"]
        vram = [c.get("memory", {}).get("peak_vram_mb") for c in cells.values()]
        row["peak_rss_mb"] = max((r for r in rss if r), default=None)
        row["peak_vram_mb"] = max((r for r in vram if r), default=None)
        requant = ((fp or {}).get("artifact", {}).get("recipe", {}) or {})
        base_recipe = requant.get("base_recipe", requant)
        row["requantized_from"] = (base_recipe.get("input_type")
                                   if base_recipe.get("requantized") else None)
        rows.append(row)
    _add_deltas(rows)
    rows.sort(key=lambda r: (r["suite"], r["model"], r["backend"], -(r["bpw"] or 0)))
    return rows


def _add_deltas(rows: list[dict[str, Any]]) -> None:
    """ΔPPL % against the row marked as the model's base (same suite and model)."""
    bases = {(r["suite"], r["model"]): r for r in rows if r["is_base"]}
    for r in rows:
        base = bases.get((r["suite"], r["model"]))
        r["dppl_pct"] = None
        if base and base["ppl"] and r["ppl"]:
            r["dppl_pct"] = 100.0 * (r["ppl"] / base["ppl"] - 1.0)


def type_mix(types: dict[str, dict[str, int]]) -> str:
    """'Q5_0 62% · Q8_0 21% · F32 0.1%' by share of parameters."""
    total = sum(t["params"] for t in types.values()) or 1
    parts = []
    for name, t in types.items():
        share = 100 * t["params"] / total
        parts.append(f"{name} {share:.0f}%" if share >= 1 else f"{name} {share:.1g}%")
    return " · ".join(parts)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:,.0f}"
