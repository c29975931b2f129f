"""Issue 25, the results folder as hostile input: no write follows a link, merge copies no link's
target and only well-formed manifests, a record counts only under its own key and shape,
conflicting ok records are never settled by the clock, and CI-facing text is escaped."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.errors import StoreError
from qbench.results import merge as merge_mod
from qbench.results.export import flat_rows, to_csv
from qbench.results.merge import merge_results
from qbench.results.schema import SCHEMA_VERSION
from qbench.results.store import Store, load_results
from qbench.run.child import run_in_child
from qbench.run.job import Job
from qbench.run.runner import is_done
from qbench.run import summary as run_summary


def record(key: str = "abc123", *, value: float = 12.5, sha: str = "aa" * 32,
           started: str = "2030-01-01T00:00:00+00:00", model: str = "m", **extra) -> dict:
    rec = {"schema_version": SCHEMA_VERSION, "key": key, "id": f"{model}/llama.cpp/Q8_0/speed",
           "suite": "s", "run_id": "r1", "model": {"id": model},
           "variant": {"backend": "llama.cpp", "quant": "Q8_0"}, "metric": "speed",
           "metric_version": "1", "options": {}, "status": "ok", "error": None,
           "signal": None, "stderr_tail": None,
           "values": {"tg_tokens_per_s": {"value": value, "stderr": 0.5, "n": 3}},
           "details": {}, "artifact": {"sha256": sha}, "backend": {}, "memory": {},
           "timings": {"started": started}, "env": {}}
    rec.update(extra)
    return rec


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


# --- no write follows a link ---------------------------------------------------------------


def test_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, victim):
    store = Store(tmp_path / "results", "s")
    store.dir.mkdir(parents=True)
    (store.dir / ".lock").symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link"):
        with store.lock():
            pass
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("folder", ["cells", "runs", "logs", ".scratch"])
def test_results_subfolder_that_is_a_link_is_refused(tmp_path, folder):
    store = Store(tmp_path / "results", "s")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store.dir.mkdir(parents=True)
    (store.dir / folder).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StoreError, match="symbolic link"):
        with store.lock():
            pass
    if folder in ("cells", "runs"):           # and a write outside a run
        with pytest.raises(StoreError, match="symbolic link"):
            store.save(record()) if folder == "cells" else store.save_run("r", {})
    assert list(elsewhere.iterdir()) == []


def test_suite_folder_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "s").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StoreError, match="symbolic link"):
        with Store(tmp_path / "results", "s").lock():
            pass
    assert list(elsewhere.iterdir()) == []


def test_cell_log_that_is_a_link_is_replaced_not_written_through(tmp_path, victim, monkeypatch):
    monkeypatch.setenv("QBENCH_FAULT", "*=error")
    log = tmp_path / "logs" / "cell.log"
    log.parent.mkdir()
    log.symlink_to(victim)
    out = run_in_child(Job(cell={"id": "m/llama.cpp/Q8_0/speed", "key": "k"}, base_dir=".",
                           cache_dir="."), log_path=log, timeout_s=120)
    assert out.status == "failed"
    assert victim.read_text() == "precious\n"
    assert not log.is_symlink() and "injected error" in log.read_text()


def test_worker_moving_to_a_linked_log_does_not_write_through(tmp_path, victim):
    """The worker's switch to a later cell's log (it used O_TRUNC on the path)."""
    log = tmp_path / "next.log"
    log.symlink_to(victim)
    code = ("import sys; from pathlib import Path; from qbench.run.worker import _switch_log\n"
            "_switch_log(Path(sys.argv[1])); print('into the new log', flush=True)")
    subprocess.run([sys.executable, "-c", code, str(log)], check=True)
    assert victim.read_text() == "precious\n"
    assert not log.is_symlink() and log.read_text() == "into the new log\n"


# --- merge: untrusted sources --------------------------------------------------------------


def _source(root: Path, rec: dict) -> Store:
    store = Store(root, rec["suite"])
    store.save(rec)
    return store


def test_merge_never_copies_a_links_target(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("api key\n")
    secret.chmod(0o600)
    src = _source(tmp_path / "src", record())
    src.logs_dir.mkdir(parents=True)
    src.log_path("abc123").symlink_to(secret)
    summary = merge_results([tmp_path / "src"], tmp_path / "out")
    dest = Store(tmp_path / "out", "s")
    assert dest.load("abc123") is not None
    assert not dest.log_path("abc123").exists()
    assert summary.logs_copied == 0
    assert any("symbolic link" in u for u in summary.unreadable)
    assert all("api key" not in p.read_text(errors="replace")
               for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_merge_skips_a_linked_record_and_a_linked_cells_folder(tmp_path):
    real = _source(tmp_path / "elsewhere", record("fff000"))
    src = _source(tmp_path / "src", record())
    (src.cells_dir / "fff000.json").symlink_to(real.cell_path("fff000"))
    summary = merge_results([tmp_path / "src"], tmp_path / "out")
    assert Store(tmp_path / "out", "s").load("fff000") is None
    assert any("fff000.json" in u for u in summary.unreadable)


def test_merge_copies_only_well_formed_run_manifests(tmp_path):
    src = _source(tmp_path / "src", record())
    src.runs_dir.mkdir(parents=True)
    good = {"run_id": "20300101T000000Z-abcdef", "suite": "s", "started": "2030-01-01",
            "finished": "2030-01-01", "cells": [{"id": "m/llama.cpp/Q8_0/speed",
                                                 "key": "abc123", "status": "ok"}]}
    (src.runs_dir / f"{good['run_id']}.json").write_text(json.dumps(good))
    (src.runs_dir / "20300101T000001Z-bad001.json").write_text(
        json.dumps({"suite": "s", "anything": ["goes"]}))
    (src.runs_dir / "20300101T000002Z-bad002.json").write_text(
        json.dumps(dict(good, run_id="20300101T000002Z-bad002",
                        cells=[{"id": "x", "key": "../../etc", "status": "ok"}])))
    summary = merge_results([tmp_path / "src"], tmp_path / "out")
    copied = sorted(p.name for p in Store(tmp_path / "out", "s").runs_dir.glob("2030*.json"))
    assert copied == [f"{good['run_id']}.json"]
    assert summary.runs_copied == 1
    assert sum("not a run manifest" in u for u in summary.unreadable) == 2


def test_merge_refuses_conflicting_ok_records_and_lists_them(tmp_path):
    _source(tmp_path / "a", record(value=12.5, started="2030-01-01T00:00:00+00:00"))
    _source(tmp_path / "b", record(value=125.0, started="2030-01-02T00:00:00+00:00",
                                   sha="bb" * 32))
    with pytest.raises(merge_mod.MergeConflict) as err:
        merge_results([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    text = str(err.value)
    assert "12.5" in text and "125.0" in text and "aaaaaaaa" in text and "bbbbbbbb" in text
    assert "--on-conflict" in text
    assert not (tmp_path / "out" / "s" / "cells").exists() or \
        not list((tmp_path / "out" / "s" / "cells").iterdir())
    # an explicit choice settles it, and says so
    s = merge_results([tmp_path / "a", tmp_path / "b"], tmp_path / "out", on_conflict="newest")
    assert Store(tmp_path / "out", "s").load("abc123")["values"]["tg_tokens_per_s"][
        "value"] == 125.0
    assert len(s.settled) == 1


def test_merge_keep_choice_and_identical_duplicates(tmp_path):
    _source(tmp_path / "a", record(value=12.5, started="2030-01-01T00:00:00+00:00"))
    _source(tmp_path / "b", record(value=125.0, started="2030-01-02T00:00:00+00:00"))
    merge_results([tmp_path / "a", tmp_path / "b"], tmp_path / "out", on_conflict="keep")
    assert Store(tmp_path / "out", "s").load("abc123")["values"]["tg_tokens_per_s"][
        "value"] == 12.5
    # the same measurement twice (an overlapping shard) is no conflict
    _source(tmp_path / "c", record(value=12.5, started="2030-01-03T00:00:00+00:00"))
    s = merge_results([tmp_path / "a", tmp_path / "c"], tmp_path / "out2")
    assert s.conflicts == 1 and s.settled == []


def test_merge_reads_the_destination_only_under_its_lock(tmp_path, monkeypatch):
    _source(tmp_path / "src", record(value=1.0, started="2031-01-01T00:00:00+00:00"))
    _source(tmp_path / "out", record(value=1.0))
    events: list[str] = []
    real_lock, real_candidates = merge_mod.Store.lock, merge_mod._candidates

    def lock(self, **kw):
        events.append("lock")
        return real_lock(self, **kw)

    def candidates(folder, origin, summary):
        events.append(f"read {origin}")
        return real_candidates(folder, origin, summary)

    monkeypatch.setattr(merge_mod.Store, "lock", lock)
    monkeypatch.setattr(merge_mod, "_candidates", candidates)
    merge_results([tmp_path / "src"], tmp_path / "out")
    assert "read dest" in events and events.index("lock") < events.index("read dest")


# --- a record is trusted only under its own key and in its own shape -------------------------


def test_a_record_under_another_keys_name_is_not_trusted(tmp_path):
    store = Store(tmp_path / "results", "s")
    store.save(record("abc123"))
    store.cells_dir.joinpath("def456.json").write_text(store.cell_path("abc123").read_text())
    assert store.load("def456") is None                 # not done: its cell runs again
    assert not store.cell_path("def456").exists()
    assert len(list(store.cells_dir.glob("def456.corrupt-*"))) == 1
    assert [r["key"] for r in load_results([store.dir])] == ["abc123"]   # export: once
    assert is_done(store.load("def456"), False) is False


def test_misnamed_record_does_not_show_twice_in_export(tmp_path):
    store = Store(tmp_path / "results", "s")
    store.save(record("abc123"))
    store.cells_dir.joinpath("def456.json").write_text(store.cell_path("abc123").read_text())
    rows = flat_rows(load_results([tmp_path / "results"]))
    assert [r["key"] for r in rows] == ["abc123"]


@pytest.mark.parametrize("bad", [
    {"schema_version": SCHEMA_VERSION, "key": "abc123"},                       # fields missing
    dict(record(), values=[1, 2]),                                              # wrong type
    dict(record(), model="m"),
    dict(record(), status=None),
    [record()],
])
def test_wrong_shape_record_is_set_aside_not_fatal(tmp_path, bad):
    store = Store(tmp_path / "results", "s")
    store.cells_dir.mkdir(parents=True)
    store.cell_path("abc123").write_text(json.dumps(bad))
    assert store.load("abc123") is None
    assert len(list(store.cells_dir.glob("abc123.corrupt-*"))) == 1


def test_wrong_shape_record_does_not_abort_plan_or_export(tmp_path):
    store = Store(tmp_path / "results", "s")
    store.save(record("abc123"))
    store.cells_dir.joinpath("def456.json").write_text(json.dumps({"schema_version": 1,
                                                                   "key": "def456"}))
    rows = flat_rows(load_results([store.dir]))
    assert [r["key"] for r in rows] == ["abc123"]


# --- output escaped for CI pages and spreadsheets ------------------------------------------


HOSTILE_ID = "x` | ![p](https://evil.example/p.png) <img src=https://evil.example/q.png> |"


def test_summary_markdown_cannot_embed_images_links_or_break_the_table():
    markdown_it = pytest.importorskip("markdown_it")
    data = {"suite": "s<b>", "run_id": "r`1", "results": "/r", "report": None, "wall_s": 1.0,
            "counts": {"failed": 1}, "cached": 0, "failed": [HOSTILE_ID],
            "failed_earlier": [HOSTILE_ID], "exit_code": 2,
            "cells": [{"id": HOSTILE_ID, "key": "k", "status": "failed", "wall_s": 1.0,
                       "metric": "speed", "primary": None,
                       "error": "boom ![e](https://evil.example/e.png) [l](https://evil.example)"
                                " www.evil.example | x"}]}
    md = run_summary.to_markdown(data)
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(md)
    assert "<img" not in html and "<a " not in html and "<b>" not in html
    assert html.count("<tr>") == 2            # the header and one row: nothing broke out
    assert html.count("<td") == 4             # its four cells


def test_csv_export_defuses_spreadsheet_formulas():
    rec = record(model="=HYPERLINK(\"https://evil.example\",\"x\")", status="failed",
                 error="+cmd|' /C calc'!A0", values={})
    rec["variant"]["quant"] = "@SUM(1+1)"
    rows = list(csv.DictReader(io.StringIO(to_csv(flat_rows([rec])))))
    assert rows[0]["model"].startswith("'=")
    assert rows[0]["error"].startswith("'+")
    assert rows[0]["quant"].startswith("'@")
    ok = record(value=-1.5)
    assert list(csv.DictReader(io.StringIO(to_csv(flat_rows([ok])))))[0]["value"] == "-1.5"
