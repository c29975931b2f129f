"""Faults and bad inputs of issue 5 that no other test module covers (benchmarks/faults/, run as
`python -m benchmarks.faults`, injects all of them into real runs and prints the figures).

Already covered elsewhere, not repeated here:
  * segfault / abort / hang / hang-tree / oom / exit / error cells, the run going on, resume and
    --rerun-failed, a cell dying with a killed run: tests/test_executor.py (and its slow
    test_resume_after_kill_9 with the real model)
  * atomic writes, ENOSPC while writing (monkeypatched), corrupt records set aside, newer or
    missing schema_version, the lock (in process and across a kill -9): tests/test_store.py
  * malformed TOML, unknown keys, wrong types, duplicate ids, empty matrix, newline and HTML in
    model ids: tests/test_config.py; bad GGUF headers, package path escapes, the offline hub:
    tests/test_sources.py; HTML escaping of hostile names: tests/test_report.py; pickle-only
    folders: tests/test_transformers_backend.py::test_check_model_dir

Here: two real `qbench run` processes on one results folder, a really full file system (tmpfs)
and a file-size limit, hostile model ids through a whole run + report + plan, a record of an
older schema, a GGUF truncated inside its tensor data, llama.cpp's allocation-failure abort,
pickle weights hidden beside a stray safetensors file, trust_remote_code reaching the
descriptor. Faults are injected into every cell (QBENCH_FAULT), so no model is loaded; the one
slow test runs the faults benchmark's kill -9 scenario with the real model.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qbench.cli import main
from qbench.errors import SourceError
from qbench.quantize.request import PrepareRequest
from qbench.run.child import run_in_child
from qbench.run.job import Job

REPO = Path(__file__).resolve().parents[1]

SUITE = """
[suite]
name = "{name}"

[defaults]
threads = 1
timeout_s = {timeout}
{models}
[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0"]

[metrics.speed]
prompt_tokens = 16
gen_tokens = 4
repetitions = 1

[metrics.sanity]
enabled = false
"""


def models(ids: tuple[str, ...], source: str) -> str:
    return "".join(f"\n[[models]]\nid = {json.dumps(i)}\nsource = {json.dumps(source)}\n"
                   for i in ids)


def suite_file(write_suite, source: str, *, name: str = "f", ids: tuple[str, ...] = ("smol",),
               timeout: float = 120) -> Path:
    return write_suite(SUITE.format(name=name, timeout=timeout, models=models(ids, source)))


def run(suite: Path, results: Path, *extra: str) -> int:
    return main(["run", str(suite), "--out", str(results), "--no-report", *extra])


def snapshot(cells: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells.glob("*.json")}


def assert_clean_cells(cells: Path) -> list[dict]:
    """Every file in cells/ is a whole record: no truncated JSON, no temporary file left."""
    recs = []
    for p in sorted(cells.iterdir()):
        assert p.suffix == ".json" and not p.name.startswith("."), f"stray file {p.name}"
        recs.append(json.loads(p.read_text()))
    return recs


@pytest.fixture
def faults(monkeypatch, isolated_env):
    """Every cell fails at once by injection (no model work) unless the test says otherwise."""
    monkeypatch.setenv("QBENCH_FAULT", "*=error")

    def set_fault(spec: str) -> None:
        monkeypatch.setenv("QBENCH_FAULT", spec)

    return set_fault


# --- two processes, one results folder ------------------------------------------------------
def _worker_of(pid: int) -> psutil.Process | None:
    try:
        for p in psutil.Process(pid).children(recursive=True):
            if "qbench.run.worker" in " ".join(p.cmdline()):
                return p
    except psutil.Error:
        pass
    return None


def test_a_second_run_process_is_refused_and_the_first_is_unaffected(
        write_suite, smollm2_ref, tmp_path, faults):
    suite = suite_file(write_suite, smollm2_ref, name="conc", timeout=600)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "qbench.cli", "run", str(suite), "--out", str(results),
           "--no-report"]
    faults("smol/*/F16/footprint=hang;*=error")   # the first run holds the lock in cell 1
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        worker = None
        while worker is None:
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run never started its cell"
            worker = _worker_of(first.pid)
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        worker.kill()                       # the hanging cell ends; the first run goes on
        _, err_first = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert second.returncode == 1
    assert f"another qbench process (pid {first.pid}) is using this results folder" in \
        second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 2, err_first
    recs = {r["id"]: r for r in assert_clean_cells(results / "conc" / "cells")}
    assert len(recs) == 4
    killed = recs["smol/llama.cpp/F16/footprint"]
    assert (killed["status"], killed["signal"]) == ("crashed", "SIGKILL")
    assert all(r["status"] == "failed" for i, r in recs.items() if i != killed["id"])
    assert len(list((results / "conc" / "runs").glob("*.json"))) == 1   # the second wrote none


# --- disk full ------------------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path):
    """A 512 KiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "tiny-fs"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_file_system_leaves_no_partial_record(write_suite, smollm2_ref, tiny_fs, faults,
                                                   capsys):
    suite = suite_file(write_suite, smollm2_ref)
    cells = tiny_fs / "f" / "cells"
    assert run(suite, tiny_fs, "--only", "*/F16/*") == 2
    before = snapshot(cells)
    assert len(before) == 2
    filler = fill(tiny_fs)
    capsys.readouterr()

    assert run(suite, tiny_fs) == 1
    err = capsys.readouterr().err
    assert "qbench: error: disk full while writing" in err and "Traceback" not in err
    assert len(assert_clean_cells(cells)) == 2
    assert snapshot(cells) == before

    filler.unlink()
    assert run(suite, tiny_fs) == 2            # space again: the rest runs, the rest is kept
    assert len(assert_clean_cells(cells)) == 4
    assert {k: snapshot(cells)[k] for k in before} == before


def test_file_size_limit_is_a_clear_error_not_a_traceback(write_suite, smollm2_ref, tmp_path,
                                                          faults):
    """RLIMIT_FSIZE (EFBIG) is a full disk for one file: same promise as ENOSPC.

    Needs fsutil.atomic_write_bytes to map EFBIG like ENOSPC (see the issue 5 report)."""
    suite = suite_file(write_suite, smollm2_ref)
    results = tmp_path / "results"
    cells = results / "f" / "cells"
    assert run(suite, results, "--only", "*/F16/*") == 2
    before = snapshot(cells)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))   # records are ~2 KB

    proc = subprocess.run([sys.executable, "-m", "qbench.cli", "run", str(suite), "--out",
                           str(results), "--no-report"], capture_output=True, text=True,
                          preexec_fn=limit, timeout=300, cwd=REPO)
    assert len(assert_clean_cells(cells)) == 2
    assert snapshot(cells) == before
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("qbench: error: ")


