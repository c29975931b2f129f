"""Plotly figures for the report. One colour per backend, one marker symbol per model; hovering a
point names the cell (model / backend / variant) and its numbers; Pareto frontiers are dotted.

Every user-supplied string that reaches a figure goes through :func:`html.escape` first: plotly
renders a subset of HTML in labels, and a model called ``<img src=x onerror=...>`` must show as
text. (plotly.io also escapes ``<`` in the embedded JSON, so nothing can close the script tag.)
"""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go

from qbench.metrics import Value, known_metric_info, metric_names
from qbench.report.floor import floor_lines
from qbench.report.table import memory_of

BACKEND_COLOURS = {"llama.cpp": "#1f77b4", "transformers": "#d62728", "vllm": "#2ca02c",
                   "exllamav2": "#9467bd"}
_SPARE = ["#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "star", "cross", "pentagon"]
_LAYOUT = {"template": "plotly_white", "height": 440,
           "margin": {"l": 70, "r": 20, "t": 60, "b": 60},
           "legend": {"orientation": "h", "y": -0.18}}


def colour(backend: str, backends: list[str]) -> str:
    if backend in BACKEND_COLOURS:
        return BACKEND_COLOURS[backend]
    others = [b for b in backends if b not in BACKEND_COLOURS]
    return _SPARE[others.index(backend) % len(_SPARE)] if backend in others else "#555"


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _groups(pts: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(backend, model, rows) groups in a stable order."""
    keys = sorted({(r["backend"], r["model"]) for r in pts})
    return [(b, m, [r for r in pts if r["backend"] == b and r["model"] == m]) for b, m in keys]


def _symbol(model: str, models: list[str]) -> str:
    return SYMBOLS[models.index(model) % len(SYMBOLS)]


def _hover(r: dict[str, Any], lines: list[str]) -> str:
    return "<br>".join([f"<b>{esc(r['label'])}</b>", *(ln for ln in lines if ln)])


def pareto(rows: list[dict[str, Any]], x: str, y: str, *, maximize_y: bool = False
           ) -> list[dict[str, Any]]:
    """Rows no other row beats on both smaller x and better y, sorted by x."""
    out: list[dict[str, Any]] = []
    best = float("-inf") if maximize_y else float("inf")
    for r in sorted(rows, key=lambda r: (r[x], -r[y] if maximize_y else r[y])):
        better = r[y] > best if maximize_y else r[y] < best
        if better:
            out.append(r)
            best = r[y]
    return out


def quality_vs_size(rows: list[dict[str, Any]], key: str, *, title: str, y_label: str,
                    higher_is_better: bool = False, fmt_y: str = ".4g", x: str = "bpw",
                    x_label: str = "bits per weight (measured from the file)",
                    floors: list[tuple[str, str, float, str]] | None = None
                    ) -> go.Figure | None:
    """Measured bits per weight (or another size, ``x``: resident MiB) vs a stored value
    (``metric.value``), each model's Pareto frontier dotted, error bars from the stored
    standard error; ``floors`` (model, backend, value, twin): a dashed line per model at the
    value a no-loss twin of its base shows (qbench.report.floor)."""
    pts = [r | {"_y": r["values"][key][0], "_e": r["values"][key][1], "_x": r[x]} for r in rows
           if r.get(x) is not None and (r.get("values") or {}).get(key, (None,))[0]
           is not None]
    if not pts:
        return None
    backends = sorted({r["backend"] for r in pts})
    models = sorted({r["model"] for r in pts})
    fig = go.Figure()
    for backend, model, sel in _groups(pts):
        err = [r["_e"] or 0 for r in sel]
        fig.add_trace(go.Scatter(
            x=[r["_x"] for r in sel], y=[r["_y"] for r in sel], mode="markers+text",
            name=esc(backend) + (f" · {esc(model)}" if len(models) > 1 else ""),
            text=[esc(r["quant"]) for r in sel], textposition="top center",
            marker={"size": 11, "color": colour(backend, backends),
                    "symbol": _symbol(model, models)},
            error_y={"type": "data", "array": err, "visible": True} if any(err) else None,
            hovertext=[_hover(r, [
                f"{r['bpw']:.3f} bits/weight, {r['size_mb']:.1f} MiB" if r.get("size_mb")
                else f"{r['bpw']:.3f} bits/weight",
                f"{esc(y_label)}: {format(r['_y'], fmt_y)}"
                + (f" ± {format(r['_e'], '.2g')}" if r["_e"] else ""),
                f"resident {r['resident_mb']:.1f} MiB: {esc(r.get('resident_how') or '')}"
                if x == "resident_mb" and r.get("resident_mb") else "",
                "base" if r["is_base"] else ""]) for r in sel],
            hoverinfo="text",
        ))
    for model in models:
        sel = [r for r in pts if r["model"] == model]
        front = pareto(sel, "_x", "_y", maximize_y=higher_is_better)
        if len(front) > 1:
            fig.add_trace(go.Scatter(
                x=[r["_x"] for r in front], y=[r["_y"] for r in front], mode="lines",
                name="Pareto frontier" + (f" · {esc(model)}" if len(models) > 1 else ""),
                line={"dash": "dot", "color": "#888"}, hoverinfo="skip"))
    lo, hi = min(r["_x"] for r in pts), max(r["_x"] for r in pts)
    for model, backend, level, twin in floors or []:
        if model not in models:
            continue
        fig.add_trace(go.Scatter(
            x=[lo, hi], y=[level, level], mode="lines",
            name=esc(f"floor: {twin} ({backend}" + (f", {model})" if len(models) > 1 else ")")),
            line={"dash": "dash", "color": "#2ca02c"},
            hovertext=esc(f"{model}: the {twin} twin of the base at {level:.3g}: a variant at "
                          "or below it loses no more than a change of float format"),
            hoverinfo="text"))
    fig.update_layout(title=esc(title), xaxis_title=esc(x_label),
                      yaxis_title=esc(y_label) + (" (higher is better)" if higher_is_better
                                                  else " (lower is better)"), **_LAYOUT)
    return fig


def _tg_traces(fig: go.Figure, pts: list[dict[str, Any]], x: Any, hover: Any, *,
               error: bool) -> None:
    """One marker trace of tg tokens/s per backend and model, labelled by quant, at x(row)."""
    backends = sorted({r["backend"] for r in pts})
    models = sorted({r["model"] for r in pts})
    for backend, model, sel in _groups(pts):
        fig.add_trace(go.Scatter(
            x=[x(r) for r in sel], y=[r["tg_tps"] for r in sel], mode="markers+text",
            name=esc(backend) + (f" · {esc(model)}" if len(models) > 1 else ""),
            text=[esc(r["quant"]) for r in sel], textposition="top center",
            marker={"size": 11, "color": colour(backend, backends),
                    "symbol": _symbol(model, models)},
            error_y=({"type": "data", "array": [r.get("tg_sd") or 0 for r in sel],
                      "visible": True} if error else None),
            hovertext=[_hover(r, hover(r)) for r in sel], hoverinfo="text"))


def speed_vs_memory(rows: list[dict[str, Any]]) -> go.Figure | None:
    """Generation speed vs the measured peak memory of the variant's process."""
    pts = []
    for r in rows:
        mem, kind = memory_of(r)
        if mem is not None and r.get("tg_tps") is not None:
            pts.append({**r, "_mem": mem, "_mem_kind": kind})
    if not pts:
        return None
    fig = go.Figure()
    _tg_traces(fig, pts, lambda r: r["_mem"], lambda r: [
        f"{r['_mem_kind']}: {r['_mem']:.0f} MiB",
        f"tg: {r['tg_tps']:.1f} ± {r.get('tg_sd') or 0:.1f} tokens/s",
        f"pp: {r['pp_tps']:.1f} tokens/s" if r.get("pp_tps") else "",
        f"device: {esc(r.get('device') or '?')}"], error=True)
    front = pareto(pts, "_mem", "tg_tps", maximize_y=True)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[r["_mem"] for r in front], y=[r["tg_tps"] for r in front],
                                 mode="lines", name="Pareto frontier",
                                 line={"dash": "dot", "color": "#888"}, hoverinfo="skip"))
    fig.update_layout(title="Generation speed vs peak memory (mean ± sd over repetitions)",
                      xaxis_title="peak memory of the cell process, MiB (VRAM on GPU, else RSS)",
                      yaxis_title="tg tokens/s (higher is better)", **_LAYOUT)
    return fig


