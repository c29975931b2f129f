"""KL-divergence of a variant's next-token distributions from its base's, on the tokens the
perplexity metric scores, with the statistics ``llama-perplexity --kl-divergence`` prints.

Base distributions are computed once per (base file, text, ctx, chunks, coverage) and cached.
Storage is bounded: per scored token, the base's most probable tokens up to ``coverage`` of its
probability mass (at most ``max_tokens`` of them) as (id, log-prob) pairs, the log of the
remaining ("tail") mass, and ``tail_samples`` token ids drawn from the tail in proportion to the
base's probability (stratified over the tail's mass, seeded per chunk).

The estimator (version 3). KL(p || q) = sum over the vocabulary of p log(p/q) - p + q (the added
terms sum to 0), and each such term is >= 0. Per token, KLD = the exact sum of those terms over
the stored tokens + the tail mass x their mean over the tail draws. That is an unbiased
estimate of each token's KLD (the tail part is a Monte-Carlo mean over draws that follow p) and
it is never negative, so nothing is clipped and the mean over tokens -- and its standard
error -- is unbiased at every KLD level, 1e-4 included (tests/test_kld_estimator.py: within
2 % of the exact KLD at 1e-4 .. 1e-1 on 32k..152k Zipf vocabularies). Version 2 used the plain
mean of log p - log q over the draws and clipped each token's tail estimate at 0: +10 to +16 %
at KLD 1e-4 on such vocabularies, the regime where "8-bit is lossless" is judged. The added
-p + q terms are a control variate (the draws' q/p has a known mean, Q_tail/P_tail): they cut
the spread of the mean 70x at KLD 1e-4, 23x at 1e-3, 6x at 1e-2, 2x at 1e-1 (measured,
benchmarks/README.md). On SmolLM2-135M (Q8_0 at KLD 0.004, Q4_K_M at 0.059) the mean is within
0.1 % of the exact full-vocabulary KLD (benchmarks/fidelity.py). Dropping the tail instead (a
"rest" bucket alone) underestimates KLD (~2 % on SmolLM2).

For SmolLM2-135M on 16 x 512 tokens (4,080 scored) the cache is 26 MB (measured), where
llama.cpp's full-vocabulary file is 400 MB (and 11 GB for a 7B on all of wikitext-2). Remove
them with ``qbench cache clear kld``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np

from qbench.inputs.datasets import load_text
from qbench.errors import ConfigError, QbenchError
from qbench.host.cache import folder as cache_folder
from qbench.host.fsutil import file_lock
from qbench.metrics import NONE, POINTS, MetricInfo, Pairing, Value, token_codec
from qbench.metrics.context import CellContext, value
from qbench.metrics.depth import check_ctx_list as ctx_points_checked, ctx_points
from qbench.metrics.scoring import (Chunks, chunk_tokens, dataset_identity, iter_scored,
                                    make_chunks, tokens_per_chunk)


def _same_top_items(details: Mapping[str, Any]) -> list[float] | None:
    """Per-chunk same-top share in percent (the unit of ``same_top_pct``)."""
    got = details.get("per_chunk_same_top")
    return [100.0 * x for x in got] if got else None


# The reference's confidence buckets (exllamav3 eval/qbench): the base's top-token
# probability at each scored token. The mean KLD "is dominated by tokens where the reference
# itself is undecided"; a loss on tokens the base is sure of hides in it.
CONF_BUCKETS: tuple[tuple[float, float], ...] = (
    (0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 0.95), (0.95, 1.0))
TOP_K = (5, 10)     # agreement: the base's top token within the variant's top k (llama_kl.py)


def bucket_name(lo: float, hi: float) -> str:
    """'0_25' .. '95_100': the bucket's bounds in percent of probability."""
    return f"{round(100 * lo)}_{round(100 * hi)}"


BUCKET_NAMES = tuple(bucket_name(lo, hi) for lo, hi in CONF_BUCKETS)


def _percent_items(key: str) -> Any:
    def items(details: Mapping[str, Any]) -> list[float] | None:
        got = details.get(key)
        return [100.0 * x for x in got] if got else None
    return items


def _bucket_items(name: str) -> Any:
    """Per chunk, the bucket's KLD sum over (the bucket's overall share x the chunk's tokens):
    0 in a chunk without such tokens, and their mean over equal chunks is the bucket's mean
    KLD. Membership is the base's, the same in both runs of a comparison, so a paired change
    of these items is the change of the bucket's mean."""
    def items(details: Mapping[str, Any]) -> list[float] | None:
        got = (details.get("per_chunk_kld_conf") or {}).get(name)
        return list(got) if got else None
    return items


