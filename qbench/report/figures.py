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


def quality_vs_size(rows: list[dict[str, Any]], y: str, y_err: str | None, *, title: str,
                    y_label: str, higher_is_better: bool = False,
                    fmt_y: str = ".4g") -> go.Figure | None:
    """Measured bits per weight vs a quality metric, each model's Pareto frontier dotted."""
    pts = [r for r in rows if r.get("bpw") is not None and r.get(y) is not None]
    if not pts:
        return None
    backends = sorted({r["backend"] for r in pts})
    models = sorted({r["model"] for r in pts})
    fig = go.Figure()
    for backend, model, sel in _groups(pts):
        err = [r.get(y_err) or 0 for r in sel] if y_err else None
        fig.add_trace(go.Scatter(
            x=[r["bpw"] for r in sel], y=[r[y] for r in sel], mode="markers+text",
            name=esc(backend) + (f" · {esc(model)}" if len(models) > 1 else ""),
            text=[esc(r["quant"]) for r in sel], textposition="top center",
            marker={"size": 11, "color": colour(backend, backends),
                    "symbol": _symbol(model, models)},
            error_y={"type": "data", "array": err, "visible": True} if err else None,
            hovertext=[_hover(r, [
                f"{r['bpw']:.3f} bits/weight, {r['size_mb']:.1f} MiB" if r.get("size_mb")
                else f"{r['bpw']:.3f} bits/weight",
                f"{esc(y_label)}: {format(r[y], fmt_y)}"
                + (f" ± {format(r[y_err], '.2g')}" if y_err and r.get(y_err) else ""),
                "base" if r["is_base"] else ""]) for r in sel],
            hoverinfo="text",
        ))
    for model in models:
        sel = [r for r in pts if r["model"] == model]
        front = pareto(sel, "bpw", y, maximize_y=higher_is_better)
        if len(front) > 1:
            fig.add_trace(go.Scatter(
                x=[r["bpw"] for r in front], y=[r[y] for r in front], mode="lines",
                name="Pareto frontier" + (f" · {esc(model)}" if len(models) > 1 else ""),
                line={"dash": "dot", "color": "#888"}, hoverinfo="skip"))
    fig.update_layout(title=title, xaxis_title="bits per weight (measured from the file)",
                      yaxis_title=y_label + (" (higher is better)" if higher_is_better
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


def deltas_vs_base(rows: list[dict[str, Any]]) -> go.Figure | None:
    """ΔPPL % per variant against its model's base, one bar each, with the table's 95 %
    interval (computed on ln(PPL ratio), so asymmetric; paired where the data are)."""
    pts = [r for r in rows if not r["is_base"] and r.get("dppl_pct") is not None]
    if not pts:
        return None
    backends = sorted({r["backend"] for r in pts})
    fig = go.Figure()
    for backend in backends:
        sel = [r for r in pts if r["backend"] == backend]
        up, down = zip(*(_interval_arms(r) for r in sel))
        fig.add_trace(go.Bar(
            x=[esc(f"{r['model']} {r['quant']}") for r in sel], y=[r["dppl_pct"] for r in sel],
            name=esc(backend), marker_color=colour(backend, backends),
            error_y={"type": "data", "symmetric": False, "visible": True,
                     "array": list(up), "arrayminus": list(down)},
            hovertext=[_hover(r, [f"ΔPPL {r['dppl_pct']:+.2f} %" + _interval_text(r),
                                  esc(r.get("dppl_paired") or r.get("dppl_how") or ""),
                                  f"vs {esc(r.get('base_label') or '?')}"]) for r in sel],
            hoverinfo="text"))
    fig.update_layout(title="Perplexity change vs the base variant (bars: 95 % interval, "
                            "paired where the data are)",
                      yaxis_title="ΔPPL % (lower is better)", barmode="group", **_LAYOUT)
    return fig


def _interval_arms(r: dict[str, Any]) -> tuple[float, float]:
    """Upper and lower error-bar lengths of ``r``'s ΔPPL interval (0, 0 when it has none)."""
    lo, hi = r.get("dppl_ci_low"), r.get("dppl_ci_high")
    if lo is None or hi is None:
        return 0.0, 0.0
    return hi - r["dppl_pct"], r["dppl_pct"] - lo


def _interval_text(r: dict[str, Any]) -> str:
    lo, hi = r.get("dppl_ci_low"), r.get("dppl_ci_high")
    return "" if lo is None or hi is None else f", 95 % interval [{lo:+.2f}, {hi:+.2f}]"


def mmlu_deltas(rows: list[dict[str, Any]]) -> go.Figure | None:
    """MMLU accuracy difference vs the base with the paired 95 % CI; significant ones marked."""
    pts = [r for r in rows if r.get("mmlu_paired")]
    if not pts:
        return None
    backends = sorted({r["backend"] for r in pts})
    fig = go.Figure()
    for backend in backends:
        sel = [r for r in pts if r["backend"] == backend]
        d = [100 * r["mmlu_paired"]["diff"] for r in sel]
        fig.add_trace(go.Bar(
            x=[esc(f"{r['model']} {r['quant']}") for r in sel], y=d, name=esc(backend),
            marker_color=colour(backend, backends),
            marker_pattern_shape=["/" if r["mmlu_paired"]["significant"] else "" for r in sel],
            error_y={"type": "data", "symmetric": False, "visible": True,
                     "array": [100 * r["mmlu_paired"]["ci_high"] - v for r, v in zip(sel, d)],
                     "arrayminus": [v - 100 * r["mmlu_paired"]["ci_low"]
                                    for r, v in zip(sel, d)]},
            hovertext=[_hover(r, [
                f"Δ accuracy {100 * p['diff']:+.1f} points, 95 % CI "
                f"[{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}]",
                f"flipped: +{p['flips_gained']} / −{p['flips_lost']} of {p['n']}, "
                f"McNemar p = {p['p_value']:.3g}"
                + (" (significant)" if p["significant"] else " (not significant)")])
                for r in sel for p in [r["mmlu_paired"]]],
            hoverinfo="text"))
    fig.update_layout(title="MMLU accuracy vs the base: paired difference with 95 % CI "
                            "(hatched: significant, exact McNemar p < 0.05)",
                      yaxis_title="Δ accuracy, points (higher is better)", barmode="group",
                      **_LAYOUT)
    return fig


def suite_figures(rows: list[dict[str, Any]]) -> list[tuple[str, go.Figure | None]]:
    """(id, figure or None) in page order; None where this run has no data for that plot."""
    return [
        ("bpw-ppl", quality_vs_size(rows, "ppl", "ppl_err", title="Perplexity vs bits per weight",
                                    y_label="perplexity")),
        ("bpw-kld", quality_vs_size(rows, "kld", "kld_err", title="KL divergence from the base "
                                    "vs bits per weight", y_label="mean KLD, nats")),
        ("bpw-mmlu", quality_vs_size(rows, "acc", "acc_err", title="MMLU accuracy vs bits per "
                                     "weight", y_label="MMLU accuracy", higher_is_better=True,
                                     fmt_y=".3f")),
        ("speed-memory", speed_vs_memory(rows)),
        ("roofline", roofline(rows)),
        ("speed-depth", speed_vs_depth(rows)),
        ("delta-ppl", deltas_vs_base(rows)),
        ("delta-mmlu", mmlu_deltas(rows)),
    ]
