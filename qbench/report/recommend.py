"""The recommendation: for a memory budget and a tolerated loss, the best variant and why; and the
fp16 rule of thumb (2 bytes per parameter) checked against measured files and peaks.

Memory a variant needs at the stated context ``kv_ctx``:

- estimate = weights in memory + KV cache. Weights: torch's measured footprint for a
  transformers variant, else the load-time estimate (bitsandbytes quantizes a float file when it
  loads it: the file is not what sits in memory), else the file size. KV cache from the model's
  shape: 2 (K and V) × layers × KV heads × head dim × ctx × 2 bytes (f16 cache);
- measured = the peak memory of the variant's own cell (speed first; VRAM on GPU, else RSS: it
  includes the runtime and compute buffers) plus the KV cache's growth from that cell's context
  to ``kv_ctx``. Never the peak of a perplexity/KLD cell that also loaded the base;
- needed = the larger of the two (what is known). A variant fits when needed ≤ budget.

Loss = ΔPPL % against the model's base, judged at its 95 % interval (paired whenever the two
scored the same tokens: table.dppl_interval). It passes when the interval's upper end is within
the tolerated loss; a variant whose point value passes but whose upper end does not is
*borderline*: never recommended, shown with the number of scored tokens that would resolve it
(stats.n_to_resolve). A variant is eligible when its loss passes, its output is not degenerate
and MMLU shows no significant drop (paired McNemar).
With a budget: the eligible variant that fits with the smallest loss (ties: faster generation).
Without one: the eligible variant needing the least memory.
"""

from __future__ import annotations

import math
from typing import Any

from qbench.results.stats import n_to_resolve
from qbench.report.table import memory_of

DEFAULT_KV_CTX = 4096
MIB = 2 ** 20
PASS, BORDERLINE, FAIL, UNKNOWN = "pass", "borderline", "fail", "unknown"


def kv_cache_mb(shape: dict[str, Any], ctx: int | None, bytes_per_element: float = 2.0
                ) -> float | None:
    """K+V cache for ``ctx`` tokens from a GGUF shape (f16: 2 bytes per element; a q8_0 cache
    34/32); None when the shape is incomplete."""
    if not shape or not ctx:
        return None
    layers = shape.get("block_count")
    heads = shape.get("attention.head_count")
    kv_heads = shape.get("attention.head_count_kv") or heads
    head_dim = shape.get("attention.key_length")
    if not head_dim and heads and shape.get("embedding_length"):
        head_dim = shape["embedding_length"] / heads
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * layers * kv_heads * head_dim * ctx * bytes_per_element / MIB


def kv_formula(shape: dict[str, Any], ctx: int) -> str:
    heads = shape.get("attention.head_count")
    head_dim = shape.get("attention.key_length") or (
        shape["embedding_length"] / heads if heads and shape.get("embedding_length") else None)
    return (f"2 × {shape.get('block_count')} layers × "
            f"{shape.get('attention.head_count_kv') or heads} KV heads × "
            f"{head_dim:g} head dim × {ctx} tokens × 2 bytes (f16 cache; a variant with a "
            f"quantized KV cache counts its type's bytes per element, e.g. q8_0 34/32)"
            if head_dim else "shape unknown")


def _run_ctx(row: dict[str, Any]) -> int | None:
    """The context of the cell whose peak is the variant's measured memory."""
    cell = row.get("own_peak_cell")
    if cell == "speed":
        o = ((row.get("cells") or {}).get("speed") or {}).get("options") or {}
        return ((o.get("prompt_tokens") or 0) + (o.get("gen_tokens") or 0)) or None
    if cell in ("perplexity", "kld"):
        return row.get("ppl_ctx")
    return None


def recommend(rows: list[dict[str, Any]], *, budget_gb: float | None,
              max_loss_pct: float | None, kv_ctx: int = DEFAULT_KV_CTX) -> list[dict[str, Any]]:
    """One recommendation per model of the suite."""
    tol = 1.0 if max_loss_pct is None else max_loss_pct
    budget_mb = budget_gb * 1024 if budget_gb else None
    out = []
    for model in sorted({r["model"] for r in rows}):
        cands = [_candidate(r, kv_ctx, budget_mb, tol) for r in rows if r["model"] == model]
        order = _rank_key(budget_mb)
        ok = sorted((c for c in cands if c["eligible"] and c["fits"]), key=order)
        choice = ok[0] if ok else None
        border = sorted((c for c in cands if c["borderline"] and c["fits"]), key=order)
        if choice is not None:   # only those the rule would have taken over the choice
            border = [c for c in border if order(c) < order(choice)]
        out.append({"model": model, "kv_ctx": kv_ctx, "budget_gb": budget_gb,
                    "max_loss_pct": tol, "tol_default": max_loss_pct is None,
                    "choice": choice, "borderline": border,
                    "why": _why(choice, cands, budget_mb, tol, kv_ctx),
                    "borderline_text": [_borderline_text(c, tol) for c in border],
                    "candidates": sorted(cands, key=lambda c: (c["need_mb"] or 0)),
                    "kv_formula": kv_formula(cands[0]["row"].get("model_shape") or {}, kv_ctx)
                    if cands else ""})
    return out


