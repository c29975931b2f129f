"""The worker process: ``python -m qbench.run.worker --cells SPEC.json`` (or, for one cell,
``JOB.json RESULT.json``).

It runs the cells it is given (the executor gives it the cells of one variant) one after the
other: builds (or finds in the cache) the variant's file and loads the backend once, for the
first cell that needs them (qbench.run.session), runs each cell's metric and writes each cell's
JSON result the moment it is done. Each cell writes into its own log; its start and end are
announced to the executor (qbench.run.control), which times it and measures its memory. A crash
here (segfault, OOM kill, hang) takes down only this process: the executor records it as the
outcome of the cell in flight and runs the cells after it in a fresh worker.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qbench.backends import backend_function, backend_module
from qbench.backends.base import LoadOptions
from qbench.errors import MissingExtraError, NotApplicable, QbenchError
from qbench.host.cache import built_here
from qbench.host import machine_lock
from qbench.host.fsutil import atomic_write_text, open_fresh
from qbench.inputs.sources import resolve, sha256_file
from qbench.metrics import metric_module
from qbench.metrics.context import CellContext
from qbench.options import from_table
from qbench.quantize.request import Prepared, PrepareRequest
from qbench.run import peak
from qbench.run.control import WorkerEnd
from qbench.run.faults import inject
from qbench.run.job import Job
from qbench.run.session import Borrowed, Session, close_session, held, session_for
from qbench.suite.config import variant_from_dict


def metric_options(job: Job) -> Any:
    """The metric's Options from the job, as strictly as the suite parser reads them: a key
    the metric does not know is an error, never silently dropped."""
    cls = metric_module(job.metric).Options
    return from_table(cls, job.cell["options"], file=f"job of cell {job.cell_id}",
                      key=f"metrics.{job.metric}")


def prepare_artifact(req: PrepareRequest) -> Prepared:
    """The variant's model file, made (or found in the cache) by its backend's ``prepare``.
    The backend is imported first: a missing inference library skips the cell with the extra
    that installs it, before anything is built."""
    backend = req.variant["backend"]
    backend_module(backend)
    prepare = backend_function(backend, "prepare")
    if prepare is None:  # pragma: no cover - BackendInfo.prepare is required
        raise QbenchError(f"backend {backend!r} cannot prepare variants")
    return prepare(req)


def _base_for(job: Job, req: PrepareRequest, variant_path: Path, variant_artifact: dict[str, Any],
              needs_base: bool, session: Session
              ) -> tuple[Path | None, dict[str, Any] | None, bool]:
    """The base variant's file for a metric that compares with it, or for the companions this
    cell serves: (path, artifact with how the base runs, companions still on)."""
    if job.base_variant is None or not (needs_base or job.companions):
        return None, None, bool(job.companions)
    if job.variant["is_base"]:
        path, artifact = variant_path, variant_artifact
    else:
        try:
            path, artifact = session.once(
                "base", lambda: prepare_artifact(req.for_variant(job.base_variant)))
        except Exception as exc:
            if needs_base:
                if not isinstance(exc, QbenchError):
                    raise
                raise QbenchError(
                    f"the base variant {job.base_variant['quant']} could not be prepared, so "
                    f"there is nothing to compare with: {exc}") from None
            # only the shared KLD work wanted it: never fail this cell for it
            print(f"shared KLD pass off: the base could not be prepared ({exc})",
                  file=sys.stderr)
            return None, None, False
    bv = job.base_variant
    # how the base runs is part of its cached distributions
    runtime = {"device": job.run_device, "batch": bv.get("batch"), "ubatch": bv.get("ubatch"),
               "n_gpu_layers": bv.get("n_gpu_layers")}
    return path, dict(artifact) | {"runtime": runtime}, bool(job.companions)


def _variant_identity(job: Job) -> dict[str, Any]:
    """What a session is kept for: the same model, variant and base, run the same way."""
    return {"model": job.model, "variant": job.variant, "base": job.base_variant,
            "device": job.device, "threads": job.threads, "cache_dir": job.cache_dir,
            "base_dir": job.base_dir, "data_dir": job.data_dir}


def _prepare(job: Job) -> tuple[PrepareRequest, Path, dict[str, Any]]:
    """The variant's file (made or found in the cache) and the request that made it."""
    cache_dir = Path(job.cache_dir)
    base_dir = Path(job.base_dir)
    source = resolve(job.model["source"], base_dir=base_dir, cache_dir=cache_dir)
    model_sha = sha256_file(source.path, cache_dir)
    req = PrepareRequest(variant=job.variant, model=job.model, model_file=source.path,
                         model_sha=model_sha, base_dir=base_dir,
                         data_dir=Path(job.data_dir) if job.data_dir else None,
                         cache_dir=cache_dir, threads=int(job.threads or 0))
    path, artifact = prepare_artifact(req)
    artifact["model_source"] = {"ref": source.origin, "path": str(source.path),
                                "sha256": model_sha, "revision": source.revision}
    return req, path, artifact


