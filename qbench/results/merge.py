"""`qbench merge`: gather the cell records of several result folders (the shards of a CI
matrix, or runs on different machines) into one results root, from which one report is built.

Sources may be a results root (``<root>/<suite>/cells``), a suite folder (``<suite>/cells``), or
a folder holding several of either (e.g. the artifacts a CI job downloaded side by side). They are
only read, never changed: an unreadable record in a source is skipped and listed, not renamed.

Conflict rule, per (suite, cell key), over the record already in the destination and those of the
sources: an ``ok`` record beats any other status; among equals the newer ``timings.started``
wins; on a full tie the destination's record stays (then the earliest source's). A record from a
newer qbench schema aborts the merge before anything is written.

Every write is atomic (tmp + fsync + rename), each suite folder of the destination is locked while
it is written, and everything is read and decided before the first write: an interrupted merge
leaves every destination record either as it was or as the winner, never a mix.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qbench.errors import StoreError
from qbench.host.fsutil import atomic_write_bytes, atomic_write_text, exclusive_lock
from qbench.results.schema import SCHEMA_VERSION, migrate
from qbench.results.store import Store

_EPOCH = datetime.min.replace(tzinfo=timezone.utc)
_SEARCH_DEPTH = 3    # how deep below a source to look for <suite>/cells folders


@dataclass
class _Candidate:
    record: dict[str, Any]
    suite: str
    key: str
    path: Path                 # its cells/<key>.json
    origin: str                # "dest" or the source folder

    @property
    def log(self) -> Path:
        return self.path.parent.parent / "logs" / f"{self.key}.log"


@dataclass
class MergeSummary:
    dest: Path
    sources: list[str] = field(default_factory=list)
    records_read: int = 0
    added: int = 0               # keys new to the destination
    replaced: int = 0            # destination records replaced by a better one
    kept: int = 0                # destination records that stayed
    conflicts: int = 0           # keys seen more than once across sources and destination
    runs_copied: int = 0
    logs_copied: int = 0
    unreadable: list[str] = field(default_factory=list)
    suites: dict[str, dict[str, int]] = field(default_factory=dict)  # suite -> status -> cells

    @property
    def written(self) -> int:
        return self.added + self.replaced

    def lines(self) -> list[str]:
        out = [f"merged {self.records_read} record(s) from {len(self.sources)} folder(s) into "
               f"{self.dest}: {self.added} added, {self.replaced} replaced, {self.kept} kept "
               f"({self.conflicts} key(s) seen more than once)"]
        for suite, counts in sorted(self.suites.items()):
            parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            out.append(f"  {suite}: {sum(counts.values())} cells ({parts})")
        if self.unreadable:
            out.append(f"  skipped {len(self.unreadable)} unreadable file(s): "
                       + "; ".join(self.unreadable[:5]))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"dest": str(self.dest), "sources": self.sources,
                "records_read": self.records_read, "added": self.added,
                "replaced": self.replaced, "kept": self.kept, "conflicts": self.conflicts,
                "runs_copied": self.runs_copied, "logs_copied": self.logs_copied,
                "unreadable": self.unreadable, "suites": self.suites}


def started_at(record: dict[str, Any]) -> datetime:
    """``timings.started`` as an aware datetime; the epoch when missing or malformed."""
    raw = (record.get("timings") or {}).get("started")
    if not isinstance(raw, str):
        return _EPOCH
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return _EPOCH
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def rank(record: dict[str, Any]) -> tuple[bool, datetime]:
    """What the conflict rule maximises: ok first, then the newer start."""
    return record.get("status") == "ok", started_at(record)


def suite_folders(source: Path) -> list[Path]:
    """The ``<suite>`` folders (those holding ``cells/``) at or below ``source``."""
    if not source.is_dir():
        raise StoreError("no such results folder", file=str(source))
    if (source / "cells").is_dir():
        return [source]
    found: list[Path] = []
    level = [source]
    for _ in range(_SEARCH_DEPTH):
        level = sorted(p for d in level for p in d.iterdir()
                       if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
        found += [p for p in level if (p / "cells").is_dir()]
        level = [p for p in level if not (p / "cells").is_dir()]
    if not found:
        raise StoreError("no cell records found (expected cells/*.json, <suite>/cells/*.json, or "
                         "folders of those)", file=str(source))
    return found


def _read(path: Path, summary: MergeSummary) -> dict[str, Any] | None:
    """A migrated record, or None (noted in the summary) if the file is not a readable record.
    Never renames or changes the file. A newer schema raises: refusing beats misreading."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        summary.unreadable.append(f"{path} ({type(exc).__name__})")
        return None
    if not isinstance(data, dict):
        summary.unreadable.append(f"{path} (not a JSON object)")
        return None
    version = data.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise StoreError(f"written by a newer qbench (schema version {version}; this qbench "
                         f"reads up to {SCHEMA_VERSION}): upgrade qbench before merging",
                         file=str(path))
    try:
        record = migrate(data, where=str(path))
    except StoreError as exc:
        summary.unreadable.append(f"{path} ({exc.detail})")
        return None
    key = record.get("key")
    if not isinstance(key, str) or not key.isalnum() or key != path.stem:
        summary.unreadable.append(f"{path} (its key {key!r} does not match the file name)")
        return None
    return record


