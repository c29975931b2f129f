"""Cells that crash, hang, run out of memory or fail are recorded, and the run goes on.

Faults are injected by qbench/run/faults.py (QBENCH_FAULT="GLOB=KIND") at the very start of the
real worker process, before it touches any model, so these tests need no inference library.
Tests marked slow run the real SmolLM2 model through llama-cpp-python.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qbench.cli import main
from qbench.suite.config import load_suite
from qbench.run.child import run_in_child
from qbench.run.faults import fault_for
from qbench.host.fsutil import exclusive_lock
from qbench.suite.plan import PlanContext, expand
from qbench.run.job import Job
from qbench.run.runner import is_done, job_for

CELL_ID = "m/llama.cpp/Q8_0/speed"


def job(cell_id: str = CELL_ID) -> Job:
    return Job(cell={"id": cell_id, "key": "deadbeef"}, base_dir=".", cache_dir=".")


@pytest.fixture
def fault(monkeypatch):
    monkeypatch.delenv("QBENCH_FAULT", raising=False)

    def set_fault(spec: str) -> None:
        monkeypatch.setenv("QBENCH_FAULT", spec)

    return set_fault


def run(tmp_path: Path, timeout_s: float = 120, **kw):
    log = tmp_path / "logs" / "cell.log"
    return run_in_child(job(), log_path=log, timeout_s=timeout_s, **kw), log


# --- fault spec parsing --------------------------------------------------------------------


def test_fault_for_parses_specs():
    spec = "*/Q8_0/*=segfault; m/*/speed=hang;bogus=nonsense"
    assert fault_for("m/llama.cpp/Q8_0/speed", spec) == "segfault"  # first match wins
    assert fault_for("m/llama.cpp/F16/speed", spec) == "hang"
    assert fault_for("m/llama.cpp/F16/sanity", spec) is None
    assert fault_for("bogus", spec) is None  # unknown kinds are ignored
    assert fault_for("x", "") is None


# --- one cell ------------------------------------------------------------------------------


def test_segfault(tmp_path, fault):
    fault(f"{CELL_ID}=segfault")
    out, log = run(tmp_path)
    assert out.status == "crashed"
    assert out.signal == "SIGSEGV"
    assert out.error.startswith("the cell process died of SIGSEGV")
    assert "Fatal Python error: Segmentation fault" in out.stderr_tail
    assert "faults.py" in out.stderr_tail  # the Python stack, from faulthandler
    assert "injecting fault 'segfault'" in log.read_text()


def test_abort(tmp_path, fault):
    fault("*=abort")
    out, _ = run(tmp_path)
    assert (out.status, out.signal) == ("crashed", "SIGABRT")
    assert out.error.startswith("the cell process died of SIGABRT")


def test_hang_times_out(tmp_path, fault):
    fault(f"{CELL_ID}=hang")
    out, _ = run(tmp_path, timeout_s=2)
    assert out.status == "timeout"
    assert out.signal == "SIGKILL"
    assert out.error == "timed out after 2 s; its process tree was killed"


def test_hang_tree_kills_grandchild(tmp_path, fault):
    fault("m/*=hang-tree")
    out, log = run(tmp_path, timeout_s=3)
    assert out.status == "timeout"
    found = re.search(r"grandchild pid (\d+)", log.read_text())
    assert found, log.read_text()
    pid = int(found.group(1))
    deadline = time.monotonic() + 10  # a killed orphan may linger as a zombie until reaped
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)  # don't leave it behind, then fail
        pytest.fail(f"grandchild {pid} survived the timeout")


def test_oom_under_memory_limit(tmp_path, fault):
    fault("*=oom")
    out, _ = run(tmp_path, memory_limit_mb=300)
    assert out.status in ("failed", "crashed")
    assert "out of memory" in out.error


def test_exit_without_result(tmp_path, fault):
    fault("*=exit")
    out, _ = run(tmp_path)
    assert out.status == "failed"
    assert out.signal is None
    assert out.error == "the cell process exited with code 3 and wrote no result"


def test_python_error(tmp_path, fault):
    fault("*=error")
    out, log = run(tmp_path)
    assert out.status == "failed"
    assert out.error == "RuntimeError: injected error"
    assert "Traceback" in log.read_text()
    assert out.stderr_tail and "injected error" in out.stderr_tail


def test_real_job_with_missing_model_fails_cleanly(tmp_path, write_suite, isolated_env):
    (tmp_path / "m.gguf").write_bytes(b"placeholder")
    suite = load_suite(write_suite("""
        [suite]
        name = "x"
        [[models]]
        id = "m"
        source = "m.gguf"
        [[variants]]
        backend = "llama.cpp"
        quant = ["F16"]
        [metrics.speed]
    """))
    ctx = PlanContext(base_dir=tmp_path, data_dir=None, cache_dir=isolated_env)
    cell = expand(suite, ctx)[0]
    (tmp_path / "m.gguf").unlink()  # gone between planning and running
    out = run_in_child(job_for(cell, suite, ctx), log_path=tmp_path / "c.log", timeout_s=120)
    assert out.status == "failed"
    assert out.error == f"model file not found: {tmp_path / 'm.gguf'}"


# --- whole runs through `qbench run` ---------------------------------------------------------

FAULT_SUITE = """
[suite]
name = "faults"

