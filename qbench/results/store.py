"""Durable results: one JSON file per cell, written atomically, found again by the cell's key.

Layout under the results root (``--out``, default ./results)::

    <suite>/cells/<key>.json      one record per cell (latest outcome of that key)
    <suite>/runs/<run-id>.json    what each `qbench run` did, in order
    <suite>/logs/<key>.log        the cell process's stdout/stderr
    <suite>/.lock                 held while a run writes (a second run refuses)

File names are keys (hex), never user strings, so no model id can escape the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qbench.errors import StoreError
from qbench.host.fsutil import atomic_write_text, exclusive_lock
from qbench.results.schema import migrate

log = logging.getLogger(__name__)


class Store:
    def __init__(self, root: Path, suite: str) -> None:
        if not suite or "/" in suite or suite in (".", "..") or "\\" in suite:
            raise StoreError(f"invalid suite name for a results folder: {suite!r}")
        self.root = root
        self.dir = root / suite
        self.cells_dir = self.dir / "cells"
        self.runs_dir = self.dir / "runs"
        self.logs_dir = self.dir / "logs"

    def cell_path(self, key: str) -> Path:
        if not key.isalnum():
            raise StoreError(f"invalid cell key {key!r}")
        return self.cells_dir / f"{key}.json"

    def log_path(self, key: str) -> Path:
        return self.logs_dir / f"{self.cell_path(key).stem}.log"

    @contextmanager
    def lock(self, *, wait: bool = False) -> Iterator[None]:
        with exclusive_lock(self.dir, wait=wait):
            self._sweep_temporaries()
            yield

    def _sweep_temporaries(self) -> None:
        """Remove the temporary files of an atomic write that a kill -9 interrupted: with the
        lock held, no writer of this folder is alive. Finished results are never touched."""
        for folder in (self.cells_dir, self.runs_dir):   # written only under this lock
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    with contextlib.suppress(OSError):
                        tmp.unlink()

    def load(self, key: str) -> dict[str, Any] | None:
        """The stored record for ``key``, migrated; None if absent or unreadable (set aside)."""
        path = self.cell_path(key)
        if not path.exists():
            return None
        return read_record(path)

    def save(self, record: dict[str, Any]) -> Path:
        path = self.cell_path(record["key"])
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str))
        return path

    def records(self) -> list[dict[str, Any]]:
        """Every readable cell record of this suite."""
        out = []
        for path in sorted(self.cells_dir.glob("*.json")):
            rec = read_record(path)
            if rec is not None:
                out.append(rec)
        return out

    def save_run(self, run_id: str, manifest: dict[str, Any]) -> Path:
        path = self.runs_dir / f"{run_id}.json"
        atomic_write_text(path, json.dumps(manifest, indent=1, default=str))
        return path


def read_record(path: Path) -> dict[str, Any] | None:
    """Read one record; a corrupt file is renamed aside (never silently trusted) and skipped.

    A record from a newer schema raises StoreError: refusing is safer than misreading.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        aside = path.with_suffix(f".corrupt-{int(time.time())}")
        try:
            path.rename(aside)
        except OSError:
            aside = path
        log.warning("unreadable result %s (%s); moved to %s, the cell will run again",
                    path, exc, aside.name)
        return None
    if not isinstance(data, dict):
        raise StoreError("expected a JSON object", file=str(path))
    return migrate(data, where=str(path))


def load_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Records from result folders or files (a suite folder, a results root, or cell files)."""
    out: list[dict[str, Any]] = []
    for p in paths:
        if p.is_file():
            rec = read_record(p)
            if rec is not None:
                out.append(rec)
            continue
        if not p.is_dir():
            raise StoreError("no such results file or folder", file=str(p))
        files = sorted(p.glob("cells/*.json")) or sorted(p.glob("*/cells/*.json"))
        if not files:
            raise StoreError("no cell records found (expected cells/*.json or "
                             "<suite>/cells/*.json)", file=str(p))
        for f in files:
            rec = read_record(f)
            if rec is not None:
                out.append(rec)
    return out
