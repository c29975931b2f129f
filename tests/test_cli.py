"""The command line: exit codes, export formats, listing stored suites."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from qbench.cli import build_parser, main
from qbench.results.export import COLUMNS
from qbench.results.schema import SCHEMA_VERSION
from qbench.results.store import Store


def record(key: str, quant: str, metric: str, status: str = "ok", values=None,
           suite: str = "s", error: str | None = None) -> dict:
    return {"schema_version": SCHEMA_VERSION, "key": key,
            "id": f"m/llama.cpp/{quant}/{metric}", "suite": suite, "run_id": "r1",
            "model": {"id": "m"}, "variant": {"backend": "llama.cpp", "quant": quant},
            "metric": metric, "metric_version": "1", "options": {}, "status": status,
            "error": error, "signal": None, "stderr_tail": None, "values": values or {},
            "details": {}, "artifact": {}, "backend": {}, "memory": {}, "timings": {},
            "env": {}}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    s = Store(root, "s")
    s.save(record("k1", "F16", "perplexity", values={
        "ppl": {"value": 18.5, "stderr": 0.25, "n": 512},
        "bits_per_byte": {"value": 1.1, "n": 512, "unit": "bits/byte"}}))
    s.save(record("k2", "Q8_0", "perplexity", status="crashed",
                  error="the cell process died of SIGSEGV"))
    s.save_run("20240101T000000Z-aaaaaa", {"run_id": "x"})
    s.save_run("20240102T000000Z-bbbbbb", {"run_id": "y"})
    t = Store(root, "t")
    t.save(record("k3", "Q4_K_M", "speed", suite="t", status="skipped", error="no extra"))
    return root


def test_export_jsonl(results, capsys):
    assert main(["export", str(results / "s")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(list(r) == list(COLUMNS) for r in rows)
    assert [(r["quant"], r["name"], r["value"], r["status"]) for r in rows] == [
        ("F16", "bits_per_byte", 1.1, "ok"), ("F16", "ppl", 18.5, "ok"),
        ("Q8_0", None, None, "crashed")]
    assert rows[1]["stderr"] == 0.25 and rows[1]["n"] == 512 and rows[1]["key"] == "k1"
    assert rows[2]["error"] == "the cell process died of SIGSEGV"
    assert rows[0]["suite"] == "s" and rows[0]["model"] == "m" and rows[0]["backend"] == "llama.cpp"


def test_export_csv_to_file(results, tmp_path, capsys):
    out = tmp_path / "out" / "table.csv"
    assert main(["export", str(results), "--format", "csv", "-o", str(out)]) == 0
    assert "wrote 4 rows" in capsys.readouterr().err
    reader = csv.DictReader(io.StringIO(out.read_text()))
    assert tuple(reader.fieldnames) == COLUMNS
    rows = list(reader)
    assert [(r["suite"], r["quant"], r["name"], r["value"], r["status"]) for r in rows] == [
        ("s", "F16", "bits_per_byte", "1.1", "ok"), ("s", "F16", "ppl", "18.5", "ok"),
        ("s", "Q8_0", "", "", "crashed"), ("t", "Q4_K_M", "", "", "skipped")]


def test_export_missing_folder_is_a_user_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.startswith(f"qbench: error: {tmp_path / 'nope'}: no such")


def test_export_refuses_newer_records(results, capsys):
    Store(results, "s").save(record("k9", "Q2_K", "speed") | {"schema_version": 999})
    assert main(["export", str(results / "s")]) == 1
    assert "schema version 999" in capsys.readouterr().err


def test_ls(results, capsys):
    assert main(["ls", "--out", str(results)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("│ s ") or
             line.startswith("│ t ")]
    assert len(lines) == 2
    cells_s = [c.strip() for c in lines[0].strip("│").split("│")]
    cells_t = [c.strip() for c in lines[1].strip("│").split("│")]
    # suite, cells, ok, failed, skipped, last run
    assert cells_s[:5] == ["s", "2", "1", "1", "0"]
    assert cells_s[5].startswith("20240102T")
    assert cells_t[:5] == ["t", "1", "0", "0", "1"]
    assert cells_t[5] == "–"


def test_ls_without_results(tmp_path, capsys):
    assert main(["ls", "--out", str(tmp_path / "none")]) == 0
    assert "no results under" in capsys.readouterr().err


def test_validate_missing_suite_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.toml")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"qbench: error: {tmp_path / 'missing.toml'}: suite file not found")


def test_every_suite_command_has_the_common_options():
    parser = build_parser()
    for cmd in ("validate", "plan", "run"):
        args = parser.parse_args([cmd, "x.toml", "--data-dir", "d", "--cache-dir", "c",
                                  "--out", "o"])
        assert (args.data_dir, args.cache_dir, args.out) == ("d", "c", "o")


def test_unknown_command_is_a_user_error_not_a_cell_failure(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 1
    assert "invalid choice" in capsys.readouterr().err


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv + ["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_says_what_qbench_does(capsys):
    text = _help([], capsys)
    description = text.split("\n\n")[1]
    assert description.startswith("qbench measures what quantization costs an LLM")
    assert "parse, call, map errors" not in text          # not the module's docstring
    assert "qbench run suites/smoke.toml" in text and "exit codes: 0 ok" in text


@pytest.mark.parametrize("command", sorted(
    name for name in build_parser()._subparsers._group_actions[0].choices))
def test_each_command_help_has_a_description_and_an_example_that_parses(command, capsys):
    import shlex

    text = _help([command], capsys)
    body, _, example = text.partition("\nexample:\n")
    assert len(body.split("\n\n")[1]) > 40, "a sentence on what the command does"
    line = example.strip().splitlines()[0]
    argv = shlex.split(line)
    assert argv[:2] == ["qbench", command]
    build_parser().parse_args(argv[1:])          # the example is a valid command line


def test_an_unexpected_exception_is_exit_3_with_its_traceback(monkeypatch, capsys):
    """A bug in qbench must not look like a user error (1) or failed cells (2)."""
    from qbench import cli

    def boom(args, console):
        raise RuntimeError("injected bug")
    monkeypatch.setitem(cli.COMMANDS, "ls", boom)
    assert cli.main(["ls"]) == cli.EXIT_BUG == 3
    err = capsys.readouterr().err
    assert "RuntimeError: injected bug" in err and "Traceback" in err
    assert "bug in qbench" in err
