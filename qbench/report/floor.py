"""The floor: per model and backend, what a metric measured against the base shows for a
no-loss twin of that base, and which variants lie within it.

The twin is a variant of the base's own backend in another *float* format (BackendInfo's
float types: a BF16 GGUF of an F16 base), built plainly (no imatrix, KV-cache type, tensor
types or outside file). On llama.cpp's CPU kernels a BF16 file rounds the weights once to bf16
and the activations entering each matmul to bf16 (F16 rounds them to f16): one bf16 unit,
2^-9 relative, at every matmul - the error exllamav3's eval/qbench injects after every layer
for its noise floor ("the KLD any lossy scheme would show even if it introduced no more error
than a different-but-equivalent kernel"). With several twins (F32 and BF16) the floor is the
largest of their values: each is a format a user would call lossless.

A variant is **within the floor** when its value is at or below the twin's, **indistinguishable
from the floor** when above it but its paired 95 % interval of the change (the one judge's,
chunk by chunk) includes no change, and **above the floor** when that whole interval is worse;
with no interval (a single chunk) a value above the twin's is only that, never
"indistinguishable".
Which values: the primary value of every metric measured against the base (MetricInfo.needs_base;
KLD's mean), from the registry - no metric is named here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qbench.metrics import known_metric_info
from qbench.results.judge import Judgement, judge

WITHIN, INDISTINGUISHABLE, ABOVE = ("within the floor", "indistinguishable from the floor",
                                    "above the floor")
# above the twin's value, but the data give no interval (one chunk: nothing to pair)
NO_INTERVAL = "above the floor's value, no interval"


def is_twin(row: dict[str, Any]) -> bool:
    """A plain float variant that is not the base: a no-loss twin of it."""
    cells = list(row["cells"].values())
    source = (cells[0].get("variant") or {}).get("source") if cells else None
    return (not row["is_base"] and row.get("method") == "float" and not row.get("kv_cache")
            and not row.get("imatrix") and not source
            and not row.get("output_asked") and not row.get("token_embd_asked"))


def floor_metrics(metrics: Iterable[str]) -> list[tuple[str, Any]]:
    """(metric, primary Value) of the metrics measured against the base among ``metrics``."""
    out = []
    for m in metrics:
        info = known_metric_info(m)
        if info is not None and info.needs_base:
            spec = info.value_spec(info.primary)
            if spec is not None:
                out.append((m, spec))
    return out


def _cell(row: dict[str, Any], metric: str, point: str = "") -> dict[str, Any] | None:
    cells = row["cells"] if not point else (row.get("points") or {}).get(point, {})
    c = cells.get(metric)
    return c if c and c.get("status") == "ok" else None


def _value(cell: dict[str, Any] | None, name: str) -> float | None:
    v = ((cell or {}).get("values") or {}).get(name) or {}
    x = v.get("value")
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def twins(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(suite, model, backend) -> its twin rows."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if is_twin(r):
            out.setdefault((r["suite"], r["model"], r["backend"]), []).append(r)
    return out


def floor_of(rows: list[dict[str, Any]], suite: str, model: str, backend: str, metric: str,
             value: str, point: str = "") -> tuple[dict[str, Any], float] | None:
    """(twin row, its value) setting the floor of ``metric.value`` for that model and
    backend (at a depth ``point``), None when no twin measured it."""
    best = None
    for r in twins(rows).get((suite, model, backend), []):
        x = _value(_cell(r, metric, point), value)
        if x is not None and (best is None or x > best[1]):
            best = (r, x)
    return best


def verdict(j: Judgement) -> str:
    """A judgement of a variant against its floor as a verdict (see the module docstring)."""
    if not j.comparable or j.change is None:
        return "not comparable: " + j.reason
    if j.worse(j.change) <= 0:
        return WITHIN
    low = j.worse_low
    if low is None:     # no interval is no evidence of indistinguishability
        unit = j.n_unit[:-1] if j.n == 1 and j.n_unit.endswith("s") else j.n_unit
        return f"{NO_INTERVAL} ({j.n} {unit})" if j.n else NO_INTERVAL
    return ABOVE if low > 0 else INDISTINGUISHABLE


def floor_verdicts(rows: list[dict[str, Any]], point: str = "") -> None:
    """``row["floor"]`` (main context) or ``row["floor_points"][point]``: per metric.value
    measured against the base, {value, floor, twin, judgement, verdict}, for every row with a
    twin to compare with (the twin itself is marked ``is_floor``)."""
    metrics = sorted({m for r in rows for m in r["cells"]}
                     | {m for r in rows for p in (r.get("points") or {}).values() for m in p})
    specs = floor_metrics(metrics)
    for r in rows:
        out: dict[str, Any] = {}
        for metric, spec in specs:
            got = floor_of(rows, r["suite"], r["model"], r["backend"], metric, spec.name, point)
            mine = _cell(r, metric, point)
            if got is None or mine is None or r["is_base"]:
                continue
            twin, level = got
            key = f"{metric}.{spec.name}"
            if twin is r:
                out[key] = {"value": level, "floor": level, "twin": twin["label"],
                            "is_floor": True, "verdict": "the floor", "judgement": None}
                continue
            ref = _cell(twin, metric, point)
            assert ref is not None
            j = judge(metric, spec, ref, mine)
            out[key] = {"value": _value(mine, spec.name), "floor": level,
                        "twin": twin["label"], "is_floor": False, "judgement": j,
                        "verdict": verdict(j)}
        if point:
            r.setdefault("floor_points", {})[point] = out
        else:
            r["floor"] = out


def floor_lines(rows: list[dict[str, Any]], key: str
                ) -> list[tuple[str, str, float, str]]:
    """(model, backend, floor value, twin's quant) of ``metric.value`` at the main context,
    per model and backend with a twin: the lines on that value's plots."""
    metric, value = key.split(".", 1)
    out = []
    for suite, model, backend in sorted({(r["suite"], r["model"], r["backend"]) for r in rows
                                         if r["is_base"]}):
        got = floor_of(rows, suite, model, backend, metric, value)
        if got is not None:
            out.append((model, backend, got[1], got[0]["quant"]))
    return out