# the same chunks of the same text, against the same base's distributions
_KLD_IDENTITY = ("dataset_sha256", "ctx", "chunks", "scored_tokens", "base_sha256")


def _chunks(items: Any) -> Pairing:
    return Pairing(items=items, unit="chunks", identity=_KLD_IDENTITY, item_size=tokens_per_chunk)


KLD_CHUNKS = _chunks("per_chunk_kld")
SAME_TOP_CHUNKS = _chunks(_same_top_items)
TOP_K_CHUNKS = {k: _chunks(_percent_items(f"per_chunk_top{k}")) for k in TOP_K}
P999_CHUNKS = _chunks("per_chunk_kld_p999")
BUCKET_CHUNKS = {name: _chunks(_bucket_items(name)) for name in BUCKET_NAMES}


def _bucket_values() -> tuple[Value, ...]:
    """Mean KLD and token share per confidence bucket. Only the confident bucket's mean is
    gated: there a loss is a wrong answer the base was sure of, and the overall mean hides it.
    On SmolLM2 (16 x 512 tokens) the [0.95, 1] bucket holds 6.4 % of the tokens and 0.4 % of
    the summed KLD (BF16, Q8_0 and Q6_K alike), so a loss confined to it could grow it tenfold
    and move the mean by 4 %, inside the mean's own 5 % tolerance. The other buckets carry
    most of the mean and move with it (not gated twice). Its per-chunk spread is 3-4 x the
    mean's (coefficient of variation over 16 chunks 0.48-0.65 against 0.12-0.17, measured):
    tolerance 10 %, twice the mean's; the absolute floor is the mean's, 1e-5 nats (BF16's
    confident bucket is at 1e-5). The shares are the base's and the text's, the same for every
    variant compared with one base: shown, never compared."""
    out: list[Value] = []
    for (lo, hi), name in zip(CONF_BUCKETS, BUCKET_NAMES):
        confident = lo >= 0.95
        out.append(Value(f"kld_conf_{name}", False, tolerance=10.0 if confident else 5.0,
                         floor=1e-5, pairing=BUCKET_CHUNKS[name], gated=confident,
                         column=f"KLD, base p(top) {_range(lo, hi)}", digits=3))
        out.append(Value(f"share_conf_{name}", True, change=POINTS, gated=False, spread=NONE,
                         column=f"% tokens {_range(lo, hi)}", digits=3))
    return tuple(out)


def _range(lo: float, hi: float) -> str:
    return f"[{lo:g}, {hi:g}]" if hi >= 1.0 else f"[{lo:g}, {hi:g})"


