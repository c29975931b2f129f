"""Prepare the next variant's file while this variant's accuracy cells run.

On a CPU run, about half of a suite of fresh variants is building their files (llama-quantize's
IQ types take 27-42 s each for SmolLM2 on 2 cores, an AWQ build 150 s) and the other half is
scoring them, one after the other, with the cores 1.6 of 2 busy on average. The executor may
start one helper process (``python -m qbench.run.prefetch JOB.json``) that makes the next
variant's file, and the importance matrix it needs, in the cache, while the current variant's
cells that read no clock run (perplexity, KLD, MMLU, sanity). The helper only fills the cache,
under the same locks as a cell: the next variant's first cell then finds the file there, or
waits on the lock for the build to end. Nothing of a cell's record comes from the helper: if
it fails, the cell builds the file itself and records its own error.

What it gains depends on the cores the cells leave idle: on 2 cores, where a perplexity pass
(1.8 cores) or a quantization (1.9) keeps both busy, one pair ended 5 s sooner (45.8 s against
50.7 one after the other); over a suite, the cells' single-threaded stretches (start-up,
loading, reading files) add up: the imatrix suite went from 1,038 s to 793 s cold with this and
faster GGUF reads together. Where the cells use fewer threads than the machine has, the build
runs in that time.

What it never overlaps: a hardware-bound cell (speed), since the helper would take the cores
it times. The executor starts the helper only once the current variant's hardware-bound cells
are done, and waits for it to end before the next variant's worker starts; against other runs
on the machine it holds the machine lock shared (qbench.host.machine_lock), as an untimed cell
does, so another run's timed cell waits for it and it for that cell. Only on the CPU: on a GPU
an AWQ/GPTQ build or an imatrix would share the device's memory with the cell being measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qbench.host.fsutil import open_fresh
from qbench.run.job import Job


# The helper takes only the cycles the cells leave: at the same priority, llama-quantize (1.9
# of 2 cores) beside a perplexity pass (1.8) made the pass 2.4x slower (38.8 s against 16.4 s:
# ggml's threads wait for each other at every operation, and any of them descheduled stalls
# the rest) and the pair ended later than one after the other (53.3 s against 50.7); at
# niceness 19 the pass took 16.6 s and the pair 49.6 s. llama-quantize and llama-imatrix,
# started by the helper, inherit it.
NICENESS = 19


def yield_to_cells() -> None:
    """Lower this process (and what it starts) to NICENESS, its session's scheduling group too,
    and offer it first to the kernel's OOM killer. With the kernel's autogroups
    (sched_autogroup_enabled = 1, the default of most desktop and VM kernels), niceness weighs
    only within a session, and the helper, like each worker, is a session of its own: at
    niceness 19 alone, a helper computing an importance matrix still took half the cores, and
    the perplexity pass beside it ran 2.4x slower. The autogroup's own nice value
    (``/proc/self/autogroup``) is what weighs between sessions. Called first, before any
    import starts a thread: on Linux a thread's niceness is its own, inherited at creation."""
    os.nice(NICENESS - os.nice(0))
    for path, value in (("/proc/self/autogroup", NICENESS), ("/proc/self/oom_score_adj", 1000)):
        try:
            Path(path).write_text(str(value))
        except OSError:    # no autogroups here, or not allowed: the niceness still holds
            pass


class Prefetch:
    """One helper process preparing one variant (the parent's side). Starting it raises
    OSError if the process cannot be started (the caller goes on without it)."""

    def __init__(self, job: Job, log_path: Path, *, python: str = sys.executable,
                 tmp_dir: Path | None = None) -> None:
        self.cell_id = job.cell_id
        self.started = time.monotonic()
        if tmp_dir is not None:      # the results folder's .scratch/: swept under its lock
            tmp_dir.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="qbench-prefetch-", dir=tmp_dir)
        self._report = Path(self._tmp.name) / "report.json"
        try:
            job_path = Path(self._tmp.name) / "job.json"
            job_path.write_text(job.replace(parent_pid=os.getpid()).to_json())
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if log_path.parent.is_symlink():
                raise OSError(f"{log_path.parent} is a symbolic link: no log written through it")
            with os.fdopen(open_fresh(log_path), "wb") as log:
                self.proc = subprocess.Popen(
                    [python, "-m", "qbench.run.prefetch", str(job_path), str(self._report)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        except BaseException:
            self._tmp.cleanup()
            raise

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the helper, at most what is left of ``timeout_s`` counted from its start
        (the cell's own limit, "quantization included"); past it the helper is ended and the
        cell builds the file itself. What the helper did: its exit code (None: ended by us),
        the seconds it spent preparing, as it measured them, and how long the run waited."""
        t0 = time.monotonic()
        try:
            code: int | None = self.proc.wait(
                timeout=max(0.0, timeout_s - (t0 - self.started)))
        except subprocess.TimeoutExpired:
            code = None
        waited = time.monotonic() - t0
        try:
            prepare_s = json.loads(self._report.read_text()).get("prepare_s")
        except (OSError, ValueError):
            prepare_s = None
        self.cancel()     # its process group too: nothing it started outlives it
        return {"exit": code, "prepare_s": prepare_s, "waited_s": round(waited, 2)}

    def cancel(self) -> None:
        """End the helper's process tree (llama-quantize with it); a half-made file stays a
        temporary file the next build removes under its lock."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Prepare the job's variant in the cache (JOB.json, REPORT.json); 0 when its file is
    there now."""
    yield_to_cells()
    from qbench.host.machine_lock import hold
    from qbench.run.worker import _prepare, _start

    argv = sys.argv[1:] if argv is None else argv
    job = Job.from_json(Path(argv[0]).read_text())
    _start(job)         # ends with qbench run; the worker's memory cap (memory_limit_mb)
    print(f"qbench: preparing {job.cell_id}'s variant ahead of its cells", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    try:
        # shared, as an untimed cell: never beside a timed cell of another run on this machine
        with hold(Path(job.cache_dir), "shared") as lock:
            _prepare(job)
    except Exception as exc:   # the cell itself will meet this and record it
        print(f"qbench: preparing ahead failed ({type(exc).__name__}: {exc}); the variant's "
              "first cell will build it and record what happens", file=sys.stderr)
        return 1
    print(f"qbench: machine lock {lock.as_record()}", file=sys.stderr)
    if len(argv) > 1:
        Path(argv[1]).write_text(json.dumps({"prepare_s": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
