"""The machine lock (issue 24 §1): a timed cell never runs beside other qbench work.

Holders are real processes; every step waits on what a process printed ("held", "waiting"),
never on a delay, so nothing here depends on the machine's speed. The end-to-end test runs two
real `qbench run`s on the toy plugin, sharing a cache folder, and checks the stored records:
no timed window of one overlaps any cell of the other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qbench.host import machine_lock
from conftest import REPO

PATIENCE_S = 300          # only reached when something is broken

HOLDER = """
import sys
from pathlib import Path
from qbench.host.machine_lock import hold
with hold(Path(sys.argv[1]), sys.argv[2], on_wait=lambda: print("waiting", flush=True)) as h:
    print("held" if h.acquired else "not held", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


class Holder:
    """A process holding (or waiting for) the lock until :meth:`release`."""

    def __init__(self, cache: Path, mode: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache), mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def says(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def holders():
    made: list[Holder] = []

    def make(cache: Path, mode: str) -> Holder:
        made.append(Holder(cache, mode))
        return made[-1]
    yield make
    for h in made:
        h.close()


def try_now(cache: Path, mode: str) -> machine_lock.Hold:
    with machine_lock.hold(cache, mode, wait_s=0) as h:
        return h


def test_exclusive_excludes_everyone_shared_only_exclusive(tmp_path: Path, holders) -> None:
    ex = holders(tmp_path, "exclusive")
    assert ex.says() == "held"
    for mode in ("shared", "exclusive"):
        h = try_now(tmp_path, mode)
        assert not h.acquired and h.contended and h.held_from is None
    ex.release()
    assert ex.says() == "released"
    sh = holders(tmp_path, "shared")
    assert sh.says() == "held"
    assert try_now(tmp_path, "shared").acquired               # untimed cells run together
    assert not try_now(tmp_path, "exclusive").acquired


def test_a_waiting_exclusive_holder_goes_before_new_shared_ones(tmp_path: Path, holders) -> None:
    """flock alone would let overlapping shared holders starve a timed cell for ever."""
    sh = holders(tmp_path, "shared")
    assert sh.says() == "held"
    ex = holders(tmp_path, "exclusive")
    assert ex.says() == "waiting"
    assert not try_now(tmp_path, "shared").acquired           # queued behind the timed cell
    sh.release()
    assert ex.says() == "held"
    ex.release()
    assert ex.says() == "released"
    assert try_now(tmp_path, "shared").acquired


def test_a_killed_holder_releases_the_lock(tmp_path: Path, holders) -> None:
    ex = holders(tmp_path, "exclusive")
    assert ex.says() == "held"
    ex.proc.send_signal(signal.SIGKILL)
    ex.proc.wait()
    got = try_now(tmp_path, "exclusive")
    assert got.acquired and not got.contended


def test_a_wait_is_bounded_and_recorded(tmp_path: Path, holders) -> None:
    ex = holders(tmp_path, "exclusive")
    assert ex.says() == "held"
    with machine_lock.hold(tmp_path, "shared", wait_s=0.2) as h:
        pass
    rec = h.as_record()
    assert rec["mode"] == "shared" and rec["acquired"] is False and rec["waited_s"] >= 0.2
    assert "held_from" not in rec


def test_the_hold_is_timestamped(tmp_path: Path) -> None:
    with machine_lock.hold(tmp_path, "exclusive") as h:
        assert h.acquired and h.held_from is not None and h.held_until is None
    rec = h.as_record()
    assert rec["held_from"] <= rec["held_until"] and not rec["contended"]
    assert (tmp_path / "machine.lock").is_file()


def test_bad_wait_setting_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QBENCH_LOCK_WAIT_S", "ten")
    with pytest.raises(ValueError, match="QBENCH_LOCK_WAIT_S must be a number of seconds"):
        machine_lock.max_wait_s()
    monkeypatch.setenv("QBENCH_LOCK_WAIT_S", "-1")
    with pytest.raises(ValueError, match=">= 0"):
        machine_lock.max_wait_s()
    with pytest.raises(ValueError, match="lock mode"):
        with machine_lock.hold(Path("."), "both"):   # type: ignore[arg-type]
            pass


# -- two real runs on one machine -------------------------------------------------------------
SUITE = """
[suite]
name = "{name}"

[defaults]
threads = 1
timeout_s = {timeout}

[[models]]
id = "toy-model"
source = "corpus.txt"
base = "f32"
base_backend = "toy"

[[variants]]
backend = "toy"
quant = {quants}

[metrics.footprint]
enabled = false

[metrics.toy_xent]
prefixes = 10

[metrics.sanity]
max_tokens = 8

[metrics.speed]
prompt_tokens = 256
gen_tokens = 64
repetitions = 3
roofline = false
"""


def run_qbench(work: Path, site: Path, cache: Path, quants: list[str], name: str
               ) -> subprocess.Popen[str]:
    work.mkdir(parents=True)
    # each run its own corpus: their variants' files in the shared cache never collide
    words = f"the quick brown fox jumps over the lazy dog by the river {name} ".split()
    (work / "corpus.txt").write_text(" ".join(words[(i * 5) % len(words)] for i in range(3000)))
    (work / "suite.toml").write_text(SUITE.format(name=name, timeout=PATIENCE_S,
                                                  quants=json.dumps(quants)))
    env = dict(os.environ, QBENCH_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, (str(site), str(REPO),
                                                        os.environ.get("PYTHONPATH")))))
    env.pop("QBENCH_FAULT", None)
    return subprocess.Popen([sys.executable, "-m", "qbench.cli", "run", "suite.toml", "--out",
                             "results", "--no-report"], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def records(work: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in (work / "results").rglob("cells/*.json")]


def waiting_logs(work: Path) -> bool:
    """A cell of this run printed that it waits for the machine lock (its cell log)."""
    return any("waiting for the machine lock" in p.read_text(errors="replace")
               for p in work.rglob("*.log"))


def test_two_runs_started_together_never_time_each_other(tmp_path: Path,
                                                         toy_plugin_site: Path) -> None:
    cache = tmp_path / "cache"
    # hold the lock until both runs' first cells wait for it: then they contend for certain
    gate = Holder(cache, "exclusive")
    try:
        assert gate.says() == "held"
        runs = {name: (tmp_path / name, run_qbench(tmp_path / name, toy_plugin_site, cache,
                                                   quants, name))
                for name, quants in (("a", ["f32", "q8"]), ("b", ["f32", "q4"]))}
        outputs: dict[str, str] = {}
        readers = [threading.Thread(target=lambda n=n, p=p: outputs.__setitem__(
            n, p.stdout.read() if p.stdout else ""), daemon=True)
            for n, (_, p) in runs.items()]
        for t in readers:
            t.start()
        deadline = time.monotonic() + PATIENCE_S
        while not all(waiting_logs(w) for w, _ in runs.values()):
            assert time.monotonic() < deadline, "the runs never reached the lock"
            assert all(p.poll() is None for _, p in runs.values()), outputs
            time.sleep(0.2)
        gate.release()
        assert gate.says() == "released"
    finally:
        gate.close()
    for name, (work, proc) in runs.items():
        assert proc.wait(timeout=PATIENCE_S) == 0, outputs.get(name)
    for t in readers:
        t.join(timeout=10)

    recs = {name: records(work) for name, (work, _) in runs.items()}
    for name, rs in recs.items():
        assert len(rs) == 2 * 3 and all(r["status"] == "ok" for r in rs), \
            [(r["id"], r["error"]) for r in rs]
        for r in rs:
            lock = r["lock"]
            assert lock["acquired"] is True
            assert lock["mode"] == ("exclusive" if r["metric"] == "speed" else "shared")
            assert lock["held_from"] <= lock["held_until"]
        # every cell that waited behind the test's hold says so
        assert any(r["lock"]["contended"] and r["lock"]["waited_s"] > 0 for r in rs), name

    def holds(rs: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
        return [(r["lock"]["held_from"], r["lock"]["held_until"], r["id"]) for r in rs]

    for name, other in (("a", "b"), ("b", "a")):
        for r in recs[name]:
            if r["metric"] != "speed":
                continue
            fitness = r["fitness"]
            assert set(fitness) >= {"reliable", "reasons", "rounds", "windows"}
            held = (r["lock"]["held_from"], r["lock"]["held_until"])
            windows = [(w["start"], w["end"]) for w in fitness["windows"]]
            assert len(windows) >= 6
            for start, end in [held, *windows]:
                # every timed window lies inside its cell's exclusive hold ...
                assert held[0] <= start <= end <= held[1]
                # ... and no cell of the other run (timed or not) overlaps it
                for o_from, o_until, o_id in holds(recs[other]):
                    assert end < o_from or o_until < start, (r["id"], o_id)


def test_a_timed_cell_that_ran_without_the_lock_is_unreliable() -> None:
    from qbench.run.worker import _note_lock
    waited = machine_lock.Hold("exclusive", waited_s=600.0, acquired=False, contended=True)
    result: dict[str, Any] = {"status": "ok", "fitness": {"reliable": True, "reasons": [],
                                                          "rounds": 1, "windows": []}}
    _note_lock(result, waited)
    assert result["lock"] == {"mode": "exclusive", "waited_s": 600.0, "acquired": False,
                              "contended": True}
    assert result["fitness"]["reliable"] is False
    assert "ran without the machine lock, after waiting 600 s" in result["fitness"]["reasons"][0]
    # a metric without a fitness of its own gets one; an untimed cell's is left alone
    bare: dict[str, Any] = {"status": "ok"}
    _note_lock(bare, waited)
    assert bare["fitness"]["reliable"] is False and bare["fitness"]["rounds"] == 0
    untimed: dict[str, Any] = {"status": "ok"}
    _note_lock(untimed, machine_lock.Hold("shared", waited_s=600.0))
    assert "fitness" not in untimed and untimed["lock"]["acquired"] is False
