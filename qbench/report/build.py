"""Result records -> a static site: one self-contained HTML page per suite plus an index.

A pure function of the records (no measurement, no network): plotly.js is inlined once per suite
page, in its head, so the page opens from file:// offline; there are no external fonts, styles or
scripts. Every user string goes through Jinja's autoescape (and html.escape inside figures).
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import plotly.io as pio
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from qbench.version import __version__
from qbench.host.fsutil import atomic_write_text
from qbench.metrics import known_metric_info, metric_names
from qbench.report import claims as claims_mod
from qbench.report.contexts import depth_figures, depth_view
from qbench.report.detail import detail_tables
from qbench.report.figures import suite_figures
from qbench.report.floor import floor_verdicts, twins
from qbench.report.resident import add_resident
from qbench.report.tokens import token_figures
from qbench.report.recommend import DEFAULT_KV_CTX, fp16_rule, recommend
from qbench.report.sizes import sizes_view
from qbench.report.table import (extra_columns, file_facts, fmt, signed, type_mix,
                                 variant_rows)
from qbench.results.schema import FAILED

_ENV = Environment(loader=PackageLoader("qbench", "report/templates"),
                   autoescape=select_autoescape(["html"]))
_ENV.filters["fmt"] = fmt
_ENV.filters["signed"] = signed
_ENV.filters["type_mix"] = type_mix
_ENV.filters["gib"] = lambda mb: "–" if mb is None else f"{mb / 1024:.2f}"


def plotly_js() -> Markup:
    """plotly.js, to be inlined once in a page's head."""
    from plotly.offline import get_plotlyjs

    return Markup(f'<script type="text/javascript">{get_plotlyjs()}</script>')


def _figures(rows: list[dict[str, Any]], kv_ctx: int | None = None) -> list[dict[str, Any]]:
    return _rendered(suite_figures(rows, kv_ctx))


