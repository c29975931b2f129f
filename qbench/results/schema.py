"""The shape of stored records, their version, and migrations from older versions.

A record written by a newer qbench is refused (with both versions named) rather than misread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NotRequired, TypedDict

from qbench.errors import StoreError

SCHEMA_VERSION = 1

Status = Literal["ok", "failed", "timeout", "crashed", "skipped"]
STATUSES: tuple[str, ...] = ("ok", "failed", "timeout", "crashed", "skipped")


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
