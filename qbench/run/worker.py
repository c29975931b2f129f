"""The cell process: ``python -m qbench.run.worker JOB.json RESULT.json``.

It builds (or finds in the cache) the variant's file, loads the backend, runs one metric and
writes a JSON result. A crash here (segfault, OOM kill, hang) takes down only this process; the
executor records it as the cell's outcome.
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
from pathlib import Path
from typing import Any

from qbench.backends import backend_function, backend_module
from qbench.backends.base import LoadOptions
from qbench.errors import MissingExtraError, NotApplicable, QbenchError
from qbench.host.fsutil import atomic_write_text
from qbench.inputs.sources import resolve, sha256_file
from qbench.metrics import metric_module
from qbench.metrics.context import CellContext
from qbench.options import from_table
from qbench.quantize.request import Prepared, PrepareRequest
from qbench.run.faults import inject
from qbench.run.job import Job


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
              needs_base: bool) -> tuple[Path | None, dict[str, Any] | None, bool]:
    """The base variant's file for a metric that compares with it, or for the companions this
    cell serves: (path, artifact with how the base runs, companions still on)."""
    if job.base_variant is None or not (needs_base or job.companions):
        return None, None, bool(job.companions)
    if job.variant["is_base"]:
        path, artifact = variant_path, variant_artifact
    else:
        try:
            path, artifact = prepare_artifact(req.for_variant(job.base_variant))
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


def execute(job: Job) -> dict[str, Any]:
    """Prepare the variant (and the base where needed), run the metric, return its result."""
    cache_dir = Path(job.cache_dir)
    base_dir = Path(job.base_dir)
    data_dir = Path(job.data_dir) if job.data_dir else None
    threads = int(job.threads or 0)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = resolve(job.model["source"], base_dir=base_dir, cache_dir=cache_dir)
    model_sha = sha256_file(source.path, cache_dir)
    req = PrepareRequest(variant=job.variant, model=job.model, model_file=source.path,
                         model_sha=model_sha, base_dir=base_dir, data_dir=data_dir,
                         cache_dir=cache_dir, threads=threads)
    path, artifact = prepare_artifact(req)
    artifact["model_source"] = {"ref": source.origin, "path": str(source.path),
                                "sha256": model_sha, "revision": source.revision}
    module = metric_module(job.metric)
    base_path, base_artifact, serving = _base_for(job, req, path, artifact,
                                                  module.INFO.needs_base)
    timings["prepare_s"] = round(time.perf_counter() - t0, 3)

    def loader(v: dict[str, Any], p: Path) -> Any:
        def load() -> Any:
            backend_mod = backend_module(v["backend"])
            t = time.perf_counter()
            extra = {"kv_cache": v["kv_cache"]} if v.get("kv_cache") else {}
            backend = backend_mod.load(p, LoadOptions(
                device=job.device, threads=threads, n_batch=v["batch"],
                n_ubatch=v["ubatch"], n_gpu_layers=v["n_gpu_layers"], extra=extra))
            timings.setdefault("load_s", round(time.perf_counter() - t, 3))
            return backend
        return load

    ctx = CellContext(cell_id=job.cell_id, model_id=job.model["id"], artifact_path=path,
                      artifact=artifact, base_dir=base_dir, data_dir=data_dir,
                      cache_dir=cache_dir, is_base=job.variant["is_base"],
                      base_artifact=base_artifact, _load=loader(job.variant, path),
                      _load_base=(loader(job.base_variant, base_path)
                                  if base_path is not None and job.base_variant else None),
                      companions=job.companions if serving else {}, cell_key=job.key,
                      backend_name=job.variant["backend"])
    t1 = time.perf_counter()
    try:
        out = module.run(ctx, metric_options(job))
        backend_info = ctx._backend.describe() if ctx._backend is not None else {}
    finally:
        ctx.close()
    timings["metric_s"] = round(time.perf_counter() - t1, 3)
    return {"status": "ok", "values": out.get("values", {}), "details": out.get("details", {}),
            "artifact": artifact, "backend": backend_info, "timings": timings}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _torch_max_allocated_mb() -> float | None:
    """Peak memory torch allocated on all CUDA devices in this cell (MiB), failed cells too
    (an OOM's peak is evidence). None when torch was never imported or never touched CUDA:
    importing torch just to ask would cost a GGUF cell seconds."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        if not cuda.is_available() or not cuda.is_initialized():
            return None
        return sum(cuda.max_memory_allocated(i) for i in range(cuda.device_count())) / 2**20
    except Exception:  # noqa: BLE001 - a broken CUDA runtime must not cost the result
        return None


def _die_with_parent(parent: int) -> None:
    """End this cell (and its own children) if `qbench run` dies: no orphan keeps computing.

    PR_SET_PDEATHSIG covers this process; the watcher thread covers its process group
    (llama-quantize, llama-imatrix) and the window before prctl took effect."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                try:
                    os.killpg(0, signal.SIGKILL)
                finally:
                    os._exit(137)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="qbench-parent-watch").start()


def _limit_memory(limit_mb: int) -> None:
    """Cap this cell's address space (set here, not in a preexec_fn: the parent has threads)."""
    if limit_mb > 0:
        limit = limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_path, result_path = Path(argv[0]), Path(argv[1])
    faulthandler.enable()  # a segfault prints the Python stack into the cell log
    job = Job.from_json(job_path.read_text())
    if job.parent_pid:
        _die_with_parent(int(job.parent_pid))
    _limit_memory(int(job.memory_limit_mb or 0))
    print(f"qbench cell {job.cell_id} key {job.key}", file=sys.stderr, flush=True)
    try:
        inject(job.cell_id)
        result = execute(job)
    except NotApplicable as exc:  # permanent: a rerun would say the same
        result = {"status": "skipped", "error": str(exc), "details": {"not_applicable": True}}
    except MissingExtraError as exc:  # retried next run: the extra may be installed by then
        result = {"status": "skipped", "error": str(exc)}
    except MemoryError:
        result = {"status": "failed", "error": "out of memory (MemoryError in the cell)"}
    except QbenchError as exc:
        result = {"status": "failed", "error": str(exc)}
    except Exception as exc:  # any other failure is this cell's outcome, not the run's
        tb = traceback.format_exc(limit=-8)
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": tb}
        print(tb, file=sys.stderr)
    result["peak_rss_self_mb"] = _peak_rss_mb()
    if (torch_peak := _torch_max_allocated_mb()) is not None:
        result["torch_max_allocated_mb"] = round(torch_peak, 1)
    atomic_write_text(result_path, json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
