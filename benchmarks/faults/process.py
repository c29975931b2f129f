"""Process faults: qbench killed with SIGKILL, a cell that segfaults or aborts, one that runs out
of memory, one that hangs with a grandchild; SIGKILL, SIGTERM and SIGINT sent to qbench alone
while its cell runs a grandchild (issue 25).

Together because they all test the same promise of the executor: a cell's process dying or
stalling is recorded as that cell's outcome, the run goes on, and no finished result is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from .common import (NO_SANITY, SPEED, Bench, Row, _clean, audit, changed, last_error_line,
                     records, short, snapshot, statuses, suite_text, yes)


# -- kill -9 -----------------------------------------------------------------------------------
def _tree(pid: int) -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def kill_run_at(b: Bench, suite: Path, out: Path, cells: Path, target: int,
                timeout: float = 900) -> dict[str, Any]:
    """Start ``qbench run``, SIGKILL its process group once ``target`` result files exist.

    The cell in flight runs in its own session (so a timeout can kill its tree); it must end
    by itself when qbench dies (PR_SET_PDEATHSIG + a parent watcher): survivors are counted,
    then killed here by pid."""
    err_path = out.parent / f"{out.name}-kill-{target}.stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(b.run_args(suite, out), stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL, env=b.env(),
                                start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout
    reached = False
    try:
        while time.monotonic() < deadline:
            seen |= _tree(proc.pid)
            if len(list(cells.glob("*.json"))) >= target:
                reached = True
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        seen |= _tree(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    gone_in = time.monotonic()
    _, alive = psutil.wait_procs(list(seen.values()), timeout=20)
    orphans = _alive(alive)
    for p in orphans:                       # ours: end them so the next run is not disturbed
        with contextlib.suppress(psutil.Error):
            p.kill()
    b.log(f"    killed qbench (pid {proc.pid}) with {len(list(cells.glob('*.json')))} result "
          f"files; {len(seen)} descendants, {len(orphans)} outlived it")
    return {"reached": reached, "exit": proc.returncode, "orphans": len(orphans),
            "descendants": len(seen), "stderr": err_path.read_text(errors="replace"),
            "settle_s": time.monotonic() - gone_in}


def scenario_kill(b: Bench, points: tuple[int, ...] = (1, 3, 5),
                  quants: tuple[str, ...] = ("F16", "Q8_0"), name: str = "faults-kill"
                  ) -> list[Row]:
    """kill -9 at several points of one suite, each kill resuming the previous run; then a run
    to completion. Every file on disk at a kill must come out of it byte-identical."""
    suite = b.write_suite(name, suite_text(name, quants=quants))
    out = b.work / "results-kill"
    cells = out / name / "cells"
    total = len(quants) * 3
    kills: list[dict[str, Any]] = []
    for target in points:
        if target >= total:
            continue
        t0 = time.monotonic()
        info = kill_run_at(b, suite, out, cells, target)
        info.update(target=target, snap=snapshot(cells), audit=audit(cells),
                    seconds=time.monotonic() - t0)
        # nothing from an earlier kill was touched by the run just killed
        info["rewritten_by_next"] = changed(kills[-1]["snap"], info["snap"]) if kills else []
        kills.append(info)
    t0 = time.monotonic()
    final = b.run(suite, out)
    after = snapshot(cells)
    final_audit = audit(cells)
    recs = records(cells)
    all_ok = len(recs) == total and all(r["status"] == "ok" for r in recs.values())
    done_msg = re.search(r"(\d+) already done", final.stderr)
    rows = []
    for k in kills:
        n = len(k["snap"])
        lost = changed(k["snap"], after)
        good = (k["reached"] and k["orphans"] == 0 and not k["audit"].corrupt
                and not k["audit"].stray and not k["rewritten_by_next"] and not lost
                and final.returncode == 0 and all_ok)
        observed = (f"killed with {n} on disk; cell process outlived qbench: "
                    f"{yes(k['orphans'] > 0)}; partial/temp files: "
                    f"{len(k['audit'].corrupt) + len(k['audit'].stray)}; "
                    f"final rerun exit {final.returncode}, {statuses(recs)}, "
                    f"{n - len(lost)}/{n} kept byte for byte (mtime too)")
        if not k["reached"]:
            observed = f"run ended (exit {k['exit']}) before {k['target']} cells: not killed"
        rows.append(Row(f"kill -9 of qbench after {k['target']} finished cell(s)",
                        "rerun completes; every cell on disk at the kill kept, none "
                        "recomputed; the cell in flight dies with qbench",
                        observed, good, n, len(lost), k["seconds"]))
    if rows:
        rows[-1].seconds += time.monotonic() - t0
        rows[-1].observed += (f"; last rerun said '{done_msg.group(0)}'" if done_msg else "")
    if final_audit.corrupt or final_audit.stray:
        rows.append(Row("kill -9 (files left after the rerun)", "no partial or temp files",
                        f"corrupt {final_audit.corrupt}, stray {final_audit.stray}", False))
    return rows


# -- crashes, memory, hangs ------------------------------------------------------------------
def scenario_crash(b: Bench) -> list[Row]:
    name = "faults-crash"
    suite = b.write_suite(name, suite_text(name))
    out = b.work / "results-crash"
    t0 = time.monotonic()
    fault = "*/F16/perplexity=segfault;*/Q8_0/speed=abort"
    proc = b.run(suite, out, fault=fault)
    recs = records(out / name / "cells")
    others = {i: r for i, r in recs.items()
              if i not in ("smol/llama.cpp/F16/perplexity", "smol/llama.cpp/Q8_0/speed")}
    others_ok = len(others) == 4 and all(r["status"] == "ok" for r in others.values())
    rows = []
    for cid, sig, marker, what in (("smol/llama.cpp/F16/perplexity", "SIGSEGV",
                                    "Segmentation fault", "segfaults"),
                                   ("smol/llama.cpp/Q8_0/speed", "SIGABRT", "Aborted",
                                    "aborts")):
        r = recs.get(cid, {})
        good = (r.get("status") == "crashed" and r.get("signal") == sig
                and marker in (r.get("stderr_tail") or "") and sig in (r.get("error") or "")
                and others_ok and proc.returncode == 2 and _clean(proc.stderr))
        rows.append(Row(f"a cell's process {what} ({cid})",
                        f"cell crashed with {sig} and the stderr tail; other cells ok; exit 2",
                        f"{r.get('status')} {r.get('signal')}: {short(r.get('error'), 60)}; "
                        f"tail has '{marker}': {yes(marker in (r.get('stderr_tail') or ''))}; "
                        f"others: {statuses(others)}; exit {proc.returncode}",
                        good, len(others), 4 - sum(r["status"] == "ok"
                                                   for r in others.values()),
                        time.monotonic() - t0))
    return rows


def scenario_oom(b: Bench, limit_mb: int = 400) -> list[Row]:
    name = "faults-oom"
    suite = b.write_suite(name, suite_text(name, memory_limit_mb=limit_mb))
    out = b.work / "results-oom"
    cells = out / name / "cells"
    t0 = time.monotonic()
    proc = b.run(suite, out, "--only", "*/footprint", "--only", "*/F16/perplexity",
                 fault="*/F16/perplexity=oom")
    recs = records(cells)
    r = recs.get("smol/llama.cpp/F16/perplexity", {})
    foot = [recs.get(f"smol/llama.cpp/{q}/footprint", {}) for q in ("F16", "Q8_0")]
    good = (r.get("status") == "failed" and "out of memory" in (r.get("error") or "")
            and all(f.get("status") == "ok" for f in foot) and proc.returncode == 2
            and _clean(proc.stderr))
    rows = [Row(f"a cell allocates past memory_limit_mb={limit_mb} (QBENCH_FAULT oom)",
                "cell failed: out of memory; the run goes on (next cell ok)",
                f"{r.get('status')}: {short(r.get('error'), 70)}; footprint cells: "
                f"{', '.join(str(f.get('status')) for f in foot)}; exit {proc.returncode}",
                good, 1, sum(f.get("status") != "ok" for f in foot),
                time.monotonic() - t0)]
    # the same limit, no injection: llama.cpp itself runs out of address space
    t0 = time.monotonic()
    before = snapshot(cells)
    proc = b.run(suite, out, "--only", "*/Q8_0/speed")
    r = records(cells).get("smol/llama.cpp/Q8_0/speed", {})
    named = "out of memory" in (r.get("error") or "").lower()
    good = (r.get("status") == "ok" or (r.get("status") in ("failed", "crashed") and named))
    tail = r.get("stderr_tail") or ""
    hint = re.search(r"(insufficient memory[^\n]*|mmap failed[^\n]*|Cannot allocate memory)",
                     (out / name / "logs" / f"{r.get('key')}.log").read_text(errors="replace")
                     if r.get("key") else "")
    rows.append(Row(f"llama.cpp itself exceeds memory_limit_mb={limit_mb} (no injection, "
                    "Q8_0 speed)",
                    "ok, or failed/crashed with 'out of memory' in the error",
                    f"{r.get('status')} {r.get('signal') or ''}: {short(r.get('error'), 110)}"
                    + (f"; the log says '{short(hint.group(0), 60)}'" if hint else "")
                    + f"; OOM named in the tail: {yes('memory' in tail.lower())}",
                    good, len(before), len(changed(before, snapshot(cells))),
                    time.monotonic() - t0))
    return rows


def scenario_hang(b: Bench, timeout_s: float = 20) -> list[Row]:
    name = "faults-hang"
    suite = b.write_suite(name, suite_text(name, timeout_s=timeout_s))
    out = b.work / "results-hang"
    t0 = time.monotonic()
    proc = b.run(suite, out, "--only", "*/footprint", "--only", "*/F16/speed",
                 fault="*/F16/speed=hang-tree")
    recs = records(out / name / "cells")
    r = recs.get("smol/llama.cpp/F16/speed", {})
    log = out / name / "logs" / f"{r.get('key')}.log"
    m = re.search(r"grandchild pid (\d+)", log.read_text(errors="replace")
                  if log.is_file() else "")
    grandchild_alive = None
    if m:
        try:
            grandchild = [psutil.Process(int(m.group(1)))]
        except psutil.NoSuchProcess:
            grandchild = []
        grandchild_alive = bool(_alive(grandchild))
        for g in _alive(grandchild):          # ours: do not leave it behind
            with contextlib.suppress(psutil.Error):
                g.kill()
    foot = [recs.get(f"smol/llama.cpp/{q}/footprint", {}) for q in ("F16", "Q8_0")]
    good = (r.get("status") == "timeout" and r.get("signal") == "SIGKILL"
            and grandchild_alive is False and all(f.get("status") == "ok" for f in foot)
            and proc.returncode == 2 and _clean(proc.stderr))
    return [Row(f"a cell hangs past timeout_s={timeout_s:g}, with a hanging grandchild",
                "cell timeout; its whole process tree killed; the run goes on",
                f"{r.get('status')} {r.get('signal')}: {short(r.get('error'), 60)}; "
                f"grandchild still alive: {grandchild_alive}; footprint cells: "
                f"{', '.join(str(f.get('status')) for f in foot)}; exit {proc.returncode}",
                good, 1, sum(f.get("status") != "ok" for f in foot), time.monotonic() - t0)]


# -- signals to qbench itself (issue 25) -----------------------------------------------------
def signal_run(b: Bench, sig: signal.Signals, timeout: float = 300) -> dict[str, Any]:
    """Start ``qbench run`` on a suite whose first cell starts a hanging grandchild (hang-tree),
    send ``sig`` to the qbench process alone (as `kill PID`, `timeout`, a CI runner or Slurm
    do) once the grandchild runs, and see what outlives it."""
    name = f"faults-signal-{sig.name.lower()}"
    suite = b.write_suite(name, suite_text(name, quants=("F16",), metrics=SPEED + NO_SANITY))
    out = b.work / f"results-{name}"
    system_tmp = b.work / f"tmp-{name}"             # stands for /tmp during this run
    system_tmp.mkdir(parents=True, exist_ok=True)
    err_path = b.work / f"{name}.stderr"
    env = b.env("*=hang-tree", TMPDIR=str(system_tmp))
    # SIGINT at its default in qbench even when the bench runs as a background job of a shell
    # without job control (SIGINT ignored there, which exec keeps); exec resets a handler
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with err_path.open("w") as err:
            proc = subprocess.Popen(b.run_args(suite, out), stdout=subprocess.DEVNULL,
                                    stderr=err, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, before)
    grandchild = None
    tree: list[psutil.Process] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and grandchild is None:
            for log in (out / name / "logs").glob("*.log") if (out / name / "logs").is_dir() \
                    else ():
                m = re.search(r"grandchild pid (\d+)", log.read_text(errors="replace"))
                if m:
                    grandchild = int(m.group(1))
            time.sleep(0.1)
        if grandchild is not None:
            with contextlib.suppress(psutil.Error):
                tree = [psutil.Process(grandchild), *_tree(proc.pid).values()]
            os.kill(proc.pid, sig)
            proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=20)
    orphans = _alive(alive)
    for p in orphans:                       # ours: end them so the next run is not disturbed
        with contextlib.suppress(psutil.Error):
            p.kill()
    manifests = sorted((out / name / "runs").glob("*.json")) if (out / name / "runs").is_dir() \
        else []
    manifest = json.loads(manifests[-1].read_text()) if manifests else {}
    return {"started": grandchild is not None, "exit": proc.returncode, "tree": len(tree),
            "orphans": len(orphans), "manifest": manifest,
            "tmp_left": sorted(p.name for p in system_tmp.iterdir()),
            "stderr": err_path.read_text(errors="replace")}


def scenario_signals(b: Bench) -> list[Row]:
    """SIGKILL, SIGTERM and SIGINT to `qbench run` alone, its cell holding a real grandchild:
    nothing survives; SIGTERM and SIGINT finish the run record as interrupted."""
    rows = []
    for sig, code in ((signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 128 + signal.SIGTERM),
                      (signal.SIGINT, 130)):
        t0 = time.monotonic()
        r = signal_run(b, sig)
        m = r["manifest"]
        finished = bool(m.get("finished")) and m.get("interrupted") is True \
            and m.get("signal") == sig.name
        good = (r["started"] and r["orphans"] == 0 and r["exit"] == code and not r["tmp_left"]
                and (sig == signal.SIGKILL or finished) and _clean(r["stderr"]))
        rows.append(Row(
            f"{sig.name} to `qbench run` alone while its cell runs a grandchild (hang-tree)",
            "no process of the cell outlives qbench"
            + ("" if sig == signal.SIGKILL else
               f"; exit {code}; run record finished, interrupted by {sig.name}")
            + "; nothing left in the system temp folder",
            f"exit {r['exit']}; {r['orphans']} of {r['tree']} cell processes outlived it; "
            f"record finished: {yes(bool(m.get('finished')))}, interrupted: "
            f"{m.get('interrupted')}, signal: {m.get('signal')}; left in TMPDIR: "
            f"{r['tmp_left'] or 'nothing'}" if r["started"] else
            f"the fault never started (exit {r['exit']}): "
            f"{short(last_error_line(r['stderr']), 100)}",
            good, seconds=time.monotonic() - t0))
    return rows