def execute(job: Job) -> dict[str, Any]:
    """Prepare the variant (and the base where needed), run the metric, return its result.

    What is prepared and loaded is kept in this process's session (qbench.run.session) for
    the variant's next cells: ``timings`` has ``load_s`` only in the cell that loaded."""
    session = session_for(_variant_identity(job))
    cache_dir = Path(job.cache_dir)
    base_dir = Path(job.base_dir)
    data_dir = Path(job.data_dir) if job.data_dir else None
    threads = int(job.threads or 0)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    req, path, artifact = session.once("variant", lambda: _prepare(job))
    module = metric_module(job.metric)
    base_path, base_artifact, serving = _base_for(job, req, path, artifact,
                                                  module.INFO.needs_base, session)
    timings["prepare_s"] = round(time.perf_counter() - t0, 3)

    def loader(name: str, v: dict[str, Any], p: Path) -> Callable[[], Any]:
        def load() -> Any:
            backend_mod = backend_module(v["backend"])
            t = time.perf_counter()
            spec = variant_from_dict(v, where=f"job of cell {job.cell_id}")
            backend = backend_mod.load(p, LoadOptions(
                device=job.device, threads=threads, n_batch=spec.batch,
                n_ubatch=spec.ubatch, n_gpu_layers=spec.n_gpu_layers,
                kv_cache=spec.kv_cache))
            timings.setdefault("load_s" if name == "variant" else "base_load_s",
                               round(time.perf_counter() - t, 3))
            return backend
        return lambda: session.loaded(name, load)

    load_base = (loader("base", job.base_variant, base_path)
                 if base_path is not None and job.base_variant else None)
    ctx = CellContext(cell_id=job.cell_id, model_id=job.model["id"], artifact_path=path,
                      artifact=artifact, base_dir=base_dir, data_dir=data_dir,
                      cache_dir=cache_dir, is_base=job.variant["is_base"],
                      base_artifact=base_artifact, _load=loader("variant", job.variant, path),
                      _load_base=(lambda: Borrowed(load_base())) if load_base else None,
                      companions=job.companions if serving else {}, cell_key=job.key,
                      backend_name=job.variant["backend"], shared_backend=True,
                      reuse=job.reuse)
    t1 = time.perf_counter()
    try:
        out = module.run(ctx, metric_options(job))
        backend_info = ctx._backend.describe() if ctx._backend is not None else {}
    finally:
        ctx.close()
        session.end_cell()
    timings["metric_s"] = round(time.perf_counter() - t1, 3)
    return {"status": "ok", "values": out.get("values", {}), "details": out.get("details", {}),
            "artifact": artifact, "backend": backend_info, "timings": timings,
            **({"fitness": out["fitness"]} if out.get("fitness") is not None else {})}


