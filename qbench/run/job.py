"""The job: one cell's work order, from the planner to the worker process and back.

It crosses a process boundary (and, with Ray, a machine boundary) as JSON, so it is a frozen
dataclass with a strict reader: a job written by another qbench version with fields this one
does not know is refused, never half-read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from qbench.errors import QbenchError


@dataclass(frozen=True)
class Job:
    """Everything the worker needs to measure one cell."""

    cell: dict[str, Any]                 # Cell.describe(): the spec stored with the record
    base_dir: str                        # relative paths in the suite are relative to this
    cache_dir: str
    data_dir: str | None = None
    device: str = "auto"                 # the suite's setting (auto | cpu | cuda)
    threads: int = 0                     # as the plan resolved it (0 only from old jobs)
    base_variant: dict[str, Any] | None = None   # the model's base, for metrics that compare
    # metrics this cell serves in its own pass (perplexity -> kld): options and the key of the
    # cell that will read the result (see qbench.metrics.shared_pass)
    companions: dict[str, dict[str, Any]] = field(default_factory=dict)
    parent_pid: int | None = None        # the worker ends itself when this process is gone
    memory_limit_mb: int = 0             # address-space cap of the worker (0: none)
    # a smaller finished cell of the same family (its key and details): the items it scored
    # are taken from it, not scored again (MetricInfo.sample_option)
    reuse: dict[str, Any] | None = None

    @property
    def cell_id(self) -> str:
        return str(self.cell["id"])

    @property
    def key(self) -> str:
        return str(self.cell["key"])

    @property
    def metric(self) -> str:
        return str(self.cell["metric"])

    @property
    def model(self) -> dict[str, Any]:
        return self.cell.get("model") or {}

    @property
    def variant(self) -> dict[str, Any]:
        return self.cell.get("variant") or {}

    @property
    def run_device(self) -> str:
        """The device as resolved for the cell key (cpu | cuda | auto-gpu)."""
        return str((self.cell.get("run") or {}).get("device", self.device))

    def replace(self, **changes: Any) -> Job:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> Job:
        """Read a job strictly: unknown or missing fields are an error naming them."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise QbenchError("a job must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QbenchError(f"job has fields this qbench does not know: {', '.join(unknown)} "
                              "(written by another qbench version?)")
        try:
            return cls(**data)
        except TypeError as exc:
            raise QbenchError(f"job is incomplete: {exc}") from None