[defaults]
threads = 1
timeout_s = {timeout}

[[models]]
id = "smol"
source = "{source}"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0"]

[metrics.speed]
prompt_tokens = 16
gen_tokens = 4
repetitions = 1
"""


def cells_on_disk(results: Path, suite: str) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text())
            for p in sorted((results / suite / "cells").glob("*.json"))}


@pytest.fixture
def fault_suite(write_suite, smollm2_ref, isolated_env):
    return write_suite(FAULT_SUITE.format(timeout=3, source=smollm2_ref))


def qbench_run(suite: Path, results: Path, *extra: str) -> int:
    return main(["run", str(suite), "--out", str(results), "--no-report", *extra])


def test_run_records_crash_and_hang_and_goes_on(fault_suite, tmp_path, fault, capsys):
    results = tmp_path / "results"
    fault("smol/*/F16/speed=hang;smol/*/Q8_0/speed=segfault;*=error")
    assert qbench_run(fault_suite, results) == 2
    recs = {r["id"]: r for r in cells_on_disk(results, "faults").values()}
    assert sorted(recs) == sorted(f"smol/llama.cpp/{q}/{m}" for q in ("F16", "Q8_0")
                                  for m in ("footprint", "sanity", "speed"))
    hang = recs["smol/llama.cpp/F16/speed"]
    assert (hang["status"], hang["signal"]) == ("timeout", "SIGKILL")
    crash = recs["smol/llama.cpp/Q8_0/speed"]
    assert (crash["status"], crash["signal"]) == ("crashed", "SIGSEGV")
    assert "Segmentation fault" in crash["stderr_tail"]
    others = [r for i, r in recs.items() if not i.endswith("/speed")]
    assert all(r["status"] == "failed" and r["error"] == "RuntimeError: injected error"
               for r in others)
    assert all(r["values"] == {} for r in recs.values())
    assert all(r["variant"]["is_base"] == (r["variant"]["quant"] == "F16") for r in recs.values())
    # each log is kept, named by key
    logs = results / "faults" / "logs"
    assert {p.stem for p in logs.glob("*.log")} == {r["key"] for r in recs.values()}
    # the run manifest lists what happened
    (manifest_path,) = (results / "faults" / "runs").glob("*.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["counts"] == {"failed": 4, "timeout": 1, "crashed": 1}
    assert manifest["interrupted"] is False
    err = capsys.readouterr().err
    assert "6 cell(s) failed" in err


def test_resume_skips_recorded_cells_unless_rerun_failed(fault_suite, tmp_path, fault, capsys):
    results = tmp_path / "results"
    fault("*=error")
    assert qbench_run(fault_suite, results) == 2
    first = cells_on_disk(results, "faults")
    assert len(first) == 6 and {r["status"] for r in first.values()} == {"failed"}
    capsys.readouterr()

    # second run: every cell has a recorded outcome, nothing is run again
    fault("*=segfault")  # would change the outcome if anything ran
    qbench_run(fault_suite, results)
    assert cells_on_disk(results, "faults") == first
    assert "6 already done, 0 to run" in capsys.readouterr().err

    # --rerun-failed runs them again (and now they crash)
    assert qbench_run(fault_suite, results, "--rerun-failed") == 2
    again = cells_on_disk(results, "faults")
    assert again.keys() == first.keys()
    assert {r["status"] for r in again.values()} == {"crashed"}
    assert len({r["run_id"] for r in again.values()} | {r["run_id"] for r in first.values()}) == 2


def test_only_runs_a_subset(fault_suite, tmp_path, fault):
    results = tmp_path / "results"
    fault("*=error")
    assert qbench_run(fault_suite, results, "--only", "*/Q8_0/speed") == 2
    recs = list(cells_on_disk(results, "faults").values())
    assert [r["id"] for r in recs] == ["smol/llama.cpp/Q8_0/speed"]


def test_run_refuses_a_locked_results_folder(fault_suite, tmp_path, fault, capsys):
    results = tmp_path / "results"
    fault("*=error")
    with exclusive_lock(results / "faults"):
        assert qbench_run(fault_suite, results) == 1
    assert "another qbench process" in capsys.readouterr().err
    assert not (results / "faults" / "cells").exists()


def _is_worker(p: psutil.Process) -> bool:
    try:
        return "qbench.run.worker" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def test_cell_dies_with_a_killed_run(fault_suite, tmp_path, fault):
    fault("*=hang")
    proc = subprocess.Popen([sys.executable, "-m", "qbench.cli", "run", str(fault_suite),
                             "--out", str(tmp_path / "results"), "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not workers:
            assert proc.poll() is None and time.monotonic() < deadline
            workers = [p for p in psutil.Process(proc.pid).children() if _is_worker(p)]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        gone, alive = psutil.wait_procs(workers, timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"cell process {[p.pid for p in alive]} outlived the killed run"
    finally:
        for p in workers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_is_done_rules():
    assert is_done(None, False) is False
    assert is_done({"status": "ok"}, True) is True
    assert is_done({"status": "skipped"}, False) is False
    for status in ("failed", "timeout", "crashed"):
        assert is_done({"status": status}, False) is True
        assert is_done({"status": status}, True) is False


# --- real model (slow) ---------------------------------------------------------------------


def _llama_ok() -> None:
    proc = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("llama-cpp-python is not importable")


@pytest.mark.slow
def test_real_run_with_one_crash_then_rerun_failed(write_suite, smollm2_ref, isolated_env,
                                                   tmp_path, fault, capsys):
    _llama_ok()
    suite = write_suite(FAULT_SUITE.format(timeout=600, source=smollm2_ref)
                        .replace('["F16", "Q8_0"]', '["F16"]'))
    results = tmp_path / "results"
    fault("smol/*/F16/sanity=segfault")
    assert qbench_run(suite, results) == 2
    first = {r["id"]: r for r in cells_on_disk(results, "faults").values()}
    assert {i: r["status"] for i, r in first.items()} == {
        "smol/llama.cpp/F16/footprint": "ok", "smol/llama.cpp/F16/sanity": "crashed",
        "smol/llama.cpp/F16/speed": "ok"}
    speed = first["smol/llama.cpp/F16/speed"]["values"]
    assert speed["pp_tokens_per_s"]["value"] > 0 and speed["tg_tokens_per_s"]["value"] > 0

    fault("")
    assert qbench_run(suite, results, "--rerun-failed") == 0
    second = {r["id"]: r for r in cells_on_disk(results, "faults").values()}
    assert second["smol/llama.cpp/F16/sanity"]["status"] == "ok"
    for cid in ("smol/llama.cpp/F16/footprint", "smol/llama.cpp/F16/speed"):
        assert second[cid] == first[cid]  # ok cells are never recomputed


KILL_SUITE = """
[suite]
name = "killed"

