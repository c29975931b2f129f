"""The ``toy`` backend: next-byte logits from a bigram table learnt from the model file's text.

Variants: ``f32`` (the table as learnt), ``q8`` / ``q4`` (each row rounded to 2^bits levels).
``TOY_DRIFT`` (a float, for tests) adds seeded noise to quantized tables: a "regressed" build.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qbench.backends import BackendInfo
from qbench.quantize.request import Prepared, PrepareRequest

BOS = 256
N_VOCAB = 257
BITS = {"f32": 32.0, "q8": 8.0, "q4": 4.0}


def _canonical(name: str) -> str | None:
    low = name.strip().lower()
    return low if low in BITS else None


INFO = BackendInfo(
    name="toy",
    module="qbench_toyplugin.engine",
    distribution="qbench-toyplugin",
    extra="toyplugin",
    canonical_quant=_canonical,
    unknown_quant=lambda name: f"unknown toy quant '{name}' (f32, q8, q4)",
    float_quants=frozenset({"f32"}),
    prepare="qbench_toyplugin.engine:prepare",
    footprint="qbench_toyplugin.engine:footprint",
    nominal_bits=lambda quant: BITS.get(quant),
    method_of=lambda quant: "toy",
)


def _table(text: bytes) -> np.ndarray:
    counts = np.full((N_VOCAB, N_VOCAB), 0.05)
    prev = BOS
    for b in text:
        counts[prev, b] += 1.0
        prev = b
    return np.log(counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)


def _quantize(table: np.ndarray, bits: float) -> np.ndarray:
    if bits >= 32:
        return table
    levels = 2 ** int(bits) - 1
    lo, hi = table.min(axis=1, keepdims=True), table.max(axis=1, keepdims=True)
    step = (hi - lo) / levels
    return (lo + np.round((table - lo) / step) * step).astype(np.float32)


def _autogroup() -> str | None:
    try:
        return open("/proc/self/autogroup").read().strip()
    except OSError:
        return None


def prepare(req: PrepareRequest) -> Prepared:
    quant = req.variant["quant"]
    trace = os.environ.get("TOY_PREPARE_TRACE")   # for tests: which process prepared what
    if trace:
        with open(trace, "a") as fh:
            fh.write(json.dumps({"quant": quant, "pid": os.getpid(), "nice": os.nice(0),
                                 "autogroup": _autogroup()}) + "\n")
    table = _quantize(_table(req.model_file.read_bytes()), BITS[quant])
    drift = float(os.environ.get("TOY_DRIFT") or 0)
    if drift and quant != "f32":
        table = table + np.random.default_rng(0).normal(0, drift, table.shape).astype(np.float32)
    folder = req.cache_dir / "toy"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{req.model_sha[:16]}-{quant}-{drift:g}.npy"
    np.save(path, table)
    (path.with_suffix(".json")).write_text(json.dumps({"bits": BITS[quant]}))
    return path, {"path": str(path), "size_bytes": path.stat().st_size,
                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                  "recipe": {"tool": "qbench-toyplugin", "quant": quant, "drift": drift}}


def footprint(path: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    bits = json.loads(path.with_suffix(".json").read_text())["bits"]
    return {"values": {"file_size_mb": {"value": path.stat().st_size / 2**20, "unit": "MiB"},
                       "bpw": {"value": bits, "unit": "bits/weight"}},
            "details": {}}


class ToyBackend:
    name = "toy"
    n_vocab = N_VOCAB
    add_bos = True
    bos_id = BOS

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.n_batch = 64

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return ([BOS] if add_special else []) + list(text.encode("utf-8"))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return bytes(t for t in tokens if t < 256).decode("utf-8", "replace")

    def chunk_logits(self, chunks: Sequence[Sequence[int]], first: int) -> Iterator[np.ndarray]:
        for chunk in chunks:
            yield self.table[np.asarray(chunk[first:len(chunk) - 1])]

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> Iterator[np.ndarray]:
        for prompt in prompts:
            yield self.table[prompt[-1]]

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        out, prev = [], prompt[-1]
        for _ in range(max_new_tokens):
            prev = int(np.argmax(self.table[prev][:256]))
            out.append(prev)
        return out

    def reset(self, n_ctx: int | None = None) -> None:
        pass

    def decode_tokens(self, tokens: Sequence[int], n_batch: int) -> None:
        """Some real work per token (a softmax of its row, then the expected next row), so a
        speed cell on this backend times computation that other work on the CPU slows."""
        for b in range(0, len(tokens), n_batch):
            rows = self.table[np.asarray(tokens[b:b + n_batch])]
            p = np.exp(rows - rows.max(axis=1, keepdims=True))
            (p / p.sum(axis=1, keepdims=True)) @ self.table

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu", "threads": 1, "engine": "numpy bigram"}

    def close(self) -> None:
        pass


def load(path: Path, options: Any) -> ToyBackend:
    return ToyBackend(np.load(path))
