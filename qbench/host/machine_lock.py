"""One lock per machine so that a timed cell never runs beside other qbench work.

Two `qbench run`s on one machine (two shards, a prepare-ahead helper, Ray workers on one node)
used to time each other: the committed smoke baseline had 4 of its 12 speed cells measured
while another run's cells computed. Every cell now holds this lock while it runs: a
hardware-bound cell (speed) exclusively, every other cell and the prepare-ahead helper shared.
So a timed cell never overlaps other qbench work, and cells that read no clock still run
together.

It is an advisory ``flock`` on ``<cache>/machine.lock`` (outside every cache kind, so
``qbench cache clear`` never removes a file someone holds): the kernel drops it when its
holder dies, however it dies. Processes that share a machine share it only when they share the
cache folder (the default, ``~/.cache/qbench``, does).

flock alone lets shared holders that keep overlapping starve an exclusive waiter forever, so a
second file, the gate, gives a waiting exclusive holder priority: an exclusive waiter holds the
gate until it has the lock; a shared taker passes through the gate (takes and drops it) first.

Waiting is bounded (QBENCH_LOCK_WAIT_S, default 600 s): the worker does not know its cell's
timeout, and a cell that waited its whole timeout away would be recorded as a timeout. Past the
bound the cell runs without the lock, and says so (``acquired: False``); a timed cell that ran
so is unreliable.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Mode = Literal["exclusive", "shared"]
LOCK_NAME = "machine.lock"
GATE_NAME = "machine.gate"
WAIT_ENV = "QBENCH_LOCK_WAIT_S"
DEFAULT_WAIT_S = 600.0
POLL_S = 0.05


def lock_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / LOCK_NAME


def max_wait_s() -> float:
    """The bound on one wait, from QBENCH_LOCK_WAIT_S (seconds, >= 0)."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_WAIT_S
    try:
        wait = float(raw)
    except ValueError:
        raise ValueError(f"{WAIT_ENV} must be a number of seconds, got {raw!r}") from None
    if wait < 0:
        raise ValueError(f"{WAIT_ENV} must be >= 0, got {raw!r}")
    return wait


@dataclass
class Hold:
    """One hold of the lock, as a record stores it (``as_record``)."""

    mode: Mode
    waited_s: float = 0.0
    acquired: bool = False
    contended: bool = False          # the first try found the lock (or the gate) taken
    held_from: float | None = None   # time.time() once acquired
    held_until: float | None = None  # time.time() right before release
    error: str | None = None         # why the lock file could not be opened

    def as_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "waited_s": round(self.waited_s, 3),
                               "acquired": self.acquired, "contended": self.contended}
        if self.error is not None:
            out["error"] = self.error
        if self.held_from is not None:
            out["held_from"] = round(self.held_from, 6)
        if self.held_until is not None:
            out["held_until"] = round(self.held_until, 6)
        return out


def _try(fd: int, flag: int) -> bool:
    try:
        fcntl.flock(fd, flag | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_CLOEXEC (Python's default): a tool the cell starts must not inherit, and keep, the lock
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _acquire(lock_fd: int, gate_fd: int, mode: Mode, deadline: float,
             on_wait: Callable[[], None] | None) -> tuple[bool, bool]:
    """(acquired, contended) by polling; gives up at ``deadline`` (time.monotonic())."""
    want = fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH
    contended = False

    def wait() -> bool:
        nonlocal contended
        if not contended and on_wait is not None:
            on_wait()
        contended = True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
        return True

    if mode == "exclusive":
        while not _try(gate_fd, fcntl.LOCK_EX):       # behind an exclusive waiter: queue up
            if not wait():
                return False, contended
        try:
            while not _try(lock_fd, want):            # new shared takers now stop at the gate
                if not wait():
                    return False, contended
            return True, contended
        finally:
            fcntl.flock(gate_fd, fcntl.LOCK_UN)
    while True:
        if _try(gate_fd, fcntl.LOCK_EX):              # no exclusive waiter ahead
            try:
                if _try(lock_fd, want):
                    return True, contended
            finally:
                fcntl.flock(gate_fd, fcntl.LOCK_UN)
        if not wait():
            return False, contended


@contextmanager
def hold(cache_dir: Path, mode: Mode, *, wait_s: float | None = None,
         on_wait: Callable[[], None] | None = None) -> Iterator[Hold]:
    """Hold the machine lock in ``mode`` for the ``with`` block, waiting at most ``wait_s``
    (default :func:`max_wait_s`); past it the block runs unlocked (``acquired`` False).
    ``on_wait`` is called once when the lock is found taken (to say so in the cell log)."""
    if mode not in ("exclusive", "shared"):
        raise ValueError(f"lock mode must be 'exclusive' or 'shared', got {mode!r}")
    limit = max_wait_s() if wait_s is None else wait_s
    path = lock_path(cache_dir)
    h = Hold(mode)
    try:
        lock_fd = _open(path)
    except OSError as exc:      # an unwritable cache folder: the cell meets it and says so
        h.error = f"{path}: {exc.strerror or exc}"
        yield h
        return
    gate_fd = -1
    try:
        gate_fd = _open(path.with_name(GATE_NAME))
        t0 = time.monotonic()
        h.acquired, h.contended = _acquire(lock_fd, gate_fd, mode, t0 + limit, on_wait)
        h.waited_s = time.monotonic() - t0
        if h.acquired:
            h.held_from = time.time()
        try:
            yield h
        finally:
            if h.acquired:
                h.held_until = time.time()
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
    finally:
        if gate_fd >= 0:
            os.close(gate_fd)
        os.close(lock_fd)
