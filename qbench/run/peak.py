"""The worker's own peak memory, per cell, from the kernel and from torch.

The parent samples the process tree every 0.1 s and can miss a short spike; the kernel's
high-water mark cannot. For a worker's first cell that is ``ru_maxrss`` (the process's whole
life, as a one-cell process always measured it). A later cell must not use it: it would report
an earlier cell's peak. So at each later cell's start the worker resets the mark (Linux >= 4.0:
``/proc/self/clear_refs``, value 5) and reads ``VmHWM`` at the end; where the reset is refused
(some containers, other systems) the cell has only the sampled peak. torch's CUDA peak is reset
per cell the same way.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS; False where the system refuses."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    # a reset that took leaves the mark at the current RSS (a refused one, above it)
    hwm, rss = _status_kib("VmHWM", "VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def peak_rss_mb(since_reset: bool) -> float | None:
    """Peak RSS of this process (MiB): since the last reset, or over its life; None when the
    reset did not happen (no figure is better than an earlier cell's)."""
    if since_reset:
        (kib,) = _status_kib("VmHWM")
        return None if kib is None else kib / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_kib(*fields: str) -> tuple[int | None, ...]:
    """``kB`` fields of one read of /proc/self/status (VmHWM: peak RSS, VmRSS: current)."""
    try:
        text = _STATUS.read_text()
    except OSError:
        text = ""
    found = (re.search(rf"^{f}:\s+(\d+)\s+kB", text, re.MULTILINE) for f in fields)
    return tuple(int(m.group(1)) if m else None for m in found)


def _cuda() -> object | None:
    """torch.cuda when torch is imported and CUDA initialised: importing torch just to ask
    would cost a GGUF cell seconds."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        if not cuda.is_available() or not cuda.is_initialized():
            return None
        return cuda
    except Exception:  # noqa: BLE001 - a broken CUDA runtime must not cost the result
        return None


def torch_max_allocated_mb() -> float | None:
    """Peak memory torch allocated on all CUDA devices since the last reset (MiB), failed cells
    too (an OOM's peak is evidence); None when torch never touched CUDA here."""
    cuda = _cuda()
    if cuda is None:
        return None
    try:
        return sum(cuda.max_memory_allocated(i)  # type: ignore[attr-defined]
                   for i in range(cuda.device_count())) / 2**20  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        return None


def reset_torch_peak() -> None:
    cuda = _cuda()
    if cuda is None:
        return
    try:
        for i in range(cuda.device_count()):  # type: ignore[attr-defined]
            cuda.reset_peak_memory_stats(i)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass
