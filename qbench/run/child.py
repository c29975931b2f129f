"""Run cells in worker processes and turn whatever happens to each into its outcome.

Like optimum-benchmark's process launcher: the worker writes each cell's result as JSON or dies,
and a side thread samples the process tree's memory (:mod:`qbench.run.sampler`). One worker
runs the cells it is given one after the other (the cells of one variant: one start-up, one
model load, see :mod:`qbench.run.worker`) and says where each begins and ends
(:mod:`qbench.run.control`). Isolation stays per cell: a segfault, an abort, an OOM kill or a
timeout is the outcome of the cell in flight, with the signal and the tail of that cell's own
log, and the cells after it go on in a fresh process. Each cell has its own timeout, counted
from its start (the first cell's from the spawn: it also pays for start-up and preparation).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbench.host.fsutil import atomic_write_text, open_fresh
from qbench.results.schema import Outcome
from qbench.run.control import ParentEnd
from qbench.run.job import Job
from qbench.run.sampler import (VRAM_NOT_ATTRIBUTABLE, VRAM_NOT_REPORTED, Boundary,
                                MemoryWindow, _NvmlProbe, _Sampler)

# the sampler lived here before it had a module of its own: its names stay reachable
__all__ = ["CellRun", "Outcome", "run_cells", "run_in_child", "memory_note", "MemoryWindow",
           "VRAM_NOT_ATTRIBUTABLE", "VRAM_NOT_REPORTED", "_NvmlProbe", "_Sampler"]

TAIL_CHARS = 3000
_OOM_PATTERNS = re.compile(r"bad_alloc|out of memory|failed to allocate|cannot allocate memory|"
                           r"insufficient memory|MemoryError|CUDA error: out of memory",
                           re.IGNORECASE)
OOM_SCAN_BYTES = 1 << 18   # llama.cpp prints a long backtrace after the allocation failure
WAIT_SLICE_S = 0.1         # longest uninterruptible wait of the executor (see _next_event)


@dataclass(frozen=True)
class CellRun:
    """One cell for a worker: its job, its own log file, how long it may take."""

    job: Job
    log_path: Path
    timeout_s: float
    # where the worker's temporary folder goes (the results folder's .scratch/, swept under its
    # lock after a kill); None: the system's temporary folder
    tmp_dir: Path | None = None


def run_in_child(job: Job, *, log_path: Path, timeout_s: float,
                 memory_limit_mb: int = 0, python: str = sys.executable) -> Outcome:
    """Run one cell in a worker process of its own; never raises for anything the cell does."""
    [(_, outcome)] = list(run_cells([CellRun(job, log_path, timeout_s)],
                                    memory_limit_mb=memory_limit_mb, python=python))
    return outcome


def run_cells(runs: Sequence[CellRun], *, memory_limit_mb: int = 0,
              python: str = sys.executable) -> Iterator[tuple[int, Outcome]]:
    """Run ``runs`` in order, in one worker process while it stays fit; yield (index, outcome)
    as each cell ends. A cell that crashes, hangs or leaves its process unfit (see
    :func:`qbench.run.worker.measure`) ends that process, and the rest go on in a fresh one.
    Never raises for anything a cell does; Ctrl-C (or closing the generator) ends the worker's
    process tree first."""
    start = 0
    while start < len(runs):
        reported = 0
        for i, outcome in _one_worker(runs[start:], memory_limit_mb, python):
            reported = i + 1
            yield start + i, outcome
        start += max(reported, 1)   # a worker always reports its first cell (in flight at spawn)


def _one_worker(runs: Sequence[CellRun], memory_limit_mb: int, python: str
                ) -> Iterator[tuple[int, Outcome]]:
    """Spawn one worker for ``runs`` and report its cells until it ends."""
    for run in runs:
        run.log_path.parent.mkdir(parents=True, exist_ok=True)
    if runs[0].tmp_dir is not None:
        runs[0].tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qbench-cell-", dir=runs[0].tmp_dir) as tmp:
        results = [Path(tmp) / f"result-{i}.json" for i in range(len(runs))]
        channel = ParentEnd()
        events_fd, ack_fd = channel.child_fds()
        spec_path = Path(tmp) / "cells.json"
        spec = {"events_fd": events_fd, "ack_fd": ack_fd, "cells": [
            {"job": run.job.replace(parent_pid=os.getpid(), memory_limit_mb=memory_limit_mb
                                    ).to_json(),
             "result": str(result), "log": str(run.log_path)}
            for run, result in zip(runs, results)]}
        try:
            # a full disk is a clear StoreError here, before any cell runs (the folder is the
            # results folder's now, not the system's)
            atomic_write_text(spec_path, json.dumps(spec))
        except BaseException:
            channel.close()
            raise
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc: subprocess.Popen[bytes] | None = None
        sampler: _Sampler | None = None
        try:
            t_spawn = time.monotonic()
            # a new file, never written through a link (the worker moves to each cell's own log)
            with os.fdopen(open_fresh(runs[0].log_path), "wb") as log:
                proc = subprocess.Popen(
                    [python, "-m", "qbench.run.worker", "--cells", str(spec_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,   # its own process group: a timeout kills the tree
                    pass_fds=(events_fd, ack_fd))
            channel.spawned()
            sampler = _Sampler(proc.pid, channel=channel)
            sampler.start()
            yield from _follow(proc, sampler, runs, results, t_spawn, memory_limit_mb)
        except BaseException:  # Ctrl-C, the consumer stopping: take the cells down with us
            if proc is not None:
                _kill_tree(proc)
                proc.wait()
            raise
        finally:
            if proc is not None:
                _kill_tree(proc)  # stray grandchildren of finished cells
            if sampler is not None:
                sampler.stop()         # it closes the channel as it ends
            else:
                channel.close()


def _follow(proc: subprocess.Popen[bytes], sampler: _Sampler, runs: Sequence[CellRun],
            results: list[Path], t_spawn: float, memory_limit_mb: int
            ) -> Iterator[tuple[int, Outcome]]:
    """The outcomes of a worker's cells, as its boundaries arrive (see qbench.run.control)."""
    in_flight: int | None = 0          # the first cell is in flight from the spawn
    began = t_spawn
    deadline = t_spawn + runs[0].timeout_s

    def outcome(i: int, window: MemoryWindow, **how: Any) -> Outcome:
        return _outcome(runs, i, results[i], window=window, wall=time.monotonic() - began,
                        memory_limit_mb=memory_limit_mb, pid=proc.pid, **how)

    while True:
        event = _next_event(sampler, deadline)
        if event is None:              # past the deadline
            _kill_tree(proc)
            proc.wait()
            if in_flight is not None:
                yield in_flight, outcome(in_flight, sampler.window, timed_out=True)
            return                     # between cells: the rest go to a fresh worker
        if event.kind == "begin":
            in_flight = event.index
            if event.index > 0:
                began, deadline = event.at, event.at + runs[event.index].timeout_s
        elif event.kind == "end":
            i = event.index
            assert event.window is not None
            if i == len(runs) - 1:     # its last cell: the worker exits now
                code, killed = _exit_code(proc, deadline)
                out = outcome(i, event.window, returncode=code, killed_after=killed)
            else:
                out = outcome(i, event.window)
            in_flight = None
            yield i, out
            if i == len(runs) - 1:
                return
            deadline = time.monotonic() + runs[i + 1].timeout_s   # its teardown included
        else:                          # end of file: the worker has ended
            code, _ = _exit_code(proc, deadline)
            if in_flight is not None:
                yield in_flight, outcome(in_flight, sampler.window, returncode=code)
            return


