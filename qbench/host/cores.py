"""How many threads "all physical cores" is on this machine: the one answer every layer uses
where a thread count of 0 still reaches it (the plan resolves the suite's ``threads = 0`` into
the cell key and the job, so jobs carry a real count; this is for direct callers)."""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Physical cores (psutil), never more than the CPUs this process may run on."""
    try:
        import psutil
        n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        n = os.cpu_count() or 1
    try:
        n = min(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    return max(1, n)
