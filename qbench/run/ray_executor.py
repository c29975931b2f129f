"""`--executor ray`: run cells as Ray tasks, on a local machine's GPUs or on a Ray cluster.

Ray does the scheduling (qbench has no scheduler of its own): each work item becomes one task
that asks for the CPUs and GPUs its cell needs, so a node runs as many cells at once as its
GPUs allow. One cell per task, on purpose: the local executor's batching (a variant's cells in
one worker, one model load) would make a task hold its GPU for the whole variant and take
scheduling freedom away from Ray; with cells spread over a cluster the repeated load is the
price of that freedom (a task per variant is possible later: run_cells takes a list). Inside
the task the cell still runs in its own child process
(:func:`qbench.run.child.run_in_child`): a segfault, an OOM kill or a timeout of the cell is that
cell's outcome, exactly as with the local executor, and the Ray worker lives on. Outcomes come
back to the driver as plain dicts and are stored there, so results land in the same store as a
local run; the cell's log travels back with its outcome (a cluster node's disk is not ours).

A task that dies itself (its worker process or node is lost, Ray's memory monitor kills it, it
is cancelled) becomes a ``crashed`` or ``failed`` outcome with Ray's reason: no cell is lost.

Stopping early (Ctrl-C, or the consumer closes the generator) cancels the remaining tasks and
waits until they have ended, so no cell process outlives the run. Ray's ``cancel(force=False)``
arrives in the task as a simulated SIGINT (``_thread.interrupt_main``) at any bytecode of the
task, including the instant between the cell's spawn and the executor's wait: there the
KeyboardInterrupt used to escape with the cell, in its own session, still running (and the Ray
worker lived on, so the cell's parent-death signal never fired). :class:`_CancelGuard` takes
the interrupt instead: it kills the cell's process group, lets the executor see the death,
then raises. Tasks that have not ended ``CANCEL_GRACE_S`` after the cancel are force-cancelled
(their Ray worker is killed; the cell dies with it by its parent-death signal).

Resources per cell:

- GPUs: none when the suite's device is ``cpu`` or the variant has ``n_gpu_layers = 0``;
  otherwise ``num_gpus_per_cell`` (default 1; a fraction such as 0.5 lets two small cells
  share a GPU). With device ``auto`` a GPU is asked for only when the cluster has GPUs; with
  device ``cuda`` and no GPU in the cluster the cell fails at once instead of waiting forever.
  Ray sets CUDA_VISIBLE_DEVICES for the task, and the cell's child process inherits it.
- CPUs: the suite's ``threads`` (1 when 0), or ``num_cpus_per_cell``.

On a multi-node cluster every node needs qbench installed and the suite folder, data dir and
cache dir at the same paths as on the driver (a shared filesystem); variables named QBENCH_*,
HF_* and TRANSFORMERS_* of the driver (HF_TOKEN among them) reach each task through its
environment (Ray's ``runtime_env`` ``env_vars``), never as task arguments, which Ray keeps with
the task's description and shows wherever tasks are listed.

Security: Ray before 2.59 starts a local instance listening on every interface with no
authentication, so anyone who can reach the machine could submit code for the run's duration;
from 2.59 token authentication is on by default. ``import_ray`` refuses older versions.

Ray is an optional extra (``pip install 'qbench-llm[ray]'``); nothing imports it unless this
executor is chosen. ``QBENCH_RAY_FAULT="GLOB=KIND"`` (kinds exit, segfault, error, hang) makes
the Ray task itself of a matching cell misbehave, for tests; never set in normal use.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from types import FrameType, TracebackType
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbench.errors import QbenchError
from qbench.results.schema import Outcome
from qbench.run.faults import fault_for
from qbench.run.job import Job

if TYPE_CHECKING:  # pragma: no cover
    from qbench.run.executors import WorkItem

INSTALL_HINT = "--executor ray needs 'pip install qbench-llm[ray]'"
MIN_RAY = (2, 59)    # token authentication on by default (pyproject's ray extra: ray>=2.59)
LOG_LIMIT = 4 * 2**20                  # bytes of a cell's log sent back (head and tail kept)
ENV_PREFIXES = ("QBENCH_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_")
CANCEL_GRACE_S = 60.0                  # cancelled tasks that still run after this are killed
_OUTCOME_FIELDS = {f.name for f in dataclasses.fields(Outcome)}


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise QbenchError(INSTALL_HINT) from None
    if _version_tuple(getattr(ray, "__version__", "0")) < MIN_RAY:
        raise QbenchError(
            f"--executor ray needs ray >= {'.'.join(map(str, MIN_RAY))} (installed: "
            f"{getattr(ray, '__version__', '?')}): older versions start a local instance that "
            "listens on every interface without authentication. pip install -U "
            "'qbench-llm[ray]'")
    return ray


def _version_tuple(version: str) -> tuple[int, ...]:
    """'2.59.0rc1' -> (2, 59, 0); (0,) when it does not start with a number."""
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    return tuple(int(g) for g in m.groups() if g is not None) if m else (0,)


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's variables a task needs (faults, data/cache dirs, hub settings)."""
    environ = dict(os.environ) if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES)}