INFO = MetricInfo(
    name="kld", version="4", primary="kld_mean", higher_is_better=False, needs_base=True,
    own_memory=False,          # loads the base too
    gated={"same_top_pct": True},
    reported=("ln_ppl_ratio",),    # the KLD cell's view of the PPL (gated in perplexity)
    # 5 % of mean KLD: 2.5 x the KLD fidelity target (2 %); at least 1e-5 nats (a base
    # against itself has KLD ~ 0). 1 same-top point: below the gap between neighbouring quants.
    values=(Value("kld_mean", False, tolerance=5.0, floor=1e-5, pairing=KLD_CHUNKS,
                  figure="KL divergence from the base vs bits per weight"),
            Value("same_top_pct", True, change=POINTS, tolerance=1.0,
                  pairing=SAME_TOP_CHUNKS, column="top-1 agreement %", digits=4),
            # the base's top token among the variant's 5 / 10 most probable: shown, not gated
            # (same-top is; a top-5 miss is a same-top miss too, so gating both counts one
            # regression twice and costs the Bonferroni budget of every other value)
            *(Value(f"top{k}_pct", True, change=POINTS, tolerance=0.5, gated=False,
                    pairing=TOP_K_CHUNKS[k], column=f"top-{k} agreement %", digits=4)
              for k in TOP_K),
            # the 99.9 % tail (Unsloth's headline): on 2,040 tokens it rests on 2 tokens, and
            # per chunk it is a chunk's near-maximum: shown with its paired change, not gated
            Value("kld_p999", False, tolerance=10.0, floor=1e-4, gated=False,
                  pairing=P999_CHUNKS, column="KLD p99.9", digits=3),
            *_bucket_values(),
            Value("ln_ppl_ratio", False, change=POINTS, gated=False, spread=NONE)),
    cost=lambda options: 1.3 * chunk_tokens(options) / 8192.0,
    methodology=(
        "KL(base || variant) of the next-token distributions on exactly the tokens the perplexity "
        "metric scores (llama-perplexity --kl-divergence). The base's distribution is stored per "
        "token as its most probable tokens up to `coverage` of the probability mass (capped at "
        "`max_tokens`) plus `tail_samples` draws from the remaining tail (proportional to the "
        "base probability, stratified, seeded). Per token, KLD is the sum of p log(p/q) - p + q "
        "(terms that are never negative and add up to the KL over the full vocabulary): exact "
        "on the stored tokens, tail mass x the mean over the draws for the rest. That estimate "
        "is unbiased and never negative, so no value is clipped: the mean and its standard "
        "error are unbiased at any KLD level (checked within 2 % of the exact KLD from 1e-4 to "
        "1e-1). Statistics as llama-perplexity: mean +/- standard error, percentiles (99.9 % "
        "included), same-top-token % +/- sqrt(p(1-p)/(N-1)), RMS and percentiles of delta-p "
        "(change in the probability of the correct token), mean ln(PPL(Q)/PPL(base)) with its "
        "covariance-corrected error. Top-5 / top-10 agreement: the share of tokens whose base "
        "top token is among the variant's 5 / 10 most probable (llama.cpp's llama_kl.py). "
        "Confidence buckets (exllamav3's eval/qbench): tokens grouped by the base's top-token "
        "probability, [0, .25), [.25, .5), [.5, .75), [.75, .95), [.95, 1], with each bucket's "
        "share of tokens and mean KLD. Per chunk (the perplexity chunks, in order) every paired "
        "value's chunk figure, so two runs compare chunk by chunk. Every token's KLD is kept in "
        "the record as a log-scale 16-bit code (within 0.034 %, from 1e-12 nats up), for "
        "paired per-token histograms of any two variants."),
)


PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


@dataclass(frozen=True)
class Options:
    dataset: str | None = None    # None: the same as [metrics.perplexity] (else wikitext-2)
    # None: as perplexity (else 512); a list: one cell per context (qbench.metrics.depth)
    ctx: int | tuple[int, ...] | None = None
    chunks: int | tuple[int, ...] | None = None     # None: as perplexity (else 16)
    coverage: float = 0.9999      # base probability mass stored per token
    max_tokens: int = 1024        # ... with at most this many tokens per position
    tail_samples: int = 64        # draws from the rest of the vocabulary per position

    def validate(self, *, file: str, key: str) -> None:
        if self.ctx is not None:
            ctx_points_checked(self.ctx, self.chunks, file=file, key=key)
        elif isinstance(self.chunks, (list, tuple)):
            raise ConfigError("a list of chunk counts goes with a list of contexts: set ctx "
                              "too (or set both under [metrics.perplexity])", file=file,
                              key=f"{key}.chunks")
        if not 0.5 <= self.coverage < 1.0:
            raise ConfigError(f"expected a probability mass in [0.5, 1), got {self.coverage}",
                              file=file, key=f"{key}.coverage")
        if self.max_tokens < 1:
            raise ConfigError(f"expected a positive count, got {self.max_tokens}", file=file,
                              key=f"{key}.max_tokens")
        if self.tail_samples < 1:
            raise ConfigError(f"expected a positive count, got {self.tail_samples}", file=file,
                              key=f"{key}.tail_samples")

    def resolved(self, perplexity: Any | None) -> "Options":
        """Fill unset text settings from the perplexity metric so both score the same tokens."""
        def pick(mine: Any, name: str, default: Any) -> Any:
            if mine is not None:
                return mine
            return getattr(perplexity, name) if perplexity is not None else default
        return Options(pick(self.dataset, "dataset", "wikitext-2"), pick(self.ctx, "ctx", 512),
                       pick(self.chunks, "chunks", 16), self.coverage, self.max_tokens,
                       self.tail_samples)

    def points(self) -> list[tuple[str, "Options"]]:
        """(point label, options of one context) per listed context (qbench.metrics.depth)."""
        return [(label, dataclasses.replace(self, ctx=c, chunks=n))
                for label, c, n in ctx_points(self.ctx, self.chunks)]


