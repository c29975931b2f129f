"""Where a run's time went, per variant: cells, worker processes, model loads, and the time spent
starting, preparing, loading and measuring (issue 14 §1, one model load per variant).

    python benchmarks/batching.py results/smoke [results-before/smoke ...] [--json]

Reads the stored records (and the newest run manifest for the run's wall time). Records from
before batching have no ``timings.worker_pid``: each of their cells was a process of its own.
``load_s`` is part of ``metric_s`` (a metric loads the model when it first uses it); "other" is
a cell's wall time outside prepare and metric: interpreter and library start-up, reading the
job, writing the result.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((folder / "cells").glob("*.json"))]


def run_wall(folder: Path) -> float | None:
    runs = sorted((folder / "runs").glob("*.json"))
    if not runs:
        return None
    return json.loads(runs[-1].read_text()).get("wall_s")


def per_variant(recs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """variant label -> cells, processes, loads and summed seconds."""
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    pids: dict[str, set[Any]] = defaultdict(set)
    for r in recs:
        label = f"{r['model']['id']}/{r['variant']['backend']}/{r['variant']['quant']}"
        t = r.get("timings") or {}
        row = rows[label]
        row["cells"] += 1
        pids[label].add(t.get("worker_pid", r["key"]))   # no pid: a process per cell
        row["loads"] += "load_s" in t
        row["base_loads"] += "base_load_s" in t
        for part in ("prepare_s", "load_s", "metric_s", "wall_s"):
            row[part] += float(t.get(part) or 0)
    for label, row in rows.items():
        row["processes"] = len(pids[label])
        row["other_s"] = row["wall_s"] - row["prepare_s"] - row["metric_s"]
    return {k: dict(v) for k, v in sorted(rows.items())}


COLUMNS = ("cells", "processes", "loads", "wall_s", "prepare_s", "load_s", "metric_s", "other_s")


def table(folder: Path) -> str:
    rows = per_variant(records(folder))
    total = {c: sum(r.get(c, 0) for r in rows.values()) for c in COLUMNS}
    width = max([len(k) for k in rows] + [5])
    lines = [f"{folder}  (run wall {run_wall(folder) or 0:.1f} s)",
             f"{'variant':{width}}  " + "  ".join(f"{c:>9}" for c in COLUMNS)]
    for label, row in [*rows.items(), ("total", total)]:
        lines.append(f"{label:{width}}  " + "  ".join(
            f"{row.get(c, 0):9.0f}" if c in ("cells", "processes", "loads")
            else f"{row.get(c, 0):9.1f}" for c in COLUMNS))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="results/<suite> folders")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.json:
        print(json.dumps({str(f): {"run_wall_s": run_wall(f), "variants": per_variant(
            records(f))} for f in args.folders}, indent=1))
        return
    print("\n\n".join(table(f) for f in args.folders))


if __name__ == "__main__":
    main()
