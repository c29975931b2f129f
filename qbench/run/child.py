"""Run one cell in its own process and turn whatever happens into an outcome.

Like optimum-benchmark's process launcher: the child returns JSON or dies; a side thread samples
the child's process tree for resident memory (psutil) and per-process VRAM (NVML), so llama.cpp's
CUDA buffers, invisible to torch's counters, are counted too. Segfaults, aborts, OOM kills and
timeouts become statuses with the signal and the tail of the cell's log; the run goes on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from qbench.results.schema import Outcome
from qbench.run.job import Job


TAIL_CHARS = 3000
_OOM_PATTERNS = re.compile(r"bad_alloc|out of memory|failed to allocate|cannot allocate memory|"
                           r"insufficient memory|MemoryError|CUDA error: out of memory",
                           re.IGNORECASE)
OOM_SCAN_BYTES = 1 << 18   # llama.cpp prints a long backtrace after the allocation failure


VRAM_NOT_ATTRIBUTABLE = (
    "VRAM not attributable: NVML reports GPU processes, but under PIDs this process cannot see "
    "(a container's PID namespace) and none of them is this cell's process tree; run with the "
    "host's PID namespace (docker --pid=host) to measure per-process VRAM")
VRAM_NOT_REPORTED = ("VRAM not reported: NVML lists this cell's processes without their memory "
                     "use (usedGpuMemory unavailable, e.g. under MIG or in some containers)")


class _Sampler(threading.Thread):
    """Samples RSS (psutil) and NVML per-process GPU memory of a process tree.

    NVML is opened in the thread, not in the constructor: the executor builds the sampler
    between spawning a cell and waiting on it, and nothing slow belongs in that window."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_rss = 0
        self._peak_ours: int | None = None   # max over samples that found the tree's processes
        self._seen: set[str] = set()         # sample kinds seen (see _NvmlProbe.sample)
        self._halt = threading.Event()
        self._nvml: _NvmlProbe | None = None

    @property
    def peak_vram(self) -> int | None:
        """Peak bytes on GPUs of the tree; 0 when NVML saw GPU processes that were all
        someone else's, or none at all; None without NVML or when nothing was attributable."""
        if self._peak_ours is not None:
            return self._peak_ours
        if self._seen and self._seen <= {"idle", "others"}:
            return 0
        return None

    @property
    def vram_note(self) -> str | None:
        """Why there is no VRAM figure though NVML works (None when measured or no NVML)."""
        if self.peak_vram is not None:
            return None
        if "no-size" in self._seen:
            return VRAM_NOT_REPORTED
        if "unknown" in self._seen:
            return VRAM_NOT_ATTRIBUTABLE
        return None

    def run(self) -> None:
        self._nvml = _NvmlProbe()
        try:
            self._sample_until_stopped()
        finally:
            self._nvml.close()

    def _sample_until_stopped(self) -> None:
        assert self._nvml is not None
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                pids = {p.pid for p in procs}
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_rss = max(self.peak_rss, rss)
                sample = self._nvml.sample(pids)
                if sample is not None:
                    vram, kind = sample
                    self._seen.add(kind)
                    if kind == "ours" and vram is not None:
                        self._peak_ours = max(self._peak_ours or 0, vram)
            except psutil.Error:
                break
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)