def roofline(rows: list[dict[str, Any]]) -> go.Figure | None:
    """tg tokens/s vs bytes read per token, with the memory roofline: at the machine's
    measured bandwidth B, no variant can generate faster than B / (bytes per token)."""
    pts = [r for r in rows if r.get("tg_tps") and r.get("bytes_per_token")]
    if not pts:
        return None
    fig = go.Figure()
    _tg_traces(fig, pts, lambda r: r["bytes_per_token"] / 1e6, lambda r: [
        f"{r['bytes_per_token'] / 1e6:.1f} MB read per token",
        f"tg: {r['tg_tps']:.1f} tokens/s",
        f"{r['tg_gbs']:.2f} GB/s" if r.get("tg_gbs") else "",
        f"{r['tg_bw_pct']:.0f} % of measured" if r.get("tg_bw_pct") is not None else ""],
        error=False)
    measured = max((r["measured_gbs"] for r in pts if r.get("measured_gbs")), default=None)
    if measured:
        lo = min(r["bytes_per_token"] for r in pts) / 2
        hi = max(r["bytes_per_token"] for r in pts) * 2
        xs = [lo * (hi / lo) ** (i / 40) for i in range(41)]
        fig.add_trace(go.Scatter(x=[x / 1e6 for x in xs], y=[measured * 1e9 / x for x in xs],
                                 mode="lines", name=f"roofline: {measured:.1f} GB/s measured",
                                 line={"dash": "dash", "color": "#444"}, hoverinfo="skip"))
    fig.update_layout(title="Generation speed vs bytes read per token, with the memory "
                      "roofline", xaxis_title="MB read per generated token (log)",
                      yaxis_title="tg tokens/s (log; higher is better)", xaxis_type="log",
                      yaxis_type="log", **_LAYOUT)
    return fig


