"""Perplexity, by llama.cpp's method (tools/perplexity/perplexity.cpp).

See :mod:`qbench.metrics.scoring` for the chunking. PPL = exp(mean NLL) over the scored tokens;
its error is PPL x the standard error of the mean NLL. Bits per byte (lm-eval's
``bits_per_byte``: summed NLL / (ln 2 x UTF-8 bytes of the scored tokens)) is stored too because,
unlike PPL, it compares models with different tokenizers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from qbench.options import positive
from qbench.metrics import LOG, NONE, MetricInfo, Pairing, Value, shared_pass
from qbench.metrics.context import CellContext, value
from qbench.metrics.scoring import (chunk_ppl_items, chunk_tokens, chunks_available,
                                    dataset_identity, iter_nll, iter_scored, make_chunks,
                                    tokens_per_chunk)

# the chunks two runs scored are the same chunks only on the same text, ctx and count
# (their count may differ: chunks are cut in order, so two runs pair on the chunks they share)
CHUNKS = Pairing(items=chunk_ppl_items, unit="chunks",
                 identity=("dataset_sha256", "ctx", "tokens_in_text", "bos_replaced"),
                 available=chunks_available, item_size=tokens_per_chunk, nested=True)

INFO = MetricInfo(
    name="perplexity", version="1", primary="ppl", higher_is_better=False,
    sample_option="chunks",    # chunks are cut in order: 16 chunks hold the first 8
    own_memory=False,          # a variant's pass may also load the base (shared KLD pass)
    reported=("bits_per_byte",),   # moves with PPL, which is gated
    # 0.25 % PPL: 2.5 x the harness's PPL fidelity (0.1 %), below the smallest quant step
    # (Q8_0 costs +0.41 % on the default suite's text)
    values=(Value("ppl", False, change=LOG, tolerance=0.25, pairing=CHUNKS,
                  figure="Perplexity vs bits per weight"),
            Value("bits_per_byte", False, change=LOG, gated=False, spread=NONE)),
    cost=lambda options: 1.0 * chunk_tokens(options) / 8192.0,
    methodology=(
        "llama.cpp's llama-perplexity method: the whole text tokenized once (BOS first where the "
        "model uses BOS), cut into non-overlapping ctx-token chunks; each chunk evaluated from "
        "an empty KV cache with its first token set to BOS when the model uses BOS; only the "
        "second half of each chunk is scored. PPL = exp(mean NLL) +/- PPL x standard error of "
        "the mean NLL. Bits per byte = sum NLL / (ln 2 x UTF-8 bytes of the scored tokens)."),
)


@dataclass(frozen=True)
class Options:
    dataset: str = "wikitext-2"   # a name (resolved in the data dir) or a text file path
    ctx: int = 512
    chunks: int = 16              # <= 0: every chunk of the text

    def validate(self, *, file: str, key: str) -> None:
        positive(self.ctx, file=file, key=f"{key}.ctx")
        if self.ctx < 8 or self.ctx % 2:
            from qbench.errors import ConfigError
            raise ConfigError(f"expected an even context of at least 8 tokens, got {self.ctx}",
                              file=file, key=f"{key}.ctx")


def key_extras(options: Options, plan_ctx: Any) -> dict[str, Any]:
    """The dataset's content is part of the cell key (a changed file means new numbers)."""
    return dataset_identity(options.dataset, plan_ctx)


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    backend = ctx.backend
    chunks = make_chunks(backend, options.dataset, options.ctx, options.chunks,
                         ctx.data_dir, ctx.base_dir)
    shared = shared_pass.start(ctx, chunks)
    # a smaller cell of this family scored the first chunks already (never when this pass
    # also computes KLD: the KLD cell needs every chunk's distributions)
    prior = reused_chunks(ctx.reuse, chunks, backend) if shared is None else None
    done = len(prior["per_chunk_nll_sum"]) if prior else 0
    if done:
        chunks_to_score = dataclasses.replace(chunks, chunks=chunks.chunks[done:],
                                              targets=chunks.targets[done:])
        ctx.notes.append(f"perplexity: {done} of {len(chunks.chunks)} chunks taken from cell "
                         f"{ctx.reuse['key']} (same text, ctx, model and settings)")
    else:
        chunks_to_score = chunks
    per_chunk = {k: list((prior or {}).get(k) or []) for k in PER_CHUNK}
    timer = {"shared_s": 0.0}
    t0 = time.perf_counter()
    for i, nll in enumerate(_nlls(ctx, chunks_to_score, shared, timer)):
        target = chunks_to_score.targets[i]
        per_chunk["per_chunk_nll_sum"].append(float(nll.sum()))
        per_chunk["per_chunk_nll_sumsq"].append(float((nll.astype(np.float64) ** 2).sum()))
        per_chunk["per_chunk_tokens"].append(len(nll))
        per_chunk["per_chunk_bytes"].append(
            sum(len(backend.detokenize([int(t)]).encode("utf-8")) for t in target))
    if shared is not None:
        t1 = time.perf_counter()
        pairs = shared_pass.guarded(ctx, shared, shared.finish)
        timer["shared_s"] += time.perf_counter() - t1
        if pairs is not None:
            ctx.notes.append(f"kld computed in this pass, for the kld cell: {pairs.name}")
    shared_s = timer["shared_s"]
    elapsed = time.perf_counter() - t0 - shared_s
    n = sum(per_chunk["per_chunk_tokens"])
    total = math.fsum(per_chunk["per_chunk_nll_sum"])
    mean = total / n
    # llama-perplexity's error of the mean NLL (N - 1 in the variance), from the per-chunk sums
    var = math.fsum(per_chunk["per_chunk_nll_sumsq"]) / n - mean * mean
    se = math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0
    ppl = math.exp(mean)
    scored_bytes = sum(per_chunk["per_chunk_bytes"])
    evaluated = len(chunks_to_score.chunks) * options.ctx
    return {
        "values": {
            "ppl": value(ppl, ppl * se, n),
            "mean_nll": value(mean, se, n, "nats/token"),
            "bits_per_byte": value(total / (math.log(2) * scored_bytes), None, n, "bits/byte"),
            "eval_tokens_per_s": value(evaluated / elapsed if elapsed > 0 else math.nan, None,
                                       evaluated, "tokens/s"),
        },
        "details": {
            "dataset": chunks.text.name, "dataset_origin": chunks.text.origin,
            "dataset_sha256": chunks.text.sha256, "ctx": options.ctx,
            "chunks": len(chunks.chunks), "tokens_in_text": chunks.tokens_total,
            "scored_tokens": n, "scored_bytes": scored_bytes,
            "bos_replaced": bool(backend.add_bos),
            "per_chunk_ppl": [math.exp(s_ / t) for s_, t in zip(per_chunk["per_chunk_nll_sum"],
                                                                per_chunk["per_chunk_tokens"])],
            **per_chunk,
            "chunks_scored_here": len(chunks_to_score.chunks),
            "chunks_reused_from": ctx.reuse["key"] if done else None,
            "eval_seconds": round(elapsed, 3),
            "kld_shared_pass_s": round(shared_s, 3) if shared is not None else None,
            "nll_path": ("full log-softmax (shared with the KLD comparison)"
                         if shared is not None else "target log-likelihood only"),
        },
    }