# --- hostile model ids end to end -----------------------------------------------------------
def test_hostile_ids_stay_inside_results_and_are_escaped(write_suite, smollm2_ref, tmp_path,
                                                         faults, monkeypatch):
    ids = ("../x", "<script>alert(1)</script>", "../../etc/passwd")
    suite = suite_file(write_suite, smollm2_ref, name="hostile", ids=ids)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    existing = set(tmp_path.rglob("*"))
    assert run(suite, Path("results")) == 2
    assert main(["report", "results", "--out", "reports"]) == 0
    new = set(tmp_path.rglob("*")) - existing
    allowed = (cwd / "results", cwd / "reports", tmp_path / "cache")
    assert [p for p in new if not any(p.is_relative_to(a) for a in allowed)] == []
    assert not [p for p in new if "<" in p.name or p.name in ("x", "passwd", "etc")]
    recs = assert_clean_cells(cwd / "results" / "hostile" / "cells")
    assert sorted({r["model"]["id"] for r in recs}) == sorted(ids)
    pages = "".join(p.read_text() for p in (cwd / "reports").rglob("*.html"))
    assert "<script>alert(1)</script>" not in pages
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages


def test_console_markup_in_ids_is_printed_not_interpreted(write_suite, smollm2_ref, tmp_path,
                                                          faults, capsys):
    """rich parses [...] in what qbench prints: an id '[/x]' crashed the run (MarkupError) and
    '[bold]' vanished. Needs rich.markup.escape in runner.py / cli.py (see the issue 5 report)."""
    ids = ("[/x]", "[bold]b")
    suite = suite_file(write_suite, smollm2_ref, name="markup", ids=ids)
    results = tmp_path / "results"
    assert main(["plan", str(suite), "--out", str(results)]) == 0
    assert run(suite, results) == 2
    err = capsys.readouterr().err
    assert len(assert_clean_cells(results / "markup" / "cells")) == 8
    assert "[/x]/llama.cpp/F16/speed" in err and "[bold]b/llama.cpp/F16/speed" in err


