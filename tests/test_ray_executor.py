"""`--executor ray`: cells as Ray tasks on a local Ray cluster (CPU), with injected faults.

QBENCH_FAULT (qbench/run/faults.py) makes a cell's own process segfault or raise at its start,
before any model work; QBENCH_RAY_FAULT makes the Ray task around it die. Every cell must come
back as a stored record (crashed / failed with the reason), none lost. Needs the optional
'ray' package: skipped with the reason without it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console

from qbench.suite.config import load_suite
from qbench.errors import QbenchError
from qbench.results.schema import Outcome
from qbench.run.job import Job
from qbench.suite.plan import PlanContext, expand
from qbench.run.ray_executor import (INSTALL_HINT, cpus_for, forwarded_env, gpus_for, outcome_from_dict, outcome_to_dict)
from qbench.run.executors import WorkItem
from qbench.run.runner import job_for, run_suite
from qbench.results.store import Store

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed "
                               "(pip install 'qbench-llm[ray]')")

SUITE = """
[suite]
name = "ray-suite"

[defaults]
device = "{device}"
threads = 1
timeout_s = 60

[[models]]
id = "m-1b"
source = "hf:example/m-1b-GGUF/m-1b-f16.gguf"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0", "Q4_K_M"]

[metrics.speed]
prompt_tokens = 8
gen_tokens = 4
"""


def make_suite(tmp_path: Path, device: str = "auto"):
    path = tmp_path / "suite.toml"
    path.write_text(SUITE.replace("{device}", device))
    suite = load_suite(path)
    ctx = PlanContext(base_dir=tmp_path, data_dir=None, cache_dir=tmp_path / "cache")
    return suite, ctx, Store(tmp_path / "results", suite.name)


@pytest.fixture
def faults(monkeypatch):
    monkeypatch.delenv("QBENCH_FAULT", raising=False)
    monkeypatch.delenv("QBENCH_RAY_FAULT", raising=False)

    def set_faults(cell: str = "", task: str = "") -> None:
        if cell:
            monkeypatch.setenv("QBENCH_FAULT", cell)
        if task:
            monkeypatch.setenv("QBENCH_RAY_FAULT", task)

    return set_faults


# --- without Ray ---------------------------------------------------------------------------


def test_missing_ray_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)    # import ray -> ImportError
    from qbench.run.ray_executor import RayExecutor
    with pytest.raises(QbenchError) as err:
        RayExecutor()
    assert str(err.value) == INSTALL_HINT == "--executor ray needs 'pip install qbench-llm[ray]'"


def test_gpu_and_cpu_requests():
    job = Job(cell={"variant": {"n_gpu_layers": -1}}, base_dir=".", cache_dir=".",
              device="auto", threads=4)
    assert gpus_for(job, 0, cluster_gpus=0) == 0            # auto, no GPU anywhere: CPU
    assert gpus_for(job, 0, cluster_gpus=8) == 1            # auto with GPUs: one by default
    assert gpus_for(job, 0.5, cluster_gpus=8) == 0.5        # two cells may share a GPU
    assert gpus_for(job.replace(device="cuda"), 2, cluster_gpus=0) == 2   # cuda always asks
    assert gpus_for(job.replace(device="cpu"), 1, cluster_gpus=8) == 0
    cpu_variant = job.replace(cell={"variant": {"n_gpu_layers": 0}})
    assert gpus_for(cpu_variant, 1, cluster_gpus=8) == 0    # n_gpu_layers = 0 runs on the CPU
    assert cpus_for(job, None) == 4
    assert cpus_for(job.replace(threads=0), None) == 1
    assert cpus_for(job, 2.5) == 2.5


def test_outcome_round_trip_and_env():
    out = Outcome(status="crashed", error="x", signal="SIGSEGV", stderr_tail="tail",
                  result={"values": {"a": {"value": 1.0}}}, peak_rss_mb=12.5, peak_vram_mb=None,
                  wall_s=3.0)
    assert outcome_from_dict(outcome_to_dict(out) | {"unknown": 1}) == out
    env = forwarded_env({"QBENCH_FAULT": "a", "HF_HOME": "/h", "PATH": "/bin",
                         "CUDA_VISIBLE_DEVICES": "0", "TRANSFORMERS_OFFLINE": "1"})
    assert env == {"QBENCH_FAULT": "a", "HF_HOME": "/h", "TRANSFORMERS_OFFLINE": "1"}


# --- a local Ray cluster -------------------------------------------------------------------


@needs_ray
def test_executor_starts_and_stops_its_own_local_ray(tmp_path, faults):
    """The `qbench run --executor ray` path with no cluster: a local Ray instance for the run."""
    import ray

    from qbench.run.ray_executor import RayExecutor
    if ray.is_initialized():
        ray.shutdown()
    faults(cell="*=error")
    suite, ctx, store = make_suite(tmp_path)
    executor = RayExecutor(init_kwargs={"num_cpus": 2, "include_dashboard": False})
    with store.lock():
        summary = run_suite(suite, ctx, store, executor=executor, only=("*/F16/*",),
                            console=Console(quiet=True))
    assert not ray.is_initialized()                      # it started Ray, so it stopped it
    assert summary.counts == {"failed": 3}
    assert all("injected error" in r["error"] for r in store.records())


@pytest.fixture(scope="module")
def ray_cluster():
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install 'qbench-llm[ray]')")
    import ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@needs_ray
def test_faults_become_recorded_outcomes_none_lost(tmp_path, faults, ray_cluster, capsys):
    # Q8_0 cells segfault in their own process, the Q4_K_M speed cell's Ray task dies itself,
    # every other cell raises: 9 cells, 9 records, each with its reason
    faults(cell="*/Q8_0/*=segfault;*=error", task="*/Q4_K_M/speed=exit")
    from qbench.run.ray_executor import RayExecutor
    suite, ctx, store = make_suite(tmp_path)
    executor = RayExecutor()
    with store.lock():
        summary = run_suite(suite, ctx, store, executor=executor, console=Console(quiet=True))
    assert ray_cluster.is_initialized()                   # someone else's cluster: left running
    records = {r["id"]: r for r in store.records()}
    cells = expand(suite, ctx)
    assert set(records) == {c.id for c in cells} and len(records) == 9
    assert summary.counts == {"crashed": 4, "failed": 5}
    for cid, rec in sorted(records.items()):
        print(f"{cid:32} {rec['status']:8} {rec['signal'] or '-':8} {rec['error'][:90]}")
        if "/Q8_0/" in cid:
            assert (rec["status"], rec["signal"]) == ("crashed", "SIGSEGV")
            assert "died of SIGSEGV" in rec["error"]
            assert "Fatal Python error: Segmentation fault" in rec["stderr_tail"]
        elif cid.endswith("/Q4_K_M/speed"):
            assert rec["status"] == "crashed"
            assert "Ray task running this cell died (WorkerCrashedError)" in rec["error"]
        else:
            assert rec["status"] == "failed"
            assert rec["error"] == "RuntimeError: injected error"
        # the cell's log came back from the task into the store
        log = store.log_path(rec["key"]).read_text()
        assert ("injecting fault" in log) or ("did not return" in log)
        assert rec["timings"]["started"]
    # the run manifest lists every cell
    manifest = next(store.runs_dir.glob("*.json")).read_text()
    assert all(cid in manifest for cid in records)
    with capsys.disabled():
        print("\nRay run:", summary.counts, f"{summary.wall_s:.1f} s")
        for cid, rec in sorted(records.items()):
            print(f"  {cid:32} {rec['status']:8} {rec['signal'] or '-':8} "
                  f"{rec['error'][:100]}")


@needs_ray
def test_a_task_that_raises_is_a_failed_cell(tmp_path, faults, ray_cluster):
    faults(task="*/F16/speed=error")
    from qbench.run.ray_executor import RayExecutor
    suite, ctx, store = make_suite(tmp_path)
    cells = [c for c in expand(suite, ctx) if c.id.endswith("/F16/speed")]
    items = [WorkItem(c, job_for(c, suite, ctx), store.log_path(c.key), 60, 0) for c in cells]
    [(item, outcome)] = list(RayExecutor().run(items))
    assert outcome.status == "failed"
    assert outcome.error.startswith("the Ray task raised RuntimeError: injected Ray task error")


@needs_ray
def test_cuda_cells_fail_at_once_on_a_cluster_without_gpus(tmp_path, faults, ray_cluster):
    from qbench.run.ray_executor import RayExecutor
    suite, ctx, store = make_suite(tmp_path, device="cuda")
    cells = expand(suite, ctx)[:2]
    items = [WorkItem(c, job_for(c, suite, ctx), store.log_path(c.key), 60, 0) for c in cells]
    outcomes = list(RayExecutor().run(items))
    assert [o.status for _, o in outcomes] == ["failed", "failed"]
    assert all("has no GPU" in o.error for _, o in outcomes)


def _cell_processes(marker: str) -> list:
    """Live cell processes (python -m qbench.run.worker) whose QBENCH_FAULT names ``marker``."""
    import psutil
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "qbench.run.worker" in " ".join(p.info["cmdline"] or []) and \
                    marker in p.environ().get("QBENCH_FAULT", "") and \
                    p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


# Bounds that only matter when something is broken: a loaded machine may take long to start
# Ray workers and cells, and the tests wait on the event itself, never on a fixed delay.
PATIENCE_S = 300


def _wait_for_cell(marker: str) -> list:
    """Poll (no event to wait on) until a marked cell process runs; [] after PATIENCE_S."""
    import time
    deadline = time.monotonic() + PATIENCE_S
    while not (procs := _cell_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return procs


def _wait_all_gone(marker: str) -> list:
    """Wait for every marked cell process to exit (psutil.wait_procs); what is left after
    PATIENCE_S (new ones included) is returned."""
    import time

    import psutil
    deadline = time.monotonic() + PATIENCE_S
    while (procs := _cell_processes(marker)) and time.monotonic() < deadline:
        psutil.wait_procs(procs, timeout=max(0.1, deadline - time.monotonic()))
    return _cell_processes(marker)


@needs_ray
def test_stopping_early_cancels_the_rest(tmp_path, faults, ray_cluster):
    marker = f"marker-{tmp_path.name}"          # identifies this test's cell processes
    faults(cell=f"*/F16/footprint=error;{marker}=error;*=hang")
    from qbench.run.ray_executor import RayExecutor
    suite, ctx, store = make_suite(tmp_path)
    cells = expand(suite, ctx)
    items = [WorkItem(c, job_for(c, suite, ctx), store.log_path(c.key), 3600, 0) for c in cells]
    gen = RayExecutor().run(items)
    try:
        item, outcome = next(gen)      # the first cell fails at once; the next ones hang
        assert item.cell.id.endswith("/F16/footprint") and outcome.status == "failed"
        assert _wait_for_cell(marker), "a hanging cell should be running"
    finally:
        gen.close()                    # the consumer stops (e.g. Ctrl-C): the rest is cancelled
    left = _wait_all_gone(marker)
    for p in left:
        p.kill()
    assert left == [], "cancelled cells must not leave processes behind"
    assert ray_cluster.is_initialized()


# --- the cancel's interrupt, wherever it lands in the task (no Ray needed) -----------------


def _interrupt_main() -> None:
    """What Ray's cancel(force=False) does in the task's worker process."""
    import _thread
    _thread.interrupt_main()


def _hang_job() -> Job:
    return Job(cell={"id": "m/llama.cpp/F16/speed", "key": "k"}, base_dir=".", cache_dir=".")


def test_cancel_between_spawn_and_wait_kills_the_cell(monkeypatch, tmp_path):
    """The leak behind a flaky test_stopping_early_cancels_the_rest: an interrupt landing after
    the cell was spawned but before run_in_child's wait-and-kill block escaped and left the cell
    (own session; the Ray worker lives on) running for good. Here it lands exactly there."""
    import psutil

    import qbench.run.child as ex
    from qbench.run.ray_executor import run_cell_task
    monkeypatch.delenv("QBENCH_FAULT", raising=False)
    spawned: list[int] = []
    real_init = ex._Sampler.__init__

    def interrupted_init(self, pid: int, *args, **kwargs) -> None:
        spawned.append(pid)
        _interrupt_main()              # delivered at the next bytecode: still in the window
        real_init(self, pid, *args, **kwargs)

    monkeypatch.setattr(ex._Sampler, "__init__", interrupted_init)
    with pytest.raises(KeyboardInterrupt):
        run_cell_task(_hang_job().to_json(), 3600, 0, {"QBENCH_FAULT": "*=hang"})
    assert len(spawned) == 1
    try:
        proc = psutil.Process(spawned[0])
    except psutil.NoSuchProcess:
        proc = None                    # killed and reaped: the fix
    if proc is not None:
        alive = proc.status() != psutil.STATUS_ZOMBIE
        proc.kill()
        assert not alive, "the cancelled cell is still running"
    assert "QBENCH_FAULT" not in os.environ            # the task restored the environment


def test_cancel_while_waiting_kills_the_cell_tree(monkeypatch, tmp_path):
    """The common case: the interrupt lands while the task waits on a running cell that has a
    grandchild of its own; the whole tree goes, then the task ends with KeyboardInterrupt."""
    import psutil

    import qbench.run.child as ex
    from qbench.run.ray_executor import run_cell_task
    monkeypatch.delenv("QBENCH_FAULT", raising=False)
    marker = f"marker-{tmp_path.name}"
    seen: list = []

    def interrupt_when_running() -> None:
        procs = _wait_for_cell(marker)
        while procs and not any(p.children() for p in procs if p.is_running()):
            psutil.wait_procs(procs, timeout=0.2)        # until the grandchild is there
        seen.extend(procs)
        seen.extend(c for p in procs for c in p.children(recursive=True))
        _interrupt_main()

    waker = threading.Thread(target=interrupt_when_running, daemon=True)
    waker.start()
    with pytest.raises(KeyboardInterrupt):
        run_cell_task(_hang_job().to_json(), 3600, 0, {"QBENCH_FAULT": f"*=hang-tree;{marker}=error"})
    waker.join()
    assert len(seen) >= 2, "the cell and its grandchild should have been seen running"
    gone, alive = psutil.wait_procs(seen, timeout=PATIENCE_S)
    for p in alive:
        p.kill()
    assert alive == [], "the cell's process tree outlived the cancel"
    assert ex._Sampler.__init__ is not None and "QBENCH_FAULT" not in os.environ


def test_guard_is_inert_outside_the_main_thread():
    """Signal handlers exist only in the main thread: elsewhere the guard changes nothing."""
    import signal

    from qbench.run.ray_executor import _CancelGuard
    before = signal.getsignal(signal.SIGINT)
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with _CancelGuard() as guard:
                assert not guard._installed
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert errors == [] and signal.getsignal(signal.SIGINT) is before


def test_cancel_waits_then_force_cancels_what_still_runs():
    """Stopping early: a gentle cancel for all, a bounded wait for them to end, then a force
    cancel (kills the Ray worker; the cell dies by its parent-death signal) for the rest."""
    from qbench.run.ray_executor import CANCEL_GRACE_S, RayExecutor
    calls: list[tuple] = []

    class FakeRay:
        def cancel(self, ref, force=False, recursive=True):
            calls.append(("cancel", ref, force))

        def wait(self, refs, num_returns, timeout):
            calls.append(("wait", tuple(refs), num_returns, timeout))
            return ["a"], ["b", "c"]          # b and c did not end in time

    executor = object.__new__(RayExecutor)
    executor.ray = FakeRay()
    executor._cancel(["a", "b", "c"])
    assert calls == [("cancel", "a", False), ("cancel", "b", False), ("cancel", "c", False),
                     ("wait", ("a", "b", "c"), 3, CANCEL_GRACE_S),
                     ("cancel", "b", True), ("cancel", "c", True)]
