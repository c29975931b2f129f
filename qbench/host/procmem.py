"""This process's memory peaks: the kernel's RSS high-water mark (resettable) and its GPU memory.

The worker (qbench.run.peak) takes a cell's peak RSS from the kernel's high-water mark, reset
at the cell's start (Linux >= 4.0: ``/proc/self/clear_refs``, value 5; some containers refuse
it). The speed metric resets the same mark before each timed repetition to get one peak per
repetition, a spread the gate can judge. Each such reset would erase the cell's own peak, so a
reset *within* a cell first folds the mark into a carried peak that :func:`peak_rss_kib` adds
back; only :func:`start_window` (a new cell) clears it. The kernel's ``ru_maxrss`` follows the
same mark (both are the mm's hiwater_rss), so the carry covers it too.

GPU memory: NVML has no per-process high-water mark. Both CUDA allocators a cell uses keep
what they reserved until the context ends (ggml's buffer pool, torch's caching allocator), so
the process's usage read right after a repetition is its peak during it, without sampling
inside the timed window.
"""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path
from typing import Any

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_carried_kib = 0


def status_kib(*fields: str) -> tuple[int | None, ...]:
    """``kB`` fields of one read of /proc/self/status (VmHWM: peak RSS, VmRSS: current)."""
    try:
        text = _STATUS.read_text()
    except OSError:
        text = ""
    found = (re.search(rf"^{f}:\s+(\d+)\s+kB", text, re.MULTILINE) for f in fields)
    return tuple(int(m.group(1)) if m else None for m in found)


def _reset() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    # a reset that took leaves the mark at the current RSS (a refused one, above it)
    hwm, rss = status_kib("VmHWM", "VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def start_window() -> bool:
    """A new window (a cell): forget every earlier peak; False where the reset is refused."""
    global _carried_kib
    _carried_kib = 0
    return _reset()


def reset_within_window() -> bool:
    """A new sub-window (a repetition) inside the current one: the peak so far is kept for
    :func:`peak_rss_kib`; False where the reset is refused."""
    global _carried_kib
    (hwm,) = status_kib("VmHWM")
    if hwm is not None:
        _carried_kib = max(_carried_kib, hwm)
    return _reset()


def hwm_kib() -> int | None:
    """The mark now: the peak since the last reset of either kind."""
    return status_kib("VmHWM")[0]


def peak_rss_kib(since_reset: bool) -> int | None:
    """Peak RSS of the current window (since :func:`start_window`), or of the process's life;
    a repetition's reset inside the window does not lower it."""
    if since_reset:
        (kib,) = status_kib("VmHWM")
        return None if kib is None else max(kib, _carried_kib)
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _carried_kib)


# -- GPU memory (NVML) ------------------------------------------------------------------------
class VramProbe:
    """This process's GPU memory from NVML (summed over devices); inert without NVML or GPUs.
    ``reason`` says why there is no figure."""

    def __init__(self, nvml: Any = None) -> None:
        self.reason: str | None = None
        self.nv: Any = None
        self.handles: list[Any] = []
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no pynvml, no driver
            self.reason = f"NVML not available ({type(exc).__name__})"
            return
        self.nv = nvml
        try:
            self.handles = [nvml.nvmlDeviceGetHandleByIndex(i)
                            for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as exc:  # noqa: BLE001
            self.reason = f"NVML lists no device ({type(exc).__name__})"
        if not self.handles and self.reason is None:
            self.reason = "no GPU"

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def processes(self) -> dict[tuple[int, int], int | None]:
        """(device, pid) -> bytes (None: not reported) of every GPU process NVML lists; a
        process in both the compute and graphics lists is counted once (the larger)."""
        sizes: dict[tuple[int, int], list[int]] = {}
        for i, h in enumerate(self.handles):
            for query in (self.nv.nvmlDeviceGetComputeRunningProcesses,
                          self.nv.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    procs = query(h)
                except Exception:  # noqa: BLE001 - a query the device does not support
                    continue
                for p in procs:
                    sizes.setdefault((i, p.pid), []).extend(
                        [int(p.usedGpuMemory)] if p.usedGpuMemory is not None else [])
        return {k: max(v) if v else None for k, v in sizes.items()}

    def used_mb(self, pid: int | None = None) -> float | None:
        """MiB of GPU memory NVML attributes to ``pid`` (this process); None when it lists no
        size for it: no GPU process at all counts 0, PIDs of another namespace (a container)
        None, with ``reason`` set."""
        if not self.handles:
            return None
        pid = os.getpid() if pid is None else pid
        procs = self.processes()
        mine = [v for (_, p), v in procs.items() if p == pid]
        if mine and all(v is None for v in mine):
            self.reason = "NVML lists this process but reports no size for it"
            return None
        if mine:
            return sum(v for v in mine if v is not None) / 2**20
        if procs:
            self.reason = ("NVML lists GPU processes but not this one (another PID namespace, "
                           "or this process uses no GPU)")
            return None
        return 0.0

    def close(self) -> None:
        if self.nv is not None:
            try:
                self.nv.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self.nv = None
