"""Synthetic cell records in the stored schema, for tests (a test fixture, not part of qbench).

Numbers are made up (and plausible): nothing here is a measurement. ``demo_records()`` builds a
whole suite - a GGUF ladder with a crashed cell, a skipped cell and a degenerate variant, plus
transformers fp32 / AWQ 4-bit variants - so every section and plot of the report has data.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

ENV = {"cpu": "Synthetic CPU @ 3.0GHz", "cpu_cores_logical": 8, "cpu_cores_physical": 4,
       "cpu_flags": ["avx2", "fma", "f16c"], "gpus": [], "hostname": "synthetic",
       "libraries": {"llama-cpp-python": "0.3.36", "qbench": "0.1.0"},
       "memory_total_mb": 32000, "os": "Linux", "python": "3.11.7", "qbench_git": None}

SHAPE = {"attention.head_count": 9, "attention.head_count_kv": 3, "block_count": 30,
         "context_length": 8192, "embedding_length": 576}


def make_record(model: str, backend: str, quant: str, metric: str, *, status: str = "ok",
                values: dict[str, Any] | None = None, details: dict[str, Any] | None = None,
                is_base: bool = False, suite: str = "demo", error: str | None = None,
                memory: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
                env: dict[str, Any] | None = None, run_id: str = "20260101T000000Z-demo",
                backend_info: dict[str, Any] | None = None, source: str = "",
                imatrix: str = "") -> dict[str, Any]:
    """One cell record as qbench stores it (schema version 1)."""
    key = hashlib.sha256(f"{suite}/{model}/{backend}/{quant}/{metric}/{source}".encode()
                         ).hexdigest()[:24]
    return {
        "schema_version": 1, "key": key, "id": f"{model}/{backend}/{quant}/{metric}",
        "suite": suite, "run_id": run_id,
        "model": {"id": model, "source": f"path:/models/{model}", "base": quant if is_base
                  else None},
        "variant": {"backend": backend, "quant": quant, "is_base": is_base, "source": source,
                    "imatrix": imatrix},
        "metric": metric, "metric_version": "1", "options": options or {},
        "status": status, "error": error, "signal": None, "stderr_tail": None,
        "values": values or {}, "details": details or {}, "artifact": {"recipe": {}},
        "backend": backend_info if backend_info is not None else
        {"device": "cpu", "threads": 4, "n_gpu_layers": 0, "n_batch": 2048,
         "system_info": "CPU : AVX2 = 1 | FMA = 1 |" if backend == "llama.cpp" else None},
        "memory": memory or {"peak_rss_mb": None, "peak_vram_mb": None,
                             "torch_max_allocated_mb": None},
        "timings": {"wall_s": 1.0}, "env": env or ENV,
    }


def _v(value: float | None, stderr: float | None = None, n: int | None = None,
       **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"value": value}
    if stderr is not None:
        out["stderr"] = stderr
    if n is not None:
        out["n"] = n
    out.update(extra)
    return out


# quant -> (bits/weight, ln PPL ratio, KLD, same-top %, MMLU questions lost, tg tok/s)
LADDER = {
    "F16": (16.0, 0.0, 0.0, 100.0, 0, 48.0),
    "Q8_0": (8.5, 0.0006, 0.0012, 98.6, 1, 80.0),
    "Q6_K": (6.6, 0.004, 0.0052, 96.5, 2, 95.0),
    "Q4_K_M": (4.9, 0.028, 0.031, 92.0, 6, 120.0),
    "Q2_K": (3.2, 0.40, 0.45, 71.0, 30, 140.0),
}


CHUNKS, CHUNK_TOKENS = 16, 255
DATASET_SHA = "ab" * 32
BASE_SHA = "cd" * 32


def chunk_details(chunk_ppl: list[float], tokens: int = CHUNK_TOKENS) -> dict[str, Any]:
    """A perplexity record's per-chunk details (as the perplexity metric stores them)."""
    return {"per_chunk_ppl": chunk_ppl, "per_chunk_tokens": [tokens] * len(chunk_ppl),
            "per_chunk_nll_sum": [tokens * math.log(p) for p in chunk_ppl],
            "scored_tokens": tokens * len(chunk_ppl), "chunks": len(chunk_ppl)}


BASE_32 = [8.0 * math.exp(0.25 * math.sin(1.7 * i)) for i in range(32)]


def shifted_chunks(ln_ratio: float, ln_err: float, base: list[float] | None = None
                   ) -> list[float]:
    """Per-chunk PPLs of a variant whose chunk-paired ln PPL ratio against ``base`` (default
    BASE_32) has mean ``ln_ratio`` and standard error ``ln_err`` exactly (a fixed spread
    pattern: for decision-logic tests, not for detection rates)."""
    base = base or BASE_32
    n = len(base)
    pattern = [math.cos(2.3 * i + 0.4) for i in range(n)]
    m = sum(pattern) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in pattern) / (n - 1))
    spread = ln_err * math.sqrt(n)
    return [b * math.exp(ln_ratio + spread * (x - m) / sd) for b, x in zip(base, pattern)]