def gpus_for(job: Job, num_gpus_per_cell: float, cluster_gpus: float) -> float:
    """GPUs to ask Ray for: see the module docstring."""
    device = job.device
    if device == "cpu" or job.variant.get("n_gpu_layers", -1) == 0:
        return 0.0
    want = num_gpus_per_cell if num_gpus_per_cell > 0 else 1.0
    if device == "cuda":
        return want
    return want if cluster_gpus > 0 else 0.0


def cpus_for(job: Job, num_cpus_per_cell: float | None) -> float:
    if num_cpus_per_cell is not None:
        return num_cpus_per_cell
    threads = int(job.threads or 0)
    return float(threads) if threads > 0 else 1.0


def outcome_to_dict(outcome: Outcome) -> dict[str, Any]:
    return dataclasses.asdict(outcome)


def outcome_from_dict(data: dict[str, Any]) -> Outcome:
    return Outcome(**{k: v for k, v in data.items() if k in _OUTCOME_FIELDS})


def _first_lines(text: str, n: int = 3, limit: int = 600) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[:n])[:limit]


def outcome_from_ray_error(exc: BaseException, ray: Any) -> Outcome:
    """The outcome of a cell whose Ray task did not return: crashed (the process or node
    running it was lost) or failed (it raised, was cancelled, or could not be scheduled)."""
    ex = ray.exceptions

    def kinds(*names: str) -> tuple[type, ...]:
        return tuple(c for c in (getattr(ex, n, None) for n in names) if isinstance(c, type))

    reason = _first_lines(str(exc)) or type(exc).__name__
    if isinstance(exc, kinds("OutOfMemoryError")):
        return Outcome(status="crashed", signal="SIGKILL", error=(
            "the Ray task was killed by Ray's memory monitor: its node ran out of memory "
            f"({reason})"))
    if isinstance(exc, kinds("TaskCancelledError")):
        return Outcome(status="failed", error=f"the Ray task was cancelled ({reason})")
    if isinstance(exc, kinds("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError",
                             "ObjectLostError", "RaySystemError")):
        return Outcome(status="crashed", error=(
            f"the Ray task running this cell died ({type(exc).__name__}): {reason}"))
    if isinstance(exc, kinds("RayTaskError")):
        cause = getattr(exc, "cause", None)
        what = f"{type(cause).__name__}: {cause}" if cause is not None else reason
        return Outcome(status="failed", error=f"the Ray task raised {what}"[:2000],
                       stderr_tail=str(exc)[-3000:] or None)
    return Outcome(status="failed", error=f"Ray could not run this cell: "
                                          f"{type(exc).__name__}: {reason}")


def _read_log(path: Path, limit: int = LOG_LIMIT) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    if len(data) > limit:
        half = limit // 2
        data = data[:half] + b"\n[... qbench: log cut in the middle ...]\n" + data[-half:]
    return data.decode("utf-8", "replace")


def _task_fault(cell_id: str, spec: str | None) -> None:
    """QBENCH_RAY_FAULT: misbehave in the Ray task itself (tests only)."""
    kind = fault_for(cell_id, spec or "")
    if kind is None:
        return
    print(f"qbench: injecting fault '{kind}' into the Ray task of {cell_id}", file=sys.stderr,
          flush=True)
    if kind == "exit":
        os._exit(3)
    if kind == "segfault":
        ctypes.string_at(0)
    if kind == "error":
        raise RuntimeError("injected Ray task error")
    if kind in ("hang", "hang-tree"):
        time.sleep(10**6)


