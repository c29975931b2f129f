"""Storage faults: a full disk, two runs on one results folder or one cache, stored records of
another schema version; links planted in a results folder, records that lie about themselves
and a cached artifact changed on disk (issue 25).

Together because they test the results folder and the artifact cache themselves: writes are
atomic, the lock holds, and what is on disk is never lost or silently misread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
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


# -- links planted in a results folder (issue 25) ----------------------------------------------
def _victim(b: Bench, name: str) -> Path:
    path = b.work / f"victim-{name}"
    path.write_text("precious, not qbench's\n")
    path.chmod(0o600)
    return path


def _untouched(victim: Path) -> bool:
    return victim.read_text() == "precious, not qbench's\n"


def scenario_links(b: Bench) -> list[Row]:
    """Symbolic links where qbench writes: the lock file, the cells folder, a cell's log; and
    `qbench merge` of a source holding a link to a private file and a made-up run manifest."""
    rows = []
    name = "faults-links"
    suite = b.write_suite(name, suite_text(name, quants=("F16",), metrics=SPEED + NO_SANITY))

    for what, plant in ((".lock -> a file of someone else's", ".lock"),
                        ("cells/ -> another folder", "cells")):
        t0 = time.monotonic()
        out = b.work / f"results-links-{plant.strip('.')}"
        (out / name).mkdir(parents=True, exist_ok=True)
        victim = _victim(b, plant.strip("."))
        target = victim
        if plant == "cells":
            target = b.work / "elsewhere-cells"
            target.mkdir(exist_ok=True)
        (out / name / plant).symlink_to(target)
        proc = b.run(suite, out, fault="*=error")
        wrote = _untouched(victim) and (plant != "cells" or not any(target.iterdir()))
        good = (proc.returncode == 1 and "symbolic link" in proc.stderr and _clean(proc.stderr)
                and wrote)
        rows.append(Row(f"results folder: {what}",
                        "exit 1 naming the link; nothing written through it",
                        f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 100)}'; "
                        f"target untouched: {yes(wrote)}", good,
                        seconds=time.monotonic() - t0))

    # a cell's log replaced by a link, then the cell rerun
    t0 = time.monotonic()
    out = b.work / "results-links-log"
    first = b.run(suite, out, fault="*=error")
    recs = records(out / name / "cells")
    key = next(iter(recs.values()))["key"] if recs else "none"
    log = out / name / "logs" / f"{key}.log"
    victim = _victim(b, "log")
    if log.exists():
        log.unlink()
    log.symlink_to(victim)
    again = b.run(suite, out, "--rerun-failed", fault="*=error")
    good = (first.returncode == 2 and again.returncode == 2 and _untouched(victim)
            and not log.is_symlink() and "injecting fault" in log.read_text(errors="replace"))
    rows.append(Row("results folder: a cell's log -> a file of someone else's, cell rerun",
                    "the link replaced by the new log; its target untouched",
                    f"rerun exit {again.returncode}; target untouched: {yes(_untouched(victim))}; "
                    f"log is a file of its own: {yes(not log.is_symlink())}", good,
                    seconds=time.monotonic() - t0))

    # merge: a source with a log linked to a private file, and a made-up run manifest
    t0 = time.monotonic()
    src = b.work / "merge-src-links"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(out, src, symlinks=True)
    secret = _victim(b, "secret")
    slog = src / name / "logs" / f"{key}.log"
    slog.unlink()
    slog.symlink_to(secret)
    (src / name / "runs" / "20300101T000000Z-forged.json").write_text(
        json.dumps({"suite": name, "anything": "goes"}))
    dest = b.work / "merged-links"
    shutil.rmtree(dest, ignore_errors=True)
    proc = b.qbench([*b.cmd, "merge", str(src), "--out", str(dest)])
    leaked = [str(p) for p in dest.rglob("*") if p.is_file()
              and "precious" in p.read_text(errors="replace")]
    forged = (dest / name / "runs" / "20300101T000000Z-forged.json").exists()
    merged = records(dest / name / "cells")
    good = (proc.returncode == 0 and not leaked and not forged and len(merged) == len(recs)
            and _clean(proc.stderr))
    rows.append(Row("`qbench merge` of a source whose log links to a 0600 private file, with a "
                    "made-up runs/*.json",
                    "records merged; the link's target and the forged manifest not copied "
                    "(listed as skipped)",
                    f"exit {proc.returncode}; {len(merged)}/{len(recs)} records; private file "
                    f"copied: {yes(bool(leaked))}; forged manifest copied: {yes(forged)}", good,
                    seconds=time.monotonic() - t0))
    return rows


# -- records that lie about themselves (issue 25) ----------------------------------------------
def scenario_records(b: Bench) -> list[Row]:
    """A record under another cell's file name, valid JSON of the wrong shape, and two ok records
    of one cell that disagree, met by plan, export, run and merge."""
    rows = []
    name = "faults-records"
    suite = b.write_suite(name, suite_text(name, metrics=SPEED + NO_SANITY))
    out = b.work / "results-records"
    cells = out / name / "cells"
    b.run(suite, out, fault="*/speed=error")          # footprints ok, speed failed
    recs = records(cells)
    f16 = recs.get("smol/llama.cpp/F16/footprint", {})
    q8 = recs.get("smol/llama.cpp/Q8_0/footprint", {})

    # 1. F16's record copied over Q8_0's file name
    t0 = time.monotonic()
    q8_path = cells / f"{q8.get('key')}.json"
    q8_path.write_text((cells / f"{f16.get('key')}.json").read_text())
    export = b.qbench([*b.cmd, "export", str(out / name), "--format", "jsonl"])
    rows_out = [json.loads(line) for line in export.stdout.splitlines() if line.strip()]
    pairs = [(r["key"], r["name"]) for r in rows_out]   # one row per value of each record
    twice = len(pairs) != len(set(pairs))
    q8_path.write_text((cells / f"{f16.get('key')}.json").read_text())   # again, for plan
    plan = b.qbench([*b.cmd, "plan", str(suite), "--out", str(out), "--json"])
    try:
        status = {r["id"]: r["status"] for r in json.loads(plan.stdout)}
    except ValueError:
        status = {}
    rerun = b.run(suite, out, fault="*/speed=error")
    after = records(cells).get("smol/llama.cpp/Q8_0/footprint", {})
    good = (status.get("smol/llama.cpp/Q8_0/footprint") == "todo" and not twice
            and after.get("key") == q8.get("key") and after.get("status") == "ok"
            and _clean(plan.stderr + export.stderr + rerun.stderr))
    rows.append(Row("a record under another cell's file name (F16's copied over Q8_0's)",
                    "not trusted: plan shows the cell todo, export lists each key once, the "
                    "rerun measures it",
                    f"plan: Q8_0 footprint {status.get('smol/llama.cpp/Q8_0/footprint')}; "
                    f"export shows a key twice: {yes(twice)}; after the rerun Q8_0's file holds "
                    f"its own key: {yes(after.get('key') == q8.get('key'))}", good,
                    seconds=time.monotonic() - t0))

    # 2. valid JSON of the wrong shape
    t0 = time.monotonic()
    q8_path.write_text(json.dumps({"schema_version": 1, "key": q8.get("key"), "status": 5}))
    others = {k: v for k, v in snapshot(cells).items() if k != q8_path.name}
    plan = b.qbench([*b.cmd, "plan", str(suite), "--out", str(out), "--json"])
    rerun = b.run(suite, out, fault="*/speed=error")
    after = records(cells).get("smol/llama.cpp/Q8_0/footprint", {})
    aside = list(cells.glob(f"{q8.get('key')}.corrupt-*"))
    good = (plan.returncode == 0 and rerun.returncode == 2 and after.get("status") == "ok"
            and aside and _clean(plan.stderr + rerun.stderr))
    rows.append(Row("a record of the wrong shape (valid JSON: status 5, fields missing)",
                    "set aside like a corrupt file; plan works; the rerun measures the cell",
                    f"plan exit {plan.returncode}; set aside: {yes(bool(aside))}; rerun exit "
                    f"{rerun.returncode}, Q8_0 footprint {after.get('status')}",
                    good, len(others), len(changed(others, snapshot(cells))),
                    time.monotonic() - t0))

    # 3. two ok records of one cell that disagree, merged
    t0 = time.monotonic()
    other = b.work / "results-records-other"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(out, other)
    forged_path = other / name / "cells" / f"{f16.get('key')}.json"
    forged = json.loads(forged_path.read_text())
    name_v, v = next(iter(sorted(forged["values"].items())))
    v["value"] = v["value"] * 10
    forged["timings"]["started"] = "2099-01-01T00:00:00+00:00"
    forged_path.write_text(json.dumps(forged))
    dest = b.work / "merged-records"
    shutil.rmtree(dest, ignore_errors=True)
    refused = b.qbench([*b.cmd, "merge", str(out), str(other), "--out", str(dest)])
    listed = str(v["value"]) in refused.stderr and "disagree" in refused.stderr
    written = any((dest / name / "cells").glob("*.json")) if (dest / name / "cells").is_dir() \
        else False
    chosen = b.qbench([*b.cmd, "merge", str(out), str(other), "--out", str(dest),
                       "--on-conflict", "newest"])
    won = records(dest / name / "cells").get("smol/llama.cpp/F16/footprint", {})
    good = (refused.returncode == 1 and listed and not written and chosen.returncode == 0
            and won.get("values", {}).get(name_v, {}).get("value") == v["value"]
            and _clean(refused.stderr + chosen.stderr))
    rows.append(Row(f"`qbench merge` of two ok records of one cell, one with {name_v} x10 "
                    "and a later start",
                    "refused (exit 1), both listed with values and artifact hashes, nothing "
                    "written; settled only by --on-conflict",
                    f"exit {refused.returncode}, values listed: {yes(listed)}, written: "
                    f"{yes(written)}; with --on-conflict newest: exit {chosen.returncode}",
                    good, seconds=time.monotonic() - t0))
    return rows


# -- a cached artifact changed on disk (issue 25) ----------------------------------------------
def scenario_artifact_cache(b: Bench) -> list[Row]:
    """A cached GGUF rewritten in place (same size, other bytes): reused only if it still is
    the file that was built."""
    t0 = time.monotonic()
    name = "faults-artifact"
    suite = b.write_suite(name, suite_text(name, quants=("F16", "Q5_1"),
                                           metrics=SPEED + NO_SANITY))
    first = b.run(suite, b.work / "results-artifact-1", "--only", "*/Q5_1/footprint")
    rec = records(b.work / "results-artifact-1" / name / "cells").get(
        "smol/llama.cpp/Q5_1/footprint", {})
    path = Path(rec.get("artifact", {}).get("path", b.work / "missing"))
    sha = rec.get("artifact", {}).get("sha256")
    if not path.is_file():
        return [Row("a cached GGUF rewritten in place", "rebuilt", "no cached file to change "
                    f"(first run exit {first.returncode})", False)]
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)                          # the last tensor's tail zeroed, same size
    path.write_bytes(bytes(data))
    second = b.run(suite, b.work / "results-artifact-2", "--only", "*/Q5_1/footprint")
    rec2 = records(b.work / "results-artifact-2" / name / "cells").get(
        "smol/llama.cpp/Q5_1/footprint", {})
    on_disk = hashlib.sha256(path.read_bytes()).hexdigest()
    log = b.work / "results-artifact-2" / name / "logs" / f"{rec2.get('key')}.log"
    rebuilt = "building it again" in (log.read_text(errors="replace") if log.is_file() else "")
    good = (second.returncode == 0 and rebuilt and rec2.get("artifact", {}).get("sha256") == sha
            and on_disk == sha and _clean(second.stderr))
    return [Row("a cached GGUF (Q5_1) rewritten in place: same size, its tail zeroed",
                "not reused: rebuilt, and the record's sha256 is the file measured",
                f"exit {second.returncode}; rebuilt: {yes(rebuilt)}; the file on disk is the "
                f"one recorded: {yes(on_disk == sha)}", good,
                seconds=time.monotonic() - t0)]
