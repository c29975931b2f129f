"""The token chunks llama-perplexity scores, and log-softmax over them.

Shared by perplexity and KLD so both see exactly the same tokens: the whole text tokenized once
(BOS added where the model adds it), cut into non-overlapping ``ctx``-token chunks; each chunk
evaluated from an empty cache with its first token replaced by BOS when the model uses BOS; only
the second half scored (positions ``ctx/2 .. ctx-2`` predicting the next token).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qbench.backends.base import Backend
from qbench.inputs.datasets import Text, load_text
from qbench.errors import DatasetError


@dataclass(frozen=True)
class Chunks:
    text: Text
    tokens_total: int          # tokens in the whole text
    chunks: list[list[int]]    # as evaluated (BOS replacement applied)
    targets: list[np.ndarray]  # per chunk, the scored next tokens (original ids)
    first: int                 # first scored position

    @property
    def n_scored(self) -> int:
        return sum(len(t) for t in self.targets)


def make_chunks(backend: Backend, dataset: str, ctx: int, n_chunks: int,
                data_dir: Path | None, base_dir: Path) -> Chunks:
    text = load_text(dataset, data_dir, base_dir)
    tokens = backend.tokenize(text.text, add_special=True)
    if len(tokens) < 2 * ctx:
        raise DatasetError(f"dataset '{dataset}' has {len(tokens)} tokens; perplexity with "
                           f"ctx={ctx} needs at least {2 * ctx} (as llama-perplexity)")
    available = len(tokens) // ctx
    count = available if n_chunks <= 0 else min(n_chunks, available)
    first = ctx // 2
    chunks, targets = [], []
    for i in range(count):
        original = tokens[i * ctx:(i + 1) * ctx]
        evaluated = list(original)
        if backend.add_bos and backend.bos_id is not None:
            evaluated[0] = backend.bos_id
        chunks.append(evaluated)
        targets.append(np.asarray(original[first + 1:], dtype=np.int64))
    return Chunks(text, len(tokens), chunks, targets, first)


def _shifted_lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits minus their row max (float32) and the log of the summed exps (float64, as
    llama.cpp accumulates them)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64, keepdims=True))
    return shifted, lse


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax; max subtracted in float32, sum of exps in float64 (as llama.cpp).
    The result stays float32 (no float64 copy of a vocabulary-wide array)."""
    shifted, lse = _shifted_lse(logits)
    shifted -= lse.astype(np.float32)
    return shifted


def target_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per row, without materialising the whole log-softmax (one scratch
    array, exponentiated in place; the input is never written)."""
    m = logits.max(axis=1, keepdims=True)
    picked = (logits[np.arange(len(targets)), targets] - m[:, 0]).astype(np.float64)
    scratch = np.subtract(logits, m)
    np.exp(scratch, out=scratch)
    return np.log(scratch.sum(axis=1, dtype=np.float64)) - picked


def _checked(i: int, logits: np.ndarray, chunks: Chunks) -> np.ndarray:
    targets = chunks.targets[i]
    if logits.shape[0] != len(targets):
        raise RuntimeError(f"backend returned {logits.shape[0]} rows for chunk {i}, "
                           f"expected {len(targets)}")
    return targets


def iter_scored(backend: Backend, chunks: Chunks) -> Iterator[tuple[int, np.ndarray,
                                                                     np.ndarray]]:
    """Yield (chunk index, log-probs (n_scored, n_vocab), target ids) chunk by chunk."""
    for i, logits in enumerate(backend.chunk_logits(chunks.chunks, chunks.first)):
        targets = _checked(i, logits, chunks)
        yield i, log_softmax(logits), targets


def iter_nll(backend: Backend, chunks: Chunks) -> Iterator[np.ndarray]:
    """Yield, chunk by chunk, the scored tokens' negative log-likelihoods (float64)."""
    for i, logits in enumerate(backend.chunk_logits(chunks.chunks, chunks.first)):
        yield target_nll(logits, _checked(i, logits, chunks))


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as llama-perplexity computes them (N-1 in the variance)."""
    n = len(values)
    mean = float(values.mean())
    var = float((values.astype(np.float64) ** 2).mean() - mean * mean)
    return mean, (np.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0)


def chunk_tokens(options: Any) -> float:
    """Tokens a chunked pass evaluates with these options (ctx x chunks; chunks <= 0: all of
    WikiText-2's ~580 chunks; None: the defaults): the cost model of perplexity and KLD."""
    ctx = getattr(options, "ctx", None) or 512
    chunks = getattr(options, "chunks", None)
    chunks = 16 if chunks is None else chunks
    return float(ctx) * (chunks if chunks > 0 else 580)


def dataset_identity(name: str, plan_ctx: Any) -> dict[str, Any]:
    """What of a scored text goes into a cell key: its content's sha256 (its hub name when it
    has no local file): a changed file means new numbers."""
    from qbench.inputs.datasets import locate_text
    from qbench.inputs.sources import sha256_file

    origin = locate_text(name, plan_ctx.data_dir, plan_ctx.base_dir)
    if origin.startswith("hf:"):
        return {"dataset": origin}
    return {"dataset_sha256": sha256_file(Path(origin), plan_ctx.cache_dir)}


# ------------------------------------------------------------- pairing two runs by chunk

def chunk_ppl_items(details: Mapping[str, Any]) -> list[float] | None:
    """Per-chunk PPL of a perplexity record, exactly from the NLL sums where stored (the
    stored per-chunk PPL is rounded through exp), else the stored per-chunk PPL."""
    sums, ntok = details.get("per_chunk_nll_sum"), details.get("per_chunk_tokens")
    if sums and ntok and len(sums) == len(ntok) and all(n > 0 for n in ntok):
        return [math.exp(s / n) for s, n in zip(sums, ntok)]
    ppl = details.get("per_chunk_ppl")
    return list(ppl) if ppl else None


def chunks_available(record: Mapping[str, Any]) -> int | None:
    """How many ctx-token chunks the record's text holds: the ceiling of a larger sample."""
    d = record.get("details") or {}
    total, ctx = d.get("tokens_in_text"), d.get("ctx")
    return int(total) // int(ctx) if total and ctx else None


def tokens_per_chunk(record: Mapping[str, Any]) -> float | None:
    """Scored tokens per chunk (a sample size in chunks, restated in tokens)."""
    d = record.get("details") or {}
    n, chunks = d.get("scored_tokens"), d.get("chunks")
    return n / chunks if n and chunks else None
