"""Context depth: ``ctx = [512, 4096, 8192]`` under a chunked metric makes one cell per context.

A quantized KV cache's error grows with the context it holds (ik_llama.cpp PR #1547 measures
at 8,192 tokens, not 512), so perplexity and KLD take a list of contexts. ``chunks`` is one
count for every context or a list as long as ``ctx`` (the count at each: 16 chunks of 512
tokens and 2 of 8,192 score a similar number of tokens).

Each entry is a *point*. The first listed is the metric's main point: its cells keep the plain
id (``model/backend/quant/perplexity``) and key, so listing more contexts adds cells and
changes none; every other point's cell id carries ``@ctx=N`` (``.../perplexity@ctx=8192``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qbench.errors import ConfigError


def as_list(x: Any) -> tuple[Any, ...]:
    """A scalar option as a one-entry tuple; a tuple as it is."""
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def check_ctx_list(ctx: Any, chunks: Any, *, file: str, key: str) -> None:
    """Each context even and at least 8 tokens, none twice; ``chunks`` one count or one per
    context."""
    contexts = as_list(ctx)
    if not contexts:
        raise ConfigError("empty ctx list", file=file, key=f"{key}.ctx")
    for i, c in enumerate(contexts):
        where = f"{key}.ctx[{i}]" if isinstance(ctx, (list, tuple)) else f"{key}.ctx"
        if c is None:
            continue
        if c < 8 or c % 2:
            raise ConfigError(f"expected an even context of at least 8 tokens, got {c}",
                              file=file, key=where)
    if len(set(contexts)) != len(contexts):
        raise ConfigError(f"the ctx list names a context twice: {list(contexts)}", file=file,
                          key=f"{key}.ctx")
    if isinstance(chunks, (list, tuple)) and len(chunks) != len(contexts):
        raise ConfigError(f"expected one chunk count, or one per context ({len(contexts)} "
                          f"for ctx = {list(contexts)}), got {len(chunks)}: {list(chunks)}",
                          file=file, key=f"{key}.chunks")


def ctx_points(ctx: Any, chunks: Any) -> list[tuple[str, Any, Any]]:
    """(point label, ctx, chunks) per listed context: the first labelled '' (the main point,
    plain cell ids), the others 'ctx=N'. A scalar ctx is one main point."""
    contexts = as_list(ctx)
    counts: Sequence[Any] = (tuple(chunks) if isinstance(chunks, (list, tuple))
                             else (chunks,) * len(contexts))
    return [("" if i == 0 else f"ctx={c}", c, n)
            for i, (c, n) in enumerate(zip(contexts, counts))]


def point_suffix(point: str) -> str:
    """What a point adds to a metric's name in a cell id: '' or '@ctx=8192'."""
    return f"@{point}" if point else ""


def split_metric(name: str) -> tuple[str, str]:
    """'perplexity@ctx=8192' -> ('perplexity', 'ctx=8192'); a plain name -> (name, '')."""
    metric, _, point = name.partition("@")
    return metric, point