def _rank_key(budget_mb: float | None) -> Any:
    """With a budget: smallest loss (ties: faster generation); without: least memory."""
    if budget_mb:
        return lambda c: (c["loss"], -(c["row"].get("tg_tps") or 0), c["label"])
    return lambda c: (c["need_mb"] if c["need_mb"] is not None else math.inf, c["loss"],
                      c["label"])


def loss_verdict(r: dict[str, Any], tol: float) -> dict[str, Any]:
    """Judge a row's ΔPPL at its 95 % interval against the tolerated loss ``tol`` (percent).

    pass: the upper end is within ``tol``; borderline: the point is, the upper end is not
    (with ``resolve_n``, the scored tokens at which the interval would stop straddling, when
    the interval is paired); fail: the point exceeds ``tol``; unknown: no ΔPPL.
    """
    point, high = (0.0, 0.0) if r["is_base"] else (r.get("dppl_pct"), r.get("dppl_ci_high"))
    out = {"loss": point, "low": r.get("dppl_ci_low"), "high": high,
           "paired": r.get("dppl_paired"), "n": r.get("dppl_n"), "resolve_n": None}
    if point is None:
        return out | {"status": UNKNOWN}
    if point > tol:
        return out | {"status": FAIL}
    if high is not None and high <= tol:
        return out | {"status": PASS}
    out["status"] = BORDERLINE
    ln_se, n = r.get("dppl_ln_se"), r.get("dppl_n")
    if high is not None and n and ln_se and r.get("dppl_paired") != "unpaired":
        out["resolve_n"] = n_to_resolve(int(n), ln_se, r["dppl_ln"], math.log1p(tol / 100))
    return out


def interval_text(v: dict[str, Any]) -> str:
    """'+0.85 % [−0.10, +1.80] (token-paired (KLD pass), 2,040 tokens)'."""
    if v["loss"] is None:
        return "ΔPPL unknown"
    text = f"ΔPPL {v['loss']:+.2f} %"
    if v["low"] is not None and v["high"] is not None:
        text += f" [95 %: {v['low']:+.2f}, {v['high']:+.2f}]"
    else:
        text += " (no interval)"
    facts = [x for x in (v.get("paired"), f"{v['n']:,} tokens" if v.get("n") else None) if x]
    return text + (f" ({', '.join(facts)})" if facts else "")


def _loss_reasons(r: dict[str, Any], v: dict[str, Any], tol: float) -> list[str]:
    if v["status"] == UNKNOWN:
        failed = [p for p in r.get("problems", []) if p["metric"] in ("perplexity", "kld")]
        return ["loss unknown: " + (f"{failed[0]['metric']} {failed[0]['status']}"
                                    if failed else "no perplexity measured")]
    if v["status"] == FAIL:
        return [f"{interval_text(v)} > tolerated {tol:g} %"]
    if v["status"] == BORDERLINE:
        return [f"borderline: {interval_text(v)}; " + _resolve_text(v, tol)]
    return []


def _resolve_text(v: dict[str, Any], tol: float) -> str:
    """What would settle a borderline loss."""
    if v["high"] is None:
        return "no error estimate: cannot tell whether it is within the loss"
    if v.get("paired") == "unpaired":
        return (f"upper end above {tol:g} %; unpaired (not the same tokens as the base): score "
                "both on the same text (kld metric) to pair them")
    if v.get("resolve_n"):
        return (f"upper end above {tol:g} %; about {v['resolve_n']:,} scored tokens "
                f"(now {v['n']:,}) would resolve it")
    return f"upper end above {tol:g} %; the point sits on the threshold"


def _memory(r: dict[str, Any], kv_ctx: int) -> dict[str, Any]:
    """Estimate, measured peak (+ KV growth to kv_ctx) and the memory needed."""
    shape = r.get("model_shape") or {}
    kvb = r.get("kv_bytes") or 2.0
    kv = kv_cache_mb(shape, kv_ctx, kvb)
    weights = r.get("weights_mb", r.get("size_mb"))
    estimate = weights + kv if weights and kv is not None else None
    measured, kind = memory_of(r)
    run_ctx = _run_ctx(r)
    kv_run = kv_cache_mb(shape, run_ctx, kvb) if run_ctx else 0.0
    measured_at_ctx = None
    if measured is not None:
        growth = (kv - kv_run) if kv is not None and kv_run is not None else 0.0
        measured_at_ctx = measured + max(growth, 0.0)
    known = [x for x in (estimate, measured_at_ctx) if x is not None]
    return {"weights_mb": weights, "weights_how": r.get("weights_how"),
            "file_mb": r.get("size_mb"), "kv_mb": kv, "estimate_mb": estimate,
            "measured_mb": measured, "measured_kind": kind, "run_ctx": run_ctx,
            "kv_run_mb": kv_run, "measured_at_ctx_mb": measured_at_ctx,
            "need_mb": max(known) if known else None}