def speed_vs_depth(rows: list[dict[str, Any]]) -> go.Figure | None:
    """pp and tg tokens/s as the KV cache fills (llama-bench -d), one line per variant."""
    pts = [r for r in rows if len(r.get("depth_curve") or []) > 1]
    if not pts:
        return None
    backends = sorted({r["backend"] for r in pts})
    fig = go.Figure()
    for r in pts:
        curve = sorted(r["depth_curve"], key=lambda p: p["depth"])
        for kind, dash in (("tg", "solid"), ("pp", "dot")):
            ys = [p.get(f"{kind}_tokens_per_s") for p in curve]
            if not any(y is not None for y in ys):
                continue
            fig.add_trace(go.Scatter(
                x=[p["depth"] for p in curve], y=ys, mode="lines+markers",
                name=f"{esc(r['label'])} · {kind}",
                line={"dash": dash, "color": colour(r["backend"], backends)}))
    fig.update_layout(title="Speed as the context fills (tokens already in the KV cache)",
                      xaxis_title="depth, tokens in the KV cache",
                      yaxis_title="tokens/s (higher is better)", **_LAYOUT)
    return fig


def deltas_vs_base(rows: list[dict[str, Any]], key: str) -> go.Figure | None:
    """The judge's change of ``key`` (metric.value) per variant against its base, one bar each,
    with its 95 % interval (asymmetric where the change is a ratio); hatched where the
    interval excludes no change."""
    pts = [(r, r["judged"][key]) for r in rows if not r["is_base"]
           and key in (r.get("judged") or {}) and r["judged"][key].change is not None]
    if not pts:
        return None
    unit = pts[0][1].unit
    backends = sorted({r["backend"] for r, _ in pts})
    fig = go.Figure()
    for backend in backends:
        sel = [(r, j) for r, j in pts if r["backend"] == backend]
        up = [(j.high - j.change) if j.high is not None else 0 for _, j in sel]
        down = [(j.change - j.low) if j.low is not None else 0 for _, j in sel]
        fig.add_trace(go.Bar(
            x=[esc(f"{r['model']} {r['quant']}") for r, _ in sel],
            y=[j.change for _, j in sel], name=esc(backend),
            marker_color=colour(backend, backends),
            marker_pattern_shape=["/" if j.low is not None and (j.low > 0 or j.high < 0)
                                  else "" for _, j in sel],
            error_y={"type": "data", "symmetric": False, "visible": True,
                     "array": up, "arrayminus": down},
            hovertext=[_hover(r, [esc(j.interval_text()), esc(j.method),
                                  f"vs {esc(r.get('base_label') or '?')}"]) for r, j in sel],
            hoverinfo="text"))
    metric, value = key.split(".", 1)
    better = "higher" if pts[0][1].higher_is_better else "lower"
    fig.update_layout(title=esc(f"{metric} {value}: change vs the base variant (bars: 95 % "
                                "interval of the one judge, paired; hatched: excludes 0)"),
                      yaxis_title=esc(f"Δ {value}, {unit} ({better} is better)"),
                      barmode="group", **_LAYOUT)
    return fig


