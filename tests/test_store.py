"""Durable results: atomic writes, corrupt files set aside, newer schemas refused, one writer."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.errors import LockedError, StoreError
from qbench.host.fsutil import atomic_write_text, exclusive_lock
from qbench.results.schema import SCHEMA_VERSION
from qbench.results.store import Store, load_results, read_record


def record(key: str = "abc123", status: str = "ok", **extra) -> dict:
    rec = {"schema_version": SCHEMA_VERSION, "key": key, "id": "m/llama.cpp/Q8_0/speed",
           "suite": "s", "run_id": "r1", "model": {"id": "m"},
           "variant": {"backend": "llama.cpp", "quant": "Q8_0"}, "metric": "speed",
           "metric_version": "1", "options": {}, "status": status, "error": None,
           "signal": None, "stderr_tail": None,
           "values": {"tg_tokens_per_s": {"value": 12.5, "stderr": 0.5, "n": 3}},
           "details": {}, "artifact": {}, "backend": {}, "memory": {}, "timings": {}, "env": {}}
    rec.update(extra)
    return rec


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "results", "s")


def test_round_trip(store):
    rec = record()
    path = store.save(rec)
    assert path == store.cells_dir / "abc123.json"
    assert store.load("abc123") == rec
    assert store.load("other") is None
    assert store.records() == [rec]


def test_save_replaces_and_leaves_no_temp_files(store):
    store.save(record(status="failed", error="boom"))
    store.save(record(status="ok"))
    assert store.load("abc123")["status"] == "ok"
    assert sorted(p.name for p in store.cells_dir.iterdir()) == ["abc123.json"]


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", "a.b", "x y"])
def test_keys_never_escape_the_folder(store, bad):
    with pytest.raises(StoreError, match="invalid cell key"):
        store.cell_path(bad)


@pytest.mark.parametrize("suite", ["", "..", ".", "a/b", "a\\b"])
def test_invalid_suite_folder(tmp_path, suite):
    with pytest.raises(StoreError, match="invalid suite name"):
        Store(tmp_path, suite)


def test_written_files_are_readable_like_any_new_file(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "report.html"
    atomic_write_text(target, "<html>")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    target.chmod(0o640)
    atomic_write_text(target, "<html>v2")  # a replaced file keeps its mode
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_corrupt_record_is_set_aside(store, caplog):
    store.save(record())
    path = store.cell_path("abc123")
    path.write_text('{"schema_version": 1, "key": "abc1')  # truncated by a crash mid-write
    assert store.load("abc123") is None
    assert not path.exists()
    aside = list(store.cells_dir.glob("abc123.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_text() == '{"schema_version": 1, "key": "abc1'
    assert "unreadable result" in caplog.text
    # records() skips it too, and the key is free to be written again
    assert store.records() == []
    store.save(record())
    assert store.load("abc123")["status"] == "ok"


def test_non_utf8_record_is_set_aside(store):
    store.cells_dir.mkdir(parents=True)
    store.cell_path("abc123").write_bytes(b"\xff\xfe\x00")
    assert store.load("abc123") is None
    assert list(store.cells_dir.glob("abc123.corrupt-*"))


def test_newer_schema_is_refused(store):
    store.save(record(schema_version=SCHEMA_VERSION + 98))
    with pytest.raises(StoreError) as info:
        store.load("abc123")
    msg = str(info.value)
    assert msg.startswith(str(store.cell_path("abc123")))
    assert f"schema version {SCHEMA_VERSION + 98}" in msg
    assert f"reads up to {SCHEMA_VERSION}" in msg
    assert store.cell_path("abc123").exists()  # refused, not moved aside or deleted


# Valid JSON of the wrong shape used to abort every command (issue 25): it is set aside like a
# corrupt file, with the reason, and its cell runs again.
def _set_aside(store, caplog, reason):
    assert store.load("abc123") is None
    assert not store.cell_path("abc123").exists()
    assert len(list(store.cells_dir.glob("abc123.corrupt-*"))) == 1
    assert reason in caplog.text


def test_record_without_schema_version(store, caplog):
    rec = record()
    del rec["schema_version"]
    store.save(rec)
    _set_aside(store, caplog, "no integer schema_version")


def test_unknown_status(store, caplog):
    store.save(record(status="exploded"))
    _set_aside(store, caplog, "'status' is 'exploded'")


def test_json_that_is_not_an_object(store, caplog):
    store.cells_dir.mkdir(parents=True)
    store.cell_path("abc123").write_text("[1, 2]")
    _set_aside(store, caplog, "a JSON list, not an object")


def test_disk_full_keeps_the_old_file(store, monkeypatch):
    store.save(record(status="ok"))
    before = store.cell_path("abc123").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError) as info:
        store.save(record(status="failed", error="x" * 1000))
    assert "disk full" in str(info.value) and "earlier results are intact" in str(info.value)
    monkeypatch.undo()
    assert store.cell_path("abc123").read_bytes() == before
    assert sorted(p.name for p in store.cells_dir.iterdir()) == ["abc123.json"]


def test_disk_full_on_write(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

        def fileno(self):
            return self.fh.fileno()

        def write(self, data):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(StoreError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_other_write_errors_propagate(tmp_path, monkeypatch):
    def denied(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", denied)
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "f.json", "x")
    assert not isinstance(info.value, StoreError) and info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_lock_refuses_a_second_holder(store):
    with store.lock():
        assert (store.dir / ".lock").read_text() == str(os.getpid())
        with pytest.raises(LockedError) as info:
            with store.lock():
                pass
        assert f"another qbench process (pid {os.getpid()})" in str(info.value)
        assert str(store.dir) in str(info.value)
    with store.lock():  # released on exit
        pass


def test_lock_held_by_another_process_and_freed_by_kill_9(tmp_path):
    folder = tmp_path / "results" / "s"
    code = ("import sys, time; from pathlib import Path; from qbench.host.fsutil import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1])):\n"
            "    print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"pid {proc.pid}"):
            with exclusive_lock(folder):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with exclusive_lock(folder):  # the kernel dropped the dead holder's lock: nothing stale
        pass


def test_save_run_manifest(store):
    path = store.save_run("20240101T000000Z-abcdef", {"run_id": "x", "cells": []})
    assert json.loads(path.read_text()) == {"run_id": "x", "cells": []}
    assert path.parent == store.runs_dir


def test_load_results_from_suite_root_and_files(tmp_path):
    a = Store(tmp_path / "results", "a")
    b = Store(tmp_path / "results", "b")
    a.save(record("k1"))
    b.save(record("k2", suite="b"))
    assert {r["key"] for r in load_results([a.dir])} == {"k1"}
    assert {r["key"] for r in load_results([tmp_path / "results"])} == {"k1", "k2"}
    assert {r["key"] for r in load_results([b.cell_path("k2")])} == {"k2"}


def test_load_results_errors(tmp_path):
    with pytest.raises(StoreError, match="no such results file or folder"):
        load_results([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no cell records found"):
        load_results([tmp_path / "empty"])


def test_read_record_missing_file_is_none(tmp_path):
    assert read_record(tmp_path / "absent.json") is None


def test_lock_sweeps_temporaries_of_an_interrupted_write(tmp_path) -> None:
    from qbench.results.store import Store

    store = Store(tmp_path, "s")
    store.cells_dir.mkdir(parents=True)
    stale = store.cells_dir / ".abc.json.123.tmp"
    stale.write_text("{half")
    kept = store.cells_dir / "abc.json"
    kept.write_text("{}")
    with store.lock():
        assert not stale.exists() and kept.exists()