def _kill_process_groups(pids: set[int]) -> None:
    """SIGKILL the process group of each pid (a cell leads its own session), else the pid."""
    for pid in pids:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class _CancelGuard:
    """Turns Ray's cancel (a simulated SIGINT in the task's main thread) into "kill the cell's
    process tree, then raise KeyboardInterrupt", wherever in the task it lands.

    Without it, an interrupt landing after the cell was spawned but before the executor's
    wait-and-kill block escaped and left the cell running for good. With it: if cell processes
    (children spawned inside the guard) exist, their groups are killed and the executor's wait
    returns; KeyboardInterrupt is raised when the guarded block ends. If none exists yet, the
    interrupt is raised at once (nothing can leak: the spawn has not happened). Outside the main
    thread (no signal handlers there) the guard does nothing."""

    def __init__(self) -> None:
        self.cancelled = False
        self._previous: Any = None
        self._installed = False
        self._before: set[int] = set()

    def _children(self) -> set[int]:
        import psutil
        try:
            return {p.pid for p in psutil.Process().children(recursive=False)}
        except psutil.Error:
            return set()

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        first = not self.cancelled
        self.cancelled = True
        cells = self._children() - self._before
        _kill_process_groups(cells)
        if first and not cells:
            raise KeyboardInterrupt

    def __enter__(self) -> _CancelGuard:
        if threading.current_thread() is threading.main_thread():
            self._before = self._children()
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
            self._installed = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        if self.cancelled and exc_type is None:
            raise KeyboardInterrupt


