"""Prompt (pp) and generation (tg) throughput, by llama-bench's method (tools/llama-bench).

pp: a prompt of N random tokens (BOS first where the model uses BOS) decoded in n_batch pieces.
tg: N single-token decode steps, each synchronised, feeding random tokens (nothing sampled).
One warm-up (a full prompt, then one generated token) first; the KV cache is cleared before
each repetition; tokens/s is computed per repetition, reported as mean and sample sd.

Each timed window also records what the rest of the machine did meanwhile (other processes' CPU
time, steal, load, clock: qbench.host.contamination); a test whose windows were disturbed, or
whose repetitions vary more than their mean, is measured again (``max_rounds`` rounds in all),
and the result's ``fitness`` says whether the figures are fit to compare and why not. Peak RSS
(and VRAM on a GPU) is read per repetition (``peak_rss_mb``, ``peak_vram_mb``: speed_hw).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from qbench.options import positive
from qbench.metrics import LOG, NONE, REPETITIONS, MetricInfo, Value
from qbench.metrics.context import CellContext, value

INFO = MetricInfo(
    name="speed", version="4", primary="tg_tokens_per_s", higher_is_better=True,
    gated={"pp_tokens_per_s": True},
    # derived from tg tokens/s (gated) and counters shared with other processes: shown only
    reported=("tg_effective_gbs", "tg_bandwidth_pct", "pp_joules_per_token",
              "tg_joules_per_token"),
    hardware_bound=True,       # keyed by the hardware; compared only on the same hardware
    # 10 %: twice llama-bench's fidelity target, above a dedicated runner's run-to-run drift;
    # tested by Welch t on ln over the repetitions. Peak memory per repetition likewise, and
    # at least 16 MiB (allocator noise on a small model).
    values=(Value("tg_tokens_per_s", True, change=LOG, tolerance=10.0, spread=REPETITIONS),
            Value("pp_tokens_per_s", True, change=LOG, tolerance=10.0, spread=REPETITIONS),
            Value("peak_rss_mb", False, change=LOG, tolerance=10.0, floor=16.0,
                  spread=REPETITIONS, backend_gate="rss_gated"),
            Value("peak_vram_mb", False, change=LOG, tolerance=10.0, floor=16.0,
                  spread=REPETITIONS),
            *(Value(name, True, change=LOG, gated=False, spread=NONE) for name in (
                "tg_effective_gbs", "tg_bandwidth_pct")),
            *(Value(name, False, change=LOG, gated=False, spread=NONE) for name in (
                "pp_joules_per_token", "tg_joules_per_token"))),
    cost=lambda options: (0.75 * (options.prompt_tokens + 8.0 * options.gen_tokens)
                          * (options.repetitions + 1.0) * max(len(options.depths), 1)
                          / ((512 + 8 * 128) * 4.0)),
    methodology=(
        "llama-bench's method: ppN = a prompt of N random tokens (BOS first where the model uses "
        "BOS) processed in n_batch pieces; tgN = N single-token decode steps on random tokens. "
        "Per test, a context of depth + that test's tokens (as llama-bench sizes it), one warm-up "
        "of the test's kind (the prompt, or 1 token), KV cache cleared before every repetition, "
        "tokens/s per repetition, reported as mean +/- sample standard deviation. At depth d (llama-bench "
        "-d) each repetition first fills the KV cache with d tokens, untimed. Effective "
        "bandwidth of generation = bytes read per token (every weight tensor, the token "
        "embedding only where the output layer reuses it, plus the KV cache at that depth) x "
        "tg tokens/s, and its share of this machine's read bandwidth, measured once per machine "
        "over a buffer far larger than the last-level cache (a model whose weights fit in that "
        "cache is flagged: it can read faster than memory). Energy per token from NVML's or "
        "RAPL's energy counter where readable (whole package or GPU, other processes "
        "included); otherwise the reason is recorded. Fitness: the cell holds qbench's "
        "machine-wide lock (no other qbench work runs beside it); over every timed window "
        "other processes' CPU time, steal, load and clock are recorded, and a test whose "
        "windows saw other processes use over 10 % of a core (or steal), or whose repetitions "
        "vary with a coefficient of variation above 1, is measured again (max_rounds); still "
        "disturbed, it is stored as unreliable with the reason: shown greyed, never ranked by "
        "or gated. Peak RSS (and VRAM) per repetition, for the gate's spread."),
)


@dataclass(frozen=True)
class Options:
    prompt_tokens: int = 512
    gen_tokens: int = 128
    repetitions: int = 3
    seed: int = 0
    # KV-cache depths to time pp and tg at, as llama-bench -d: each repetition fills the cache
    # with d tokens (not timed) first. Depth 0 keeps the plain value names.
    depths: tuple[int, ...] = (0,)
    # effective GB/s of tg and % of this machine's measured bandwidth (measured once per
    # machine, ~2 GiB of RAM for a few seconds, in a process of its own)
    roofline: bool = True
    # a test whose timed windows were disturbed by other work (or whose repetitions vary
    # more than their mean) is measured again, up to this many rounds in all
    # (qbench.host.contamination); still disturbed, the result says it is unreliable
    max_rounds: int = 3

    def validate(self, *, file: str, key: str) -> None:
        from qbench.metrics.speed_hw import validate_depths
        positive(self.prompt_tokens, file=file, key=f"{key}.prompt_tokens", allow_zero=True)
        positive(self.gen_tokens, file=file, key=f"{key}.gen_tokens", allow_zero=True)
        positive(self.repetitions, file=file, key=f"{key}.repetitions")
        positive(self.max_rounds, file=file, key=f"{key}.max_rounds")
        validate_depths(self.depths, file=file, key=f"{key}.depths")


def _random_tokens(rng: np.random.Generator, n: int, n_vocab: int, bos: int | None
                   ) -> list[int]:
    toks = [int(t) for t in rng.integers(0, n_vocab, size=n)]
    if toks and bos is not None:
        toks[0] = bos
    return toks


def _summary(samples: list[float], n_tokens: int) -> dict[str, Any]:
    arr = np.asarray(samples)
    sd = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return value(float(arr.mean()), sd / np.sqrt(len(arr)) if len(arr) > 1 else None,
                 len(arr), "tokens/s", sd=sd, samples=[round(s, 3) for s in samples],
                 tokens=n_tokens)


def _meter() -> Any:
    """What reads the machine around each timed window (tests put a scripted one here)."""
    from qbench.host.contamination import WindowMeter
    return WindowMeter()


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    from qbench.host.contamination import measure_until_fit
    from qbench.metrics import speed_hw as hw

    backend = ctx.backend
    n_batch = getattr(backend, "n_batch", 2048)
    rng = np.random.default_rng(options.seed)
    bos = backend.bos_id if backend.add_bos else None
    roof = (hw.roofline_setup(ctx, backend) if options.roofline
            else {"available": False, "reason": "roofline = false"})
    energy = hw.open_energy()
    meter = _meter()
    memory = hw.RepetitionMemory(on_gpu=str(getattr(backend, "device", "cpu")).startswith("cuda"))

    # a backend whose cache has a fixed size takes it exactly; others just start empty
    size_context = getattr(backend, "size_context", backend.reset)

    def test_prompt(n: int) -> None:
        backend.decode_tokens(_random_tokens(rng, n, backend.n_vocab, bos), n_batch)

    def test_gen(n: int) -> None:
        token = bos if bos is not None else int(rng.integers(0, backend.n_vocab))
        for _ in range(n):
            backend.decode_tokens([token], 1)
            token = int(rng.integers(0, backend.n_vocab))

    values: dict[str, Any] = {}
    curve: list[dict[str, Any]] = []
    bandwidth: list[dict[str, Any]] = []
    test_names: list[str] = []
    windows: list[dict[str, Any]] = []
    reasons: list[str] = []
    rounds = 0
    try:
        for depth in sorted(options.depths):
            sfx = hw.suffix(depth)
            point: dict[str, Any] = {"depth": depth}
            for label, n, test in (("pp", options.prompt_tokens, test_prompt),
                                   ("tg", options.gen_tokens, test_gen)):
                if n <= 0:
                    continue
                test_names.append(f"{label}{n}{sfx}")
                # as llama-bench: a context sized for this test alone, and a warm-up of its
                # own kind (a prompt for pp, one token for tg)
                size_context(hw.n_ctx_for(depth, n if label == "pp" else 0,
                                          n if label == "tg" else 0))
                if label == "pp":
                    test_prompt(n)
                else:
                    test_gen(1)

                def one_round(label: str = label, n: int = n, test: Any = test,
                              depth: int = depth, sfx: str = sfx
                              ) -> tuple[list[float], list[dict[str, Any]], Any]:
                    samples, wins, mem = [], [], memory.round(f"{label}{sfx}")
                    for rep in range(options.repetitions):
                        backend.reset()
                        mem.begin()
                        if depth:
                            test_prompt(depth)      # fill the cache to the depth: not timed
                        meter.begin()
                        energy.begin()
                        t0 = time.perf_counter_ns()
                        test(n)
                        t1 = time.perf_counter_ns()
                        energy.end(f"{label}{sfx}", n)
                        wins.append(meter.end(test=label, rep=rep, depth=depth))
                        mem.end()
                        samples.append(n * 1e9 / (t1 - t0))
                    return samples, wins, mem

                fit = measure_until_fit(one_round, max_rounds=options.max_rounds)
                memory.keep(fit.extra)
                windows.extend(fit.windows)
                rounds = max(rounds, fit.rounds)
                reasons.extend(f"{label}{sfx}: {why}" for why in fit.reasons)
                summary = _summary(fit.samples, n)
                values[f"{label}_tokens_per_s{sfx}"] = summary
                values |= energy.values(f"{label}{sfx}", label, depth)
                point[f"{label}_tokens_per_s"] = summary["value"]
                if label == "tg":
                    bw_values, bw_details = hw.bandwidth_values(roof, summary, depth, n)
                    values |= bw_values
                    if bw_details:
                        bandwidth.append(bw_details)
                        point["tg_effective_gbs"] = bw_details["gbs"]
                        point["tg_bandwidth_pct"] = bw_details["pct_of_measured"]
            curve.append(point)
    finally:
        energy.close()
        memory.close()
    values |= memory.values()
    roof_details = {k: v for k, v in roof.items() if k != "available"} | {
        "available": roof.get("available", False), "per_depth": bandwidth}
    if bandwidth:
        caveat = bandwidth[0]
        roof_details |= {"weight_bytes_per_token": caveat["weight_bytes_per_token"],
                         "kv_bytes_per_token": {str(b["depth"]): b["kv_bytes_per_token"]
                                                for b in bandwidth},
                         "cache_caveat": caveat["cache_caveat"], "caveat": caveat["caveat"]}
    return {"values": values,
            "details": {"test_names": test_names, "n_batch": n_batch,
                        "repetitions": options.repetitions, "depths": curve,
                        "bandwidth": roof_details, "energy": energy.details(),
                        "memory_per_repetition": memory.details()},
            "fitness": {"reliable": not reasons, "reasons": reasons, "rounds": rounds,
                        "windows": windows}}