def _rendered(figures: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """(id, plotly figure or None) -> {id, html} with the figure as a div (plotly.js is in
    the page's head once)."""
    out = []
    for fig_id, fig in figures:
        html = None
        if fig is not None:
            html = Markup(pio.to_html(fig, include_plotlyjs=False, full_html=False,
                                      div_id=f"fig-{fig_id}",
                                      config={"displaylogo": False, "responsive": True}))
        out.append({"id": fig_id, "html": html})
    return out


_ENV_KEYS = (("cpu", "CPU"), ("cpu_cores_physical", "physical cores"),
             ("cpu_cores_logical", "logical cores"), ("memory_total_mb", "RAM, MiB"),
             ("cpu_flags", "CPU flags"), ("gpus", "GPUs"), ("os", "OS"), ("python", "Python"),
             ("libraries", "libraries"), ("qbench_git", "qbench git"), ("hostname", "host"))


def _environments(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Distinct machine fingerprints, each with the variants measured on it."""
    seen: dict[str, dict[str, Any]] = {}
    for r in records:
        env = r.get("env") or {}
        key = json.dumps(env, sort_keys=True, default=str)
        entry = seen.setdefault(key, {"items": _env_items(env), "raw": env, "cells": 0})
        entry["cells"] += 1
    return list(seen.values())


def _env_items(env: dict[str, Any]) -> list[tuple[str, str]]:
    items = []
    for key, label in _ENV_KEYS:
        v = env.get(key)
        if v in (None, "", [], {}):
            if key == "gpus":
                items.append((label, "none"))
            continue
        if key == "libraries" and isinstance(v, dict):
            v = ", ".join(f"{k} {ver}" for k, ver in sorted(v.items()))
        elif key == "gpus" and isinstance(v, list):
            v = "; ".join(f"{g.get('name')} ({fmt(g.get('memory_total_mb'), 5)} MiB, driver "
                          f"{g.get('driver')})" if isinstance(g, dict) else str(g) for g in v)
        elif isinstance(v, (list, tuple)):
            v = " ".join(map(str, v))
        items.append((label, str(v)))
    for key, v in sorted(env.items()):
        if key not in dict(_ENV_KEYS) and v not in (None, "", [], {}):
            items.append((key, json.dumps(v, default=str) if not isinstance(v, str) else v))
    return items


def _backends(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Distinct backend settings (device, threads, offload, batch, build) and who used them."""
    seen: dict[str, dict[str, Any]] = {}
    for r in records:
        be = {k: v for k, v in (r.get("backend") or {}).items()
              if k not in ("model_size_bytes", "n_params") and v not in (None, "")}
        if not be:
            continue
        key = json.dumps(be, sort_keys=True, default=str)
        entry = seen.setdefault(key, {"settings": be, "variants": set()})
        entry["variants"].add(f"{r['variant'].get('backend')} {r['variant'].get('quant')}")
    return [{"settings": e["settings"], "variants": sorted(e["variants"])}
            for e in seen.values()]


def _methodology(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    used = {r["metric"] for r in records}
    out = []
    for name in [*metric_names(), *sorted(used - set(metric_names()))]:
        info = known_metric_info(name)
        if name not in used or info is None:
            continue
        recs = [r for r in records if r["metric"] == name]
        options = sorted({json.dumps(r.get("options") or {}, sort_keys=True) for r in recs})
        versions = sorted({str(r.get("metric_version")) for r in recs})
        ok = [r for r in recs if r["status"] == "ok"]
        out.append({"name": name, "text": info.methodology,
                    "options": [json.loads(o) for o in options], "versions": versions,
                    "data": _data_facts(name, ok)})
    return out


_DATA_KEYS = {
    "perplexity": ("dataset", "dataset_origin", "dataset_sha256", "ctx", "chunks",
                   "tokens_in_text", "scored_tokens", "bos_replaced"),
    "kld": ("dataset", "dataset_sha256", "ctx", "chunks", "coverage", "max_tokens",
            "base_sha256"),
    "mmlu": ("dataset", "dataset_origin", "n", "shots", "seed", "subset", "subset_rule",
             "questions_in_dataset", "bos_added", "multi_token_fallbacks"),
    "speed": ("test_names", "n_batch", "repetitions"),
}


def _data_facts(name: str, recs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    keys = _DATA_KEYS.get(name, ())
    facts: dict[str, set[str]] = defaultdict(set)
    for r in recs:
        d = r.get("details") or {}
        for k in keys:
            if d.get(k) not in (None, ""):
                facts[k].add(json.dumps(d[k]) if not isinstance(d[k], str) else d[k])
    return [(k, " | ".join(sorted(facts[k]))) for k in keys if facts.get(k)]


def _calibration(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Per variant: imatrix / calibration provenance found in the artifact recipe."""
    out: dict[str, str] = {}
    for r in records:
        recipe = (r.get("artifact") or {}).get("recipe") or {}
        found = _find_calib(recipe)
        v = r["variant"]
        if v.get("imatrix"):
            found.insert(0, f"imatrix: {v['imatrix']}")
        if found:
            out[f"{r['model']['id']} {v.get('backend')} {v.get('quant')}"] = "; ".join(found)
    return sorted(out.items())


def _find_calib(obj: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else k
            if any(s in k.lower() for s in ("calib", "imatrix", "dataset")) and v not in (
                    None, "", [], {}):
                found.append(f"{p} = {v if not isinstance(v, (dict, list)) else json.dumps(v)}")
            elif isinstance(v, dict):
                found += _find_calib(v, p)
    return found


def _base_notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for r in rows:
        if r["is_base"] and r.get("requantized_from"):
            notes.append(f"{r['label']}: the base was dequantized from a {r['requantized_from']}"
                         " file, so it is not the original model's precision; losses are "
                         "relative to that base.")
    return notes


def render_suite(suite: str, records: list[dict[str, Any]], *, budget_gb: float | None = None,
                 max_loss_pct: float | None = None, kv_ctx: int = DEFAULT_KV_CTX,
                 notes: dict[str, Any] | None = None) -> str:
    rows = variant_rows(records)
    floor_verdicts(rows)
    add_resident(rows, kv_ctx)
    depth = depth_view(rows)
    floors = {(s, m): ts[0]["label"] for (s, m, _), ts in twins(rows).items()}
    claims = claims_mod.check_claims(rows)
    recs = recommend(rows, budget_gb=budget_gb, max_loss_pct=max_loss_pct, kv_ctx=kv_ctx)
    return _ENV.get_template("suite.html").render(
        suite=suite, rows=rows, extra_columns=extra_columns(rows), files=file_facts(rows),
        figures=_figures(rows, kv_ctx),
        detail_tables=detail_tables(rows), depth=depth,
        depth_figures=_rendered(depth_figures(depth)),
        token_figures=_rendered(token_figures(rows, floors)),
        kv_ctx=kv_ctx,
        plotly_js=plotly_js(),
        envs=_environments(records), backends=_backends(records),
        methods=_methodology(records), calibration=_calibration(records),
        base_notes=_base_notes(rows), claims=claims,
        thresholds=claims_mod.THRESHOLDS_TEXT, sources=claims_mod.published()["sources"],
        published_about=claims_mod.published()["about"],
        recommendations=recs,
        sizes=sizes_view(rows, records, recs, kv_ctx, budget_gb), budget_gb=budget_gb,
        fp16=fp16_rule(rows), version=__version__,
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        n_cells=len(records), n_variants=len(rows),
        n_failed=sum(r["status"] in FAILED for r in records),
        n_skipped=sum(r["status"] == "skipped" for r in records),
        runs=sorted({str(r.get("run_id")) for r in records}),
        suite_notes=notes or {})


def build_site(records: list[dict[str, Any]], out_dir: Path, *, budget_gb: float | None = None,
               max_loss_pct: float | None = None, kv_ctx: int = DEFAULT_KV_CTX,
               notes: dict[str, dict[str, Any]] | None = None) -> list[Path]:
    """Write <out_dir>/<suite>.html per suite and <out_dir>/index.html; return their paths
    (index first). ``notes``: suite -> its description and notes (qbench.results.runs)."""
    by_suite: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_suite[r["suite"]].append(r)
    written, summaries = [], []
    for suite, recs in sorted(by_suite.items()):
        path = out_dir / f"{safe_name(suite)}.html"
        atomic_write_text(path, render_suite(suite, recs, budget_gb=budget_gb,
                                             max_loss_pct=max_loss_pct, kv_ctx=kv_ctx,
                                             notes=(notes or {}).get(suite)))
        written.append(path)
        summaries.append({"name": suite, "file": path.name, "cells": len(recs),
                          "ok": sum(r["status"] == "ok" for r in recs),
                          "failed": sum(r["status"] in FAILED for r in recs),
                          "models": sorted({r["model"]["id"] for r in recs}),
                          "variants": len({(r["model"]["id"], r["variant"].get("backend"),
                                            r["variant"].get("quant")) for r in recs})})
    index = _ENV.get_template("index.html").render(
        suites=summaries, version=__version__,
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_text(out_dir / "index.html", index)
    return [out_dir / "index.html", *written]


def safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".")
    return cleaned or "suite"


_safe = safe_name   # older name

__all__ = ["build_site", "render_suite", "safe_name"]
