"""Build frozen dataclasses from TOML tables, strictly: unknown keys and wrong types are errors.

Shared by the suite parser and by every metric's options, so all of them report mistakes the
same way: ``suite.toml: metrics.perplexity.ctx: expected an integer, got 'big'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from qbench.errors import ConfigError, did_you_mean

T = TypeVar("T")

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"a list of {_describe(inner).removeprefix('a ').removeprefix('an ')}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, *, file: str, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in its canonical form."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, file=file, key=key)
            except ConfigError:
                continue
        raise ConfigError(f"expected {_describe(tp)}, got {value!r}", file=file, key=key)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = did_you_mean(str(value), [str(a) for a in allowed])
            raise ConfigError(
                f"expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}{hint}",
                file=file, key=key,
            )
        return value
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"expected {_describe(tp)}, got {value!r}", file=file, key=key)
        return tuple(coerce(v, inner, file=file, key=f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {value!r}", file=file, key=key)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", file=file, key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", file=file, key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", file=file, key=key)
        if not math.isfinite(value):
            # TOML has nan and inf; every comparison with nan is false, so a nan limit (a
            # timeout, a tolerance) would silently turn its check off
            raise ConfigError(f"expected a finite number, got {value!r}", file=file, key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", file=file, key=key)
        return value
    raise TypeError(f"unsupported option type {tp!r} at {key}")  # a bug in qbench, not user input


def from_table(cls: type[T], table: Any, *, file: str, key: str) -> T:
    """Instantiate dataclass ``cls`` from a TOML table, rejecting unknown keys and bad types."""
    if not isinstance(table, dict):
        raise ConfigError(f"expected a table, got {table!r}", file=file, key=key)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for name in table:
        if name not in fields:
            raise ConfigError(
                f"unknown key '{name}'{did_you_mean(name, fields)}; expected one of: "
                + ", ".join(sorted(fields)),
                file=file, key=f"{key}.{name}" if key else name,
            )
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in table:
            kwargs[name] = coerce(table[name], hints[name], file=file, key=sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{name}' ({_describe(hints[name])})",
                              file=file, key=sub)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(file=file, key=key)
    return obj


def positive(value: float | int, *, file: str, key: str, allow_zero: bool = False) -> None:
    """Raise a ConfigError unless ``value`` is a finite number > 0 (or >= 0)."""
    if not math.isfinite(value):
        raise ConfigError(f"expected a finite number, got {value!r}", file=file, key=key)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"expected a number {bound}, got {value!r}", file=file, key=key)


def finite_float(text: str) -> float:
    """argparse's ``type`` for a number option: a float that is not nan or infinite (argparse's
    own ``float`` takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
