"""What one `qbench run` did, for machines: a JSON file, or Markdown for a CI job's summary page
($GITHUB_STEP_SUMMARY). Built from the run record (runs/<run-id>.json) and the cell records the
run wrote, so it says exactly what the store says."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qbench.run.runner import RunSummary
from qbench.results.store import Store


def _primary(record: dict[str, Any]) -> dict[str, Any]:
    """The cell's headline value (the metric's primary one, e.g. ppl), or {} if none."""
    from qbench.metrics import known_metric_info

    info = known_metric_info(record["metric"])
    if info is None:
        return {}
    name = info.primary
    v = (record.get("values") or {}).get(name) or {}
    if v.get("value") is None:
        return {}
    return {"name": name, "value": v["value"], "stderr": v.get("stderr"), "unit": v.get("unit")}


def build(summary: RunSummary, store: Store, *, report: Path | None = None,
          exit_code: int = 0) -> dict[str, Any]:
    """The run as one JSON-able dict: counts, failures, and each cell run with its headline."""
    try:
        manifest = json.loads((store.runs_dir / f"{summary.run_id}.json").read_text("utf-8"))
    except (OSError, ValueError):
        manifest = {}
    cells = []
    for c in manifest.get("cells") or []:
        rec = store.load(c["key"]) or {}
        cells.append({"id": c["id"], "key": c["key"], "status": c["status"],
                      "wall_s": round(float(c.get("wall_s") or 0), 2),
                      "metric": rec.get("metric"), "primary": _primary(rec) or None,
                      "error": rec.get("error") if c["status"] != "ok" else None})
    return {"suite": store.dir.name, "run_id": summary.run_id, "results": str(store.dir),
            "report": str(report) if report else None, "wall_s": round(summary.wall_s, 2),
            "counts": dict(sorted(summary.counts.items())), "cached": summary.cached,
            "failed": list(summary.failed_ids),
            "failed_earlier": list(summary.recorded_failures), "exit_code": exit_code,
            "cells": cells}


# What can make inline Markdown of plain text: emphasis, code spans, links and images ([ ] !),
# HTML and entities (< > &), strikethrough, the table's cell separator, and the autolinks of
# GitHub's Markdown (https: and www.). Escaped with a backslash, which GitHub's Markdown honours
# before any ASCII punctuation. Block syntax (#, -, +) cannot start inside a table cell.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>!|&~:])|(?<=www)(\.)", re.IGNORECASE)


def _cell_md(text: str) -> str:
    """Untrusted text (an error, a status, a suite name) as plain text inside one Markdown
    table cell: on one line, every metacharacter escaped, so it can neither end the cell or the
    row nor become a link, an image (``![x](https://...)``, fetched by every viewer of the job's
    page) or HTML."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), " ".join(str(text).split()))


def _code_md(text: str) -> str:
    """Untrusted text (a cell id, a path) as a Markdown code span: fenced by more backticks than
    any run of them in the text (CommonMark's rule: a backtick in an id cannot close the span;
    padded with a space when the text starts or ends with one), on one line, '|' escaped (GitHub
    splits table rows on it even inside code spans). Nothing inside a code span is a link, an
    image or HTML. Text with a backslash is shown as escaped plain text instead: in a code span
    a backslash is literal, and a table would read the backslash before an escaped '|' as the
    escape."""
    if "\\" in str(text):
        return _cell_md(text)
    flat = " ".join(str(text).split()).replace("|", "\\|")
    longest = max((len(m) for m in re.findall(r"`+", flat)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


def _result(cell: dict[str, Any]) -> str:
    if cell["status"] != "ok":
        return _cell_md((cell.get("error") or "")[:200])
    p = cell.get("primary")
    if not p:
        return "ok"
    err = f" ± {p['stderr']:.4g}" if p.get("stderr") else ""
    return _cell_md(f"{p['name']} = {p['value']:.4g}{err}"
                    + (f" {p['unit']}" if p.get("unit") else ""))


def to_markdown(data: dict[str, Any]) -> str:
    """A heading line, the counts, and one table row per cell run (full ids, never wrapped)."""
    counts = ", ".join(f"{n} {s}" for s, n in data["counts"].items()) or "nothing run"
    mark = "❌" if data["failed"] or data["failed_earlier"] else "✅"
    lines = [f"### {mark} qbench run: {_cell_md(data['suite'])}", "",
             f"{counts}; {data['cached']} cached; {data['wall_s']:.1f} s "
             f"(run {_code_md(data['run_id'])}, results {_code_md(data['results'])}"
             + (f", report {_code_md(data['report'])}" if data["report"] else "") + ")", ""]
    if data["failed_earlier"]:
        lines += ["Failed in earlier runs (`--rerun-failed` retries them): "
                  + ", ".join(_code_md(i) for i in data["failed_earlier"]), ""]
    if data["cells"]:
        lines += ["| cell | status | result | time (s) |", "| --- | --- | --- | ---: |"]
        lines += [f"| {_code_md(c['id'])} | {_cell_md(c['status'])} | {_result(c)} | "
                  f"{c['wall_s']:.1f} |" for c in data["cells"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def write(data: dict[str, Any], *, json_path: str | None, md_path: str | None) -> None:
    """JSON replaces its file (atomically); Markdown is appended, as $GITHUB_STEP_SUMMARY wants
    (several runs in one CI step add up)."""
    if json_path:
        from qbench.host.fsutil import atomic_write_text

        atomic_write_text(Path(json_path), json.dumps(data, indent=1, default=str) + "\n")
    if md_path:
        path = Path(md_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(to_markdown(data))
