"""Stored results as pandas DataFrames, for analysis in a notebook or a script.

``load`` gives the flat table of ``qbench export`` (one row per metric value, failed cells as
one row with their status and error) with real dtypes; ``load_details`` gives the per-question
/ per-chunk / per-repetition data a cell keeps, so two variants can be compared pairwise (the
same questions, the same chunks). pandas and pyarrow are the optional ``pandas`` extra: this
module is only imported on demand (``qbench.load``), never by ``qbench run``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from qbench.errors import MissingExtraError, QbenchError
from qbench.results.export import COLUMNS, flat_rows
from qbench.results.schema import STATUSES

if TYPE_CHECKING:
    import pandas as pd

PathArg = str | PathLike[str] | Sequence[str | PathLike[str]]

CATEGORICAL = ("suite", "model", "backend", "quant", "metric", "name", "unit")
FLOAT = ("value", "stderr")
TEXT = ("error", "key", "id")
# the columns every details frame starts with: which cell a row belongs to
CELL_COLUMNS = ("suite", "model", "backend", "quant", "metric", "key", "id")


def require_pandas(why: str = "qbench.load") -> ModuleType:
    """pandas, or an error naming the extra that installs it."""
    try:
        import pandas
    except ImportError:
        raise MissingExtraError("pandas", "pandas", why) from None
    return pandas


def require_pyarrow(why: str = "Parquet") -> None:
    """Parquet goes through pyarrow; say which extra brings it before pandas fails deeper."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MissingExtraError("pyarrow", "pandas", why) from None


