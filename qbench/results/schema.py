"""The shape of stored records, their version, and migrations from older versions.

A record written by a newer qbench is refused (with both versions named) rather than misread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, TypedDict

from qbench.errors import StoreError

SCHEMA_VERSION = 1

Status = Literal["ok", "failed", "timeout", "crashed", "skipped"]
STATUSES: tuple[str, ...] = ("ok", "failed", "timeout", "crashed", "skipped")
FAILED: tuple[str, ...] = ("failed", "timeout", "crashed")   # a cell that went wrong
NOT_OK: tuple[str, ...] = FAILED + ("skipped",)               # a cell without values


class Value(TypedDict):
    value: float | None
    stderr: NotRequired[float | None]
    n: NotRequired[int | None]
    unit: NotRequired[str]


class Memory(TypedDict, total=False):
    peak_rss_mb: float            # max resident set of the cell's process tree (sampled + rusage)
    peak_vram_mb: float | None    # NVML per-process, sampled; None without a GPU
    torch_max_allocated_mb: float | None
    vram_note: str | None         # why peak_vram_mb is None where NVML works (container PIDs)
    # set when the cell was not the first of its worker process: what its window may include
    # besides the cell's own memory (the variant loaded earlier, a base still held)
    note: str | None


class CellRecord(TypedDict):
    schema_version: int
    key: str
    id: str                       # model/backend/quant/metric, for people
    suite: str
    run_id: str
    model: dict[str, Any]
    variant: dict[str, Any]
    metric: str
    metric_version: str
    options: dict[str, Any]
    status: Status
    error: str | None
    signal: str | None
    stderr_tail: str | None
    values: dict[str, Value]      # metric outputs: name -> value, stderr, n
    details: dict[str, Any]       # metric extras (per-chunk data, histograms, texts)
    artifact: dict[str, Any]      # the file measured: path, sha256, size, provenance
    backend: dict[str, Any]       # device, threads, offload, build info
    memory: Memory
    timings: dict[str, Any]
    env: dict[str, Any]
    run: NotRequired[dict[str, Any]]   # threads and device the cell ran with (in its key)
    lock: NotRequired[dict[str, Any]]      # qbench.host.machine_lock.Hold.as_record()
    fitness: NotRequired[dict[str, Any]]   # a timed metric's: reliable, reasons, rounds, windows


# version n -> function turning a version-n record into version n+1
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def migrate(record: dict[str, Any], *, where: str) -> dict[str, Any]:
    """Bring ``record`` to SCHEMA_VERSION or raise StoreError naming the version."""
    version = record.get("schema_version")
    if not isinstance(version, int):
        raise StoreError(f"not a qbench cell record (no integer schema_version)", file=where)
    if version > SCHEMA_VERSION:
        raise StoreError(f"written by a newer qbench (schema version {version}; this qbench "
                         f"reads up to {SCHEMA_VERSION}): upgrade qbench", file=where)
    while version < SCHEMA_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise StoreError(f"schema version {version} is too old to migrate (this qbench "
                             f"reads {min(MIGRATIONS, default=SCHEMA_VERSION)}.."
                             f"{SCHEMA_VERSION})", file=where)
        record = step(record)
        version = record["schema_version"]
    if record.get("status") not in STATUSES:
        raise StoreError(f"unknown status {record.get('status')!r}", file=where)
    return record


@dataclass
class Outcome:
    """What happened to one cell's process: its status, result and measured memory."""

    status: str                      # ok | failed | timeout | crashed | skipped
    error: str | None = None
    signal: str | None = None
    stderr_tail: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_vram_mb: float | None = None   # None: not measured (no NVML) or not attributable
    wall_s: float = 0.0
    vram_note: str | None = None     # why peak_vram_mb is None on a machine with NVML
    memory_note: str | None = None   # what else the cell's memory window may include


def make_record(spec: dict[str, Any], outcome: Outcome, run_id: str, started: str,
                env: dict[str, Any]) -> dict[str, Any]:
    """The stored record of one cell: its spec (the plan's ``Cell.describe()``), outcome,
    values, provenance and environment."""
    res = outcome.result
    return {
        "schema_version": SCHEMA_VERSION, "key": spec["key"], "id": spec["id"],
        "suite": spec["suite"], "run_id": run_id, "model": spec["model"],
        "variant": spec["variant"], "metric": spec["metric"],
        "metric_version": spec["metric_version"], "options": spec["options"],
        "run": spec["run"], "status": outcome.status, "error": outcome.error,
        "signal": outcome.signal, "stderr_tail": outcome.stderr_tail,
        "values": res.get("values", {}) if outcome.status == "ok" else {},
        "details": res.get("details", {}), "artifact": res.get("artifact", {}),
        "backend": res.get("backend", {}),
        "memory": {"peak_rss_mb": round(outcome.peak_rss_mb, 1),
                   "peak_vram_mb": (None if outcome.peak_vram_mb is None
                                    else round(outcome.peak_vram_mb, 1)),
                   "torch_max_allocated_mb": (res.get("torch_max_allocated_mb") or
                                              res.get("backend", {}).get(
                                                  "torch_max_allocated_mb")),
                   "vram_note": outcome.vram_note, "note": outcome.memory_note},
        "timings": {"started": started, "wall_s": round(outcome.wall_s, 3),
                    **res.get("timings", {})},
        "env": env,
        # how the cell held the machine lock, and whether its timing is fit to compare
        **{k: res[k] for k in ("lock", "fitness") if k in res},
        # the cell's family (same cell, other sample size) and the sequential plan it was
        # measured under (qbench run --until-decided)
        **{k: spec[k] for k in ("family", "decide") if spec.get(k)},
    }