def run_cell_task(job_json: str, timeout_s: float, memory_limit_mb: int,
                  env: dict[str, str] | None = None) -> dict[str, Any]:
    """The body of each Ray task (runs in a Ray worker process): one cell in a child process.

    Returns plain data: ``outcome`` (Outcome as a dict), ``log`` (the cell's log text) and where
    it ran. The executor passes the driver's variables through the task's environment (its
    runtime_env); ``env``, for a direct call, is set for the child and restored afterwards."""
    from qbench.run.child import run_in_child

    env = env or {}
    job = Job.from_json(job_json)   # plain JSON across the cluster, read strictly
    _task_fault(job.cell_id, env.get("QBENCH_RAY_FAULT", os.environ.get("QBENCH_RAY_FAULT")))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory(prefix="qbench-ray-") as tmp:
            log_path = Path(tmp) / "cell.log"
            with _CancelGuard():   # a cancel kills the cell's tree, wherever it lands
                outcome = run_in_child(job, log_path=log_path, timeout_s=timeout_s,
                                       memory_limit_mb=memory_limit_mb)
            log_text = _read_log(log_path)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    data = outcome_to_dict(outcome)
    # the runner stores result["timings"] over its own: the true start of a cell that may have
    # queued for a GPU (`qbench merge` keeps the newer record by it)
    data["result"] = {**data["result"],
                      "timings": {**(data["result"].get("timings") or {}), "started": started}}
    try:
        import ray
        node, gpu_ids = ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - informative only
        node, gpu_ids = "", []
    return {"outcome": data, "log": log_text, "node": node, "gpu_ids": gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class RayExecutor:
    """Runs work items as Ray tasks; yields each outcome as its task finishes (any order).

    ``address``: a Ray cluster ("auto", "ray://host:10001", ...); None starts a local Ray
    instance for the run unless $RAY_ADDRESS names one or Ray is already initialised (then it
    is used and left running). ``num_gpus_per_cell``: GPUs per GPU cell (0: 1). ``max_retries``:
    Ray's retries of a task whose worker died (default 0: a lost task is a crashed cell, rerun
    with --rerun-failed)."""

    name = "ray"

    def __init__(self, address: str | None = None, num_gpus_per_cell: float = 0, *,
                 num_cpus_per_cell: float | None = None, max_retries: int = 0,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        if num_gpus_per_cell < 0:
            raise QbenchError(f"expected GPUs per cell >= 0, got {num_gpus_per_cell}",
                              key="--gpus-per-cell")
        if num_cpus_per_cell is not None and num_cpus_per_cell <= 0:
            raise QbenchError(f"expected CPUs per cell > 0, got {num_cpus_per_cell}")
        self.ray = import_ray()
        self.address = address
        self.num_gpus_per_cell = float(num_gpus_per_cell)
        self.num_cpus_per_cell = num_cpus_per_cell
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})
        self.placements: dict[str, dict[str, Any]] = {}   # cell key -> node, GPUs (last run)

    def _connect(self) -> bool:
        """Initialise Ray if needed; True when this executor started it (and so stops it)."""
        ray = self.ray
        if ray.is_initialized():
            return False
        kwargs = dict(self.init_kwargs)
        if self.address is None and not os.environ.get("RAY_ADDRESS"):
            kwargs.setdefault("include_dashboard", False)
        try:
            ray.init(address=self.address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = self.address or os.environ.get("RAY_ADDRESS") or "a local Ray instance"
            raise QbenchError(f"cannot start or reach {where}: {exc}", key="--executor ray"
                              ) from None
        return True

    def run(self, items: list[WorkItem]) -> Iterator[tuple[WorkItem, Outcome]]:
        if not items:
            return
        ray = self.ray
        started_here = self._connect()
        pending: list[Any] = []
        try:
            cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
            task = ray.remote(run_cell_task)
            # the driver's variables (HF_TOKEN among them) in the task's environment: task
            # arguments are kept with the task's description and listed by Ray's tools
            runtime_env = {"env_vars": forwarded_env()}
            by_ref: dict[Any, WorkItem] = {}
            refused: list[tuple[WorkItem, Outcome]] = []
            for item in items:
                gpus = gpus_for(item.job, self.num_gpus_per_cell, cluster_gpus)
                if gpus > 0 and cluster_gpus == 0:
                    refused.append((item, Outcome(status="failed", error=(
                        "device = 'cuda' but the Ray cluster has no GPU: nothing could ever "
                        "run this cell"))))
                    continue
                ref = task.options(
                    name=f"qbench:{item.cell.id}"[:200], num_cpus=cpus_for(
                        item.job, self.num_cpus_per_cell),
                    num_gpus=gpus, max_retries=self.max_retries, retry_exceptions=False,
                    runtime_env=runtime_env,
                ).remote(item.job.to_json(), item.timeout_s, item.memory_limit_mb)
                by_ref[ref] = item
            pending = list(by_ref)
            for item, outcome in refused:
                yield item, outcome
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    item = by_ref.pop(ref)
                    yield item, self._collect(ref, item)
        finally:
            if pending:           # stopped early: no cell may outlive the run
                self._cancel(pending)
            if started_here:
                ray.shutdown()

    def _cancel(self, refs: list[Any], grace_s: float = CANCEL_GRACE_S) -> None:
        """Cancel ``refs`` and wait until they have ended: gently first (the task kills its
        cell's process tree and cleans up), then by killing the Ray workers of the tasks still
        running after ``grace_s`` (their cells die by their parent-death signal)."""
        ray = self.ray
        for ref in refs:
            try:
                ray.cancel(ref, force=False, recursive=True)
            except Exception:  # noqa: BLE001 - already finished or unknown: nothing to stop
                pass
        try:
            _, stuck = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        except Exception:  # noqa: BLE001 - Ray going down: escalate for all
            stuck = refs
        for ref in stuck:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass

    def _collect(self, ref: Any, item: WorkItem) -> Outcome:
        ray = self.ray
        try:
            data = ray.get(ref)
        except ray.exceptions.RayError as exc:
            outcome = outcome_from_ray_error(exc, ray)
            _write_log(item.log_path, f"qbench: the Ray task for {item.cell.id} did not return:\n"
                                      f"{exc}\n")
            return outcome
        self.placements[item.cell.key] = {"node": data.get("node"),
                                          "gpu_ids": data.get("gpu_ids", [])}
        _write_log(item.log_path, data.get("log", ""))
        return outcome_from_dict(data["outcome"])


def _write_log(path: Path, text: str) -> None:
    from qbench.host.fsutil import atomic_write_text

    try:
        atomic_write_text(path, text)
    except (OSError, QbenchError):
        pass   # a log is evidence, not a result: never lose the outcome over it
