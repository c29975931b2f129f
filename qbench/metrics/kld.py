"""KL-divergence of a variant's next-token distributions from its base's, on the tokens the
perplexity metric scores, with the statistics ``llama-perplexity --kl-divergence`` prints.

Base distributions are computed once per (base file, text, ctx, chunks, coverage) and cached.
Storage is bounded: per scored token, the base's most probable tokens up to ``coverage`` of its
probability mass (at most ``max_tokens`` of them) as (id, log-prob) pairs, the log of the
remaining ("tail") mass, and ``tail_samples`` token ids drawn from the tail in proportion to the
base's probability (seeded per chunk). KLD = the exact sum over the stored tokens + the tail
mass x the sampled mean of log p - log q over the tail draws: a Monte-Carlo estimate of the
tail's share (unbiased before the clip below, which can only raise it, negligibly), where
dropping the tail (a "rest" bucket alone) underestimates KLD by ~2 % on
SmolLM2 (measured, benchmarks/fidelity.py). The tail's KL between the renormalised tails cannot
be negative, so a draw that says otherwise is clipped to 0 (never below the exact lower bound).
For SmolLM2-135M on 16 x 512 tokens (4,080 scored) the cache is 26 MB (measured), where
llama.cpp's full-vocabulary file is 400 MB (and 11 GB for a 7B on all of wikitext-2). Remove
them with ``qbench cache clear kld``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets import load_text
from ..errors import ConfigError, QbenchError
from ..fsutil import file_lock
from . import MetricInfo
from .context import CellContext, value
from .scoring import Chunks, iter_scored, make_chunks

INFO = MetricInfo(
    name="kld", version="2", primary="kld_mean", higher_is_better=False, needs_base=True,
    methodology=(
        "KL(base || variant) of the next-token distributions on exactly the tokens the perplexity "
        "metric scores (llama-perplexity --kl-divergence). The base's distribution is stored per "
        "token as its most probable tokens up to `coverage` of the probability mass (capped at "
        "`max_tokens`) plus `tail_samples` draws from the remaining tail (proportional to the "
        "base probability, seeded); KLD is exact on the stored tokens and the tail's share is "
        "estimated from the draws (tail mass x mean log-ratio; a negative estimate of the "
        "renormalised tails' KL is clipped to 0). Statistics as llama-perplexity: mean +/- standard "
        "error, percentiles, same-top-token % +/- sqrt(p(1-p)/(N-1)), RMS and percentiles of "
        "delta-p (change in the probability of the correct token), mean ln(PPL(Q)/PPL(base)) "
        "with its covariance-corrected error."),
)

PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


@dataclass(frozen=True)
class Options:
    dataset: str | None = None    # None: the same as [metrics.perplexity] (else wikitext-2)
    ctx: int | None = None        # None: as perplexity (else 512)
    chunks: int | None = None     # None: as perplexity (else 16)
    coverage: float = 0.9999      # base probability mass stored per token
    max_tokens: int = 1024        # ... with at most this many tokens per position
    tail_samples: int = 64        # draws from the rest of the vocabulary per position

    def validate(self, *, file: str, key: str) -> None:
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


def key_extras(options: Options, plan_ctx: Any) -> dict[str, Any]:
    from .perplexity import Options as PplOptions, key_extras as ppl_extras
    return ppl_extras(PplOptions(dataset=options.dataset or "wikitext-2"), plan_ctx)


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


def base_cache_path(cache_dir: Path, base_sha: str, text_sha: str, options: Options) -> Path:
    """The base cache of (base file, text, ctx, requested chunks, storage settings): the
    requested count fixes the chunks as surely as the actual one, and needs no tokenizer."""
    ident = {"base_sha256": base_sha, "text_sha256": text_sha, "ctx": options.ctx,
             "chunks": options.chunks, "coverage": options.coverage,
             "max_tokens": options.max_tokens, "tail_samples": options.tail_samples,
             "version": INFO.version}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir / "kld-base" / f"{digest}.npz"


def _tail_draws(logprobs: np.ndarray, ids: np.ndarray, counts: np.ndarray, samples: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per row: ``samples`` token ids drawn (with replacement) from the tokens not stored,
    in proportion to their probability, and the log of that tail's mass summed directly."""
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
        draws[r] = np.minimum(np.searchsorted(cum, rng.random(samples) * total, side="right"),
                              vocab - 1)
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


