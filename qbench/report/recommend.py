"""The recommendation: for a memory budget and a tolerated loss, the best variant and why; and the
fp16 rule of thumb (2 bytes per parameter) checked against measured files and peaks.

Memory a variant needs at the stated context ``kv_ctx``:

- estimate = weights (the file's size) + KV cache, with the KV cache from the model's shape:
  2 (K and V) × layers × KV heads × head dim × ctx × 2 bytes (f16 cache);
- measured = the variant's peak memory in this run (VRAM on GPU, else RSS: it includes the
  runtime and compute buffers) plus the KV cache's growth from the run's context to ``kv_ctx``;
- needed = the larger of the two (what is known). A variant fits when needed ≤ budget.

Loss = ΔPPL % against the model's base (the base itself: 0). A variant is eligible when its loss
is at most the tolerated loss, its output is not degenerate and MMLU shows no significant drop.
With a budget: the eligible variant that fits with the smallest loss (ties: faster generation).
Without one: the eligible variant needing the least memory.
"""

from __future__ import annotations

from typing import Any

from .table import memory_of

DEFAULT_KV_CTX = 4096
MIB = 2 ** 20


def kv_cache_mb(shape: dict[str, Any], ctx: int | None) -> float | None:
    """f16 K+V cache for ``ctx`` tokens from a GGUF shape; None when the shape is incomplete."""
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
    return 2 * layers * kv_heads * head_dim * ctx * 2 / MIB


def kv_formula(shape: dict[str, Any], ctx: int) -> str:
    heads = shape.get("attention.head_count")
    head_dim = shape.get("attention.key_length") or (
        shape["embedding_length"] / heads if heads and shape.get("embedding_length") else None)
    return (f"2 × {shape.get('block_count')} layers × "
            f"{shape.get('attention.head_count_kv') or heads} KV heads × "
            f"{head_dim:g} head dim × {ctx} tokens × 2 bytes" if head_dim else "shape unknown")


def _run_ctx(row: dict[str, Any]) -> int | None:
    ctx = row.get("ppl_ctx")
    sp = (row.get("cells") or {}).get("speed")
    if sp and sp.get("status") == "ok":
        o = sp.get("options") or {}
        ctx = max(ctx or 0, (o.get("prompt_tokens") or 0) + (o.get("gen_tokens") or 0)) or ctx
    return ctx


def recommend(rows: list[dict[str, Any]], *, budget_gb: float | None,
              max_loss_pct: float | None, kv_ctx: int = DEFAULT_KV_CTX) -> list[dict[str, Any]]:
    """One recommendation per model of the suite."""
    tol = 1.0 if max_loss_pct is None else max_loss_pct
    budget_mb = budget_gb * 1024 if budget_gb else None
    out = []
    for model in sorted({r["model"] for r in rows}):
        cands = [_candidate(r, kv_ctx, budget_mb, tol) for r in rows if r["model"] == model]
        ok = [c for c in cands if c["eligible"] and c["fits"]]
        if budget_mb:
            ok.sort(key=lambda c: (c["loss"], -(c["row"].get("tg_tps") or 0)))
        else:
            ok.sort(key=lambda c: (c["need_mb"] if c["need_mb"] is not None else float("inf"),
                                   c["loss"]))
        choice = ok[0] if ok else None
        out.append({"model": model, "kv_ctx": kv_ctx, "budget_gb": budget_gb,
                    "max_loss_pct": tol, "tol_default": max_loss_pct is None,
                    "choice": choice, "why": _why(choice, cands, budget_mb, tol, kv_ctx),
                    "candidates": sorted(cands, key=lambda c: (c["need_mb"] or 0)),
                    "kv_formula": kv_formula(cands[0]["row"].get("model_shape") or {}, kv_ctx)
                    if cands else ""})
    return out