# --- stored records from another qbench ------------------------------------------------------
def test_record_of_an_older_schema_is_refused_naming_version_and_file(write_suite, smollm2_ref,
                                                                      tmp_path, faults, capsys):
    suite = suite_file(write_suite, smollm2_ref)
    results = tmp_path / "results"
    assert run(suite, results) == 2
    victim = sorted((results / "f" / "cells").glob("*.json"))[0]
    rec = json.loads(victim.read_text())
    victim.write_text(json.dumps(rec | {"schema_version": 0}))
    capsys.readouterr()
    assert run(suite, results) == 1
    assert main(["report", str(results), "--out", str(tmp_path / "reports")]) == 1
    for line in capsys.readouterr().err.strip().splitlines():
        assert line.startswith(f"qbench: error: {victim}: schema version 0 is too old")


# --- a GGUF cut inside its tensor data ---------------------------------------------------------
def test_gguf_truncated_in_its_tensor_data_is_refused_before_any_cell(write_suite, smollm2_ref,
                                                                     tmp_path, isolated_env,
                                                                     capsys):
    from qbench.inputs.sources import locate
    src = locate(smollm2_ref, base_dir=tmp_path).path
    cut = tmp_path / "cut.gguf"
    with src.open("rb") as fi, cut.open("wb") as fo:
        fo.write(fi.read(4 << 20))     # metadata and tensor infos whole, tensor data cut
    suite = suite_file(write_suite, str(cut))
    assert run(suite, tmp_path / "results") == 1
    err = capsys.readouterr().err
    assert f"qbench: error: {suite}: models[0].source: {cut} is " in err and "truncated" in err
    assert not (tmp_path / "results" / "f" / "cells").exists()


# --- llama.cpp running out of memory under a cap -------------------------------------------------
def test_ggml_allocation_abort_is_reported_as_out_of_memory(tmp_path, monkeypatch):
    """Under memory_limit_mb llama.cpp prints 'insufficient memory', a long backtrace, and
    aborts. Needs executor.py to find that line (see the issue 5 report)."""
    monkeypatch.setenv("QBENCH_FAULT", "*=alloc-abort")
    out = run_in_child(Job(cell={"id": "m/llama.cpp/Q8_0/speed", "key": "k"}, base_dir=".",
                           cache_dir="."), log_path=tmp_path / "cell.log", timeout_s=120)
    assert (out.status, out.signal) == ("crashed", "SIGABRT")
    assert "out of memory" in out.error


# --- pickle checkpoints, remote code ------------------------------------------------------
def test_pickle_weights_beside_a_stray_safetensors_file_are_refused(tmp_path):
    """transformers loads pytorch_model.bin when there is no model.safetensors(.index.json),
    whatever other *.safetensors lie there. Needs quantize/hf.check_model_dir to look for the
    files transformers loads (see the issue 5 report)."""
    from qbench.quantize import hf
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "adapter.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(SourceError, match="allow_pickle"):
        hf.check_model_dir(tmp_path, allow_pickle=False)
    hf.check_model_dir(tmp_path, allow_pickle=True)


def test_trust_remote_code_reaches_the_loader_only_when_opted_in(tmp_path):
    from qbench.quantize import hf
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    loads = []
    for trust in (False, True):
        variant = {"backend": "transformers", "quant": "fp32", "source": ""}
        req = PrepareRequest(variant=variant, model={"id": "m", "trust_remote_code": trust},
                             model_file=folder, model_sha="sha", base_dir=tmp_path,
                             data_dir=None, cache_dir=tmp_path / "cache", threads=1)
        path, _ = hf.prepare(req)
        loads.append(hf.read_descriptor(path)["load"]["trust_remote_code"])
    assert loads == [False, True]


# --- the real model (slow) ---------------------------------------------------------------------
def _bench_module():
    """benchmarks/faults/ as a package under a private name (benchmarks/ is not on sys.path)."""
    package = REPO / "benchmarks" / "faults"
    spec = importlib.util.spec_from_file_location("qbench_bench_faults", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_kill_9_scenario_of_the_benchmark(smollm2_ref, data_dir, isolated_env, tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("llama-cpp-python is not importable")
    faults_bench = _bench_module()
    bench = faults_bench.Bench(tmp_path / "work", data_dir, cache_dir=isolated_env)
    rows = faults_bench.scenario_kill(bench, points=(1,), quants=("F16",))
    assert len(rows) == 1, rows
    row = rows[0]
    assert row.survived, row.observed
    assert row.before >= 1 and row.lost == 0
