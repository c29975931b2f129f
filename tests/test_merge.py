"""`qbench merge`: shards of a suite merged back equal one run of the whole suite; conflicts are
resolved by rule (ok beats failed, then the newer start); sources are never changed; a merge
never leaves a half-written destination."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from qbench.suite.config import load_suite
from qbench.errors import LockedError, StoreError
from qbench.run.child import Outcome
from qbench.host.fsutil import exclusive_lock
from qbench.results.merge import merge_results, rank, started_at
from qbench.metrics import metric_info
from qbench.suite.plan import PlanContext
from qbench.run.executors import LocalExecutor, WorkItem
from qbench.run.runner import run_suite
from qbench.results.schema import SCHEMA_VERSION
from qbench.suite.shard import shard_selector
from qbench.results.store import Store, load_results

SUITE = """
[suite]
name = "merge-me"

[defaults]
timeout_s = 60

[[models]]
id = "tiny-1b"
source = "hf:example/tiny-1b-GGUF/tiny-1b-f16.gguf"
base = "F16"

[[models]]
id = "huge-70b"
source = "hf:example/huge-70b-GGUF/huge-70b-f16.gguf"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0", "Q4_K_M", "Q2_K"]

[metrics.perplexity]
dataset = "text.txt"
ctx = 64
chunks = 2

