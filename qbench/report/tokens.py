"""Per-token histograms: every token's value of a variant, and paired against another variant
on the same tokens (exllamav3's histogram of KLD minus the noise floor, for any pair).

The data are the per-token series a record carries (``details["per_token"]``, decoded by
qbench.metrics.token_codec): any metric that stores them gets these plots, none is named here.
Two series pair when both cells scored the same tokens: the same pairing identity (dataset,
context, chunks, base) as the metric's primary value declares, and the same length.

The figures hold binned counts, not the tokens (8,000 tokens x 14 variants x 13 references
would be megabytes of page): 60 bins over the decades the data span; a menu picks the
reference variant of the paired plot.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import plotly.graph_objects as go

from qbench.metrics import known_metric_info, token_codec

EPS = 1e-9          # a token's value below this counts as this in a ratio (KLD of 0)
BINS = 60


def series(rows: list[dict[str, Any]], metric: str, name: str
           ) -> list[tuple[dict[str, Any], np.ndarray, tuple[Any, ...]]]:
    """(row, per-token values, pairing identity) of every row whose ``metric`` cell (main
    context) stores the series ``name``."""
    info = known_metric_info(metric)
    spec = info.value_spec(info.primary) if info else None
    ident_keys = spec.pairing.identity if spec is not None and spec.pairing else ()
    out = []
    for r in rows:
        cell = r["cells"].get(metric)
        if not cell or cell.get("status") != "ok":
            continue
        details = cell.get("details") or {}
        got = token_codec.per_token(details).get(name)
        if got is not None and len(got):
            out.append((r, got, tuple(details.get(k) for k in ident_keys)))
    return out


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Summary of ``b`` against ``a`` on the same tokens: the share of tokens where b is
    larger, the median and 90th percentile of log10(b / a) (values floored at ``EPS``)."""
    r = np.log10(np.maximum(b, EPS) / np.maximum(a, EPS))
    return {"tokens": float(len(r)), "share_higher": float((b > a).mean()),
            "median_log10_ratio": float(np.median(r)), "p90_log10_ratio": float(np.percentile(r, 90))}


def _edges(lo: float, hi: float) -> np.ndarray:
    return np.linspace(lo, hi, BINS + 1)


def _bars(values: np.ndarray, edges: np.ndarray) -> tuple[list[float], list[float]]:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    mids = (edges[:-1] + edges[1:]) / 2
    share = 100.0 * counts / max(len(values), 1)
    return mids.tolist(), share.tolist()


def token_figures(rows: list[dict[str, Any]], floors: dict[tuple[str, str], str] | None = None
                  ) -> list[tuple[str, go.Figure | None]]:
    """Per metric and series with per-token data, per model: the distribution of log10 of each
    variant's per-token value, and the paired log10 ratio against a reference variant chosen
    in a menu (first: the model's floor twin when ``floors`` names one)."""
    out: list[tuple[str, go.Figure | None]] = []
    names = sorted({(m, n) for r in rows for m, c in r["cells"].items()
                    if c.get("status") == "ok"
                    for n in ((c.get("details") or {}).get("per_token") or {})})
    for metric, name in names:
        got = series(rows, metric, name)
        for model in sorted({r["model"] for r, _, _ in got}):
            mine = [(r, v, i) for r, v, i in got if r["model"] == model and not r["is_base"]]
            if not mine:
                continue
            fid = f"tokens-{metric}-{name}-{model}"
            out.append((fid, _distribution(mine, metric, name, model)))
            ref_first = (floors or {}).get((mine[0][0]["suite"], model))
            out.append((fid + "-paired", _paired_figure(mine, metric, name, model, ref_first)))
    return out


def _distribution(items: list[tuple[dict[str, Any], np.ndarray, tuple[Any, ...]]],
                  metric: str, name: str, model: str) -> go.Figure:
    logs = [np.log10(np.maximum(v, EPS)) for _, v, _ in items]
    edges = _edges(math.floor(min(x.min() for x in logs)), math.ceil(max(x.max() for x in logs)))
    fig = go.Figure()
    for (r, v, _), x in zip(items, logs):
        mids, share = _bars(x, edges)
        fig.add_trace(go.Scatter(x=mids, y=share, mode="lines", line={"shape": "hvh"},
                                 name=html.escape(r["quant"]),
                                 hovertext=html.escape(f"{r['label']}: median {np.median(v):.3g}"),
                                 hoverinfo="text+y"))
    fig.update_layout(
        title=html.escape(f"{model}: per-token {metric} {name} (every scored token; click the "
                          "legend to compare any two)"),
        xaxis_title=html.escape(f"log10 per-token {name} (values below {EPS:g} drawn at it)"),
        yaxis_title="% of tokens", template="plotly_white", height=440,
        margin={"l": 70, "r": 20, "t": 60, "b": 60}, legend={"orientation": "h", "y": -0.2})
    return fig


def _paired_figure(items: list[tuple[dict[str, Any], np.ndarray, tuple[Any, ...]]],
                   metric: str, name: str, model: str, first_ref: str | None) -> go.Figure | None:
    refs = sorted(items, key=lambda it: (it[0]["label"] != first_ref, it[0]["quant"]))
    edges = _edges(-4, 4)
    fig = go.Figure()
    buttons, groups = [], []
    for ref, rv, rid in refs:
        start = len(fig.data)
        for r, v, ident in items:
            if r is ref or ident != rid or len(v) != len(rv):
                continue
            s = paired(rv, v)
            mids, share = _bars(np.log10(np.maximum(v, EPS) / np.maximum(rv, EPS)), edges)
            fig.add_trace(go.Scatter(
                x=mids, y=share, mode="lines", line={"shape": "hvh"},
                name=html.escape(f"{r['quant']} vs {ref['quant']}"), visible=not groups,
                hovertext=html.escape(
                    f"{r['label']} vs {ref['label']}: higher on {100 * s['share_higher']:.1f} % "
                    f"of tokens, median ratio {10 ** s['median_log10_ratio']:.3g}"),
                hoverinfo="text+y"))
        if len(fig.data) > start:
            groups.append((ref, start, len(fig.data)))
    if not groups:
        return None
    for ref, a, b in groups:
        visible = [a <= i < b for i in range(len(fig.data))]
        buttons.append({"label": html.escape(ref["quant"]), "method": "update",
                        "args": [{"visible": visible},
                                 {"title": html.escape(_paired_title(model, metric, name,
                                                                     ref["quant"]))}]})
    fig.update_layout(
        title=html.escape(_paired_title(model, metric, name, groups[0][0]["quant"])),
        xaxis_title=html.escape(f"log10 ({name} of the variant / {name} of the reference), "
                                "same token"),
        yaxis_title="% of tokens", template="plotly_white", height=460,
        margin={"l": 70, "r": 20, "t": 90, "b": 60}, legend={"orientation": "h", "y": -0.2},
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right",
                      "y": 1.18, "yanchor": "top", "showactive": True}])
    return fig


def _paired_title(model: str, metric: str, name: str, ref: str) -> str:
    return (f"{model}: per-token {metric} {name}, paired against {ref} on the same tokens "
            "(menu: the reference)")
