"""The shared pass: the perplexity cell computes the KLD comparison in its own forward pass.

Perplexity and KLD score the same tokens, so one forward pass can serve both (half the
inference of the two cells). All of the arrangement lives here:

- :func:`align_options` makes the KLD metric score the perplexity metric's text unless the
  suite says otherwise (the suite parser calls it);
- :func:`companions` decides, at planning time, whether a perplexity cell serves a KLD cell, and
  names that KLD cell by its key (so a result is only ever read by a cell with that key: another
  library version, batch or GPU setting is another key). Not part of the perplexity cell's key:
  its values are the same either way;
- :func:`start` / :func:`guarded` / :class:`SharedPass` run it inside the perplexity cell, where
  a failure never fails the perplexity cell (the KLD cell then computes on its own);
- the KLD cell reads the stored comparison (``kld.run``, via ``kld.pairs_path``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qbench.errors import QbenchError
from qbench.host.fsutil import file_lock
from qbench.metrics.context import CellContext
from qbench.metrics.kld import (Accumulator, Options, base_cache_path, pairs_path,
                                save_npz)
from qbench.metrics.scoring import Chunks


def align_options(metrics: dict[str, Any]) -> dict[str, Any]:
    """The suite's metric options with KLD's unset text settings taken from perplexity's."""
    if "kld" in metrics:
        metrics = dict(metrics)
        metrics["kld"] = metrics["kld"].resolved(metrics.get("perplexity"))
    return metrics


def companions(metric: str, options: Any, kld_options: Any | None, kld_key: str | None
               ) -> dict[str, dict[str, Any]]:
    """What a cell serves besides itself: a perplexity cell serves the KLD cell ``kld_key`` of
    the same model and variant when both score exactly the same tokens."""
    if metric != "perplexity" or kld_options is None or not kld_key:
        return {}
    if ((kld_options.dataset, kld_options.ctx, kld_options.chunks)
            != (options.dataset, options.ctx, options.chunks)):
        return {}
    return {"kld": dataclasses.asdict(kld_options) | {"cell_key": kld_key}}


def start(ctx: CellContext, chunks: Chunks) -> SharedPass | None:
    """The KLD comparison to run in this pass, when the planner made this cell a companion of
    a KLD cell and a base is known; None otherwise (or when it cannot run here)."""
    opts = dict(ctx.companions.get("kld") or {})
    key = opts.pop("cell_key", "")
    if not opts or not key or ctx.base_artifact is None:
        return None
    try:
        shared = SharedPass(ctx, chunks, Options(**opts), key)
    except Exception as exc:  # noqa: BLE001 - never fail the perplexity cell for it
        ctx.notes.append(f"kld not computed in this pass ({type(exc).__name__}: {exc})")
        return None
    return shared if shared.active else None


def guarded(ctx: CellContext, shared: SharedPass, step: Callable[[], Any]) -> Any:
    """Run a step of the shared KLD work; a failure there never fails the perplexity cell
    (the KLD cell then computes on its own and reports the problem itself)."""
    if not shared.active:
        return None
    try:
        return step()
    except Exception as exc:  # noqa: BLE001 - any failure: leave KLD to its own cell
        shared.active = False
        ctx.notes.append(f"kld not computed in this pass ({type(exc).__name__}: {exc})")
        return None


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
                                     chunks.text.sha256, options,
                                     ctx.base_artifact.get("runtime"))
        self.out = pairs_path(self.cache, kld_cell_key)
        self.acc: Accumulator | None = None
        if self.out.exists():
            pass                                     # already computed for that KLD cell
        elif ctx.is_base and not self.cache.exists():
            self.acc = Accumulator(options, build=True)    # the base's pass builds the cache
        elif self.cache.exists():
            with np.load(self.cache) as npz:
                self.acc = Accumulator(options, base={k: npz[k] for k in npz.files})

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
                    save_npz(self.cache, self.acc.stored())
        save_npz(self.out, self.acc.compared())
        return self.out
