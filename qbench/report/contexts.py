"""The loss against context depth: each variant's values at every context its suite listed
(``ctx = [512, 8192]``, qbench.metrics.depth), as a table and plots.

Per metric whose cells come at several contexts, from its declaration: a metric measured
against the base (KLD) shows its primary value; any other metric with a paired primary value
(perplexity) shows the one judge's change against the base *at the same context* (ΔPPL %, the
same chunks). A quantized KV cache's error grows with the context it holds (ik_llama.cpp PR
#1547): this is where that shows.
"""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go

from qbench.metrics import known_metric_info, metric_names
from qbench.report.floor import floor_verdicts
from qbench.results.judge import judge


def _cells_at(row: dict[str, Any], point: str) -> dict[str, Any]:
    return row["cells"] if not point else (row.get("points") or {}).get(point, {})


def _ctx(cell: dict[str, Any] | None) -> int | None:
    c = ((cell or {}).get("options") or {}).get("ctx")
    return int(c) if isinstance(c, int) and not isinstance(c, bool) else None


def _ok(cell: dict[str, Any] | None) -> bool:
    return bool(cell) and cell.get("status") == "ok"  # type: ignore[union-attr]


def depth_view(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """{contexts, columns: [{metric, value, kind, label}], rows: [{label, by: {(metric,
    ctx): {...}}}]} for the variants measured at more than one context; None when none is."""
    multi = [r for r in rows if r.get("points")]
    if not multi:
        return None
    for point in sorted({p for r in multi for p in r["points"]}):
        floor_verdicts(rows, point)
    metrics = [m for m in metric_names()
               if any(m in pts for r in multi for pts in r["points"].values())]
    columns = []
    for m in metrics:
        info = known_metric_info(m)
        spec = info.value_spec(info.primary) if info else None
        if info is None or spec is None:
            continue
        if info.needs_base:
            columns.append({"metric": m, "value": spec.name, "kind": "value", "spec": spec,
                            "label": f"{m} {spec.name}"})
        elif spec.pairing is not None:
            columns.append({"metric": m, "value": spec.name, "kind": "change", "spec": spec,
                            "label": f"Δ{m} {spec.name} vs base, {spec.unit}"})
    bases = {(r["suite"], r["model"], r["label"]): r for r in rows if r["is_base"]}
    out_rows, contexts = [], set()
    for r in rows:
        if not r.get("points") and not r["is_base"]:
            continue
        base = next((b for (s, m, label), b in bases.items()
                     if s == r["suite"] and m == r["model"] and label == r.get("base_label")),
                    r if r["is_base"] else None)
        by: dict[tuple[str, int], dict[str, Any]] = {}
        for point in ["", *sorted(r.get("points") or {})]:
            cells = _cells_at(r, point)
            for col in columns:
                cell = cells.get(col["metric"])
                ctx = _ctx(cell)
                if not _ok(cell) or ctx is None:
                    continue
                contexts.add(ctx)
                entry: dict[str, Any] = {"point": point}
                if col["kind"] == "value":
                    v = (cell.get("values") or {}).get(col["value"]) or {}
                    entry |= {"value": v.get("value"), "err": v.get("stderr")}
                    floor = ((r.get("floor_points") or {}).get(point) if point
                             else r.get("floor")) or {}
                    entry["floor"] = floor.get(f"{col['metric']}.{col['value']}")
                elif r["is_base"]:
                    entry |= {"value": 0.0, "base": True}
                else:
                    ref = _cells_at(base, point).get(col["metric"]) if base else None
                    if _ok(ref) and _ctx(ref) == ctx:
                        j = judge(col["metric"], col["spec"], ref, cell)
                        entry |= {"judgement": j, "value": j.change, "low": j.low,
                                  "high": j.high}
                    else:
                        entry["why"] = "no ok base cell at this context"
                by[(col["metric"], ctx)] = entry
        if by:
            out_rows.append({"label": r["label"], "quant": r["quant"], "is_base": r["is_base"],
                             "backend": r["backend"], "model": r["model"], "by": by})
    if len({c for c in contexts}) < 2:
        return None
    return {"contexts": sorted(contexts), "columns": columns, "rows": out_rows}


def depth_figures(view: dict[str, Any] | None) -> list[tuple[str, go.Figure | None]]:
    """Per column of the view: the value (or change vs base) against context, a line per
    variant measured at more than one context."""
    if not view:
        return []
    out = []
    for col in view["columns"]:
        fig = go.Figure()
        for r in view["rows"]:
            pts = sorted((ctx, e) for (m, ctx), e in r["by"].items()
                         if m == col["metric"] and e.get("value") is not None)
            if len(pts) < 2 or r["is_base"]:
                continue
            err = None
            if col["kind"] == "change" and all(e.get("low") is not None for _, e in pts):
                err = {"type": "data", "symmetric": False, "visible": True,
                       "array": [e["high"] - e["value"] for _, e in pts],
                       "arrayminus": [e["value"] - e["low"] for _, e in pts]}
            fig.add_trace(go.Scatter(
                x=[c for c, _ in pts], y=[e["value"] for _, e in pts], mode="lines+markers",
                name=html.escape(r["quant"]), error_y=err,
                hovertext=[html.escape(f"{r['label']} at ctx {c}: {e['value']:.4g}")
                           for c, e in pts], hoverinfo="text"))
        if not fig.data:
            continue
        fig.update_layout(
            title=html.escape(f"{col['label']} against context (tokens)"),
            xaxis={"title": "context, tokens (each cell's chunks are ctx tokens long)",
                   "type": "log", "tickvals": view["contexts"]},
            yaxis={"title": html.escape(col["label"]),
                   "type": "log" if col["kind"] == "value" else "linear"},
            template="plotly_white", height=440,
            margin={"l": 70, "r": 20, "t": 60, "b": 60}, legend={"orientation": "h", "y": -0.2})
        out.append((f"depth-{col['metric']}", fig))
    return out
