"""Issue 25, the process tree: nothing a cell started outlives `qbench run`, however it ends.

Each test starts a real `qbench run` whose first cell runs the ``hang-tree`` fault (the worker
starts a grandchild, a real subprocess, and both hang), signals the qbench process alone (not
its group: `kill PID`, `timeout`, a CI runner), and checks that the worker and the grandchild
are gone, that SIGTERM/SIGINT finish the run record as interrupted, and that no temporary folder
is left in the system's temporary folder. The fault strikes before any model is touched: no
inference library runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from qbench.results.store import Store

SUITE = """
[suite]
name = "signals"

[defaults]
threads = 1
timeout_s = 600

[[models]]
id = "smol"
source = "{source}"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16"]

[metrics.speed]
prompt_tokens = 16
gen_tokens = 4
repetitions = 1
"""

PATIENCE_S = 120     # generous: the machine is shared and slow; nothing here is timed


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """Spawn ``qbench run`` with SIGINT at its default, as a terminal or a CI runner does.

    A shell without job control starts background jobs with SIGINT ignored (`pytest ... &` in a
    script), the ignored disposition survives exec, and Python keeps an ignored SIGINT ignored:
    `qbench run` would then rightly go on and this test would wait for an exit that never
    comes. A handler installed here is reset to the default by exec in the child."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _grandchild(log_dir: Path, proc: subprocess.Popen[bytes]) -> int:
    """The pid the hang-tree fault prints into the cell's log, once it is there."""
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "qbench ended before the fault struck"
        for log in log_dir.glob("*.log") if log_dir.is_dir() else ():
            m = re.search(r"grandchild pid (\d+)", log.read_text(errors="replace"))
            if m:
                return int(m.group(1))
        time.sleep(0.1)
    raise AssertionError("the hang-tree fault never started its grandchild")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_no_descendant_outlives_a_signalled_run(sig, write_suite, smollm2_ref, isolated_env,
                                                tmp_path):
    suite = write_suite(SUITE.format(source=smollm2_ref))
    results = tmp_path / "results"
    private_tmp = tmp_path / "system-tmp"     # stands for /tmp: nothing of the run may land here
    private_tmp.mkdir()
    env = dict(os.environ, QBENCH_FAULT="*=hang-tree", TMPDIR=str(private_tmp))
    err = (tmp_path / "stderr").open("wb")
    with sigint_not_ignored():
        proc = subprocess.Popen([sys.executable, "-m", "qbench.cli", "run", str(suite), "--out",
                                 str(results), "--no-report"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        pid = _grandchild(results / "signals" / "logs", proc)
        tree = [psutil.Process(pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.kill(proc.pid, sig)                 # qbench alone, not its process group
        code = proc.wait(timeout=PATIENCE_S)
        _, alive = psutil.wait_procs(tree, timeout=30)
        survivors = _alive(alive)
        assert not survivors, (f"{[p.pid for p in survivors]} outlived `qbench run` killed by "
                               f"{sig.name}")
    finally:
        for p in _alive(tree):
            p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err.close()
    stderr = (tmp_path / "stderr").read_text(errors="replace")
    assert "Traceback" not in stderr, stderr
    assert list(private_tmp.iterdir()) == []   # the run's temporary folders: under results
    store = Store(results, "signals")
    [manifest_path] = store.runs_dir.glob("*.json")
    manifest = json.loads(manifest_path.read_text())
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL and manifest["finished"] is None
    else:
        assert code == 128 + sig, stderr
        assert manifest["finished"] and manifest["interrupted"] is True
        assert manifest["signal"] == sig.name
        assert list(store.tmp_dir.iterdir()) == []     # removed on the way out
    with store.lock():                         # what a kill -9 left is swept under the lock
        assert not store.tmp_dir.exists() or list(store.tmp_dir.iterdir()) == []


def test_sweep_removes_scratch_folders_without_following_links(tmp_path):
    store = Store(tmp_path / "results", "s")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (store.tmp_dir / "qbench-cell-x").mkdir(parents=True)
    (store.tmp_dir / "qbench-cell-x" / "cells.json").write_text("{}")
    (store.tmp_dir / "link").symlink_to(victim)
    with store.lock():
        assert list(store.tmp_dir.iterdir()) == []
    assert (victim / "keep.txt").read_text() == "mine"
