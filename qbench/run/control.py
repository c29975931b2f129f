"""The boundary channel between `qbench run` and a worker that runs several cells in one process.

Two pipes. On the first the worker writes one line per boundary: ``begin I`` before cell I
starts and ``end I`` once its result file is written. On the second the parent answers each
``begin`` with one byte, after it has opened the cell's memory window; the worker waits for
that byte, so the cell's first allocation already lands in its own window. The pipes close
when the worker exits (end of file): that, not a poll of the process, tells the parent a worker
is gone. Plain pipes rather than a status file: the parent blocks on them (no polling delay,
nothing timing-dependent), and a crash closes them by itself.
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass


class ParentEnd:
    """The parent's end: reads boundaries, acknowledges "begin"s. Made before the spawn;
    :meth:`child_fds` go to the worker (``pass_fds``) and are closed here after it started."""

    def __init__(self) -> None:
        self._events_r, self._events_w = os.pipe()
        self._ack_r, self._ack_w = os.pipe()
        self._buffer = b""
        self.closed = False

    def child_fds(self) -> tuple[int, int]:
        """(events fd the worker writes, ack fd the worker reads)."""
        return self._events_w, self._ack_r

    def spawned(self) -> None:
        """The worker holds its ends now: drop ours, so its exit reads as end of file."""
        for fd in (self._events_w, self._ack_r):
            _close(fd)
        self._events_w = self._ack_r = -1

    def poll(self, timeout: float) -> list[tuple[str, int]]:
        """Boundaries written so far, waiting up to ``timeout`` s for the first; ("eof", -1)
        last once the worker's end is closed."""
        if self.closed:
            return []
        eof = False
        try:
            ready, _, _ = select.select([self._events_r], [], [], max(0.0, timeout))
            while ready:
                data = os.read(self._events_r, 65536)
                if not data:
                    eof = True
                    break
                self._buffer += data
                ready, _, _ = select.select([self._events_r], [], [], 0)
        except (OSError, ValueError):   # closed under us: the run is being torn down
            eof = True
        *lines, self._buffer = self._buffer.split(b"\n")
        events = [e for e in map(_parse, lines) if e is not None]
        if eof:
            events.append(("eof", -1))
            self.close()
        return events

    def ack(self) -> None:
        try:
            os.write(self._ack_w, b"k")
        except OSError:   # the worker is gone already: nobody to tell
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in (self._events_r, self._ack_w, self._events_w, self._ack_r):
                _close(fd)


@dataclass
class WorkerEnd:
    """The worker's end (fds inherited from the parent)."""

    events_fd: int
    ack_fd: int

    def __post_init__(self) -> None:
        for fd in (self.events_fd, self.ack_fd):   # not for the cells' own subprocesses
            os.set_inheritable(fd, False)

    def begin(self, index: int) -> None:
        """Announce cell ``index`` and wait until the parent has opened its window (an end of
        file means the parent is gone: this process is about to be ended anyway)."""
        os.write(self.events_fd, f"begin {index}\n".encode())
        os.read(self.ack_fd, 1)

    def end(self, index: int) -> None:
        os.write(self.events_fd, f"end {index}\n".encode())


def _parse(line: bytes) -> tuple[str, int] | None:
    kind, _, index = line.decode("ascii", "replace").strip().partition(" ")
    if kind in ("begin", "end") and index.isdigit():
        return kind, int(index)
    return None


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
