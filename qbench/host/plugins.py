"""Entry points other installed packages declare: how plugins register backends and metrics.

The lookup reads the installed distributions' metadata once per process (importlib.metadata,
as pluggy-based tools such as simonw/llm do); nothing is imported until a plugin is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any, TypeVar

from qbench.errors import QbenchError

T = TypeVar("T")


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


def with_plugins(group: str, builtin: Mapping[str, T], kind: str,
                 convert: Callable[[str, str], T]) -> dict[str, T]:
    """``builtin``, then every entry point of ``group`` (sorted by name) as
    ``convert(name, target)``. A plugin may not take a built-in name: results would then
    mean two different things under one name."""
    out = dict(builtin)
    for name, target in sorted(entry_points_of(group).items()):
        if name in out:
            raise QbenchError(f"the {kind} name {name!r} registered by a plugin ({target}) "
                              "is already qbench's own: rename it")
        out[name] = convert(name, target)
    return out
