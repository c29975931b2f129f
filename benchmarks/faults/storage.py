"""Storage faults: a full disk, two runs on one results folder or one cache, stored records of
another schema version.

Together because they test the results folder and the artifact cache themselves: writes are
atomic, the lock holds, and what is on disk is never lost or silently misread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .common import (NO_SANITY, SPEED, Bench, Row, _clean, audit, changed, last_error_line,
                     records, short, snapshot, statuses, suite_text, yes)


# -- disk full -------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` on ``path`` if this process may (root); yield whether it did."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                  str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until the file system is full; return it."""
    filler = folder / "filler"
    block = b"\0" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    break
                raise
        with contextlib.suppress(OSError):
            os.write(fd, b"\0")   # the last bytes of a partly used page
    finally:
        os.close(fd)
    return filler


def fsize_limit(limit: int) -> Callable[[], None]:
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def scenario_disk(b: Bench) -> list[Row]:
    name = "faults-disk"
    suite = b.write_suite(name, suite_text(name))
    t0 = time.monotonic()
    with tmpfs(b.work / "disk", "4m") as mounted:
        out = b.work / "disk" / "results"
        cells = out / name / "cells"
        first = b.run(suite, out, "--only", "*/F16/*")
        before = snapshot(cells)
        if mounted:
            how = "tmpfs (4 MiB) filled to the last byte"
            filler = fill(b.work / "disk")
            full = b.run(suite, out)
        else:
            how = "RLIMIT_FSIZE 2 KiB on the qbench process"
            filler = None
            full = b.run(suite, out, preexec_fn=fsize_limit(2048))
        mid = audit(cells)
        mid_lost = changed(before, snapshot(cells))
        if filler is not None:
            filler.unlink()
        again = b.run(suite, out)
        after_recs = records(cells)
        lost = changed(before, snapshot(cells))
    clear = full.returncode == 1 and _clean(full.stderr) and "disk full" in full.stderr
    good = (first.returncode == 0 and len(before) == 3 and clear and not mid.corrupt
            and not mid.stray and not mid_lost and not lost and again.returncode == 0
            and len(after_recs) == 6)
    return [Row(f"disk full while writing results ({how})",
                "clear error, exit 1; no truncated/corrupt/temp file in cells/; earlier "
                "results intact; a rerun with space completes",
                f"exit {full.returncode}: '{short(last_error_line(full.stderr), 110)}'; "
                f"traceback: {yes(not _clean(full.stderr))}; corrupt {len(mid.corrupt)}, temp "
                f"{len(mid.stray)}; rerun with space: exit {again.returncode}, "
                f"{statuses(after_recs)}",
                good, len(before), len(set(lost) | set(mid_lost)), time.monotonic() - t0)]


# -- two runs at once ------------------------------------------------------------------------
def scenario_concurrent(b: Bench) -> list[Row]:
    rows = []
    name = "faults-concurrent"
    suite = b.write_suite(name, suite_text(name))
    out = b.work / "results-concurrent"
    sdir = out / name
    t0 = time.monotonic()
    err_a = b.work / "concurrent-a.stderr"
    with err_a.open("w") as err:
        a = subprocess.Popen(b.run_args(suite, out, "--only", "*/F16/*"),
                             stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                             env=b.env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and a.poll() is None:
            lock = sdir / ".lock"
            if (lock.is_file() and lock.read_text().strip() == str(a.pid)
                    and any((sdir / "logs").glob("*.log"))):
                break
            time.sleep(0.05)
        running = a.poll() is None
        second = b.run(suite, out)
        a_rc = a.wait(timeout=900)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()
    recs = records(sdir / "cells")
    runs = list((sdir / "runs").glob("*.json"))
    refused = (second.returncode == 1 and f"another qbench process (pid {a.pid})" in second.stderr
               and _clean(second.stderr))
    a_ok = a_rc == 0 and len(recs) == 3 and all(r["status"] == "ok" for r in recs.values())
    st = audit(sdir / "cells")
    rows.append(Row("a second `qbench run` on the same results folder while one runs",
                    "the second exits 1 with the lock message (naming the holder); the first "
                    "finishes unaffected",
                    (f"second: exit {second.returncode}: "
                     f"'{short(last_error_line(second.stderr), 110)}'; first: exit {a_rc}, "
                     f"{statuses(recs)}, {len(runs)} run manifest(s), corrupt "
                     f"{len(st.corrupt)}") if running else "the first run ended too soon",
                    running and refused and a_ok and len(runs) == 1 and not st.corrupt,
                    len(recs), 3 - len(recs), time.monotonic() - t0))

    # two suites, one cache: both build the same new artifact at the same moment
    t0 = time.monotonic()
    procs = []
    for tag in ("a", "b"):
        nm = f"faults-cache-{tag}"
        s = b.write_suite(nm, suite_text(nm, quants=("Q5_0",), metrics=SPEED + NO_SANITY))
        procs.append((nm, subprocess.Popen(b.run_args(s, out), stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True, env=b.env(),
                                           stdin=subprocess.DEVNULL)))
    results = [(nm, p.communicate(timeout=900)[1], p.returncode) for nm, p in procs]
    shas = set()
    ok = True
    for nm, _, rc in results:
        rs = records(out / nm / "cells")
        ok &= rc == 0 and len(rs) == 2 and all(r["status"] == "ok" for r in rs.values())
        shas |= {r["artifact"].get("sha256") for r in rs.values()}
    rows.append(Row("two suites run at once on one cache, building the same new variant",
                    "both complete; one artifact (same sha256) used by both",
                    f"exits {[rc for _, _, rc in results]}; distinct artifact sha256: "
                    f"{len(shas)}", ok and len(shas) == 1, seconds=time.monotonic() - t0))
    return rows


# -- stored records from another qbench --------------------------------------------------------
def scenario_schema(b: Bench) -> list[Row]:
    """Records with an older / newer schema_version in a results folder `qbench run` resumes."""
    name = "faults-schema"
    suite = b.write_suite(name, suite_text(name, metrics=SPEED + NO_SANITY))
    out = b.work / "results-schema"
    cells = out / name / "cells"
    b.run(suite, out, fault="*=error")          # 4 records, no model work
    rows = []
    victim = sorted(cells.glob("*.json"))[0]
    original = victim.read_bytes()
    for version, word in ((0, "too old"), (99, "newer")):
        t0 = time.monotonic()
        rec = json.loads(original)
        rec["schema_version"] = version
        victim.write_text(json.dumps(rec))
        others = {k: v for k, v in snapshot(cells).items() if k != victim.name}
        run = b.run(suite, out)
        report = b.qbench([*b.cmd, "report", str(out / name), "--out",
                           str(b.work / "report-schema")])
        msgs = (run.stderr, report.stderr)
        good = all(f"schema version {version}" in m and str(victim) in m and word in m
                   and _clean(m) for m in msgs) and run.returncode == 1 == report.returncode
        rows.append(Row(f"a stored record has schema_version {version} ({word})",
                        "migrated, or refused naming the version and the file (run and report)",
                        f"run exit {run.returncode}, report exit {report.returncode}: "
                        f"'{short(last_error_line(run.stderr), 120)}'",
                        good, len(others), len(changed(others, snapshot(cells))),
                        time.monotonic() - t0))
    victim.write_bytes(original)
    return rows