PER_CHUNK = ("per_chunk_nll_sum", "per_chunk_nll_sumsq", "per_chunk_tokens", "per_chunk_bytes")


def reused_chunks(reuse: dict[str, Any] | None, chunks: Any, backend: Any
                  ) -> dict[str, Any] | None:
    """The per-chunk sums a smaller cell of this family stored, when they are this pass's
    first chunks: the same text (hash and token count), ctx and BOS handling, every per-chunk
    sum present, fewer chunks than this cell scores. None otherwise (then every chunk is
    scored here)."""
    d = (reuse or {}).get("details") or {}
    lists = [d.get(k) for k in PER_CHUNK]
    if not reuse or any(not isinstance(x, list) or not x for x in lists):
        return None
    k = len(lists[0])
    if any(len(x) != k for x in lists) or k >= len(chunks.chunks):
        return None
    if (d.get("dataset_sha256") != chunks.text.sha256 or d.get("ctx") != len(chunks.chunks[0])
            or d.get("tokens_in_text") != chunks.tokens_total
            or bool(d.get("bos_replaced")) != bool(backend.add_bos)):
        return None
    if [int(t) for t in d["per_chunk_tokens"]] != [len(t) for t in chunks.targets[:k]]:
        return None
    return {name: x for name, x in zip(PER_CHUNK, lists)}


def _nlls(ctx: CellContext, chunks: Any, shared: Any, timer: dict[str, float]
          ) -> Iterator[np.ndarray]:
    """Per chunk, the scored tokens' NLLs; with a shared KLD pass from the full log-softmax it
    needs (its time kept apart in ``timer``), else without computing the log-softmax."""
    if shared is None:
        yield from iter_nll(ctx.backend, chunks)
        return
    for i, logprobs, targets in iter_scored(ctx.backend, chunks):
        t1 = time.perf_counter()
        shared_pass.guarded(ctx, shared, lambda: shared.feed(i, logprobs, targets))
        timer["shared_s"] += time.perf_counter() - t1
        yield -logprobs[np.arange(len(targets)), targets].astype(np.float64)
