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

from qbench.backends import BACKENDS, backend_module
from qbench.backends.base import LoadOptions
from qbench.errors import MissingExtraError, NotApplicable, QbenchError
from qbench.run.faults import inject
from qbench.host.fsutil import atomic_write_text
from qbench.metrics import metric_module
from qbench.metrics.context import CellContext
from qbench.inputs.sources import resolve, sha256_file


def _options(metric: str, raw: dict[str, Any]) -> Any:
    cls = metric_module(metric).Options
    fields = cls.__dataclass_fields__
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()
                  if k in fields})


def _import_backend(name: str) -> Any:
    info = BACKENDS[name]
    try:
        return backend_module(name)
    except ImportError as exc:
        raise MissingExtraError(info.distribution, info.extra,
                                f"the {name} backend ({exc})") from None


def prepare_artifact(job: dict[str, Any], variant: dict[str, Any], model_file: Path,
                     model_sha: str, cache_dir: Path, threads: int
                     ) -> tuple[Path, dict[str, Any]]:
    """The variant's model file: a pre-quantized source as is, else built from the model."""
    if variant["backend"] == "transformers":
        _import_backend("transformers")
        from qbench.quantize.hf import prepare
        return prepare(job, variant, model_file, model_sha, cache_dir, threads)
    model = job["cell"]["model"]
    base_dir = Path(job["base_dir"])
    if variant["source"]:
        res = resolve(variant["source"], base_dir=base_dir, cache_dir=cache_dir)
        from qbench.quantize.gguf import inspect_gguf
        inspect_gguf(res.path, cache_dir)
        return res.path, {"path": str(res.path), "sha256": sha256_file(res.path, cache_dir),
                          "size_bytes": res.path.stat().st_size,
                          "recipe": {"tool": "none (pre-quantized source)",
                                     "source": variant["source"], "revision": res.revision}}
    if variant["backend"] == "llama.cpp":
        _import_backend("llama.cpp")
        from qbench.quantize.gguf import build_variant
        imatrix_path, imatrix_sha = None, ""
        if variant["imatrix"]:
            from qbench.quantize.imatrix import build_imatrix
            imatrix_path, imatrix_sha = build_imatrix(job, model_file, model_sha, cache_dir,
                                                      threads)
        art = build_variant(model_file, model_sha, variant["quant"], model["base"],
                            cache_dir=cache_dir, threads=threads, imatrix_path=imatrix_path,
                            imatrix_sha=imatrix_sha)
        return art.path, art.describe()
    raise QbenchError(f"backend {variant['backend']!r} cannot build variants")


def execute(job: dict[str, Any]) -> dict[str, Any]:
    cell = job["cell"]
    metric = cell["metric"]
    cache_dir = Path(job["cache_dir"])
    base_dir = Path(job["base_dir"])
    data_dir = Path(job["data_dir"]) if job.get("data_dir") else None
    threads = int(job.get("threads") or 0)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = resolve(cell["model"]["source"], base_dir=base_dir, cache_dir=cache_dir)
    model_sha = sha256_file(source.path, cache_dir)
    variant = cell["variant"]
    path, artifact = prepare_artifact(job, variant, source.path, model_sha, cache_dir, threads)
    artifact["model_source"] = {"ref": source.origin, "path": str(source.path),
                                "sha256": model_sha, "revision": source.revision}
    module = metric_module(metric)
    companions = job.get("companions") or {}
    base_path, base_artifact = None, None
    if (module.INFO.needs_base or companions) and job.get("base_variant"):
        if variant["is_base"]:
            base_path, base_artifact = path, artifact
        else:
            try:
                base_path, base_artifact = prepare_artifact(
                    job, job["base_variant"], source.path, model_sha, cache_dir, threads)
            except Exception as exc:
                if module.INFO.needs_base:
                    if not isinstance(exc, QbenchError):
                        raise
                    raise QbenchError(
                        f"the base variant {job['base_variant']['quant']} could not be "
                        f"prepared, so there is nothing to compare with: {exc}") from None
                # only the shared KLD work wanted it: never fail this cell for it
                print(f"shared KLD pass off: the base could not be prepared ({exc})",
                      file=sys.stderr)
                companions = {}
    if base_artifact is not None:  # how the base runs is part of its cached distributions
        bv = job["base_variant"]
        base_artifact = dict(base_artifact) | {"runtime": {
            "device": (job.get("cell", {}).get("run") or {}).get("device", job.get("device")),
            "batch": bv.get("batch"), "ubatch": bv.get("ubatch"),
            "n_gpu_layers": bv.get("n_gpu_layers")}}
    timings["prepare_s"] = round(time.perf_counter() - t0, 3)

    def loader(v: dict[str, Any], p: Path) -> Any:
        def load() -> Any:
            backend_mod = _import_backend(v["backend"])
            t = time.perf_counter()
            backend = backend_mod.load(p, LoadOptions(
                device=job.get("device", "auto"), threads=threads, n_batch=v["batch"],
                n_ubatch=v["ubatch"], n_gpu_layers=v["n_gpu_layers"]))
            timings.setdefault("load_s", round(time.perf_counter() - t, 3))
            return backend
        return load

    ctx = CellContext(cell_id=cell["id"], model_id=cell["model"]["id"], artifact_path=path,
                      artifact=artifact, base_dir=base_dir, data_dir=data_dir,
                      cache_dir=cache_dir, is_base=variant["is_base"],
                      base_artifact=base_artifact, _load=loader(variant, path),
                      _load_base=(loader(job["base_variant"], base_path)
                                  if base_path is not None else None),
                      companions=companions, cell_key=cell["key"])
    t1 = time.perf_counter()
    try:
        out = module.run(ctx, _options(metric, cell["options"]))
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
    job = json.loads(job_path.read_text())
    if job.get("parent_pid"):
        _die_with_parent(int(job["parent_pid"]))
    _limit_memory(int(job.get("memory_limit_mb") or 0))
    print(f"qbench cell {job['cell']['id']} key {job['cell']['key']}", file=sys.stderr,
          flush=True)
    try:
        inject(job["cell"]["id"])
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
