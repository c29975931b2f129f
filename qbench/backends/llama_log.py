"""llama.cpp's own account of the memory it allocated, read from its log.

llama.cpp prints one "<name> <kind> buffer size = N MiB" line per buffer it makes when it loads
a model and makes a context (the mapped file, the repacked weights, the KV cache, the compute
and output buffers); llama.h has no call that returns them. A benchmark that checks the memory
model (benchmarks/memory_fit.py) and the test of the repack rule (tests/test_cpu_repack.py)
read the log instead of guessing.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

import llama_cpp

_KEEP: list[Any] = []     # the installed callback, kept alive for the process's life
_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s*([\d.]+) MiB")


def capture() -> list[str]:
    """Install a log callback that keeps llama.cpp's lines from now on in the returned list
    (nothing is printed); errors are the caller's to surface."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: Any) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    _KEEP[:] = [keep]             # the previous callback is released only once replaced
    return lines


def buffer_sizes(log: str) -> dict[str, float]:
    """``{"CPU_REPACK model": 3264.0, "CPU KV": 512.0, "CPU compute": 258.5, ...}`` (MiB) from
    the log's buffer lines, summed where a name repeats (a model with several files)."""
    out: dict[str, float] = {}
    for name, kind, mib in _BUFFER_LINE.findall(log):
        key = f"{name} {kind}"
        out[key] = out.get(key, 0.0) + float(mib)
    return out