[metrics.speed]
prompt_tokens = 8
gen_tokens = 4
"""


class FakeExecutor:
    """Outcomes made up from the cell id (no model work): Q2_K speed cells fail."""

    name = "fake"

    def run(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, Outcome]]:
        for item in items:
            item.log_path.parent.mkdir(parents=True, exist_ok=True)
            item.log_path.write_text(f"log of {item.cell.id}\n")
            if item.cell.id.endswith("Q2_K/speed"):
                yield item, Outcome(status="failed", error="made-up failure", wall_s=0.1)
                continue
            primary = metric_info(item.cell.metric).primary
            value = (len(item.cell.id) % 7) + 1.5
            yield item, Outcome(status="ok", wall_s=0.1,
                                result={"values": {primary: {"value": value}}})


@pytest.fixture
def suite_path(tmp_path: Path, write_suite) -> Path:
    (tmp_path / "text.txt").write_text("some evaluation text\n" * 50)
    return write_suite(SUITE)


def run_into(suite_path: Path, out: Path, shard: str | None = None, executor=None,
             only: tuple[str, ...] = ()):
    suite = load_suite(suite_path)
    ctx = PlanContext(base_dir=suite_path.parent, data_dir=None,
                      cache_dir=suite_path.parent / "cache")
    store = Store(out, suite.name)
    with store.lock():
        return run_suite(suite, ctx, store, executor=executor or FakeExecutor(), only=only,
                         select=shard_selector(shard), console=Console(quiet=True))


def essence(root: Path) -> dict[str, tuple]:
    """What must agree between a merged set and a single run: per key, id/status/values."""
    return {r["key"]: (r["id"], r["status"], json.dumps(r["values"], sort_keys=True))
            for r in load_results([root])}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# --- shards merged == one run -------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
def test_merged_shards_equal_a_single_run(tmp_path, suite_path, count):
    single = tmp_path / "single"
    run_into(suite_path, single)
    shard_roots = []
    for i in range(1, count + 1):
        root = tmp_path / "shards" / f"results-shard-{i}"
        run_into(suite_path, root, f"{i}/{count}")
        shard_roots.append(root)
    # each shard holds only part of the suite, and together all of it, once
    parts = [essence(r) for r in shard_roots]
    assert all(0 < len(p) < len(essence(single)) for p in parts)
    assert sum(len(p) for p in parts) == len(essence(single))

    merged = tmp_path / "merged"
    summary = merge_results(shard_roots, merged)
    assert essence(merged) == essence(single)
    assert summary.added == len(essence(single)) and summary.replaced == summary.conflicts == 0
    assert summary.suites["merge-me"] == {"ok": 30, "failed": 2}
    # the logs and the shards' run manifests came along; a merge manifest says what happened
    store = Store(merged, "merge-me")
    for key in essence(single):
        assert store.log_path(key).read_text().startswith("log of ")
    runs = sorted(p.name for p in store.runs_dir.glob("*.json"))
    assert len(runs) == count + 1 and sum("-merge-" in r for r in runs) == 1
    assert summary.runs_copied == count


def test_merge_finds_suites_below_a_folder_and_is_idempotent(tmp_path, suite_path):
    for i in (1, 2):
        run_into(suite_path, tmp_path / "downloads" / f"results-shard-{i}", f"{i}/2")
    merged = tmp_path / "merged"
    first = merge_results([tmp_path / "downloads"], merged)   # the folder holding both
    assert first.added == 32
    before = {k: v for k, v in tree_bytes(merged).items() if "/runs/" not in k}
    again = merge_results([tmp_path / "downloads"], merged)
    assert (again.added, again.replaced, again.kept) == (0, 0, 32)
    assert {k: v for k, v in tree_bytes(merged).items() if "/runs/" not in k} == before


def test_merge_into_a_suite_folder_source(tmp_path, suite_path):
    run_into(suite_path, tmp_path / "a", "1/2")
    run_into(suite_path, tmp_path / "b", "2/2")
    merged = tmp_path / "merged"
    merge_results([tmp_path / "a" / "merge-me", tmp_path / "b" / "merge-me"], merged)
    assert len(essence(merged)) == 32


def test_real_cell_processes_merge(tmp_path, suite_path, monkeypatch):
    """Records written by the local executor's real child processes (each cell fails at once
    by injected fault, so no model is needed) merge like any others."""
    monkeypatch.setenv("QBENCH_FAULT", "*=error")
    suite_path.write_text(suite_path.read_text().replace(
        'quant = ["F16", "Q8_0", "Q4_K_M", "Q2_K"]', 'quant = ["F16", "Q8_0"]'))
    roots = []
    only = ("tiny-1b/*/*/perplexity", "tiny-1b/*/*/speed")
    for i in (1, 2):
        roots.append(tmp_path / f"shard{i}")
        run_into(suite_path, roots[-1], f"{i}/2", executor=LocalExecutor(), only=only)
    merge_results(roots, tmp_path / "merged")
    recs = load_results([tmp_path / "merged"])
    assert len(recs) == 2 * 2   # variants x (perplexity, speed) of one model
    assert {r["status"] for r in recs} == {"failed"}
    assert all("injected error" in r["error"] for r in recs)


# --- conflicts -----------------------------------------------------------------------------


def _one_record(tmp_path: Path, suite_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "base"
    run_into(suite_path, root)
    rec = next(r for r in load_results([root]) if r["status"] == "ok")
    return root, rec


def _write(root: Path, rec: dict) -> None:
    Store(root, rec["suite"]).save(rec)


def _variant(rec: dict, status: str, started: str) -> dict:
    out = copy.deepcopy(rec)
    out["status"] = status
    out["timings"]["started"] = started
    out["values"] = {} if status != "ok" else {"x": {"value": started[:4]}}
    return out


@pytest.mark.parametrize("first,second,winner", [
    (("failed", "2030-01-02T00:00:00+00:00"), ("ok", "2030-01-01T00:00:00+00:00"), 1),
    (("ok", "2030-01-01T00:00:00+00:00"), ("crashed", "2030-01-02T00:00:00+00:00"), 0),
    (("ok", "2030-01-01T00:00:00+00:00"), ("ok", "2030-01-02T00:00:00+00:00"), 1),
    (("failed", "2030-01-01T00:00:00+00:00"), ("timeout", "2030-01-03T00:00:00+00:00"), 1),
    (("ok", "2030-01-02T00:00:00+00:00"), ("ok", "2030-01-02T00:00:00+00:00"), 0),  # tie: first
])
def test_conflict_rule(tmp_path, suite_path, first, second, winner):
    _, rec = _one_record(tmp_path, suite_path)
    a, b = _variant(rec, *first), _variant(rec, *second)
    b["run_id"] = "the-second"
    _write(tmp_path / "s1", a)
    _write(tmp_path / "s2", b)
    summary = merge_results([tmp_path / "s1", tmp_path / "s2"], tmp_path / "out")
    got = Store(tmp_path / "out", rec["suite"]).load(rec["key"])
    assert got["run_id"] == (b if winner else a)["run_id"]
    assert got["status"] == (b if winner else a)["status"]
    assert summary.conflicts == 1


def test_destination_record_kept_unless_beaten(tmp_path, suite_path):
    _, rec = _one_record(tmp_path, suite_path)
    dest = tmp_path / "dest"
    _write(dest, _variant(rec, "ok", "2030-01-01T00:00:00+00:00"))
    _write(tmp_path / "older", _variant(rec, "ok", "2029-01-01T00:00:00+00:00"))
    _write(tmp_path / "failing", _variant(rec, "failed", "2031-01-01T00:00:00+00:00"))
    # the ok records' values differ (2030 vs 2029): since issue 25 that needs a choice
    s = merge_results([tmp_path / "older", tmp_path / "failing"], dest, on_conflict="newest")
    assert (s.kept, s.replaced, s.added) == (1, 0, 0)
    assert Store(dest, rec["suite"]).load(rec["key"])["timings"]["started"].startswith("2030")
    _write(tmp_path / "newer", _variant(rec, "ok", "2032-01-01T00:00:00+00:00"))
    s = merge_results([tmp_path / "newer"], dest, on_conflict="newest")
    assert (s.kept, s.replaced) == (0, 1)
    assert Store(dest, rec["suite"]).load(rec["key"])["timings"]["started"].startswith("2032")


def test_started_and_rank():
    assert started_at({}) < started_at({"timings": {"started": "2020-01-01T00:00:00Z"}})
    assert started_at({"timings": {"started": "garbage"}}) == started_at({})
    assert rank({"status": "ok"}) > rank({"status": "failed",
                                          "timings": {"started": "2030-01-01T00:00:00"}})


# --- never corrupt -------------------------------------------------------------------------


def test_unreadable_source_records_are_skipped_and_left_alone(tmp_path, suite_path):
    src = tmp_path / "src"
    run_into(suite_path, src, "1/2")
    cells = Store(src, "merge-me").cells_dir
    victim = sorted(cells.glob("*.json"))[0]
    victim.write_text('{"schema_version": 1, "key": "trunc')           # torn file
    (cells / "notarecord.json").write_text('{"hello": 1}')
    mismatch = json.loads(sorted(cells.glob("*.json"))[1].read_text())
    (cells / "abcdef0123.json").write_text(json.dumps(mismatch))      # key != file name
    before = tree_bytes(src)
    summary = merge_results([src], tmp_path / "out")
    assert tree_bytes(src) == before                                   # sources untouched
    assert len(summary.unreadable) == 3
    assert victim.stem not in essence(tmp_path / "out")
    assert all(len(k) == 24 for k in essence(tmp_path / "out"))


def test_newer_schema_aborts_before_writing(tmp_path, suite_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    run_into(suite_path, good, "1/2")
    run_into(suite_path, bad, "2/2")
    path = sorted(Store(bad, "merge-me").cells_dir.glob("*.json"))[-1]
    rec = json.loads(path.read_text())
    rec["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(rec))
    dest = tmp_path / "out"
    with pytest.raises(StoreError, match="newer qbench"):
        merge_results([good, bad], dest)
    assert not dest.exists() or not list(dest.rglob("*.json"))


def test_locked_destination_is_refused(tmp_path, suite_path):
    run_into(suite_path, tmp_path / "src", "1/2")
    dest = tmp_path / "dest"
    with exclusive_lock(dest / "merge-me"):
        with pytest.raises(LockedError):
            merge_results([tmp_path / "src"], dest)


def test_bad_sources(tmp_path):
    with pytest.raises(StoreError, match="no such results folder"):
        merge_results([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no cell records"):
        merge_results([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(StoreError, match="nothing to merge"):
        merge_results([], tmp_path / "out")


def test_no_partial_files_left(tmp_path, suite_path):
    for i in (1, 2):
        run_into(suite_path, tmp_path / f"s{i}", f"{i}/2")
    merge_results([tmp_path / "s1", tmp_path / "s2"], tmp_path / "out")
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert all(os.access(p, os.R_OK) for p in (tmp_path / "out").rglob("*.json"))
