"""Entry points other installed packages declare: how plugins register backends and metrics.

The lookup reads the installed distributions' metadata once per process (importlib.metadata,
as pluggy-based tools such as simonw/llm do); nothing is imported until a plugin is used.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any


def entry_points_of(group: str) -> dict[str, str]:
    """name -> ``module[:attribute]`` for every entry point in ``group``."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=group)}


def load_target(target: str) -> Any:
    """Import ``module:attribute`` (or a bare module) and return it."""
    module_name, _, attribute = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attribute.split(".")):
        obj = getattr(obj, part)
    return obj
