"""Output that reads in CI: `qbench run --summary-json/--summary-md` (for $GITHUB_STEP_SUMMARY)
and, when stderr is not a terminal, tables and messages that never wrap a cell id."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from qbench import cli
from qbench.run import summary as run_summary
from qbench.cli import main
from synthetic_records import make_record
from qbench.run.runner import RunSummary
from qbench.results.store import Store

LONG_MODEL = "an-organisation-with-a-long-name--a-model-with-an-even-longer-name-instruct-v0.3"


def _fake_run(store: Store) -> RunSummary:
    """What run_suite leaves behind: two cells stored, a run record naming them."""
    ok = make_record(LONG_MODEL, "llama.cpp", "Q4_K_M", "perplexity", suite=store.dir.name,
                     values={"ppl": {"value": 18.523, "stderr": 0.25, "n": 512}})
    bad = make_record(LONG_MODEL, "llama.cpp", "Q2_K", "mmlu", suite=store.dir.name,
                      status="crashed", error="died | of SIGSEGV\nat step 3")
    summary = RunSummary("20260101T000000Z-abcdef", counts={"ok": 1, "crashed": 1}, cached=3,
                         failed_ids=[bad["id"]], wall_s=12.34)
    for rec in (ok, bad):
        store.save(rec)
    store.save_run(summary.run_id, {"cells": [
        {"id": ok["id"], "key": ok["key"], "status": "ok", "wall_s": 3.21},
        {"id": bad["id"], "key": bad["key"], "status": "crashed", "wall_s": 1.0}]})
    return summary


def test_summary_json_and_markdown(tmp_path):
    store = Store(tmp_path / "results", "smoke")
    data = run_summary.build(_fake_run(store), store, exit_code=2)
    assert data["counts"] == {"crashed": 1, "ok": 1} and data["cached"] == 3
    assert data["exit_code"] == 2 and data["results"] == str(store.dir)
    ok, bad = data["cells"]
    assert ok["primary"] == {"name": "ppl", "value": 18.523, "stderr": 0.25, "unit": None}
    assert ok["wall_s"] == 3.21 and ok["error"] is None
    assert bad["status"] == "crashed" and bad["primary"] is None
    assert bad["error"] == "died | of SIGSEGV\nat step 3"

    md = run_summary.to_markdown(data)
    assert md.startswith("### ❌ qbench run: smoke\n")
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert rows[0] == (f"| `{LONG_MODEL}/llama.cpp/Q4_K_M/perplexity` | ok | "
                       "ppl = 18.52 ± 0.25 | 3.2 |")
    assert rows[1] == (f"| `{LONG_MODEL}/llama.cpp/Q2_K/mmlu` | crashed | "
                       "died \\| of SIGSEGV at step 3 | 1.0 |")   # one table row, pipe escaped


def test_markdown_appends_and_json_replaces(tmp_path):
    store = Store(tmp_path / "results", "smoke")
    data = run_summary.build(_fake_run(store), store)
    j, m = tmp_path / "s.json", tmp_path / "step" / "summary.md"
    m.parent.mkdir()
    m.write_text("earlier step output\n")
    for _ in range(2):
        run_summary.write(data, json_path=str(j), md_path=str(m))
    assert json.loads(j.read_text())["run_id"] == "20260101T000000Z-abcdef"
    text = m.read_text()
    assert text.startswith("earlier step output\n") and text.count("### ") == 2


def test_run_writes_the_summaries_and_keeps_failed_ids_on_one_line(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    store = Store(tmp_path / "results", "smoke")
    monkeypatch.setattr(cli, "_suite_context",
                        lambda args: (SimpleNamespace(name="smoke"), None, store))
    monkeypatch.setattr(cli, "_check_inputs", lambda suite, ctx: None)
    monkeypatch.setattr("qbench.run.runner.run_suite", lambda *a, **k: _fake_run(store))
    j, m = tmp_path / "summary.json", tmp_path / "summary.md"
    assert main(["run", "suite.toml", "--no-report", "--summary-json", str(j),
                 "--summary-md", str(m)]) == 2
    data = json.loads(j.read_text())
    assert data["exit_code"] == 2 and [c["status"] for c in data["cells"]] == ["ok", "crashed"]
    assert f"`{LONG_MODEL}/llama.cpp/Q2_K/mmlu` | crashed" in m.read_text()
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if "cell(s) failed" in line]
    assert failed == [f"1 cell(s) failed: {LONG_MODEL}/llama.cpp/Q2_K/mmlu"]


def test_tables_keep_long_names_whole_when_not_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    suite = "nightly-" + LONG_MODEL
    Store(tmp_path, suite).save(make_record("m", "llama.cpp", "Q8_0", "speed", suite=suite))
    assert main(["ls", "--out", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().err.splitlines() if suite in line]
    assert len(rows) == 1 and rows[0].startswith(f"│ {suite} │ 1 ")


def test_an_explicit_columns_still_wins(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert cli.make_console().width == 100
    monkeypatch.delenv("COLUMNS")
    assert cli.make_console().width == cli.LOG_WIDTH


@pytest.mark.parametrize("flag", ["--summary-json", "--summary-md"])
def test_run_help_documents_the_summary_flags(flag, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert flag in capsys.readouterr().out