def _compare_rows(b: dict[str, np.ndarray], lq: np.ndarray, targets: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Per-token KLD, same-top, NLLs and delta-p of one chunk against its base rows."""
    if not np.array_equal(b["targets"], targets):
        raise QbenchError("the base cache was made from different tokens (tokenizer "
                          "mismatch between variant and base?)")
    n = len(targets)
    lp = b["logp"].astype(np.float64)
    row_idx = np.repeat(np.arange(n), b["counts"])
    ids = b["ids"].astype(np.int64)
    lq_sel = lq[row_idx, ids].astype(np.float64)
    p = np.exp(lp)
    kld = np.bincount(row_idx, p * (lp - lq_sel), minlength=n)
    log_p_rest = b["rest"].astype(np.float64)
    p_rest = np.exp(log_p_rest)
    q_rest = np.clip(1.0 - np.bincount(row_idx, np.exp(lq_sel), minlength=n), 1e-30, None)
    # the tail: mass x KL(renormalised base tail || renormalised variant tail), the latter
    # estimated from the draws (E over base-tail draws of log p - log q, plus the
    # renormalisation), clipped at 0 because a KL cannot be negative
    tail_ids = b["tail_ids"].astype(np.int64)
    ratio = (b["tail_logp"].astype(np.float64)
             - np.take_along_axis(lq, tail_ids, axis=1).astype(np.float64)).mean(axis=1)
    tail_kl = np.maximum(ratio - log_p_rest + np.log(q_rest), 0.0)
    kld += np.where(p_rest > 1e-30, p_rest * (log_p_rest - np.log(q_rest) + tail_kl), 0.0)
    lq_t = lq[np.arange(n), targets].astype(np.float64)
    lb_t = b["target_logp"].astype(np.float64)
    return {"kld": np.maximum(kld, 0.0), "same": lq.argmax(axis=1) == b["top"],
            "nll_q": -lq_t, "nll_b": -lb_t, "dp": np.exp(lq_t) - np.exp(lb_t)}


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


class _Pass:
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
            self.parts.append(_compare_rows(b, logprobs, targets))
        self.row0 += len(targets)

    def stored(self) -> dict[str, np.ndarray]:
        return _concat(self.rows)

    def compared(self) -> dict[str, np.ndarray]:
        return _concat(self.parts)


def _run_pass(backend: Any, chunks: Chunks, acc: _Pass) -> _Pass:
    for i, logprobs, targets in iter_scored(backend, chunks):
        acc.feed(i, logprobs, targets)
    return acc


def compute_base(backend: Any, chunks: Chunks, options: Options, *, self_compare: bool = False
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The base's stored rows; with ``self_compare`` also the base compared with its own stored
    rows in the same pass (the base cell: KLD 0 up to the storage's rounding, for free)."""
    acc = _run_pass(backend, chunks, _Pass(options, build=True, compare=self_compare))
    return acc.stored(), (acc.compared() if self_compare else None)


def _save(path: Path, data: dict[str, np.ndarray]) -> None:
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
                           options)
    built = False
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            with np.load(path) as npz:
                base = {k: npz[k] for k in npz.files}
        elif ctx.is_base:
            base, compared = compute_base(ctx.backend, chunks, options, self_compare=True)
            _save(path, base)
            return base, compared, path, True  # type: ignore[return-value]
        else:
            loaded = ctx.load_base()
            try:
                base, _ = compute_base(loaded, chunks, options)
            finally:
                loaded.close()
            _save(path, base)
            built = True
    return base, compare(base, ctx.backend, chunks), path, built


