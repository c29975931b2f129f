"""qbench: measure what quantization really costs an LLM.

``qbench.load(path)`` and ``qbench.load_details(path, metric)`` read stored results as pandas
DataFrames (``pip install 'qbench-llm[pandas]'``). They are imported on first use, so importing
qbench (and running ``qbench run``) never imports pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qbench.version import __version__
__all__ = ["__version__", "load", "load_details"]

if TYPE_CHECKING:
    from qbench.results.frame import load, load_details


def __getattr__(name: str) -> Any:
    """Lazy attributes: the pandas-backed API loads only when someone asks for it."""
    if name in ("load", "load_details"):
        from qbench.results import frame

        return getattr(frame, name)
    raise AttributeError(f"module 'qbench' has no attribute {name!r}")
