"""What a worker process keeps between the cells of one variant: the prepared files and the
loaded models, so a variant is prepared and loaded once, not once per metric.

Cells borrow the loaded backend and never close it (:class:`~qbench.metrics.context.CellContext`
with ``shared_backend``); between cells the session drops what one cell built on it (llama.cpp's
context, a KV cache: the backend's optional ``end_cell``) so the next cell starts as on a fresh
load; :func:`close_session` frees the models when the worker is done. A failure the user must fix
(a :class:`QbenchError`, e.g. a missing file or extra) is remembered too: the variant's other
cells report it at once instead of trying again.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from qbench.backends.base import Backend
from qbench.errors import QbenchError

T = TypeVar("T")


class Borrowed:
    """A loaded backend lent to a metric that closes what it loads (``ctx.load_base()``):
    its ``close`` gives it back to the session instead of freeing it."""

    def __init__(self, backend: Backend) -> None:
        self._lent = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lent, name)

    def close(self) -> None:
        pass


class Session:
    """One variant's prepared files and loaded backends in this process."""

    def __init__(self, ident: str) -> None:
        self.ident = ident
        self._memo: dict[str, tuple[bool, Any]] = {}
        self._loaded: dict[str, Backend] = {}

    def once(self, name: str, make: Callable[[], T]) -> T:
        """``make()``'s value, computed on the first call for ``name``; a QbenchError it raised
        is raised again (other errors are not kept: the worker ends after them)."""
        if name not in self._memo:
            try:
                self._memo[name] = (True, make())
            except QbenchError as exc:
                self._memo[name] = (False, exc)
        ok, value = self._memo[name]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def loaded(self, name: str, load: Callable[[], Backend]) -> Backend:
        """The backend ``name`` ("variant", "base"), loaded on first use and kept."""
        if name not in self._loaded:
            self._loaded[name] = load()
        return self._loaded[name]

    def held(self) -> list[str]:
        """The backends loaded now (recorded with each cell: they are in its memory)."""
        return sorted(self._loaded)

    def end_cell(self) -> None:
        """Drop what the cell built on the loaded backends; keep their weights. A backend that
        fails to is closed instead (the next cell loads it afresh): the cell's result stands."""
        for name, backend in list(self._loaded.items()):
            end = getattr(backend, "end_cell", None)
            if end is None:
                continue
            try:
                end()
            except Exception as exc:  # noqa: BLE001 - not this cell's failure
                print(f"qbench: resetting the {name} backend failed ({exc!r}); it is "
                      "loaded again for the next cell", file=sys.stderr)
                del self._loaded[name]
                try:
                    backend.close()
                except Exception:  # noqa: BLE001
                    pass
        release_free_memory()   # the cell's garbage goes now, not into the next one's window

    def close(self) -> None:
        for name in sorted(self._loaded, key=lambda n: n != "base"):   # the base first
            try:
                self._loaded.pop(name).close()
            except Exception as exc:  # noqa: BLE001 - the results are written: say, go on
                print(f"qbench: closing the {name} backend failed: {exc!r}", file=sys.stderr)
        self._memo.clear()
        release_free_memory()


def release_free_memory() -> None:
    """Collect cycles, then hand the C heap's free pages back to the system (glibc's
    ``malloc_trim``): memory a cell freed would otherwise stay resident and count in the next
    cell's window. Best effort (other C libraries: the collection only)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_current: Session | None = None


def session_for(identity: dict[str, Any]) -> Session:
    """This process's session for the variant ``identity`` describes; another variant's
    session (if any) is closed first."""
    global _current
    ident = json.dumps(identity, sort_keys=True, default=str)
    if _current is not None and _current.ident != ident:
        close_session()
    if _current is None:
        _current = Session(ident)
    return _current


def close_session() -> None:
    global _current
    if _current is not None:
        session, _current = _current, None
        session.close()


def held() -> list[str]:
    """The backends this process holds loaded now (none without a session)."""
    return _current.held() if _current is not None else []
