"""The ``toy_hog`` metric: allocates ``mb`` MiB (every page touched), frees it, reports the size.

For tests of per-cell memory: a cell that peaks high followed, in the same worker process, by
one that does not (tests/test_batch.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbench.metrics import MetricInfo
from qbench.metrics.context import CellContext, value

INFO = MetricInfo(
    name="toy_hog", version="1", primary="allocated_mb", higher_is_better=False,
    methodology="Allocates and frees a buffer (a plugin metric, for tests).",
)

PAGE = 4096


@dataclass(frozen=True)
class Options:
    mb: int = 256


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    _ = ctx.backend                                  # loads the variant, as a real metric would
    size = options.mb * 2**20
    buf = bytearray(size)
    buf[::PAGE] = b"\x01" * len(range(0, size, PAGE))   # resident, not just reserved
    touched = sum(buf[::PAGE])
    del buf
    return {"values": {"allocated_mb": value(touched * PAGE / 2**20, unit="MiB")},
            "details": {}}