def key_extras(options: Options, plan_ctx: Any) -> dict[str, Any]:
    """The dataset's content is part of the cell key (a changed file means new numbers)."""
    return dataset_identity(options.dataset or "wikitext-2", plan_ctx)


# -- the base cache ----------------------------------------------------------------------------

def _top_mass(logprobs: np.ndarray, coverage: float, cap: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: ids and log-probs of the most probable tokens covering ``coverage`` of the mass
    (at most ``cap``), flattened, with per-row counts and the log of the uncovered mass."""
    cap = min(cap, logprobs.shape[1])
    top = np.argpartition(-logprobs, cap - 1, axis=1)[:, :cap] if cap < logprobs.shape[1] \
        else np.tile(np.arange(logprobs.shape[1]), (logprobs.shape[0], 1))
    top_lp = np.take_along_axis(logprobs, top, axis=1)
    order = np.argsort(-top_lp, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    top_lp = np.take_along_axis(top_lp, order, axis=1)
    cum = np.cumsum(np.exp(top_lp.astype(np.float64)), axis=1)
    counts = np.minimum((cum < coverage).sum(axis=1) + 1, cap)
    mask = np.arange(cap)[None, :] < counts[:, None]
    covered = cum[np.arange(len(counts)), counts - 1]
    rest = np.log(np.clip(1.0 - covered, 1e-30, None))
    return (top[mask].astype(np.int32), top_lp[mask].astype(np.float32),
            counts.astype(np.int32), rest.astype(np.float32))


# what the base cache stores and how (KLD v4 added statistics, not stored base rows: the caches
# v3 built stay valid, and rebuilding them would cost a base pass per text and context)
BASE_CACHE_FORMAT = "3"


def base_cache_path(cache_dir: Path, base_sha: str, text_sha: str, options: Options,
                    runtime: dict[str, Any] | None = None) -> Path:
    """The base cache of (base file, text, ctx, requested chunks, storage settings, and how the
    base ran: device, batch sizes, offloaded layers - CUDA logits change with the batch shape,
    so a cache built on a GPU must not stand in for a CPU run): the requested count fixes the
    chunks as surely as the actual one, and needs no tokenizer."""
    ident = {"base_sha256": base_sha, "text_sha256": text_sha, "ctx": options.ctx,
             "chunks": options.chunks, "coverage": options.coverage,
             "max_tokens": options.max_tokens, "tail_samples": options.tail_samples,
             "version": BASE_CACHE_FORMAT}
    if runtime:
        ident["runtime"] = runtime
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return cache_folder(cache_dir, "kld") / f"{digest}.npz"


def _tail_draws(logprobs: np.ndarray, ids: np.ndarray, counts: np.ndarray, samples: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per row: ``samples`` token ids drawn from the tokens not stored, in proportion to their
    probability, and the log of that tail's mass summed directly. Stratified: draw j falls in
    the j-th of ``samples`` equal slices of the tail's mass (each draw still follows p, so the
    mean stays unbiased; a quarter less spread than independent draws, measured)."""
    n, vocab = logprobs.shape
    draws = np.zeros((n, samples), dtype=np.int32)
    rest = np.full(n, math.log(1e-30), dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for r in range(n):
        p = np.exp(logprobs[r].astype(np.float64))
        p[ids[offsets[r]:offsets[r + 1]]] = 0.0
        cum = np.cumsum(p)
        total = cum[-1]
        if total <= 1e-30:
            draws[r] = ids[offsets[r]]  # no tail: the draws are multiplied by a zero mass
            continue
        rest[r] = math.log(total)
        u = (np.arange(samples) + rng.random(samples)) / samples
        draws[r] = np.minimum(np.searchsorted(cum, u * total, side="right"), vocab - 1)
    return draws, rest


def _top_rows(logprobs: np.ndarray, targets: np.ndarray, options: Options, seed: int = 0
              ) -> dict[str, np.ndarray]:
    ids, lp, counts, _ = _top_mass(logprobs, options.coverage, options.max_tokens)
    tail_ids, rest = _tail_draws(logprobs, ids, counts, options.tail_samples,
                                 np.random.default_rng([20260523, seed]))
    id_type = np.uint16 if logprobs.shape[1] <= 65536 else np.int32
    return {"ids": ids.astype(id_type), "logp": lp, "counts": counts, "rest": rest,
            "tail_ids": tail_ids.astype(id_type),
            "tail_logp": np.take_along_axis(logprobs, tail_ids, axis=1).astype(np.float32),
            "target_logp": logprobs[np.arange(len(targets)), targets],
            "top": logprobs.argmax(axis=1).astype(np.int32), "targets": targets.astype(np.int32)}


def _excess(d: np.ndarray) -> np.ndarray:
    """d - 1 + exp(-d) for d = log p - log q: p x this is p log(p/q) - p + q, never negative
    term by term, and summed over a whole vocabulary it is KL(p || q) (both sum to 1), so no
    term needs a clip. Written d + expm1(-d) so that small differences keep their digits."""
    return d + np.expm1(-d)


def _tail_term(b: dict[str, np.ndarray], lq: np.ndarray) -> np.ndarray:
    """Per row: the tail's share of KLD, tail mass x the mean of ``_excess`` over the draws
    (drawn in proportion to p: an unbiased estimate of the tail's sum). It is the plain mean
    of log p - log q plus a control variate whose mean is known (q/p over the draws averages
    Q_tail/P_tail): 1/70 of the plain form's spread at KLD 1e-4, 1/6 at 1e-2 (measured,
    benchmarks/README.md), and never negative."""
    d = (b["tail_logp"].astype(np.float64)
         - np.take_along_axis(lq, b["tail_ids"].astype(np.int64), axis=1).astype(np.float64))
    p_rest = np.exp(b["rest"].astype(np.float64))
    return np.where(p_rest > 1e-29, p_rest * _excess(d).mean(axis=1), 0.0)


def _rank_of(lq: np.ndarray, ids: np.ndarray, block: int = 256) -> np.ndarray:
    """Per row, how many tokens the variant ranks strictly above token ``ids[row]``: 0 when it
    is the variant's top token. In row blocks, so a ctx-8192 chunk (4,096 x 49,152 log-probs)
    never needs a second array of its size."""
    out = np.empty(len(ids), dtype=np.int32)
    for a in range(0, len(ids), block):
        rows = lq[a:a + block]
        ref = rows[np.arange(len(rows)), ids[a:a + block]]
        out[a:a + block] = (rows > ref[:, None]).sum(axis=1)
    return out


def _compare_rows(b: dict[str, np.ndarray], lq: np.ndarray, targets: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Per-token KLD, same-top, NLLs and delta-p of one chunk against its base rows, with the
    base's top-token probability (the confidence buckets) and the rank of the base's top token
    among the variant's (top-k agreement). The per-token KLD is unbiased and, by construction,
    never negative: exact Bregman terms on the stored tokens plus the tail's estimated share
    (see ``_tail_term``)."""
    if not np.array_equal(b["targets"], targets):
        raise QbenchError("the base cache was made from different tokens (tokenizer "
                          "mismatch between variant and base?)")
    n = len(targets)
    row_idx = np.repeat(np.arange(n), b["counts"])
    lq_sel = lq[row_idx, b["ids"].astype(np.int64)].astype(np.float64)
    lp = b["logp"].astype(np.float64)
    kld = np.bincount(row_idx, np.exp(lp) * _excess(lp - lq_sel), minlength=n)
    kld += _tail_term(b, lq)
    lq_t = lq[np.arange(n), targets].astype(np.float64)
    lb_t = b["target_logp"].astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(b["counts"])[:-1]]).astype(np.int64)
    return {"kld": kld, "same": lq.argmax(axis=1) == b["top"],
            "nll_q": -lq_t, "nll_b": -lb_t, "dp": np.exp(lq_t) - np.exp(lb_t),
            # stored rows are sorted by probability: each row's first is the base's top token
            "conf": np.exp(lp[starts]).astype(np.float32),
            "rank": _rank_of(lq, b["top"].astype(np.int64))}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _base_slice(base: dict[str, np.ndarray], offsets: np.ndarray, row0: int, n: int
                ) -> dict[str, np.ndarray]:
    """The stored rows ``row0 .. row0+n`` (one chunk) of the base cache."""
    rows = slice(row0, row0 + n)
    lo, hi = offsets[row0], offsets[row0 + n]
    b = {k: base[k][rows] for k in ("counts", "rest", "target_logp", "top", "targets",
                                      "tail_ids", "tail_logp")}
    return b | {"ids": base["ids"][lo:hi], "logp": base["logp"][lo:hi]}


class Accumulator:
    """Per chunk of log-probs: the base's stored rows (``build``) and/or the comparison with
    stored base rows (``base``) -- one accumulator for the KLD cell and the perplexity pass."""

    def __init__(self, options: Options | None = None, *,
                 base: dict[str, np.ndarray] | None = None, build: bool = False,
                 compare: bool = True) -> None:
        self.opts, self.base, self.build, self.compare = options, base, build, compare
        self.offsets = (np.concatenate([[0], np.cumsum(base["counts"])])
                        if base is not None else None)
        self.rows: list[dict[str, np.ndarray]] = []
        self.parts: list[dict[str, np.ndarray]] = []
        self.row0 = 0

    def feed(self, i: int, logprobs: np.ndarray, targets: np.ndarray) -> None:
        if self.build:
            assert self.opts is not None
            b = _top_rows(logprobs, targets, self.opts, seed=i)
            self.rows.append(b)
        else:
            assert self.base is not None and self.offsets is not None
            b = _base_slice(self.base, self.offsets, self.row0, len(targets))
        if self.compare:
            part = _compare_rows(b, logprobs, targets)
            part["chunk"] = np.full(len(targets), i, dtype=np.int32)
            self.parts.append(part)
        self.row0 += len(targets)

    def stored(self) -> dict[str, np.ndarray]:
        return _concat(self.rows)

    def compared(self) -> dict[str, np.ndarray]:
        return _concat(self.parts)


def _run_pass(backend: Any, chunks: Chunks, acc: Accumulator) -> Accumulator:
    for i, logprobs, targets in iter_scored(backend, chunks):
        acc.feed(i, logprobs, targets)
    return acc


def compute_base(backend: Any, chunks: Chunks, options: Options, *, self_compare: bool = False
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The base's stored rows; with ``self_compare`` also the base compared with its own stored
    rows in the same pass (the base cell: KLD 0 up to the storage's rounding, for free)."""
    acc = _run_pass(backend, chunks, Accumulator(options, build=True, compare=self_compare))
    return acc.stored(), (acc.compared() if self_compare else None)


def save_npz(path: Path, data: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)


def base_and_comparison(ctx: CellContext, chunks: Chunks, options: Options
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Path, bool]:
    """The base's stored distributions (built with the base model if absent) and the per-token
    comparison of this cell's variant with them."""
    if ctx.base_artifact is None:
        raise QbenchError("no base variant to compare with")
    path = base_cache_path(ctx.cache_dir, ctx.base_artifact["sha256"], chunks.text.sha256,
                           options, ctx.base_artifact.get("runtime"))
    built = False
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            with np.load(path) as npz:
                base = {k: npz[k] for k in npz.files}
        elif ctx.is_base:
            base, compared = compute_base(ctx.backend, chunks, options, self_compare=True)
            save_npz(path, base)
            return base, compared, path, True  # type: ignore[return-value]
        else:
            loaded = ctx.load_base()
            try:
                base, _ = compute_base(loaded, chunks, options)
            finally:
                loaded.close()
            save_npz(path, base)
            built = True
    return base, compare(base, ctx.backend, chunks), path, built


def compare(base: dict[str, np.ndarray], backend: Any, chunks: Chunks
            ) -> dict[str, np.ndarray]:
    """Per scored token of ``backend``: KLD, same-top flag, NLLs, delta-p against ``base``."""
    return _run_pass(backend, chunks, Accumulator(base=base)).compared()


# -- the shared pass: KLD from the perplexity cell's forward pass -----------------------------

def pairs_path(base_cache: Path, kld_cell_key: str) -> Path:
    """Where the per-token comparison for one KLD cell (its key: model, variant settings,
    library version, options) against one base cache is kept."""
    return base_cache.parent / "pairs" / f"{base_cache.stem}-{kld_cell_key}.npz"


# -- statistics --------------------------------------------------------------------------------

def _mean_unc(s: float, s2: float, n: int) -> tuple[float, float]:
    """llama-perplexity's mean_and_uncertainty."""
    f = s / n
    var = s2 / n - f * f
    return f, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def per_chunk(t: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each paired value's figure per chunk, in the order scored (the chunks of the perplexity
    metric): the units a regression gate compares run against run. Mean KLD and same-top
    fraction always; with the base's confidence and rank stored (v4) also top-k agreement,
    the chunk's 99.9 % KLD and each confidence bucket's items (``_bucket_items``)."""
    if "chunk" not in t:
        return {}
    _, first, inv = np.unique(t["chunk"], return_index=True, return_inverse=True)
    order = np.argsort(first)
    n = np.bincount(inv)
    out: dict[str, Any] = {
        "per_chunk_kld": (np.bincount(inv, t["kld"]) / n)[order].tolist(),
        "per_chunk_same_top": (np.bincount(inv, t["same"]) / n)[order].tolist()}
    if "rank" in t:
        for k in TOP_K:
            out[f"per_chunk_top{k}"] = (np.bincount(inv, t["rank"] < k) / n)[order].tolist()
    kld = np.maximum(t["kld"], 0.0)
    out["per_chunk_kld_p999"] = [float(np.percentile(kld[inv == c], 99.9)) for c in order]
    if "conf" in t:
        total = len(t["kld"])
        buckets: dict[str, list[float]] = {}
        for name, mask in zip(BUCKET_NAMES, _bucket_masks(t["conf"])):
            share = mask.sum() / total
            if share == 0:
                continue
            sums = np.bincount(inv, np.where(mask, t["kld"], 0.0), minlength=len(n))
            buckets[name] = (sums / (share * n))[order].tolist()
        out["per_chunk_kld_conf"] = buckets
    return out


def _bucket_masks(conf: np.ndarray) -> list[np.ndarray]:
    """Per confidence bucket, which tokens fall in it (the last bucket includes 1.0)."""
    c = np.asarray(conf, dtype=np.float64)
    return [(c >= lo) & ((c < hi) if hi < 1.0 else (c <= 1.0 + 1e-6)) for lo, hi in CONF_BUCKETS]


def _detail_values(t: dict[str, np.ndarray], kld: np.ndarray) -> dict[str, Any]:
    """Values of v4: the 99.9 % tail, top-k agreement and the confidence buckets (those whose
    per-token data the comparison holds)."""
    n = len(kld)
    out = {"kld_p999": value(float(np.percentile(kld, 99.9)), None, n, "nats")}
    if "rank" in t:
        for k in TOP_K:
            p = float((t["rank"] < k).mean())
            out[f"top{k}_pct"] = value(100 * p, 100 * math.sqrt(p * (1 - p) / (n - 1)), n, "%")
    if "conf" in t:
        for name, mask in zip(BUCKET_NAMES, _bucket_masks(t["conf"])):
            m = int(mask.sum())
            out[f"share_conf_{name}"] = value(100 * m / n, None, n, "%")
            if m:
                mean, se = _mean_unc(float(t["kld"][mask].sum()),
                                     float((t["kld"][mask] ** 2).sum()), m)
                out[f"kld_conf_{name}"] = value(mean, se, m, "nats")
    return out


def statistics(t: dict[str, np.ndarray]) -> dict[str, Any]:
    """The figures llama-perplexity --kl-divergence prints, from per-token arrays. Mean and
    its error use the per-token estimates as they are (unbiased); figures that show single
    tokens (median, percentiles, max) use them floored at 0, which a KL cannot go below."""
    n = len(t["kld"])
    dp = t["dp"]
    mean_kld, se_kld = _mean_unc(t["kld"].sum(), (t["kld"] ** 2).sum(), n)
    kld = np.maximum(t["kld"], 0.0)
    m_q, se_q = _mean_unc(t["nll_q"].sum(), (t["nll_q"] ** 2).sum(), n)
    m_b, se_b = _mean_unc(t["nll_b"].sum(), (t["nll_b"] ** 2).sum(), n)
    cov = ((t["nll_q"] * t["nll_b"]).sum() / n - (t["nll_q"].sum() / n) * (t["nll_b"].sum() / n)
           ) / (n - 1) if n >= 10 else 0.0
    ln_ratio = m_q - m_b
    ln_ratio_unc = math.sqrt(max(se_q ** 2 + se_b ** 2 - 2 * cov, 0.0))
    p_same = float(t["same"].mean())
    mse, mse_unc = _mean_unc((dp ** 2).sum(), (dp ** 4).sum(), n)
    rms = math.sqrt(mse)
    values = {
        "kld_mean": value(mean_kld, se_kld, n, "nats"),
        "kld_median": value(float(np.percentile(kld, 50)), None, n, "nats"),
        "kld_p90": value(float(np.percentile(kld, 90)), None, n, "nats"),
        "kld_p99": value(float(np.percentile(kld, 99)), None, n, "nats"),
        "kld_max": value(float(kld.max()), None, n, "nats"),
        "same_top_pct": value(100 * p_same, 100 * math.sqrt(p_same * (1 - p_same) / (n - 1)),
                              n, "%"),
        "rms_dp_pct": value(100 * rms, 100 * (0.5 / rms) * mse_unc if rms > 0 else 0.0, n, "%"),
        "mean_dp_pct": value(100 * float(dp.mean()), 100 * _mean_unc(dp.sum(), (dp ** 2).sum(),
                                                                     n)[1], n, "%"),
        "ln_ppl_ratio": value(ln_ratio, ln_ratio_unc, n),
        "ppl_ratio": value(math.exp(ln_ratio), math.exp(ln_ratio) * ln_ratio_unc, n),
        "ppl": value(math.exp(m_q), math.exp(m_q) * se_q, n),
        "ppl_base": value(math.exp(m_b), math.exp(m_b) * se_b, n),
    } | _detail_values(t, kld)
    details = {
        "kld_percentiles": {f"{p:g}": float(np.percentile(kld, p)) for p in PERCENTILES}
        | {"max": float(kld.max()), "min": float(kld.min())},
        "dp_percentiles_pct": {f"{p:g}": 100 * float(np.percentile(dp, p))
                               for p in DP_PERCENTILES}
        | {"max": 100 * float(dp.max()), "min": 100 * float(dp.min())},
        "cor_ln_ppl_pct": 100 * cov / (se_q * se_b) if se_q > 0 and se_b > 0 else None,
    } | per_chunk(t)
    return {"values": values, "details": details}


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    opts = options.resolved(None)
    if ctx.base_artifact is None:
        raise QbenchError("no base variant to compare with")
    text = load_text(opts.dataset, ctx.data_dir, ctx.base_dir)
    path = base_cache_path(ctx.cache_dir, ctx.base_artifact["sha256"], text.sha256, opts,
                           ctx.base_artifact.get("runtime"))
    pairs = pairs_path(path, ctx.cell_key) if ctx.cell_key else None
    shared = pairs is not None and path.exists() and pairs.exists()
    if shared:  # the perplexity cell's pass already compared this variant: no model load
        try:
            with np.load(path) as npz:
                base = {k: npz[k] for k in ("counts", "rest")}
            with np.load(pairs) as npz:
                per_token = {k: npz[k] for k in npz.files}
            built, n_chunks = False, None
        except (OSError, ValueError, KeyError) as exc:   # unreadable: compute it here
            ctx.notes.append(f"kld: shared result unreadable ({exc}); computed in this cell")
            shared = False
    if not shared:
        chunks = make_chunks(ctx.backend, opts.dataset, opts.ctx, opts.chunks, ctx.data_dir,
                             ctx.base_dir)
        base, per_token, path, built = base_and_comparison(ctx, chunks, opts)
        n_chunks = len(chunks.chunks)
    out = statistics(per_token)
    rest_mass = np.exp(base["rest"].astype(np.float64))
    out["values"]["coverage_mean"] = value(1 - float(rest_mass.mean()), None,
                                           len(rest_mass), "probability")
    out["details"].update({
        "base_cache": str(path), "base_cache_bytes": path.stat().st_size,
        "base_cache_built_here": built, "base_tokens_stored_mean": float(base["counts"].mean()),
        "base_sha256": ctx.base_artifact["sha256"], "dataset": text.name,
        "dataset_sha256": text.sha256, "ctx": opts.ctx,
        "chunks": n_chunks if n_chunks is not None else opts.chunks,
        "scored_tokens": len(per_token["kld"]),
        "coverage": opts.coverage, "max_tokens": opts.max_tokens,
        "tail_samples": opts.tail_samples,
        "computed_in": ("the perplexity cell's forward pass (shared, same tokens)" if shared
                        else "this cell"),
        "coverage_min": 1 - float(rest_mass.max()),
        # every token's KLD (floored at 0, as the percentiles), 2 bytes each, in scoring
        # order: two variants' tokens pair by position (qbench.metrics.token_codec)
        "per_token": {"kld": token_codec.encode(np.maximum(per_token["kld"], 0.0))},
    })
    return out
