"""Durable results: one JSON file per cell, written atomically, found again by the cell's key.

Layout under the results root (``--out``, default ./results)::

    <suite>/cells/<key>.json      one record per cell (latest outcome of that key)
    <suite>/runs/<run-id>.json    what each `qbench run` did, in order
    <suite>/logs/<key>.log        the cell process's stdout/stderr
    <suite>/.lock                 held while a run writes (a second run refuses)
    <suite>/.scratch/             a run's temporary folders (cell specs, results in flight),
                                  swept when the lock is next taken

File names are keys (hex), never user strings, so no model id can escape the folder. No write
follows a symbolic link: the suite folder and its subfolders must be real folders
(:func:`qbench.host.fsutil.real_folder`), files are replaced, never written through. A record is
trusted only under its own key (``cells/<key>.json`` holding that key) and in its own shape;
anything else is set aside like a corrupt file and its cell runs again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qbench.errors import StoreError
from qbench.host.fsutil import atomic_write_text, exclusive_lock, real_folder
from qbench.results.schema import SCHEMA_VERSION, STATUSES, migrate

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
        self.tmp_dir = self.dir / ".scratch"

    def folders(self) -> None:
        """Create the suite's folders, refusing any that is a symbolic link (StoreError); the
        scratch folder is made by the run that needs it, and checked here when it exists."""
        for folder in (self.cells_dir, self.runs_dir, self.logs_dir):
            real_folder(folder, below=self.root)
        if os.path.lexists(self.tmp_dir):
            real_folder(self.tmp_dir, below=self.root)

    def cell_path(self, key: str) -> Path:
        if not key.isalnum():
            raise StoreError(f"invalid cell key {key!r}")
        return self.cells_dir / f"{key}.json"

    def log_path(self, key: str) -> Path:
        return self.logs_dir / f"{self.cell_path(key).stem}.log"

    @contextmanager
    def lock(self, *, wait: bool = False, what: str = "results folder") -> Iterator[None]:
        real_folder(self.dir, below=self.root)
        with exclusive_lock(self.dir, wait=wait, what=what):
            self.folders()
            self._sweep_temporaries()
            yield

    def _sweep_temporaries(self) -> None:
        """Remove what a killed run left: the temporary files of an atomic write and the run's
        temporary folders (.scratch/). With the lock held, no writer of this folder is alive.
        Finished results are never touched; links are removed, never followed."""
        for folder in (self.cells_dir, self.runs_dir):   # written only under this lock
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    with contextlib.suppress(OSError):
                        tmp.unlink()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.tmp_dir):
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)

    def load(self, key: str) -> dict[str, Any] | None:
        """The stored record for ``key``, migrated; None if absent or unreadable (set aside)."""
        path = self.cell_path(key)
        if not os.path.lexists(path):
            return None
        return read_record(path, key=key)

    def save(self, record: dict[str, Any]) -> Path:
        path = self.cell_path(record["key"])
        real_folder(self.cells_dir, below=self.root)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str))
        return path

    def records(self) -> list[dict[str, Any]]:
        """Every readable cell record of this suite (each under its own key)."""
        out = []
        for path in sorted(self.cells_dir.glob("*.json")):
            rec = read_record(path, key=path.stem)
            if rec is not None:
                out.append(rec)
        return out

    def save_run(self, run_id: str, manifest: dict[str, Any]) -> Path:
        path = self.runs_dir / f"{run_id}.json"
        real_folder(self.runs_dir, below=self.root)
        atomic_write_text(path, json.dumps(manifest, indent=1, default=str))
        return path


def shape_problem(record: dict[str, Any]) -> str | None:
    """What makes a (migrated) record unusable, or None: the fields every reader indexes, with
    their types. A record that fails here would otherwise abort every command that reads it."""
    def text(name: str) -> bool:
        return isinstance(record.get(name), str)

    for name in ("key", "id", "suite", "metric"):
        if not text(name):
            return f"'{name}' is {record.get(name)!r}, expected a string"
    if not record["key"].isalnum():
        return f"'key' is {record['key']!r}, expected letters and digits"
    if record.get("status") not in STATUSES:
        return f"'status' is {record.get('status')!r}, expected one of {', '.join(STATUSES)}"
    model, variant = record.get("model"), record.get("variant")
    if not isinstance(model, dict) or not isinstance(model.get("id"), str):
        return "'model' is not a table with a string 'id'"
    if not isinstance(variant, dict) or not all(isinstance(variant.get(k), str)
                                                for k in ("backend", "quant")):
        return "'variant' is not a table with string 'backend' and 'quant'"
    values = record.get("values", {})
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        return "'values' is not a table of tables"
    for name in ("details", "artifact", "backend", "memory", "timings", "env", "options"):
        if not isinstance(record.get(name, {}), dict):
            return f"'{name}' is {type(record.get(name)).__name__}, expected a table"
    if not isinstance(record.get("error"), (str, type(None))):
        return "'error' is not a string"
    return None


def _set_aside(path: Path, why: str) -> None:
    """Rename an untrustworthy record out of the way (never deleted: it is evidence)."""
    aside = path.with_suffix(f".corrupt-{int(time.time())}")
    try:
        path.rename(aside)
    except OSError:
        aside = path
    log.warning("unreadable result %s (%s); moved to %s, the cell will run again",
                path, why, aside.name)


def read_record(path: Path, *, key: str | None = None) -> dict[str, Any] | None:
    """Read one record; a corrupt file, one of the wrong shape, or (with ``key``) one that is
    not the record of that key is renamed aside (never silently trusted) and skipped.

    A record from a newer schema, or one too old to migrate, raises StoreError: refusing is
    safer than misreading, and an upgrade (not a rerun) is the fix.
    """
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise OSError("a symbolic link, not a record")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _set_aside(path, str(exc))
        return None
    if not isinstance(data, dict):
        _set_aside(path, f"a JSON {type(data).__name__}, not an object")
        return None
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        _set_aside(path, "no integer schema_version: not a qbench cell record")
        return None
    if version != SCHEMA_VERSION:
        data = migrate(data, where=str(path))   # raises for newer (and unmigratable) ones
    problem = shape_problem(data)
    if problem is None and key is not None and data["key"] != key:
        problem = (f"it holds the record of key {data['key']!r}, not of {key!r} (its file "
                   "name): a record is trusted only under its own key")
    if problem is not None:
        _set_aside(path, problem)
        return None
    return data


def load_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Records from result folders or files (a suite folder, a results root, or cell files)."""
    out: list[dict[str, Any]] = []
    for p in paths:
        if p.is_file():
            rec = read_record(p)                # named by the user: any file name
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
            rec = read_record(f, key=f.stem)
            if rec is not None:
                out.append(rec)
    return out