def _candidate(r: dict[str, Any], kv_ctx: int, budget_mb: float | None,
               tol: float) -> dict[str, Any]:
    mem = _memory(r, kv_ctx)
    need = mem["need_mb"]
    v = loss_verdict(r, tol)
    reasons = _loss_reasons(r, v, tol)
    if r.get("degenerate"):
        reasons.append(f"degenerate output: {r['degenerate']}")
    p = r.get("mmlu_paired")
    if p and p["significant"] and p["diff"] < 0:
        reasons.append(f"significant MMLU drop ({100 * p['diff']:+.1f} points)")
    other = len(reasons) - (v["status"] == BORDERLINE)   # reasons besides the borderline loss
    fits = True
    if budget_mb is not None:
        if need is None:
            fits = False
            reasons.append("memory unknown")
        elif need > budget_mb:
            fits = False
            reasons.append(f"needs {need / 1024:.2f} GiB > budget {budget_mb / 1024:g} GiB")
    return {"row": r, "label": r["label"], **mem, "fits": fits,
            "loss": v["loss"] if v["loss"] is not None else math.inf,
            "loss_known": v["loss"] is not None, "loss_err": r.get("dppl_err"),
            "loss_low": v["low"], "loss_high": v["high"], "loss_paired": v["paired"],
            "loss_n": v["n"], "loss_status": v["status"], "resolve_n": v["resolve_n"],
            "interval": interval_text(v),
            "eligible": v["status"] == PASS and other == 0,
            "borderline": v["status"] == BORDERLINE and other == 0,
            "reasons": reasons}


def _borderline_text(c: dict[str, Any], tol: float, lead: str = " is borderline and not "
                     "recommended") -> str:
    return (f"{c['label']}{lead}: {c['interval']}; "
            + _resolve_text({"high": c["loss_high"], "paired": c["loss_paired"],
                             "resolve_n": c["resolve_n"], "n": c["loss_n"]}, tol) + ".")


def _why(choice: dict[str, Any] | None, cands: list[dict[str, Any]], budget_mb: float | None,
         tol: float, kv_ctx: int) -> str:
    if choice is None:
        return _why_none(cands, budget_mb, tol, kv_ctx)
    r = choice["row"]
    need = (f"needs about {choice['need_mb'] / 1024:.2f} GiB at {kv_ctx} tokens of context"
            if choice["need_mb"] is not None else "memory not measured")
    loss = "is the base itself" if r["is_base"] else f"measures {choice['interval']}"
    if budget_mb:
        rule = (f"the lowest loss among the variants that fit {budget_mb / 1024:g} GiB and "
                f"lose at most {tol:g} % at the upper end of their 95 % interval")
    else:
        rule = (f"the least memory among the variants that lose at most {tol:g} % at the upper "
                "end of their 95 % interval (no budget given)")
    extra = []
    if r.get("tg_tps"):
        extra.append(f"generates {r['tg_tps']:.1f} tokens/s")
    p = r.get("mmlu_paired")
    if p:
        extra.append(f"MMLU {100 * p['diff']:+.1f} points vs base "
                     f"({'significant' if p['significant'] else 'not significant'})")
    return (f"{r['label']}: {rule}. It {need}, {loss}"
            + (", " + ", ".join(extra) if extra else "") + ".")


def _why_none(cands: list[dict[str, Any]], budget_mb: float | None, tol: float,
              kv_ctx: int) -> str:
    """Nothing eligible fits: say so, and name the best borderline and what would resolve it."""
    parts = [f"No measured variant both fits and loses at most {tol:g} % at the upper end of "
             "its 95 % interval."]
    border = sorted((c for c in cands if c["borderline"] and c["fits"]),
                    key=_rank_key(budget_mb))
    if border:
        parts.append("The best borderline one (not recommended) is "
                     + _borderline_text(border[0], tol, lead=""))
    fitting = [c for c in cands if c["fits"] and c["loss_known"]]
    if fitting and not border:
        best = min(fitting, key=lambda c: c["loss"])
        parts.append(f"The best that fits is {best['label']} ({best['interval']}).")
    eligible = [c for c in cands if c["eligible"]]
    if eligible:
        small = min(eligible, key=lambda c: c["need_mb"] or math.inf)
        if small["need_mb"] is not None:
            parts.append(f"The smallest within the loss is {small['label']}, needing "
                         f"{small['need_mb'] / 1024:.2f} GiB at {kv_ctx} tokens.")
    return " ".join(parts)


def fp16_rule(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """2 bytes × parameters vs each 16-bit variant's file size and measured peak."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        sel = [r for r in rows if r["model"] == model]
        params = next((r["model_params"] for r in sel if r.get("model_params")), None)
        if not params:
            continue
        est = 2 * params / MIB
        checks = []
        for r in sel:
            if r["bits"] != 16:
                continue
            peak, kind = memory_of(r)
            checks.append({"label": r["label"], "file_mb": r.get("size_mb"),
                           "file_ratio": r["size_mb"] / est if r.get("size_mb") else None,
                           "peak_mb": peak, "peak_kind": kind,
                           "peak_ratio": peak / est if peak else None,
                           "run_ctx": _run_ctx(r)})
        out.append({"model": model, "n_params": params, "estimate_mb": est, "checks": checks})
    return out
