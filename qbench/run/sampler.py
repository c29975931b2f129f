"""Peak memory of a cell's process tree, sampled from outside: RSS (psutil) and per-process VRAM
(NVML), so llama.cpp's CUDA buffers, invisible to torch's counters, are counted too.

A worker process may run several cells one after the other (see :mod:`qbench.run.control`).
Each cell then gets its own :class:`MemoryWindow`: the sampler reads the worker's boundary
events itself, between samples, and opens a new window *before* it lets the worker start the
cell (it acknowledges the "begin"), so nothing a cell allocates is counted for another one, and
the windows do not depend on how quickly the parent's main thread gets to run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from qbench.host.procmem import VramProbe
from qbench.run.control import ParentEnd

VRAM_NOT_ATTRIBUTABLE = (
    "VRAM not attributable: NVML reports GPU processes, but under PIDs this process cannot see "
    "(a container's PID namespace) and none of them is this cell's process tree; run with the "
    "host's PID namespace (docker --pid=host) to measure per-process VRAM")
VRAM_NOT_REPORTED = ("VRAM not reported: NVML lists this cell's processes without their memory "
                     "use (usedGpuMemory unavailable, e.g. under MIG or in some containers)")

# resident bytes of a process tree (root first); replaceable so tests can script the figures
RssSource = Callable[[list[psutil.Process]], int]


def tree_rss(procs: list[psutil.Process]) -> int:
    """Sum of the resident sets of ``procs`` (processes that just ended count 0)."""
    rss = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
        except psutil.Error:
            pass
    return rss


class MemoryWindow:
    """The peaks seen over one stretch of a worker's life: one cell."""

    def __init__(self) -> None:
        self.peak_rss = 0
        self.first_rss: int | None = None    # the tree's RSS when the window opened
        self.samples = 0
        self._peak_ours: int | None = None   # max over samples that found the tree's processes
        self._seen: set[str] = set()         # sample kinds seen (see _NvmlProbe.sample)

    def add(self, rss: int, vram: tuple[int | None, str] | None) -> None:
        self.samples += 1
        if self.first_rss is None:
            self.first_rss = rss
        self.peak_rss = max(self.peak_rss, rss)
        if vram is not None:
            used, kind = vram
            self._seen.add(kind)
            if kind == "ours" and used is not None:
                self._peak_ours = max(self._peak_ours or 0, used)

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


@dataclass(frozen=True)
class Boundary:
    """A worker's boundary event as the sampler passes it on: ``kind`` is "begin", "end" or
    "eof" (the worker's channel closed: it has exited); ``window`` is the cell's finished
    window (for "end"); ``at`` the parent's monotonic clock when the event was read."""

    kind: str
    index: int = -1
    at: float = 0.0
    window: MemoryWindow | None = None


class _Sampler(threading.Thread):
    """Samples RSS and NVML per-process GPU memory of a process tree into the current window.

    With a ``channel`` it also reads the worker's cell boundaries (see the module docstring)
    and puts them on ``events`` for the executor. The first cell of a process keeps the window
    opened at the spawn (it is measured as a one-cell process always was); each later cell gets
    a fresh one.

    NVML is opened in the thread, not in the constructor: the executor builds the sampler
    between spawning a cell and waiting on it, and nothing slow belongs in that window."""

    def __init__(self, pid: int, interval: float = 0.1, channel: ParentEnd | None = None,
                 rss: RssSource = tree_rss) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.channel = channel
        self.rss = rss
        self.window = MemoryWindow()
        self.events: queue.Queue[Boundary] = queue.Queue()
        self._begun = 0
        self._halt = threading.Event()
        self._nvml: _NvmlProbe | None = None

    # the current window's figures (a one-cell process: the cell's)
    @property
    def peak_rss(self) -> int:
        return self.window.peak_rss

    @property
    def peak_vram(self) -> int | None:
        return self.window.peak_vram

    @property
    def vram_note(self) -> str | None:
        return self.window.vram_note

    def run(self) -> None:
        self._nvml = _NvmlProbe()
        try:
            self._sample_until_stopped()
        finally:
            self._nvml.close()
            if self.channel is not None:
                if not self.channel.closed:
                    self.events.put(Boundary("eof"))   # never leave the executor waiting
                # closed here, by the only thread reading it: closed elsewhere, its fd number
                # could be reused by the next worker's pipe while this thread still reads
                self.channel.close()

    def _sample(self, root: psutil.Process) -> bool:
        """One sample into the current window; False when the tree's root is gone."""
        assert self._nvml is not None
        try:
            procs = [root, *root.children(recursive=True)]
            rss = self.rss(procs)
            self.window.add(rss, self._nvml.sample({p.pid for p in procs}))
        except psutil.Error:
            return False
        return True

    def _sample_until_stopped(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            root = None
        while not self._halt.is_set():
            alive = root is not None and self._sample(root)
            if self.channel is None:
                if not alive:
                    return
                self._halt.wait(self.interval)
                continue
            for kind, index in self.channel.poll(self.interval if alive else 0.0):
                self._handle(kind, index, root)
            if self.channel.closed:
                return
            if not alive:   # gone, yet its channel is open (inherited by a stray process)
                self.channel.close()
                self.events.put(Boundary("eof", at=_now()))
                return

    def _handle(self, kind: str, index: int, root: psutil.Process | None) -> None:
        assert self.channel is not None
        if kind == "begin":
            self._begun += 1
            if self._begun > 1:          # the first cell keeps the window opened at the spawn
                self.window = MemoryWindow()
                if root is not None:
                    self._sample(root)
            self.channel.ack()           # only now may the worker start the cell
            self.events.put(Boundary("begin", index, _now()))
        elif kind == "end":
            if root is not None:
                self._sample(root)
            finished, self.window = self.window, MemoryWindow()   # until the next "begin"
            self.events.put(Boundary("end", index, _now(), finished))
        elif kind == "eof":
            self.events.put(Boundary("eof", at=_now()))

    def stop(self) -> None:
        self._halt.set()
        if self.ident is None:          # never started (interrupted right after the spawn)
            if self.channel is not None:
                self.channel.close()
            return
        self.join(timeout=2)


def _now() -> float:
    return time.monotonic()


class _NvmlProbe:
    """Per-process GPU memory from NVML (qbench.host.procmem's listing); inert (None) without
    NVML or GPUs."""

    def __init__(self) -> None:
        self.nvml = VramProbe()
        self.handles = self.nvml.handles
        self._processes = self.nvml.processes

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
        self.nvml.close()