def _candidate(r: dict[str, Any], kv_ctx: int, budget_mb: float | None,
               tol: float) -> dict[str, Any]:
    shape = r.get("model_shape") or {}
    kv = kv_cache_mb(shape, kv_ctx)
    estimate = r["size_mb"] + kv if r.get("size_mb") and kv is not None else None
    measured, kind = memory_of(r)
    run_ctx = _run_ctx(r)
    kv_run = kv_cache_mb(shape, run_ctx)
    measured_at_ctx = None
    if measured is not None:
        growth = (kv - kv_run) if kv is not None and kv_run is not None else 0.0
        measured_at_ctx = measured + max(growth, 0.0)
    known = [x for x in (estimate, measured_at_ctx) if x is not None]
    need = max(known) if known else None
    reasons = []
    loss = 0.0 if r["is_base"] else r.get("dppl_pct")
    if loss is None:
        failed = [p for p in r.get("problems", []) if p["metric"] in ("perplexity", "kld")]
        reasons.append("loss unknown: " + (f"{failed[0]['metric']} {failed[0]['status']}"
                                           if failed else "no perplexity measured"))
    elif loss > tol:
        reasons.append(f"ΔPPL {loss:+.2f} % > tolerated {tol:g} %")
    if r.get("degenerate"):
        reasons.append(f"degenerate output: {r['degenerate']}")
    p = r.get("mmlu_paired")
    if p and p["significant"] and p["diff"] < 0:
        reasons.append(f"significant MMLU drop ({100 * p['diff']:+.1f} points)")
    fits = True
    if budget_mb is not None:
        if need is None:
            fits = False
            reasons.append("memory unknown")
        elif need > budget_mb:
            fits = False
            reasons.append(f"needs {need / 1024:.2f} GiB > budget {budget_mb / 1024:g} GiB")
    return {"row": r, "label": r["label"], "weights_mb": r.get("size_mb"), "kv_mb": kv,
            "estimate_mb": estimate, "measured_mb": measured, "measured_kind": kind,
            "run_ctx": run_ctx, "kv_run_mb": kv_run, "measured_at_ctx_mb": measured_at_ctx,
            "need_mb": need, "fits": fits, "loss": loss if loss is not None else float("inf"),
            "loss_known": loss is not None, "loss_err": r.get("dppl_err"),
            "eligible": not [x for x in reasons if not x.startswith("needs")
                             and x != "memory unknown"],
            "reasons": reasons}


def _why(choice: dict[str, Any] | None, cands: list[dict[str, Any]], budget_mb: float | None,
         tol: float, kv_ctx: int) -> str:
    if choice is None:
        fitting = [c for c in cands if c["fits"] and c["loss_known"]]
        eligible = [c for c in cands if c["eligible"]]
        parts = [f"No measured variant both fits and loses at most {tol:g} %."]
        if fitting:
            best = min(fitting, key=lambda c: c["loss"])
            parts.append(f"The best that fits is {best['label']} (ΔPPL {best['loss']:+.2f} %).")
        if eligible:
            small = min(eligible, key=lambda c: c["need_mb"] or float("inf"))
            if small["need_mb"] is not None:
                parts.append(f"The smallest within the loss is {small['label']}, needing "
                             f"{small['need_mb'] / 1024:.2f} GiB at {kv_ctx} tokens.")
        return " ".join(parts)
    r = choice["row"]
    need = (f"needs about {choice['need_mb'] / 1024:.2f} GiB at {kv_ctx} tokens of context"
            if choice["need_mb"] is not None else "memory not measured")
    loss = ("is the base itself" if r["is_base"] else
            f"loses {choice['loss']:+.2f} %" + (f" ± {choice['loss_err']:.2f}"
                                                 if choice["loss_err"] else "") + " PPL")
    if budget_mb:
        rule = (f"the lowest loss among the variants that fit {budget_mb / 1024:g} GiB and "
                f"lose at most {tol:g} %")
    else:
        rule = f"the least memory among the variants that lose at most {tol:g} % (no budget given)"
    extra = []
    if r.get("tg_tps"):
        extra.append(f"generates {r['tg_tps']:.1f} tokens/s")
    p = r.get("mmlu_paired")
    if p:
        extra.append(f"MMLU {100 * p['diff']:+.1f} points vs base "
                     f"({'significant' if p['significant'] else 'not significant'})")
    return (f"{r['label']}: {rule}. It {need}, {loss}"
            + (", " + ", ".join(extra) if extra else "") + ".")


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
