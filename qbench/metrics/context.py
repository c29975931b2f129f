"""What a metric gets to work with inside a cell's process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbench.backends.base import Backend


@dataclass
class CellContext:
    cell_id: str
    model_id: str
    artifact_path: Path            # the variant's model file
    artifact: dict[str, Any]       # its description (sha256, recipe, size)
    base_dir: Path                 # relative paths in the suite are relative to this
    data_dir: Path | None
    cache_dir: Path
    is_base: bool
    base_artifact: dict[str, Any] | None = None   # the base variant's file (KLD)
    _load: Callable[[], Backend] | None = None
    _load_base: Callable[[], Backend] | None = None
    _backend: Backend | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    # other metrics this cell may serve in the same pass (perplexity -> kld): their options
    # and the key of the cell that will read the result
    companions: dict[str, dict[str, Any]] = field(default_factory=dict)
    cell_key: str = ""             # this cell's key (names what it shares with others)
    backend_name: str = ""         # the variant's backend (its registry entry)
    # the backend is the worker's, lent for this cell: the variant's next cell reuses it, so
    # closing the context only lets go of it (the worker closes it after its last cell)
    shared_backend: bool = False
    # a smaller finished cell of this cell's family ({"key", "details"}): a metric with a
    # sample_option takes the items it already scored from it
    reuse: dict[str, Any] | None = None

    @property
    def backend(self) -> Backend:
        """The loaded variant, loaded on first use (footprint never loads it)."""
        if self._backend is None:
            assert self._load is not None
            self._backend = self._load()
        return self._backend

    def load_base(self) -> Backend:
        """Load the model's base variant (the caller closes it; a shared one stays loaded)."""
        if self._load_base is None:
            raise RuntimeError("this cell has no base variant")
        return self._load_base()

    def close(self) -> None:
        if self._backend is not None and not self.shared_backend:
            self._backend.close()
        self._backend = None


def value(v: float | None, stderr: float | None = None, n: int | None = None,
          unit: str = "", **extra: Any) -> dict[str, Any]:
    """A stored metric value: number, standard error, sample count, unit."""
    out: dict[str, Any] = {"value": None if v is None else float(v)}
    if stderr is not None:
        out["stderr"] = float(stderr)
    if n is not None:
        out["n"] = int(n)
    if unit:
        out["unit"] = unit
    out.update(extra)
    return out
