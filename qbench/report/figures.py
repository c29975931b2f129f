"""Plotly figures for the report. One colour per backend; hover names the cell."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

BACKEND_COLOURS = {"llama.cpp": "#1f77b4", "transformers": "#d62728"}


def quality_vs_size(rows: list[dict[str, Any]], y: str, y_err: str | None, title: str,
                    y_label: str) -> go.Figure | None:
    """Bits per weight vs a quality metric, with the Pareto frontier (lower is better)."""
    pts = [r for r in rows if r.get("bpw") is not None and r.get(y) is not None]
    if not pts:
        return None
    fig = go.Figure()
    for backend in sorted({r["backend"] for r in pts}):
        sel = [r for r in pts if r["backend"] == backend]
        fig.add_trace(go.Scatter(
            x=[r["bpw"] for r in sel], y=[r[y] for r in sel], mode="markers+text",
            name=backend, text=[r["quant"] for r in sel], textposition="top center",
            marker={"size": 10, "color": BACKEND_COLOURS.get(backend, "#555")},
            error_y=({"type": "data", "array": [r.get(y_err) or 0 for r in sel]}
                     if y_err else None),
            customdata=[[r["model"], r["quant"], r.get("size_mb")] for r in sel],
            hovertemplate=("%{customdata[0]} %{customdata[1]}<br>%{x:.3f} bits/weight, "
                           "%{customdata[2]:.1f} MiB<br>" + y_label + " %{y:.4g}<extra></extra>"),
        ))
    frontier = pareto(pts, "bpw", y)
    if len(frontier) > 1:
        fig.add_trace(go.Scatter(x=[r["bpw"] for r in frontier], y=[r[y] for r in frontier],
                                 mode="lines", name="Pareto frontier",
                                 line={"dash": "dot", "color": "#888"}, hoverinfo="skip"))
    fig.update_layout(title=title, xaxis_title="bits per weight (measured)",
                      yaxis_title=y_label, template="plotly_white", height=420,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def pareto(rows: list[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    """Rows not beaten on both smaller x and smaller y, sorted by x."""
    out, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r[x], r[y])):
        if r[y] < best:
            out.append(r)
            best = r[y]
    return out