def _candidates(folder: Path, origin: str, summary: MergeSummary) -> list[_Candidate]:
    out = []
    for path in sorted((folder / "cells").glob("*.json")):
        record = _read(path, summary)
        if record is None:
            continue
        suite = record.get("suite") if isinstance(record.get("suite"), str) else folder.name
        try:
            Store(Path("."), suite)      # validates the name (it becomes a folder)
        except StoreError as exc:
            summary.unreadable.append(f"{path} ({exc.detail})")
            continue
        out.append(_Candidate(record, suite, record["key"], path, origin))
    return out


def merge_results(sources: list[Path], dest: Path) -> MergeSummary:
    """Merge the cell records (and their logs and run manifests) of ``sources`` into the results
    root ``dest``; return what happened. Raises StoreError (before writing) if a source is not a
    results folder or holds a record from a newer schema; LockedError if a run holds ``dest``."""
    dest = Path(dest)
    summary = MergeSummary(dest=dest)
    if not sources:
        raise StoreError("nothing to merge: give at least one results folder")
    dest_resolved = dest.resolve()
    source_folders: list[tuple[Path, str]] = []
    for src in sources:
        src = Path(src)
        summary.sources.append(str(src))
        for folder in suite_folders(src):
            if folder.resolve().parent == dest_resolved:
                continue                 # the destination itself: its records are read below
            source_folders.append((folder, str(folder)))

    # 1. read and decide everything
    incoming: list[_Candidate] = []
    folder_suites: dict[Path, set[str]] = {}
    for folder, origin in source_folders:
        found = _candidates(folder, origin, summary)
        summary.records_read += len(found)
        incoming += found
        folder_suites[folder] = {c.suite for c in found} or {folder.name}
    by_key: dict[tuple[str, str], list[_Candidate]] = {}
    for cand in incoming:
        by_key.setdefault((cand.suite, cand.key), []).append(cand)
    existing: dict[tuple[str, str], _Candidate] = {}
    for suite in sorted({s for s, _ in by_key}):
        folder = dest / suite
        if (folder / "cells").is_dir():
            for cand in _candidates(folder, "dest", summary):
                existing[(cand.suite, cand.key)] = cand
    winners: dict[tuple[str, str], _Candidate] = {}
    for ident, cands in by_key.items():
        pool = ([existing[ident]] if ident in existing else []) + cands
        if len(pool) > 1:
            summary.conflicts += 1
        best = pool[0]
        for cand in pool[1:]:
            if rank(cand.record) > rank(best.record):   # strict: ties keep the earlier one
                best = cand
        winners[ident] = best
        if ident not in existing:
            summary.added += 1
        elif best.origin == "dest":
            summary.kept += 1
        else:
            summary.replaced += 1

    # 2. write, one locked suite folder at a time
    for suite in sorted({s for s, _ in winners}):
        store = Store(dest, suite)
        with exclusive_lock(store.dir, what="results folder (merge destination)"):
            for (s, key), win in sorted(winners.items()):
                if s != suite or win.origin == "dest":
                    continue
                log_target = store.log_path(key)
                if win.log.is_file():
                    atomic_write_bytes(log_target, win.log.read_bytes())
                    summary.logs_copied += 1
                elif log_target.exists():
                    log_target.unlink()      # the old log belongs to the replaced record
                store.save(win.record)
            for folder, _ in source_folders:
                if suite in folder_suites[folder]:
                    summary.runs_copied += _copy_runs(folder, store, suite)
            counts: dict[str, int] = {}
            for rec in store.records():
                counts[rec["status"]] = counts.get(rec["status"], 0) + 1
            summary.suites[suite] = counts
            store.save_run(_merge_run_id(), {
                "kind": "merge", "suite": suite, "merged": _now(), "sources": summary.sources,
                "added": sum(1 for (s, _), w in winners.items()
                             if s == suite and (s, w.key) not in existing),
                "replaced": sum(1 for (s, _), w in winners.items()
                                if s == suite and (s, w.key) in existing and w.origin != "dest"),
                "counts": counts})
    return summary


def _copy_runs(folder: Path, store: Store, suite: str) -> int:
    """Copy the run manifests of a source suite folder that the destination lacks."""
    runs = folder / "runs"
    if not runs.is_dir():
        return 0
    copied = 0
    for path in sorted(runs.glob("*.json")):
        target = store.runs_dir / path.name
        if target.exists():
            continue
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(manifest, dict) or manifest.get("suite", suite) != suite:
            continue
        atomic_write_text(target, json.dumps(manifest, indent=1, default=str))
        copied += 1
    return copied


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _merge_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-merge-" + uuid.uuid4().hex[:6]

