"""`qbench merge`: gather the cell records of several result folders (the shards of a CI
matrix, or runs on different machines) into one results root, from which one report is built.

Sources may be a results root (``<root>/<suite>/cells``), a suite folder (``<suite>/cells``), or
a folder holding several of either (e.g. the artifacts a CI job downloaded side by side). They are
only read, never changed: an unreadable record in a source is skipped and listed, not renamed.

Conflict rule, per (suite, cell key), over the record already in the destination and those of the
sources: an ``ok`` record beats any other status; among equals the newer ``timings.started``
wins; on a full tie the destination's record stays (then the earliest source's). Two ``ok``
records of one key that disagree (other values, or another artifact hash) are not a tie to break
by the clock: they are listed and the merge is refused unless the caller chose how to settle them
(``on_conflict``: "newest" keeps the rule above, "keep" keeps the destination's or the earliest
source's record). A record from a newer qbench schema aborts the merge before anything is written.

Sources are read as untrusted: a record, log or run manifest that is a symbolic link (or not a
regular file) is skipped and listed, never followed (a link to a private file would otherwise be
copied, world-readable, into what a CI job uploads); a record is read only under its own key and
in its own shape; a run manifest is copied only when it is well-formed.

Every write is atomic (tmp + fsync + rename), the destination's suite folders are locked before
they are read and until the last write, and everything is read and decided before the first
write: an interrupted merge leaves every destination record either as it was or as the winner,
never a mix.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qbench.errors import StoreError
from qbench.host.fsutil import atomic_write_bytes, atomic_write_text, is_regular, read_regular
from qbench.results.schema import SCHEMA_VERSION, STATUSES, migrate
from qbench.results.store import Store, shape_problem

ON_CONFLICT = ("refuse", "newest", "keep")

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
    settled: list[str] = field(default_factory=list)   # conflicting ok records, settled by choice
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
        if self.settled:
            out.append(f"  {len(self.settled)} conflicting ok record(s) settled as asked: "
                       + "; ".join(self.settled[:5]))
        if self.unreadable:
            out.append(f"  skipped {len(self.unreadable)} unreadable file(s): "
                       + "; ".join(self.unreadable[:5]))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"dest": str(self.dest), "sources": self.sources,
                "records_read": self.records_read, "added": self.added,
                "replaced": self.replaced, "kept": self.kept, "conflicts": self.conflicts,
                "runs_copied": self.runs_copied, "logs_copied": self.logs_copied,
                "unreadable": self.unreadable, "settled": self.settled, "suites": self.suites}


class MergeConflict(StoreError):
    """Two ok records of one cell disagree; the merge wrote nothing."""


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
    Never renames or changes the file, never follows a link. A newer schema raises: refusing
    beats misreading."""
    try:
        data = json.loads(read_regular(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = "a symbolic link or not a regular file" if not is_regular(path) else \
            type(exc).__name__
        summary.unreadable.append(f"{path} ({why})")
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
    problem = shape_problem(record)
    if problem is not None:
        summary.unreadable.append(f"{path} ({problem})")
        return None
    return record


def _candidates(folder: Path, origin: str, summary: MergeSummary) -> list[_Candidate]:
    out: list[_Candidate] = []
    if (folder / "cells").is_symlink():
        summary.unreadable.append(f"{folder / 'cells'} (a symbolic link: not followed)")
        return out
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


def merge_results(sources: list[Path], dest: Path, *, on_conflict: str = "refuse"
                  ) -> MergeSummary:
    """Merge the cell records (and their logs and run manifests) of ``sources`` into the results
    root ``dest``; return what happened. Raises StoreError (before writing) if a source is not a
    results folder or holds a record from a newer schema; MergeConflict (before writing) if two
    ok records of a cell disagree and ``on_conflict`` is "refuse"; LockedError if a run holds
    ``dest``."""
    if on_conflict not in ON_CONFLICT:
        raise StoreError(f"on_conflict must be one of {', '.join(ON_CONFLICT)}, got "
                         f"{on_conflict!r}")
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

    # 1. read the sources
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
    suites = sorted({s for s, _ in by_key})

    # 2. lock every destination suite folder, then read it and decide: no run can write
    # between what the merge reads there and what it writes
    with contextlib.ExitStack() as locks:
        stores = {}
        for suite in suites:
            stores[suite] = Store(dest, suite)
            locks.enter_context(stores[suite].lock(what="results folder (merge destination)"))
        existing: dict[tuple[str, str], _Candidate] = {}
        for suite in suites:
            if stores[suite].cells_dir.is_dir():
                for cand in _candidates(stores[suite].dir, "dest", summary):
                    existing[(cand.suite, cand.key)] = cand
        winners = _decide(by_key, existing, summary, on_conflict)

        # 3. write, one suite folder at a time
        for suite in suites:
            _write_suite(stores[suite], suite, winners, existing, source_folders, folder_suites,
                         summary)
    return summary


def _fingerprint(record: dict[str, Any]) -> str:
    """What two ok records of one cell must share to be the same measurement: their values and
    the hash of the artifact measured."""
    return json.dumps([record.get("values"), (record.get("artifact") or {}).get("sha256")],
                      sort_keys=True, default=str)


def _describe(cand: _Candidate) -> str:
    values = ", ".join(f"{name} = {v.get('value')!r}"
                       for name, v in sorted((cand.record.get("values") or {}).items())[:6])
    sha = (cand.record.get("artifact") or {}).get("sha256") or "?"
    return (f"    {cand.origin} (started {cand.record.get('timings', {}).get('started')}, "
            f"artifact sha256 {str(sha)[:16]}): {values or 'no values'}")


def _decide(by_key: dict[tuple[str, str], list[_Candidate]],
            existing: dict[tuple[str, str], _Candidate], summary: MergeSummary,
            on_conflict: str) -> dict[tuple[str, str], _Candidate]:
    """The winner of each (suite, key), by the conflict rule; raises MergeConflict when ok
    records disagree and no choice was made."""
    winners: dict[tuple[str, str], _Candidate] = {}
    disputes: list[str] = []
    for ident, cands in by_key.items():
        pool = ([existing[ident]] if ident in existing else []) + cands
        if len(pool) > 1:
            summary.conflicts += 1
        oks = [c for c in pool if c.record.get("status") == "ok"]
        disagree = len({_fingerprint(c.record) for c in oks}) > 1
        best = pool[0]
        if disagree and on_conflict == "keep":
            best = oks[0]
        else:
            for cand in pool[1:]:
                if rank(cand.record) > rank(best.record):   # strict: ties keep the earlier one
                    best = cand
        if disagree:
            what = (f"  {ident[0]} / {oks[0].record.get('id')} (key {ident[1]}): "
                    f"{len(oks)} ok records disagree\n" + "\n".join(_describe(c) for c in oks))
            if on_conflict == "refuse":
                disputes.append(what)
            else:
                summary.settled.append(f"{oks[0].record.get('id')}: {on_conflict} -> "
                                       f"{best.origin}")
        winners[ident] = best
        if ident not in existing:
            summary.added += 1
        elif best.origin == "dest":
            summary.kept += 1
        else:
            summary.replaced += 1
    if disputes:
        raise MergeConflict(
            f"{len(disputes)} cell(s) have ok records that disagree (other values or another "
            "artifact): a clock must not pick the number that is published. Nothing was "
            "written. Rerun the cell, remove the wrong record, or choose: --on-conflict newest "
            "(the later start wins) or --on-conflict keep (the destination's, else the first "
            "source's record stays).\n" + "\n".join(disputes[:10])
            + (f"\n  ... and {len(disputes) - 10} more" if len(disputes) > 10 else ""))
    return winners


def _write_suite(store: Store, suite: str, winners: dict[tuple[str, str], _Candidate],
                 existing: dict[tuple[str, str], _Candidate],
                 source_folders: list[tuple[Path, str]], folder_suites: dict[Path, set[str]],
                 summary: MergeSummary) -> None:
    """Write one (locked) destination suite folder: the winning records with their logs, the
    sources' run manifests, and a manifest of this merge."""
    for (s, key), win in sorted(winners.items()):
        if s != suite or win.origin == "dest":
            continue
        log_target = store.log_path(key)
        try:
            if win.log.parent.is_symlink():
                raise OSError("the logs folder is a symbolic link")
            log = read_regular(win.log)
        except FileNotFoundError:
            log = None
        except OSError:
            log = None
            if win.log.parent.is_symlink() or not is_regular(win.log):
                summary.unreadable.append(f"{win.log} (a symbolic link or not a regular "
                                          "file: not copied)")
        if log is not None:
            atomic_write_bytes(log_target, log)
            summary.logs_copied += 1
        elif log_target.exists() or log_target.is_symlink():
            log_target.unlink()      # the old log belongs to the replaced record
        store.save(win.record)
    for folder, _ in source_folders:
        if suite in folder_suites[folder]:
            summary.runs_copied += _copy_runs(folder, store, suite, summary)
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


def manifest_problem(manifest: Any, name: str, suite: str) -> str | None:
    """Why ``manifest`` (runs/<name>.json) is not a run manifest qbench wrote, or None. A run's:
    run_id (its file name), suite, started, cells (id, key, status); a merge's: kind "merge",
    suite, merged, counts."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if manifest.get("suite") != suite:
        return f"its suite is {manifest.get('suite')!r}, not {suite!r}"
    if manifest.get("kind") == "merge":
        counts = manifest.get("counts")
        if not isinstance(manifest.get("merged"), str) or not isinstance(counts, dict) or not all(
                k in STATUSES and isinstance(v, int) for k, v in counts.items()):
            return "a merge record without its date or counts"
        return None
    if manifest.get("run_id") != name:
        return f"its run_id {manifest.get('run_id')!r} is not its file name {name!r}"
    if not isinstance(manifest.get("started"), str):
        return "no 'started' date"
    cells = manifest.get("cells")
    if not isinstance(cells, list):
        return "no 'cells' list"
    for c in cells:
        if not (isinstance(c, dict) and isinstance(c.get("id"), str)
                and isinstance(c.get("key"), str) and c["key"].isalnum()
                and c.get("status") in STATUSES):
            return f"a cell entry {str(c)[:80]!r} without id, key and status"
    if not isinstance(manifest.get("finished"), (str, type(None))):
        return "'finished' is not a date"
    return None


def _copy_runs(folder: Path, store: Store, suite: str, summary: MergeSummary) -> int:
    """Copy the well-formed run manifests of a source suite folder that the destination lacks;
    the others are listed, not copied."""
    runs = folder / "runs"
    if runs.is_symlink() or not runs.is_dir():
        if runs.is_symlink():
            summary.unreadable.append(f"{runs} (a symbolic link: its manifests not copied)")
        return 0
    copied = 0
    for path in sorted(runs.glob("*.json")):
        target = store.runs_dir / path.name
        if target.exists() or target.is_symlink() or not path.stem.replace("-", "").isalnum():
            continue
        try:
            manifest = json.loads(read_regular(path).decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            why = ("a symbolic link or not a regular file" if not is_regular(path)
                   else type(exc).__name__)
            summary.unreadable.append(f"{path} ({why})")
            continue
        problem = manifest_problem(manifest, path.stem, suite)
        if problem is not None:
            summary.unreadable.append(f"{path} (not a run manifest: {problem})")
            continue
        atomic_write_text(target, json.dumps(manifest, indent=1, default=str))
        copied += 1
    return copied


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _merge_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-merge-" + uuid.uuid4().hex[:6]