def _figure_id(metric: str, value: Value, primary: str, kind: str) -> str:
    return f"{kind}-{metric}" if value.name == primary else f"{kind}-{metric}-{value.name}"


def suite_figures(rows: list[dict[str, Any]], kv_ctx: int | None = None
                  ) -> list[tuple[str, go.Figure | None]]:
    """(id, figure or None) in page order; None where this run has no data for that plot.
    Quality plots and deltas come from the registry: every value a metric declares with a
    ``figure`` is drawn against bits per weight and, when rows carry ``resident_mb``
    (qbench.report.resident), against resident MiB at ``kv_ctx``; a value of a metric measured
    against the base gets its floor line (qbench.report.floor); every paired value a delta vs
    the base."""
    metrics = sorted({m for r in rows for m in r.get("cells", {})},
                     key=lambda m: (metric_names().index(m) if m in metric_names() else 99, m))
    quality, resident, deltas = [], [], []
    for metric in metrics:
        info = known_metric_info(metric)
        for v in info.value_specs() if info else ():
            if v.figure:
                key = f"{metric}.{v.name}"
                floors = floor_lines(rows, key) if info.needs_base else None
                quality.append((_figure_id(metric, v, info.primary, "bpw"),
                                quality_vs_size(rows, key, title=v.figure,
                                                y_label=f"{metric} {v.name}",
                                                higher_is_better=v.higher_is_better,
                                                floors=floors)))
                if kv_ctx:
                    resident.append((_figure_id(metric, v, info.primary, "resident"),
                                     quality_vs_size(
                                         rows, key, title=_resident_title(v.figure, kv_ctx),
                                         y_label=f"{metric} {v.name}",
                                         higher_is_better=v.higher_is_better, floors=floors,
                                         x="resident_mb",
                                         x_label=f"resident MiB: every weight tensor (embedding "
                                                 f"and output included) + KV cache at "
                                                 f"{kv_ctx:,} tokens")))
            # a metric measured against the base (KLD) is itself the delta: no bars for it
            if v.pairing is not None and v.name == info.primary and not info.needs_base:
                deltas.append((_figure_id(metric, v, info.primary, "delta"),
                               deltas_vs_base(rows, f"{metric}.{v.name}")))
    return [*quality, *resident, ("speed-memory", speed_vs_memory(rows)),
            ("roofline", roofline(rows)), ("speed-depth", speed_vs_depth(rows)), *deltas]


def _resident_title(title: str, kv_ctx: int) -> str:
    """'X vs bits per weight' restated against resident memory."""
    head = title.split(" vs ")[0]
    return f"{head} vs resident memory (weights + KV cache at {kv_ctx:,} tokens)"
