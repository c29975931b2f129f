"""Fault injection for testing the executor on real runs (never set in normal use).

``QBENCH_FAULT="GLOB=KIND[;GLOB=KIND...]"`` makes the cell whose id matches GLOB misbehave at the
start of its process: segfault, abort, hang, hang-tree (a grandchild that also hangs), oom
(allocates until the memory limit stops it), exit (exit code 3 without a result), error (raises),
alloc-abort (what llama.cpp does when an allocation fails under a memory cap: prints ggml's
"insufficient memory" line, then a long backtrace, then aborts).
"""

from __future__ import annotations

import ctypes
import fnmatch
import os
import subprocess
import sys
import time

KINDS = ("segfault", "abort", "hang", "hang-tree", "oom", "exit", "error", "alloc-abort")


def fault_for(cell_id: str, spec: str | None = None) -> str | None:
    spec = os.environ.get("QBENCH_FAULT", "") if spec is None else spec
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        pattern, _, kind = part.rpartition("=")
        if kind in KINDS and fnmatch.fnmatchcase(cell_id, pattern):
            return kind
    return None


def inject(cell_id: str) -> None:
    kind = fault_for(cell_id)
    if kind is None:
        return
    print(f"qbench: injecting fault '{kind}' into {cell_id}", file=sys.stderr, flush=True)
    if kind == "segfault":
        ctypes.string_at(0)
    elif kind == "abort":
        os.abort()
    elif kind == "hang":
        time.sleep(10**6)
    elif kind == "hang-tree":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
        print(f"qbench: grandchild pid {child.pid}", file=sys.stderr, flush=True)
        time.sleep(10**6)
    elif kind == "oom":
        hog = []
        while True:
            hog.append(bytearray(64 * 2**20))
    elif kind == "exit":
        os._exit(3)
    elif kind == "error":
        raise RuntimeError("injected error")
    elif kind == "alloc-abort":
        # as ggml_aligned_malloc + GGML_ASSERT + llama.cpp's gdb backtrace write it (stderr)
        os.write(2, b"ggml_aligned_malloc: insufficient memory (attempted to allocate "
                    b"41.96 MB)\nggml/src/ggml.c:1644: GGML_ASSERT(ctx->mem_buffer != NULL) "
                    b"failed\n")
        for i in range(120):
            os.write(2, f"#{i:<3} 0x00007f0000{i:06x} in ggml_backtrace_frame_{i} () from "
                        f"libggml-base.so.0\n".encode())
        os.abort()
