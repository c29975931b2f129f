"""Decode against the bandwidth roofline on models far larger than the cache: tg of a synthetic
model's quantized files, qbench beside llama-bench on the same file, and this machine's read
bandwidth measured in the same round.

    .venv/bin/python benchmarks/decode_roofline.py [--preset llama-3.2-1b] \
        [--quants Q8_0,Q4_K_M] [--rounds 5] [--gen-tokens 64] [--reps 3] [--threads 2] \
        [--scaling] [--tools BIN | --build] [--cache-dir DIR] [--json out.json]

The model is ``synthetic:PRESET`` (qbench.inputs.synthetic: the architecture's exact tensors,
random weights; generated once), its quantized files made as `qbench run` makes them: at the
types llama.cpp's quantizer picks in its dry run, with valid random blocks
(qbench.quantize.synthetic_blocks; the real quantizer's size and tensor mix), cached.

Each round, for each quant, back to back: the read bandwidth (qbench.host.bandwidth's CPU
kernel over a 2 GiB buffer, 3 passes, median), ``llama-bench -m FILE -p 0 -n N -r R -t T`` and
qbench's tg (qbench.metrics.speed, the same N, R and threads, model loaded afresh), the two
tools in alternating order (speed_depth.py's pairing). Per round, per tool: effective GB/s =
bytes read per generated token (qbench.metrics.roofline: every weight tensor, the token
embedding in full only where the output reuses it, plus the KV cache attended) x tokens/s,
and its % of *that round's* bandwidth, so a machine whose load moves between rounds moves both
halves of the ratio. Reported per quant: medians and [min, max] over rounds, the paired
qbench / llama-bench ratio with speed_depth's 5 % verdict.

--scaling adds, per round, llama-bench tg and the bandwidth with one thread: bandwidth-bound
decode gains from a second core only as much as the read bandwidth does; compute-bound decode
gains up to 2x. The ratio of the two gains says which one this machine is at this core count.
Nothing else heavy should run meanwhile; the load average is recorded per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from speed_depth import find_llama_bench, quiet_llama_cpp, run_llama_bench, run_qbench, verdict  # noqa: E402

BANDWIDTH_BYTES = 2 * 2**30


def spread(xs: list[float]) -> dict[str, Any]:
    """Median and range of a list (None when empty)."""
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def measure_bandwidth(threads: int, passes: int = 3) -> float:
    from qbench.host.bandwidth import cpu_read_bandwidth
    return float(cpu_read_bandwidth(BANDWIDTH_BYTES, passes=passes, threads=threads)["gbs"])


def prepare(preset: str, quants: list[str], cache_dir: Path, threads: int,
            seed: int = 0) -> dict[str, Path]:
    """quant -> the GGUF file of the synthetic preset, made once as `qbench run` makes it
    (qbench.quantize.gguf_prepare: a quantized type written directly at the quantizer's
    types, qbench.quantize.synthetic_blocks)."""
    from qbench.inputs.sources import resolve, sha256_file
    from qbench.quantize.gguf_prepare import prepare as prepare_variant
    from qbench.quantize.request import PrepareRequest

    ref = f"synthetic:{preset}" + (f"?seed={seed}" if seed else "")
    base = resolve(ref, base_dir=REPO, cache_dir=cache_dir).path
    sha = sha256_file(base, cache_dir)
    model = {"id": preset, "source": ref, "base": "F16"}
    return {q: prepare_variant(PrepareRequest({"backend": "llama.cpp", "quant": q}, model, base,
                                              sha, REPO, None, cache_dir, threads))[0]
            for q in quants}


def bytes_per_token(path: Path, cache_dir: Path, depth: int, gen: int) -> dict[str, float]:
    """Weights and KV bytes one tg step reads on average (qbench.metrics.roofline)."""
    from qbench.metrics.roofline import gguf_traffic, kv_bytes, mean_tg_positions

    t = gguf_traffic(path, cache_dir)
    kv = kv_bytes(t["kv_bytes_per_position"] or 0, mean_tg_positions(depth, gen))
    return {"weights": float(t["weight_bytes_per_token"]), "kv": float(kv),
            "total": float(t["weight_bytes_per_token"] + kv), "file": float(path.stat().st_size)}


def one_round(i: int, files: dict[str, Path], a: argparse.Namespace, exe: Path | None
              ) -> dict[str, Any]:
    rnd: dict[str, Any] = {"round": i, "load": os.getloadavg(), "quants": {}}
    for k, (q, path) in enumerate(files.items()):
        row: dict[str, Any] = {"bw_gbs": measure_bandwidth(a.threads)}
        order = ["llama-bench", "qbench"] if (i + k) % 2 == 0 else ["qbench", "llama-bench"]
        for side in order:
            t0 = time.perf_counter()
            if side == "llama-bench" and exe is not None:
                got = run_llama_bench(exe, path, a, 0, a.gen_tokens, [a.depth])
                row["llama_bench_tg"] = got.get(f"tg@{a.depth}")
            elif side == "qbench":
                got, _ = run_qbench(path, a, 0, a.gen_tokens, [a.depth])
                row["qbench_tg"] = got.get(f"tg@{a.depth}")
            row[f"{side}_s"] = round(time.perf_counter() - t0, 1)
        if a.scaling and exe is not None:
            one = argparse.Namespace(**{**vars(a), "threads": 1})
            row["bw_gbs_1t"] = measure_bandwidth(1)
            row["llama_bench_tg_1t"] = run_llama_bench(exe, path, one, 0, a.gen_tokens,
                                                       [a.depth]).get(f"tg@{a.depth}")
        row["order"] = order[0]
        rnd["quants"][q] = row
        print(f"round {i} {q}: {json.dumps(row)}", file=sys.stderr, flush=True)
    rnd["load_after"] = os.getloadavg()
    return rnd


def summarise(rounds: list[dict[str, Any]], files: dict[str, Path],
              traffic: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per quant: t/s, GB/s and % of the same round's bandwidth, per tool, with spreads."""
    out: dict[str, Any] = {}
    for q in files:
        rows = [r["quants"][q] for r in rounds if q in r["quants"]]
        per_token = traffic[q]["total"]
        entry: dict[str, Any] = {"bytes_per_token": traffic[q], "bandwidth_gbs":
                                 spread([r["bw_gbs"] for r in rows])}
        for tool, key in (("qbench", "qbench_tg"), ("llama_bench", "llama_bench_tg")):
            tps = [r[key] for r in rows if r.get(key)]
            gbs = [r[key] * per_token / 1e9 for r in rows if r.get(key)]
            pct = [100 * r[key] * per_token / 1e9 / r["bw_gbs"] for r in rows if r.get(key)]
            entry[tool] = {"tg": spread(tps), "gbs": spread(gbs), "pct_of_bandwidth": spread(pct)}
        paired = [r["qbench_tg"] / r["llama_bench_tg"] for r in rows
                  if r.get("qbench_tg") and r.get("llama_bench_tg")]
        if len(paired) >= 2:
            entry["ratio"] = {"paired": paired, "median": statistics.median(paired)} | \
                verdict(paired)
        if any("llama_bench_tg_1t" in r for r in rows):
            tg_gain = [r["llama_bench_tg"] / r["llama_bench_tg_1t"] for r in rows
                       if r.get("llama_bench_tg") and r.get("llama_bench_tg_1t")]
            bw_gain = [r["bw_gbs"] / r["bw_gbs_1t"] for r in rows if r.get("bw_gbs_1t")]
            tg1 = [r["llama_bench_tg_1t"] for r in rows if r.get("llama_bench_tg_1t")]
            entry["scaling"] = {"tg_gain_2_over_1": spread(tg_gain),
                                "bandwidth_gain_2_over_1": spread(bw_gain),
                                "llama_bench_tg_1t": spread(tg1),
                                "gbs_1t": spread([t * per_token / 1e9 for t in tg1]),
                                "bandwidth_1t": spread([r["bw_gbs_1t"] for r in rows
                                                        if r.get("bw_gbs_1t")])}
        out[q] = entry
    return out