def _end_tree(code: int = 137) -> None:
    """Kill everything this process started, then this process: its descendants (found by
    walking the tree, so one that left the group dies too), then its process group when it
    leads one (a worker leads its own session: llama-quantize, llama-imatrix, a tools build are
    in it). Never returns."""
    try:
        import psutil
        for proc in psutil.Process().children(recursive=True):
            try:
                proc.kill()
            except psutil.Error:
                pass
    except Exception:  # noqa: BLE001 - the group kill below still covers the usual case
        pass
    try:
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(code)


def _on_parent_death(signum: int, frame: Any) -> None:
    _end_tree(128 + signum)


def _die_with_parent(parent: int) -> None:
    """End this cell and everything it started if `qbench run` dies, however it dies (kill -9
    included): no orphan keeps the cores or the GPU while a rerun times its speed cells.

    PR_SET_PDEATHSIG delivers SIGTERM here when the parent dies; the handler kills the tree
    (:func:`_end_tree`). Not SIGKILL: that ended this process at once, before anything could
    reach its children, and they ran on as orphans. The watcher thread covers the window before
    prctl took effect and a main thread that cannot run the handler (a long C call)."""
    import psutil  # noqa: F401 - imported now, not inside the signal handler

    signal.signal(signal.SIGTERM, _on_parent_death)
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                _end_tree()
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="qbench-parent-watch").start()


def _limit_memory(limit_mb: int) -> None:
    """Cap this cell's address space (set here, not in a preexec_fn: the parent has threads)."""
    if limit_mb > 0:
        limit = limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _lock_mode(job: Job) -> machine_lock.Mode:
    """How a cell holds the machine lock: a hardware-bound (timed) cell alone on the machine,
    every other cell beside other untimed work (qbench.host.machine_lock)."""
    try:
        bound = bool(getattr(metric_module(job.metric).INFO, "hardware_bound", False))
    except Exception:  # noqa: BLE001 - an unknown metric fails in the cell itself, with why
        bound = False
    return "exclusive" if bound else "shared"


def _note_lock(result: dict[str, Any], lock: machine_lock.Hold) -> None:
    """The lock's hold into the result (record["lock"]); a timed cell that ran without it
    (the wait's bound passed) is unfit whatever its metric said."""
    result["lock"] = lock.as_record()
    if lock.mode == "exclusive" and not lock.acquired and result.get("status") == "ok":
        fitness = result.setdefault("fitness", {"reliable": True, "reasons": [], "rounds": 0,
                                                "windows": []})
        fitness["reliable"] = False
        why = (f"its file could not be opened ({lock.error})" if lock.error else
               f"after waiting {lock.waited_s:.0f} s (QBENCH_LOCK_WAIT_S)")
        fitness["reasons"] = [*fitness.get("reasons", []),
                              f"ran without the machine lock, {why}: other qbench work may "
                              "have run beside it"]


