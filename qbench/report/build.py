"""Result records -> a static site: one self-contained HTML page per suite plus an index.

A pure function of the records (no measurement, no network): plotly.js is inlined once per page
so the page opens from file:// offline; every user string goes through Jinja's autoescape.
"""

from __future__ import annotations

import html
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import plotly.io as pio
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from .. import __version__
from ..fsutil import atomic_write_text
from ..metrics import METRIC_NAMES, metric_info
from .figures import quality_vs_size
from .table import fmt, type_mix, variant_rows

_ENV = Environment(loader=PackageLoader("qbench", "report/templates"),
                   autoescape=select_autoescape(["html"]))
_ENV.filters["fmt"] = fmt
_ENV.filters["type_mix"] = type_mix


def _figures(rows: list[dict[str, Any]]) -> list[Markup]:
    figs = [quality_vs_size(rows, "ppl", "ppl_err", "Perplexity vs bits per weight",
                            "perplexity")]
    out, first = [], True
    for fig in figs:
        if fig is None:
            continue
        # plotly.js goes into the first figure only; the others reuse it
        out.append(Markup(pio.to_html(fig, include_plotlyjs=True if first else False,
                                      full_html=False, config={"displaylogo": False})))
        first = False
    return out


def _environments(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for r in records:
        env = dict(r.get("env") or {})
        be = r.get("backend") or {}
        if be.get("system_info"):
            env["llama.cpp build"] = be["system_info"]
        key = repr(sorted((k, repr(v)) for k, v in env.items()))
        seen.setdefault(key, env)
    return list(seen.values())


def _methodology(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    used = {r["metric"] for r in records}
    out = []
    for name in METRIC_NAMES:
        if name in used:
            opts = next(r["options"] for r in records if r["metric"] == name)
            out.append({"name": name, "text": metric_info(name).methodology, "options": opts})
    return out


def render_suite(suite: str, records: list[dict[str, Any]]) -> str:
    rows = variant_rows(records)
    datasets = sorted({f"{r['details'].get('dataset')} ({r['details'].get('dataset_origin')}, "
                       f"sha256 {str(r['details'].get('dataset_sha256'))[:12]}…)"
                       for r in records if r["metric"] == "perplexity" and r["status"] == "ok"})
    return _ENV.get_template("suite.html").render(
        suite=suite, rows=rows, figures=_figures(rows), envs=_environments(records),
        methods=_methodology(records), datasets=datasets, version=__version__,
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        n_cells=len(records),
        n_failed=sum(r["status"] in ("failed", "timeout", "crashed") for r in records))


def build_site(records: list[dict[str, Any]], out_dir: Path, *, budget_gb: float | None = None,
               max_loss_pct: float | None = None) -> list[Path]:
    """Write <out_dir>/<suite>.html per suite and <out_dir>/index.html; return their paths."""
    by_suite: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_suite[r["suite"]].append(r)
    written = []
    for suite, recs in sorted(by_suite.items()):
        path = out_dir / f"{_safe(suite)}.html"
        atomic_write_text(path, render_suite(suite, recs))
        written.append(path)
    index = _ENV.get_template("index.html").render(
        suites=[{"name": s, "file": f"{_safe(s)}.html", "cells": len(r)}
                for s, r in sorted(by_suite.items())], version=__version__)
    atomic_write_text(out_dir / "index.html", index)
    return [out_dir / "index.html", *written]


def _safe(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".")
    return cleaned or "suite"


__all__ = ["build_site", "render_suite", "html"]