def compare(base: dict[str, np.ndarray], backend: Any, chunks: Chunks
            ) -> dict[str, np.ndarray]:
    """Per scored token of ``backend``: KLD, same-top flag, NLLs, delta-p against ``base``."""
    return _run_pass(backend, chunks, _Pass(base=base)).compared()


# -- the shared pass: KLD from the perplexity cell's forward pass -----------------------------

def pairs_path(base_cache: Path, kld_cell_key: str) -> Path:
    """Where the per-token comparison for one KLD cell (its key: model, variant settings,
    library version, options) against one base cache is kept."""
    return base_cache.parent / "pairs" / f"{base_cache.stem}-{kld_cell_key}.npz"


class SharedPass:
    """Computes this variant's per-token KLD inside the perplexity cell's pass over the same
    tokens, so the KLD cell needs no second forward pass (half the inference of ppl + KLD).
    The numbers are those the KLD cell would compute (same log-softmax, same stored base rows,
    the same accumulator). The base variant's pass also builds the base cache. A variant whose
    base cache does not exist yet is left to its KLD cell."""

    def __init__(self, ctx: CellContext, chunks: Chunks, options: Options,
                 kld_cell_key: str) -> None:
        if ctx.base_artifact is None:
            raise QbenchError("no base variant to compare with")
        self.cache = base_cache_path(ctx.cache_dir, ctx.base_artifact["sha256"],
                                     chunks.text.sha256, options)
        self.out = pairs_path(self.cache, kld_cell_key)
        self.acc: _Pass | None = None
        if self.out.exists():
            pass                                     # already computed for that KLD cell
        elif ctx.is_base and not self.cache.exists():
            self.acc = _Pass(options, build=True)    # the base's pass builds the cache
        elif self.cache.exists():
            with np.load(self.cache) as npz:
                self.acc = _Pass(options, base={k: npz[k] for k in npz.files})

    @property
    def active(self) -> bool:
        return self.acc is not None

    @active.setter
    def active(self, on: bool) -> None:
        if not on:
            self.acc = None

    def feed(self, i: int, logprobs: np.ndarray, targets: np.ndarray) -> None:
        if self.acc is not None:
            self.acc.feed(i, logprobs, targets)

    def finish(self) -> Path | None:
        """Save the base cache (when built here) and the comparison; the pairs file's path."""
        if self.acc is None or not self.acc.parts:
            return None
        if self.acc.build:
            with file_lock(self.cache.with_suffix(".lock")):
                if not self.cache.exists():
                    _save(self.cache, self.acc.stored())
        _save(self.out, self.acc.compared())
        return self.out


# -- statistics --------------------------------------------------------------------------------

def _mean_unc(s: float, s2: float, n: int) -> tuple[float, float]:
    """llama-perplexity's mean_and_uncertainty."""
    f = s / n
    var = s2 / n - f * f
    return f, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def statistics(t: dict[str, np.ndarray]) -> dict[str, Any]:
    """The figures llama-perplexity --kl-divergence prints, from per-token arrays."""
    n = len(t["kld"])
    kld, dp = t["kld"], t["dp"]
    mean_kld, se_kld = _mean_unc(kld.sum(), (kld ** 2).sum(), n)
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
    }
    details = {
        "kld_percentiles": {f"{p:g}": float(np.percentile(kld, p)) for p in PERCENTILES}
        | {"max": float(kld.max()), "min": float(kld.min())},
        "dp_percentiles_pct": {f"{p:g}": 100 * float(np.percentile(dp, p))
                               for p in DP_PERCENTILES}
        | {"max": 100 * float(dp.max()), "min": 100 * float(dp.min())},
        "cor_ln_ppl_pct": 100 * cov / (se_q * se_b) if se_q > 0 and se_b > 0 else None,
    }
    return {"values": values, "details": details}


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    opts = options.resolved(None)
    if ctx.base_artifact is None:
        raise QbenchError("no base variant to compare with")
    text = load_text(opts.dataset, ctx.data_dir, ctx.base_dir)
    path = base_cache_path(ctx.cache_dir, ctx.base_artifact["sha256"], text.sha256, opts)
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
    })
    return out