class _NvmlProbe:
    """Per-process GPU memory from NVML; inert (None) without NVML or GPUs."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nv = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                            for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no pynvml, no driver, no GPU
            self.handles = []

    def _processes(self) -> dict[tuple[int, int], int | None]:
        """(device, pid) -> bytes (None: not reported) of every GPU process NVML lists; a
        process in both the compute and graphics lists is counted once."""
        sizes: dict[tuple[int, int], list[int]] = {}
        for i, h in enumerate(self.handles):
            for query in (self.nv.nvmlDeviceGetComputeRunningProcesses,
                          self.nv.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    procs = query(h)
                except Exception:  # noqa: BLE001 - a query a device does not support
                    continue
                for p in procs:
                    sizes.setdefault((i, p.pid), []).extend(
                        [p.usedGpuMemory] if p.usedGpuMemory is not None else [])
        return {k: max(v) if v else None for k, v in sizes.items()}

    def sample(self, pids: set[int]) -> tuple[int | None, str] | None:
        """(bytes used by ``pids``, kind of sample), or None without NVML. Kinds: "ours" (the
        tree's processes found and measured), "no-size" (found, but NVML gives no sizes),
        "idle" (no GPU process at all), "others" (GPU processes, all visible here and none
        ours: the tree uses no GPU), "unknown" (GPU processes under PIDs not visible here and
        none ours: NVML's PIDs are another PID namespace's, so nothing can be attributed)."""
        if not self.handles:
            return None
        procs = self._processes()
        if not procs:
            return 0, "idle"
        mine = [v for (_, pid), v in procs.items() if pid in pids]
        if mine:
            sizes = [v for v in mine if v is not None]
            return (sum(sizes), "ours") if sizes else (None, "no-size")
        if any(not psutil.pid_exists(pid) for _, pid in procs):
            return None, "unknown"
        return 0, "others"

    def used_by(self, pids: set[int]) -> int | None:
        """Bytes of GPU memory used by ``pids`` (None: no NVML, or not attributable)."""
        sample = self.sample(pids)
        return None if sample is None else sample[0]

    def close(self) -> None:
        if self.handles:
            try:
                self.nv.nvmlShutdown()
            except Exception:
                pass


def _tail(path: Path, n: int = TAIL_CHARS) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - n))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _head(path: Path, n: int = 20000) -> str:
    try:
        with path.open("rb") as fh:
            return fh.read(n).decode("utf-8", "replace")
    except OSError:
        return ""


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_in_child(job: Job, *, log_path: Path, timeout_s: float,
                 memory_limit_mb: int = 0, python: str = sys.executable) -> Outcome:
    """Run ``python -m qbench.run.worker`` on ``job``; never raises for anything the cell does."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qbench-cell-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job = job.replace(parent_pid=os.getpid(), memory_limit_mb=memory_limit_mb)
        job_path.write_text(job.to_json())
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.monotonic()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [python, "-m", "qbench.run.worker", str(job_path), str(result_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)  # its own process group: a timeout kills the tree
            sampler = _Sampler(proc.pid)
            sampler.start()
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_tree(proc)
                proc.wait()
            except BaseException:  # Ctrl-C / kill of the parent: take the cell down with us
                _kill_tree(proc)
                proc.wait()
                sampler.stop()
                raise
            finally:
                _kill_tree(proc)  # stray grandchildren of a finished cell
            sampler.stop()
        wall = time.monotonic() - t0
        tail = _tail(log_path)
        result: dict[str, Any] = {}
        if result_path.exists():
            try:
                result = json.loads(result_path.read_text())
            except ValueError:
                result = {}
    out = Outcome(status="failed", stderr_tail=tail or None, wall_s=wall, result=result,
                  peak_rss_mb=max(sampler.peak_rss / 2**20, result.get("peak_rss_self_mb", 0)),
                  peak_vram_mb=None if sampler.peak_vram is None else sampler.peak_vram / 2**20,
                  vram_note=sampler.vram_note)
    if timed_out:
        out.status = "timeout"
        out.error = f"timed out after {timeout_s:g} s; its process tree was killed"
        out.signal = "SIGKILL"
    elif proc.returncode < 0 and result.get("status") == "ok":
        # the measurement was complete and written; the process died on its way out
        out.status = "ok"
        out.error = (f"note: the cell process died of {_signal_name(-proc.returncode)} after "
                     "writing its result")
    elif proc.returncode < 0:
        sig = _signal_name(-proc.returncode)
        out.status = "crashed"
        out.signal = sig
        out.error = f"the cell process died of {sig}"
        if sig == "SIGKILL":
            out.error += " (not sent by qbench: most likely the kernel's OOM killer)"
        elif _OOM_PATTERNS.search(_tail(log_path, OOM_SCAN_BYTES)):
            out.error += " after an allocation failure: out of memory"
            if memory_limit_mb:
                out.error += f" (memory_limit_mb = {memory_limit_mb})"
        hint = _diagnosis(job, _head(log_path) + tail, sig)
        if hint:
            out.error += hint
    elif result:
        out.status = result.get("status", "failed")
        out.error = result.get("error")
        if out.status == "ok":
            out.stderr_tail = None
        elif (out.status == "failed" and "out of memory" not in (out.error or "")
              and _OOM_PATTERNS.search(_tail(log_path, OOM_SCAN_BYTES))):
            out.error = (f"{out.error}: out of memory (the cell log shows an allocation failure"
                         + (f"; memory_limit_mb = {memory_limit_mb}" if memory_limit_mb else "")
                         + ")")
    else:
        out.error = f"the cell process exited with code {proc.returncode} and wrote no result"
        if _OOM_PATTERNS.search(tail):
            out.error += ": out of memory"
    return out


def _diagnosis(job: Job, log_text: str, signal_name: str) -> str | None:
    """The crashed cell's backend's explanation of the crash (e.g. llama.cpp's AMX segfault)."""
    from qbench.backends import known_backend_info

    info = known_backend_info(job.variant.get("backend", ""))
    return info.diagnose(log_text, signal_name) if info and info.diagnose else None
