"""What making (or finding) one variant's file needs: the contract between the worker and a
backend's ``prepare`` function (BackendInfo.prepare), built-in or plugin."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PrepareRequest:
    variant: Mapping[str, Any]    # the variant's parameters (backend, quant, source, imatrix, ...)
    model: Mapping[str, Any]      # the model spec (id, source, base, trust_remote_code, ...)
    model_file: Path              # the model's local file or folder
    model_sha: str                # its content sha256
    base_dir: Path                # the suite's folder: relative paths are relative to it
    data_dir: Path | None         # where named datasets live
    cache_dir: Path
    threads: int

    def for_variant(self, variant: Mapping[str, Any]) -> PrepareRequest:
        """The same request for another variant of the model (the base, for KLD)."""
        return PrepareRequest(variant, self.model, self.model_file, self.model_sha,
                              self.base_dir, self.data_dir, self.cache_dir, self.threads)


# a prepared variant: the file (or descriptor) to load, and its description for the record
Prepared = tuple[Path, dict[str, Any]]