def _paths(paths: PathArg) -> list[Path]:
    if isinstance(paths, (str, PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    from qbench.results.store import load_results

    return load_results(list(paths))


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """Give the flat table its dtypes: numbers numeric, labels categorical, text as strings.

    Idempotent, so a frame read back from Parquet (or concatenated) is normalised the same way.
    """
    pd = require_pandas()
    df = df.reindex(columns=list(COLUMNS)).reset_index(drop=True)
    for col in CATEGORICAL:
        df[col] = df[col].astype("string").astype("category")
    df["status"] = pd.Categorical(df["status"].astype("string"), categories=list(STATUSES))
    for col in FLOAT:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    df["n"] = pd.to_numeric(df["n"], errors="coerce").astype("Int64")
    for col in TEXT:
        df[col] = df[col].astype("string")
    return df


def frame_from_rows(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The typed DataFrame of :func:`qbench.results.export.flat_rows` output."""
    pd = require_pandas()
    return typed(pd.DataFrame(rows, columns=list(COLUMNS)))


def load(paths: PathArg) -> pd.DataFrame:
    """One row per stored metric value (the columns of ``qbench export``), typed.

    ``paths``: result folders (a suite's, or a results root), cell JSON files, or Parquet files
    written by ``qbench export --format parquet``, alone or in a list. Failed, crashed, timed-out
    and skipped cells are one row each, with ``status`` and ``error`` and no value.
    """
    pd = require_pandas()
    frames, others = [], []
    for p in _paths(paths):
        if p.suffix.lower() == ".parquet":
            require_pyarrow("reading Parquet")
            if not p.is_file():
                raise QbenchError("no such Parquet file", file=str(p))
            frames.append(pd.read_parquet(p, engine="pyarrow"))
        else:
            others.append(p)
    if others:
        frames.append(pd.DataFrame(flat_rows(_records(others)), columns=list(COLUMNS)))
    if len(frames) > 1:   # categoricals with different categories: plain values first
        frames = [f.astype({c: "object" for c in CATEGORICAL + ("status",)}) for f in frames]
    return typed(pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0])


def to_parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    """The flat table as a Parquet file's bytes (written atomically by the caller)."""
    require_pandas("Parquet export")
    require_pyarrow("Parquet export")
    buf = io.BytesIO()
    frame_from_rows(rows).to_parquet(buf, engine="pyarrow", index=False)
    return buf.getvalue()


# ---- per-cell details ---------------------------------------------------------------------

def _mmlu_rows(details: dict[str, Any], values: dict[str, Any]) -> list[dict[str, Any]]:
    ids, correct = details.get("question_ids") or [], details.get("correct") or []
    predicted = details.get("predicted") or [None] * len(ids)
    return [{"question_id": int(q), "correct": bool(c), "predicted": p}
            for q, c, p in zip(ids, correct, predicted)]


def _perplexity_rows(details: dict[str, Any], values: dict[str, Any]) -> list[dict[str, Any]]:
    """Per chunk: PPL, and the NLL sum and token count where the record has them (newer
    records; the exact inputs of a paired ln PPL ratio), else mean NLL = ln PPL."""
    ppls = details.get("per_chunk_ppl") or []
    sums = details.get("per_chunk_nll_sum") or [None] * len(ppls)
    tokens = details.get("per_chunk_tokens") or [None] * len(ppls)
    rows = []
    for i, (p, s, n) in enumerate(zip(ppls, sums, tokens)):
        mean = s / n if s is not None and n else (math.log(p) if p > 0 else math.nan)
        rows.append({"chunk": i, "ppl": float(p), "mean_nll": mean, "nll_sum": s, "tokens": n})
    return rows


def _kld_rows(details: dict[str, Any], values: dict[str, Any]) -> list[dict[str, Any]]:
    kld = details.get("per_chunk_kld") or []
    same = details.get("per_chunk_same_top") or [None] * len(kld)
    return [{"chunk": i, "kld_mean": k, "same_top_frac": t}
            for i, (k, t) in enumerate(zip(kld, same))]


def _speed_rows(details: dict[str, Any], values: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": name, "repetition": i, "tokens_per_s": float(s),
             "tokens": v.get("tokens")}
            for name, v in sorted(values.items()) for i, s in enumerate(v.get("samples") or [])]


# metric -> (rows of one cell from its details and values, the columns those rows have)
DETAILS: dict[str, tuple[Callable[[dict[str, Any], dict[str, Any]], list[dict[str, Any]]],
                         tuple[str, ...]]] = {
    "mmlu": (_mmlu_rows, ("question_id", "correct", "predicted")),
    "perplexity": (_perplexity_rows, ("chunk", "ppl", "mean_nll", "nll_sum", "tokens")),
    "kld": (_kld_rows, ("chunk", "kld_mean", "same_top_frac")),
    "speed": (_speed_rows, ("name", "repetition", "tokens_per_s", "tokens")),
}


def _ok_cells(paths: PathArg, metric: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, the columns naming its cell) of every ok cell of ``metric``."""
    for rec in _records(_paths(paths)):
        if rec["metric"] == metric and rec["status"] == "ok":
            yield rec, {"suite": rec["suite"], "model": rec["model"]["id"],
                        "backend": rec["variant"]["backend"], "quant": rec["variant"]["quant"],
                        "metric": metric, "key": rec["key"], "id": rec.get("id")}


def load_details(paths: PathArg, metric: str = "mmlu") -> pd.DataFrame:
    """Per-item data of every ok cell of ``metric``, one row per item, for paired analyses.

    mmlu: one row per question (``question_id``, ``correct``, ``predicted`` letter);
    perplexity: one row per chunk (``chunk``, ``ppl``, ``mean_nll``, ``nll_sum``, ``tokens``);
    kld: one row per chunk (``chunk``, ``kld_mean``, ``same_top_frac``: 0..1);
    speed: one row per timed repetition (``name``, ``repetition``, ``tokens_per_s``).
    Each row also names its cell (suite, model, backend, quant, metric, key, id).
    """
    pd = require_pandas("qbench.load_details")
    if metric not in DETAILS:
        return _declared_details(pd, paths, metric)
    make, columns = DETAILS[metric]
    rows = [cell | r for rec, cell in _ok_cells(paths, metric)
            for r in make(rec.get("details") or {}, rec.get("values") or {})]
    df = pd.DataFrame(rows, columns=list(CELL_COLUMNS + columns))
    for col in CELL_COLUMNS[:5]:
        df[col] = df[col].astype("string").astype("category")
    for col in ("key", "id"):
        df[col] = df[col].astype("string")
    if metric == "mmlu":
        df = df.astype({"question_id": "int64", "correct": "bool"})
        df["predicted"] = pd.Categorical(df["predicted"], categories=list("ABCD"))
    elif metric == "perplexity":
        df = df.astype({"chunk": "int64", "ppl": "float64", "mean_nll": "float64",
                        "nll_sum": "float64", "tokens": "Int64"})
    elif metric == "kld":
        df = df.astype({"chunk": "int64", "kld_mean": "float64", "same_top_frac": "float64"})
    else:
        df["name"] = df["name"].astype("string").astype("category")
        df = df.astype({"repetition": "int64", "tokens_per_s": "float64", "tokens": "Int64"})
    return df


def _declared_details(pd: ModuleType, paths: PathArg, metric: str) -> pd.DataFrame:
    """Per-item data of any other metric, as its registry entry declares it (Value.pairing):
    one row per item of each paired value (``value``, ``item``: the item's id or position,
    ``x``). A plugin metric needs no code here to be exported."""
    from qbench.metrics import known_metric_info

    info = known_metric_info(metric)
    specs = [v for v in (info.value_specs() if info else ()) if v.pairing is not None]
    if not specs:
        raise QbenchError(f"no per-item details for metric {metric!r}: it declares no paired "
                          f"value; expected one of {', '.join(sorted(DETAILS))} or a metric "
                          "whose values declare a pairing")
    rows = []
    for rec, cell in _ok_cells(paths, metric):
        details = rec.get("details") or {}
        for spec in specs:
            items = spec.pairing.values_of(details) or []   # type: ignore[union-attr]
            ids = details.get(spec.pairing.ids) if spec.pairing.ids else None  # type: ignore[union-attr]
            for i, x in enumerate(items):
                rows.append(cell | {"value": spec.name,
                                    "item": str(ids[i]) if ids else str(i), "x": float(x)})
    df = pd.DataFrame(rows, columns=list(CELL_COLUMNS + ("value", "item", "x")))
    for col in CELL_COLUMNS[:5] + ("value",):
        df[col] = df[col].astype("string").astype("category")
    return df.astype({"key": "string", "id": "string", "item": "string", "x": "float64"})