def measure(job: Job, *, position: int = 0) -> tuple[dict[str, Any], bool]:
    """Run one cell in this process: (its result, whether this process may run another).

    A failure qbench understands (a QbenchError: a missing file, a refused option; a skip)
    leaves the process as it was. Anything else (a MemoryError, an unexpected exception in a
    library) may have left it half-broken, so the worker stops after writing this result and
    the variant's next cells go on in a fresh process: the isolation a process per cell gave.
    So does a cell that built the variant's file (a cache miss): the build's leftover heap
    would otherwise count in the next cells' memory."""
    session_held = held()
    builds_before = len(built_here())
    exact = position > 0 and peak.reset_peak_rss()
    if position > 0:
        peak.reset_torch_peak()
    print(f"qbench cell {job.cell_id} key {job.key}", file=sys.stderr, flush=True)
    fit = True
    try:
        mode, wait_s = _lock_mode(job), machine_lock.max_wait_s()
    except ValueError as exc:
        return {"status": "failed", "error": str(exc)}, True
    with machine_lock.hold(Path(job.cache_dir), mode, wait_s=wait_s,
                           on_wait=lambda: print(f"qbench: waiting for the machine lock "
                                                 f"({mode})", file=sys.stderr,
                                                 flush=True)) as lock:
        try:
            inject(job.cell_id)
            result = execute(job)
        except NotApplicable as exc:  # permanent: a rerun would say the same
            result = {"status": "skipped", "error": str(exc),
                      "details": {"not_applicable": True}}
        except MissingExtraError as exc:  # retried next run: the extra may be installed by then
            result = {"status": "skipped", "error": str(exc)}
        except MemoryError:
            result = {"status": "failed", "error": "out of memory (MemoryError in the cell)"}
            fit = False
        except QbenchError as exc:
            result = {"status": "failed", "error": str(exc)}
        except Exception as exc:  # any other failure is this cell's outcome, not the run's
            tb = traceback.format_exc(limit=-8)
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                      "traceback": tb}
            print(tb, file=sys.stderr)
            fit = False
    _note_lock(result, lock)
    # the kernel's peak: over the process for its first cell, since the reset for a later one
    if (self_peak := peak.peak_rss_mb(since_reset=exact) if position == 0 or exact
            else None) is not None:
        result["peak_rss_self_mb"] = self_peak
    if (torch_peak := peak.torch_max_allocated_mb()) is not None:
        result["torch_max_allocated_mb"] = round(torch_peak, 1)
    result["held"] = session_held
    if fit and (built := built_here()[builds_before:]):
        # an AWQ/GPTQ build or an HF conversion leaves hundreds of MiB of heap behind (measured:
        # 1,167 MiB held at the next cell's start against 467 for a fresh process); the next
        # cells' memory windows, the speed cell's above all, must not carry it
        print(f"qbench: this cell built {', '.join(built)}; the variant's next cells run in a "
              "fresh process, so their memory is their own", file=sys.stderr)
        fit = False
    sys.stdout.flush()
    sys.stderr.flush()
    return result, fit


def _switch_log(path: Path) -> None:
    """Send this process's stdout and stderr (Python's, the C libraries', faulthandler's) to
    ``path``, the next cell's own log. Subprocesses a cell started keep the log they had."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        import ctypes
        ctypes.CDLL(None).fflush(None)   # C stdio buffers (llama.cpp prints through them)
    except (OSError, AttributeError):
        pass
    fd = open_fresh(path)     # a new file: never truncate what a link points at
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def _start(job: Job) -> None:
    """What every worker does once: crash reports into the log, end with the parent, cap."""
    faulthandler.enable()  # a segfault prints the Python stack into the cell log
    if job.parent_pid:
        _die_with_parent(int(job.parent_pid))
    _limit_memory(int(job.memory_limit_mb or 0))


def run_cells(spec: dict[str, Any]) -> None:
    """The cells in ``spec`` (written by qbench.run.child) one after the other, each into its
    own log and result file, each announced on the boundary channel (qbench.run.control)."""
    cells = spec["cells"]
    jobs = [Job.from_json(c["job"]) for c in cells]
    channel = WorkerEnd(int(spec["events_fd"]), int(spec["ack_fd"]))
    _start(jobs[0])
    try:
        for i, (cell, job) in enumerate(zip(cells, jobs)):
            if i > 0:
                _switch_log(Path(cell["log"]))
            channel.begin(i)
            result, fit = measure(job, position=i)
            atomic_write_text(Path(cell["result"]), json.dumps(result, default=str))
            channel.end(i)
            if not fit:
                break
    finally:
        close_session()


def main(argv: list[str] | None = None) -> int:
    """``--cells SPEC.json`` (the executor's form), or ``JOB.json RESULT.json`` (one cell)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "--cells":
        run_cells(json.loads(Path(argv[1]).read_text()))
        return 0
    job_path, result_path = Path(argv[0]), Path(argv[1])
    job = Job.from_json(job_path.read_text())
    _start(job)
    try:
        result, _ = measure(job)
        atomic_write_text(result_path, json.dumps(result, default=str))
    finally:
        close_session()        # after the result: a crash on the way out costs it nothing
    return 0


if __name__ == "__main__":
    sys.exit(main())