def _next_event(sampler: _Sampler, deadline: float) -> Boundary | None:
    """The worker's next boundary, or None once ``deadline`` has passed. Waits in short slices:
    a simulated interrupt (``_thread.interrupt_main``, Ray's cancel) only runs its handler
    when this thread runs Python code, and a single long blocking wait would hold it off."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return sampler.events.get(timeout=min(left, WAIT_SLICE_S))
        except queue.Empty:
            continue


def _exit_code(proc: subprocess.Popen[bytes], deadline: float) -> tuple[int, bool]:
    """(return code, killed by us) of a worker expected to exit by ``deadline``."""
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic())), False
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        return proc.wait(), True


def _outcome(runs: Sequence[CellRun], position: int, result_path: Path, *,
             window: MemoryWindow, wall: float, memory_limit_mb: int, pid: int,
             returncode: int | None = None, timed_out: bool = False,
             killed_after: bool = False) -> Outcome:
    """Cell ``position`` of a worker as an outcome. ``returncode`` None: the worker lives on
    (the cell reported its end); otherwise how the worker ended while (or just after) the cell
    ran. ``killed_after``: the worker wrote the result but did not exit, so qbench ended it."""
    run = runs[position]
    log_path = run.log_path
    result: dict[str, Any] = {}
    if result_path.exists():
        try:
            result = json.loads(result_path.read_text())
        except ValueError:
            result = {}
    result["timings"] = {**(result.get("timings") or {}), "worker_pid": pid,
                         "process_cell": position + 1}
    tail = _tail(log_path)
    out = Outcome(status="failed", stderr_tail=tail or None, wall_s=wall, result=result,
                  peak_rss_mb=max(window.peak_rss / 2**20, result.get("peak_rss_self_mb") or 0),
                  peak_vram_mb=None if window.peak_vram is None else window.peak_vram / 2**20,
                  vram_note=window.vram_note, memory_note=memory_note(position, result, window))
    failed = returncode is not None and returncode < 0 and not killed_after
    if timed_out:
        out.status = "timeout"
        out.error = f"timed out after {run.timeout_s:g} s; its process tree was killed"
        out.signal = "SIGKILL"
    elif failed and result.get("status") == "ok":
        # the measurement was complete and written; the process died on its way out
        out.status = "ok"
        out.error = (f"note: the cell process died of {_signal_name(-returncode)} after "
                     "writing its result")
    elif failed:
        sig = _signal_name(-returncode)
        out.status = "crashed"
        out.signal = sig
        out.error = f"the cell process died of {sig}"
        if sig == "SIGKILL":
            out.error += " (not sent by qbench: most likely the kernel's OOM killer)"
        elif _OOM_PATTERNS.search(_tail(log_path, OOM_SCAN_BYTES)):
            out.error += " after an allocation failure: out of memory"
            if memory_limit_mb:
                out.error += f" (memory_limit_mb = {memory_limit_mb})"
        # the backend's banner (e.g. llama.cpp's system info) is in the log of the cell that
        # loaded it, which may be an earlier one of this worker
        earlier = "".join(_head(r.log_path) for r in runs[:position])
        hint = _diagnosis(run.job, earlier + _head(log_path) + tail, sig)
        if hint:
            out.error += hint
    elif result.get("status"):
        out.status = result["status"]
        out.error = result.get("error")
        if out.status == "ok":
            out.stderr_tail = None
            if killed_after:
                out.error = ("note: the worker process did not exit after writing its result; "
                             "qbench ended it")
        elif (out.status == "failed" and "out of memory" not in (out.error or "")
              and _OOM_PATTERNS.search(_tail(log_path, OOM_SCAN_BYTES))):
            out.error = (f"{out.error}: out of memory (the cell log shows an allocation failure"
                         + (f"; memory_limit_mb = {memory_limit_mb}" if memory_limit_mb else "")
                         + ")")
    else:
        out.error = f"the cell process exited with code {returncode} and wrote no result"
        if _OOM_PATTERNS.search(tail):
            out.error += ": out of memory"
    return out


def memory_note(position: int, result: dict[str, Any], window: MemoryWindow) -> str | None:
    """What a cell's peak may include besides the cell's own memory; None for the first cell
    of a worker, measured over the whole process as a one-cell process always was."""
    if position == 0:
        return None
    held = result.get("held")
    note = (f"cell {position + 1} of its worker process, after {position} of this variant's "
            "cells: peak over this cell's own window")
    if window.first_rss is not None:
        note += f"; {window.first_rss / 2**20:.0f} MiB were held at its start"
        if held is not None and "variant" in held:
            note += (", the variant's weights among them (their load's transient peak is not "
                     "in this window)")
    if held is not None and "base" in held:
        note += "; the base variant, loaded by an earlier cell, was still held and counts"
    return note


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


def _diagnosis(job: Job, log_text: str, signal_name: str) -> str | None:
    """The crashed cell's backend's explanation of the crash (e.g. llama.cpp's AMX segfault)."""
    from qbench.backends import known_backend_info

    info = known_backend_info(job.variant.get("backend", ""))
    return info.diagnose(log_text, signal_name) if info and info.diagnose else None
