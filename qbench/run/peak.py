"""The worker's own peak memory, per cell, from the kernel and from torch.

The parent samples the process tree every 0.1 s and can miss a short spike; the kernel's
high-water mark cannot. For a worker's first cell that is ``ru_maxrss`` (the process's whole
life, as a one-cell process always measured it). A later cell must not use it: it would report
an earlier cell's peak. So at each later cell's start the worker resets the mark (Linux >= 4.0:
``/proc/self/clear_refs``, value 5) and reads ``VmHWM`` at the end; where the reset is refused
(some containers, other systems) the cell has only the sampled peak. The speed metric resets
the mark again before each repetition (its per-repetition peaks); qbench.host.procmem carries
the cell's peak across those resets. torch's CUDA peak is reset per cell the same way.
"""

from __future__ import annotations

import sys

from qbench.host import procmem


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS (a new cell); False where the system
    refuses. Per-repetition resets inside the cell (the speed metric's) do not lower the
    cell's peak: qbench.host.procmem carries it."""
    return procmem.start_window()


def peak_rss_mb(since_reset: bool) -> float | None:
    """Peak RSS of this process (MiB): since the last reset, or over its life; None when the
    reset did not happen (no figure is better than an earlier cell's)."""
    kib = procmem.peak_rss_kib(since_reset)
    return None if kib is None else kib / 1024.0


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
