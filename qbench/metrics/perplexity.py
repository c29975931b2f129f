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

from qbench.metrics import LOG, NONE, MetricInfo, Pairing, Value, depth, shared_pass
from qbench.metrics.context import CellContext, value
from qbench.metrics.scoring import (chunk_ppl_items, chunk_tokens, chunks_available,
                                    dataset_identity, iter_nll, iter_scored, make_chunks,
                                    mean_and_stderr, tokens_per_chunk)

# the chunks two runs scored are the same chunks only on the same text, ctx and count
CHUNKS = Pairing(items=chunk_ppl_items, unit="chunks",
                 identity=("dataset_sha256", "ctx", "chunks", "per_chunk_tokens"),
                 available=chunks_available, item_size=tokens_per_chunk)

INFO = MetricInfo(
    name="perplexity", version="1", primary="ppl", higher_is_better=False,
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
    # a list makes one cell per context, the first the main one (qbench.metrics.depth)
    ctx: int | tuple[int, ...] = 512
    chunks: int | tuple[int, ...] = 16    # <= 0: every chunk of the text; or one per ctx

    def validate(self, *, file: str, key: str) -> None:
        depth.check_ctx_list(self.ctx, self.chunks, file=file, key=key)

    def points(self) -> list[tuple[str, "Options"]]:
        """(point label, options of one context) per listed context (qbench.metrics.depth)."""
        return [(label, dataclasses.replace(self, ctx=c, chunks=n))
                for label, c, n in depth.ctx_points(self.ctx, self.chunks)]


def key_extras(options: Options, plan_ctx: Any) -> dict[str, Any]:
    """The dataset's content is part of the cell key (a changed file means new numbers)."""
    return dataset_identity(options.dataset, plan_ctx)


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    backend = ctx.backend
    chunks = make_chunks(backend, options.dataset, options.ctx, options.chunks,
                         ctx.data_dir, ctx.base_dir)
    nll_parts: list[np.ndarray] = []
    per_chunk: list[float] = []
    chunk_nll: list[float] = []   # per chunk: summed NLL and token count (paired comparisons)
    chunk_ntok: list[int] = []
    shared = shared_pass.start(ctx, chunks)
    timer = {"shared_s": 0.0}
    t0 = time.perf_counter()
    for nll in _nlls(ctx, chunks, shared, timer):
        nll_parts.append(nll)
        per_chunk.append(math.exp(float(nll.mean())))
        chunk_nll.append(float(nll.sum()))
        chunk_ntok.append(len(nll))
    if shared is not None:
        t1 = time.perf_counter()
        pairs = shared_pass.guarded(ctx, shared, shared.finish)
        timer["shared_s"] += time.perf_counter() - t1
        if pairs is not None:
            ctx.notes.append(f"kld computed in this pass, for the kld cell: {pairs.name}")
    shared_s = timer["shared_s"]
    elapsed = time.perf_counter() - t0 - shared_s
    nll = np.concatenate(nll_parts)
    mean, se = mean_and_stderr(nll)
    ppl = math.exp(mean)
    scored_bytes = sum(len(backend.detokenize([int(t)]).encode("utf-8"))
                       for tg in chunks.targets for t in tg)
    evaluated = len(chunks.chunks) * options.ctx
    return {
        "values": {
            "ppl": value(ppl, ppl * se, len(nll)),
            "mean_nll": value(mean, se, len(nll), "nats/token"),
            "bits_per_byte": value(float(nll.sum()) / (math.log(2) * scored_bytes), None,
                                   len(nll), "bits/byte"),
            "eval_tokens_per_s": value(evaluated / elapsed, None, evaluated, "tokens/s"),
        },
        "details": {
            "dataset": chunks.text.name, "dataset_origin": chunks.text.origin,
            "dataset_sha256": chunks.text.sha256, "ctx": options.ctx,
            "chunks": len(chunks.chunks), "tokens_in_text": chunks.tokens_total,
            "scored_tokens": len(nll), "scored_bytes": scored_bytes,
            "bos_replaced": bool(backend.add_bos), "per_chunk_ppl": per_chunk,
            "per_chunk_nll_sum": chunk_nll, "per_chunk_tokens": chunk_ntok,
            "eval_seconds": round(elapsed, 3),
            "kld_shared_pass_s": round(shared_s, 3) if shared is not None else None,
            "nll_path": ("full log-softmax (shared with the KLD comparison)"
                         if shared is not None else "target log-likelihood only"),
        },
    }


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
