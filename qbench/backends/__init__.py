"""Backend registry: names users write in suites -> modules loaded only when a cell runs.

Importing this package imports no inference library (a GGUF-only install never imports torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from qbench.quantize import gguf_types, hf_types


@dataclass(frozen=True)
class BackendInfo:
    """What the planner needs to know about a backend without importing it."""

    name: str
    module: str                                  # implements load_backend(...) -> Backend
    distribution: str                            # the pip distribution whose version keys cells
    extra: str                                   # qbench-llm[extra] that installs it
    canonical_quant: Callable[[str], str | None]  # user spelling -> canonical, None if unknown
    unknown_quant: Callable[[str], str]          # error text for an unknown quant name
    float_quants: frozenset[str]                 # unquantized types a base may be


BACKENDS: dict[str, BackendInfo] = {
    "llama.cpp": BackendInfo(
        name="llama.cpp",
        module="qbench.backends.llamacpp",
        distribution="llama-cpp-python",
        extra="gguf",
        canonical_quant=gguf_types.canonical,
        unknown_quant=gguf_types.unknown_message,
        float_quants=gguf_types.FLOAT_TYPES,
    ),
    "transformers": BackendInfo(
        name="transformers",
        module="qbench.backends.transformers",
        distribution="transformers",
        extra="hf",
        canonical_quant=hf_types.canonical,
        unknown_quant=hf_types.unknown_message,
        float_quants=hf_types.FLOAT_TYPES,
    ),
}


def backend_module(name: str):  # noqa: ANN201 - a module
    """Import a backend's implementation module (and so its inference library)."""
    return importlib.import_module(BACKENDS[name].module)