def _base_chunks(rng: random.Random, ppl: float) -> list[float]:
    return [ppl * math.exp(rng.gauss(0, 0.25)) for _ in range(CHUNKS)]


def _variant_chunks(rng: random.Random, base: list[float], lnr: float) -> list[float]:
    """Each chunk moves by the quant's ln ratio, give or take a spread that grows with it."""
    spread = 0.3 * max(abs(lnr), 0.002)
    return [p * math.exp(lnr + rng.gauss(0, spread)) for p in base]


def demo_records(model: str = "tiny-135m", suite: str = "demo", n_params: float = 134.5e6,
                 *, with_failures: bool = True, with_transformers: bool = True,
                 n_questions: int = 285, seed: int = 0) -> list[dict[str, Any]]:
    """A complete synthetic suite for one model (see the module docstring)."""
    rng = random.Random(seed)
    base_ppl, base_nll_se = 28.8, 0.048
    ids = [f"q{i:04d}" for i in range(n_questions)]
    base_correct = [1 if rng.random() < 0.45 else 0 for _ in ids]
    base_chunks = _base_chunks(rng, base_ppl)
    recs: list[dict[str, Any]] = []
    for quant, (bpw, lnr, kld, same, lost, tg) in LADDER.items():
        is_base = quant == "F16"
        size_mb = bpw * n_params / 8 / 2 ** 20
        peak = size_mb + 120.0
        mem = {"peak_rss_mb": peak, "peak_vram_mb": None, "torch_max_allocated_mb": None}
        common = {"suite": suite, "is_base": is_base}
        recs.append(make_record(model, "llama.cpp", quant, "footprint", **common, values={
            "file_size_mb": _v(size_mb, unit="MiB"), "bpw": _v(bpw, unit="bits/weight"),
            "n_params": _v(n_params), "fp16_estimate_mb": _v(2 * n_params / 2 ** 20)},
            details={"shape": SHAPE, "tensor_types": {
                quant if quant != "F16" else "F16": {"tensors": 200, "params": int(n_params * .99),
                                                     "bytes": int(size_mb * 2 ** 20 * .99)},
                "F32": {"tensors": 61, "params": int(n_params * .01), "bytes": 1000}}},
            memory={"peak_rss_mb": 200.0, "peak_vram_mb": None}))
        chunk_ppl = base_chunks if is_base else _variant_chunks(rng, base_chunks, lnr)
        ppl = math.exp(sum(math.log(p) for p in chunk_ppl) / len(chunk_ppl))
        if with_failures and quant == "Q6_K":
            recs.append(make_record(model, "llama.cpp", quant, "perplexity", **common,
                                    status="crashed", error="the cell process died of SIGILL",
                                    options={"dataset": "wikitext-2", "ctx": 512, "chunks": 16}))
        else:
            recs.append(make_record(model, "llama.cpp", quant, "perplexity", **common, values={
                "ppl": _v(ppl, ppl * base_nll_se, 4080), "mean_nll": _v(math.log(ppl),
                                                                        base_nll_se, 4080),
                "bits_per_byte": _v(1.11 + lnr / math.log(2) / 4.3)},
                details={"dataset": "wiki.test.raw", "dataset_origin": "/data/wikitext-2-raw",
                         "dataset_sha256": DATASET_SHA, "ctx": 512, "tokens_in_text": 300000,
                         **chunk_details(chunk_ppl)},
                options={"dataset": "wikitext-2", "ctx": 512, "chunks": 16}, memory=mem))
        if not is_base:
            recs.append(make_record(model, "llama.cpp", quant, "kld", **common, values={
                "kld_mean": _v(kld, kld * 0.01 + 1e-6, 4080, unit="nats"), "kld_p99": _v(kld * 12),
                "same_top_pct": _v(same, 100 * math.sqrt(same / 100 * (1 - same / 100) / 4079)),
                "ln_ppl_ratio": _v(lnr, 0.0003 + lnr * 0.02, 4080),
                "ppl_ratio": _v(math.exp(lnr))},
                details={"dataset": "wiki.test.raw", "ctx": 512, "chunks": CHUNKS,
                         "dataset_sha256": DATASET_SHA, "base_sha256": BASE_SHA,
                         "scored_tokens": CHUNKS * CHUNK_TOKENS,
                         "coverage": 0.9999, "max_tokens": 2048,
                         "per_chunk_kld": [kld * math.exp(rng.gauss(0, 0.3))
                                           for _ in range(CHUNKS)],
                         "per_chunk_same_top": [min(1.0, same / 100 + rng.gauss(0, 0.01))
                                                for _ in range(CHUNKS)]},
                options={"coverage": 0.9999}, memory=mem))
        correct = list(base_correct)
        flips = [i for i, c in enumerate(correct) if c][:lost]
        for i in flips:
            correct[i] = 0
        gained = [i for i, c in enumerate(base_correct) if not c][:lost // 3]
        for i in gained:
            correct[i] = 1
        acc = sum(correct) / len(correct)
        recs.append(make_record(model, "llama.cpp", quant, "mmlu", **common, values={
            "acc": _v(acc, math.sqrt(acc * (1 - acc) / (len(ids) - 1)), len(ids)),
            "questions_per_s": _v(20.0)},
            details={"question_ids": ids, "correct": correct, "n": len(ids), "shots": 0,
                     "seed": 0, "subset": n_questions, "dataset": "mmlu",
                     "subset_rule": "stratified by subject, seeded"},
            options={"subset": n_questions, "shots": 0, "seed": 0}, memory=mem))
        if with_failures and quant == "Q2_K":
            recs.append(make_record(model, "llama.cpp", quant, "speed", **common,
                                    status="timeout", error="no result within 600 s",
                                    options={"prompt_tokens": 512, "gen_tokens": 128}))
        else:
            weights = n_params * bpw / 8          # bytes read per generated token
            gbs = weights * tg / 1e9
            recs.append(make_record(model, "llama.cpp", quant, "speed", **common, values={
                "pp_tokens_per_s": _v(400.0 + 10 * bpw, sd=12.0, n=3,
                                      samples=[388.0 + 10 * bpw, 400.0 + 10 * bpw,
                                               412.0 + 10 * bpw]),
                "tg_tokens_per_s": _v(tg, sd=tg * 0.03, n=3,
                                      samples=[tg * 0.97, tg, tg * 1.03]),
                "tg_effective_gbs": _v(gbs), "tg_bandwidth_pct": _v(100 * gbs / 60.0),
                "peak_rss_mb": _v(peak, sd=1.0, n=3, unit="MiB",
                                  samples=[peak - 1.0, peak, peak + 1.0])},
                details={"test_names": ["pp512", "tg128"], "n_batch": 2048, "repetitions": 3,
                         "depths": [{"depth": 0, "pp_tokens_per_s": 400.0 + 10 * bpw,
                                     "tg_tokens_per_s": tg},
                                    {"depth": 2048, "pp_tokens_per_s": 300.0 + 8 * bpw,
                                     "tg_tokens_per_s": tg * 0.8}],
                         "bandwidth": {"available": True, "reference": {"gbs": 60.0},
                                       "per_depth": [{"depth": 0, "bytes_per_token": weights,
                                                      "gbs": gbs}],
                                       "cache_caveat": False}},
                options={"prompt_tokens": 512, "gen_tokens": 128, "repetitions": 3,
                         "depths": [0, 2048]},
                memory=mem))
        degenerate = quant == "Q2_K"
        recs.append(make_record(model, "llama.cpp", quant, "sanity", **common,
                                values={"degenerate": _v(1.0 if degenerate else 0.0)},
                                details={"output": "!!!!!!!!!!!!!!!!" if degenerate else
                                         " with the founding of Rome in 753 BC.",
                                         "reason": "under half of the characters are letters"
                                         if degenerate else None}, memory=mem))
    if with_transformers:
        for quant, lnr, tg in (("fp32", 0.0, 20.0), ("awq-w4g64", 0.035, 30.0)):
            common = {"suite": suite, "is_base": False}
            mem = {"peak_rss_mb": 900.0 if quant == "fp32" else 400.0, "peak_vram_mb": None}
            ppl = base_ppl * math.exp(lnr)
            recs.append(make_record(model, "transformers", quant, "perplexity", **common, values={
                "ppl": _v(ppl, ppl * base_nll_se, 4080)},
                options={"dataset": "wikitext-2", "ctx": 512, "chunks": 16}, memory=mem,
                backend_info={"device": "cpu", "threads": 4, "dtype": "float32"}))
            recs.append(make_record(model, "transformers", quant, "speed", **common, values={
                "pp_tokens_per_s": _v(150.0, sd=5.0, n=3),
                "tg_tokens_per_s": _v(tg, sd=1.0, n=3)},
                options={"prompt_tokens": 512, "gen_tokens": 128}, memory=mem,
                backend_info={"device": "cpu", "threads": 4, "dtype": "float32"}))
        recs.append(make_record(model, "transformers", "bnb-nf4", "perplexity", suite=suite,
                                status="skipped", error="bitsandbytes is not installed"))
    return recs