def fmt(s: dict[str, Any], digits: int = 2) -> str:
    if s.get("median") is None:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--quants", default="Q8_0,Q4_K_M")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--scaling", action="store_true", help="also one thread (tg and bandwidth)")
    p.add_argument("--tools", help="folder with llama-bench")
    p.add_argument("--build", action="store_true", help="build llama-bench if missing")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    a.cache_dir = a.cache_dir or Path(os.environ.get("QBENCH_CACHE_DIR")
                                      or Path.home() / ".cache" / "qbench")
    a.no_roofline = True            # this script computes the roofline per round itself
    quiet_llama_cpp()
    quants = [q.strip() for q in a.quants.split(",") if q.strip()]
    t0 = time.perf_counter()
    files = prepare(a.preset, quants, a.cache_dir, a.threads)
    prep_s = time.perf_counter() - t0
    traffic = {q: bytes_per_token(f, a.cache_dir, a.depth, a.gen_tokens) for q, f in files.items()}
    exe, how = find_llama_bench(a.tools, a.build)
    print(f"preset {a.preset}: {', '.join(f'{q} {f}' for q, f in files.items())} "
          f"(prepared in {prep_s:.0f} s)\nllama-bench: {exe or 'none'} ({how})", file=sys.stderr)
    rounds: list[dict[str, Any]] = []
    for i in range(a.rounds):
        rounds.append(one_round(i, files, a, exe))
        summary = summarise(rounds, files, traffic)
        result = {"preset": a.preset, "threads": a.threads, "gen_tokens": a.gen_tokens,
                  "reps": a.reps, "rounds": len(rounds), "depth": a.depth,
                  "llama_bench": str(exe), "files": {q: str(f) for q, f in files.items()},
                  "per_round": rounds, "summary": summary}
        if a.json:   # after every round: a run cut short by a time limit keeps what it measured
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(result, indent=1, default=str))
    print(f"\n{a.preset}: tg{a.gen_tokens} @ depth {a.depth}, {a.threads} threads, {len(rounds)} "
          f"rounds x {a.reps} reps; median [min-max] over rounds")
    print(f"{'quant':<8}{'GB/token':>9}{'bandwidth GB/s':>22}{'qbench t/s':>22}"
          f"{'qbench GB/s':>22}{'% of bw':>22}{'llama-bench t/s':>22}{'% of bw':>22}  ratio")
    for q, e in summary.items():
        ratio = e.get("ratio")
        print(f"{q:<8}{e['bytes_per_token']['total'] / 1e9:>9.3f}{fmt(e['bandwidth_gbs']):>22}"
              f"{fmt(e['qbench']['tg']):>22}{fmt(e['qbench']['gbs']):>22}"
              f"{fmt(e['qbench']['pct_of_bandwidth'], 1):>22}{fmt(e['llama_bench']['tg']):>22}"
              f"{fmt(e['llama_bench']['pct_of_bandwidth'], 1):>22}  "
              + (f"{ratio['median']:.3f}: {ratio['verdict']}" if ratio else "-"))
        if "scaling" in e:
            s = e["scaling"]
            print(f"{'':<8}1 thread: llama-bench {fmt(s['llama_bench_tg_1t'])} t/s = "
                  f"{fmt(s['gbs_1t'])} GB/s of {fmt(s['bandwidth_1t'])}; 2 threads / 1: tg "
                  f"x{fmt(s['tg_gain_2_over_1'])}, bandwidth x{fmt(s['bandwidth_gain_2_over_1'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
