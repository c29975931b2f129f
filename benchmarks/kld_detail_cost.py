"""What KLD v4's new figures cost: confidence buckets, top-k agreement, p99.9, per-token codes.

    .venv/bin/python benchmarks/kld_detail_cost.py --base F16.gguf --variant Q4_K_M.gguf \
        [--ctx 512 --chunks 4] [--ctx 8192 --chunks 1] [--threads 2] [--text wiki.test.raw] \
        [--repeats 5] [--json out.json]

On the same chunks of real text, in one process: the forward pass and log-softmax of the
variant (what the perplexity cell pays anyway), the v3 per-token comparison (KLD, same-top,
NLL, delta-p), and separately what v4 adds to it - the rank of the base's top token among the
variant's log-probs (top-k), the base's top probability (buckets) - then the statistics with
and without the v4 fields, and the per-token code. Each timed part is the median of
``--repeats``; the forward pass is timed once per chunk. Prints ms per 1,000 scored tokens and
each part's share of the forward pass.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _median_s(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return st.median(times)


def measure(base: Path, variant: Path, text: Path, ctx: int, chunks: int, threads: int,
            repeats: int) -> dict[str, Any]:
    from qbench.backends.base import LoadOptions
    from qbench.backends.llamacpp import load
    from qbench.metrics import kld, token_codec
    from qbench.metrics.scoring import iter_scored, make_chunks

    opts = kld.Options(dataset=str(text), ctx=ctx, chunks=chunks)
    load_opts = LoadOptions(device="cpu", threads=threads, n_ctx=ctx)
    b = load(base, load_opts)
    try:
        ch = make_chunks(b, str(text), ctx, chunks, None, REPO)
        stored, _ = kld.compute_base(b, ch, opts)
    finally:
        b.close()
    v = load(variant, load_opts)
    forward = compare = rank = conf = 0.0
    parts = []
    offsets = np.concatenate([[0], np.cumsum(stored["counts"])])
    row0 = 0
    try:
        t0 = time.perf_counter()
        for i, lq, targets in iter_scored(v, ch):
            forward += time.perf_counter() - t0
            rows = kld._base_slice(stored, offsets, row0, len(targets))
            row0 += len(targets)
            compare += _median_s(lambda: kld._compare_rows(rows, lq, targets), repeats)
            top = rows["top"].astype(np.int64)
            rank += _median_s(lambda: kld._rank_of(lq, top), repeats)
            starts = np.concatenate([[0], np.cumsum(rows["counts"])[:-1]]).astype(np.int64)
            conf += _median_s(lambda: np.exp(rows["logp"][starts].astype(np.float64)), repeats)
            part = kld._compare_rows(rows, lq, targets)
            part["chunk"] = np.full(len(targets), i, dtype=np.int32)
            parts.append(part)
            t0 = time.perf_counter()
    finally:
        v.close()
    t = kld._concat(parts)
    v3 = {k: x for k, x in t.items() if k not in ("conf", "rank")}
    stats_v4 = _median_s(lambda: kld.statistics(t), repeats)
    stats_v3 = _median_s(lambda: kld.statistics(v3), repeats)
    code = _median_s(lambda: token_codec.encode(np.maximum(t["kld"], 0.0)), repeats)
    n = len(t["kld"])
    per_k = 1000.0 / n

    def ms(x: float) -> float:
        return round(1000 * x * per_k, 3)

    v3_compare = compare - rank - conf
    added = rank + conf + (stats_v4 - stats_v3) + code
    return {
        "ctx": ctx, "chunks": len(ch.chunks), "scored_tokens": n, "threads": threads,
        "ms_per_1k_tokens": {
            "forward_and_log_softmax": ms(forward), "compare_v3": ms(v3_compare),
            "rank_top_k": ms(rank), "base_confidence": ms(conf),
            "statistics_v3": ms(stats_v3), "statistics_v4": ms(stats_v4),
            "per_token_code": ms(code), "v4_added_total": ms(added)},
        "v4_added_pct_of_forward": round(100 * added / forward, 2),
        "v4_added_pct_of_v3_kld_work": round(100 * added / (v3_compare + stats_v3), 1),
        "record_bytes_per_token": round(len(json.dumps(
            token_codec.encode(t["kld"].clip(0)))) / n, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--variant", type=Path, required=True)
    ap.add_argument("--text", type=Path, default=Path("/work/shared/data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--ctx", type=int, action="append")
    ap.add_argument("--chunks", type=int, action="append")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    ctxs = args.ctx or [512, 8192]
    chunks = args.chunks or [4, 1]
    if len(chunks) != len(ctxs):
        ap.error("give one --chunks per --ctx")
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    out = {"load_average_before": load_before,
           "runs": [measure(args.base, args.variant, args.text, c, n, args.threads,
                            args.repeats) for c, n in zip(ctxs, chunks)]}
    with open("/proc/loadavg") as f:
        out["load_average_after"] = f.read().split()[:3]
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