[defaults]
threads = 2
timeout_s = 600

[[models]]
id = "smol"
source = "{source}"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0"]

[metrics.perplexity]
dataset = "wikitext-2"
ctx = 512
chunks = 2

[metrics.sanity]
enabled = false
"""


@pytest.mark.slow
def test_resume_after_kill_9(write_suite, smollm2_ref, data_dir, isolated_env, tmp_path,
                             monkeypatch):
    _llama_ok()
    suite = write_suite(KILL_SUITE.format(source=smollm2_ref))
    results = tmp_path / "results"
    cells = results / "killed" / "cells"
    cmd = [sys.executable, "-m", "qbench.cli", "run", str(suite), "--out", str(results),
           "--no-report", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    descendants: set[int] = set()
    try:
        deadline = time.monotonic() + 480
        while not list(cells.glob("*.json")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no cell finished in time"
            try:
                descendants |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        descendants |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # the cell in flight runs in its own session; end it too (by pid: ours)
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells.glob("*.json")}
    assert before
    assert all(json.loads(data)["status"] == "ok" for _, data in before.values())
    # the run record survives the kill: unfinished, listing the cells done before it
    runs = [json.loads(p.read_text()) for p in (results / "killed" / "runs").glob("*.json")]
    assert len(runs) == 1 and runs[0]["finished"] is None
    assert {c["key"] + ".json" for c in runs[0]["cells"]} <= set(before)

    # the lock died with its holder
    with exclusive_lock(results / "killed"):
        pass
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=580)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(before)} already done" in rerun.stderr
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells.glob("*.json")}
    assert len(after) == 4  # F16, Q8_0 x footprint, perplexity
    for name, snap in before.items():
        assert after[name] == snap, f"{name} was rewritten"
    recs = [json.loads(d) for _, d in after.values()]
    assert {r["status"] for r in recs} == {"ok"}
    ppl = {r["variant"]["quant"]: r["values"]["ppl"]["value"] for r in recs
           if r["metric"] == "perplexity"}
    assert set(ppl) == {"F16", "Q8_0"} and all(1 < v < 1000 for v in ppl.values())
    # a third run has nothing to do
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "4 already done, 0 to run" in third.stderr
