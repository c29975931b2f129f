"""The recommendation: for a memory budget and a tolerated loss, the best variant and why; and the
fp16 rule of thumb (2 bytes per parameter) checked against measured files and peaks.

Memory a variant needs at the stated context ``kv_ctx`` (all in MiB; budgets in GiB):

- estimate = weights in memory + repacked copy + KV cache + runtime. Weights: torch's measured
  footprint for a transformers variant, else the load-time estimate (bitsandbytes quantizes a
  float file when it loads it: the file is not what sits in memory), else the file size. KV
  cache from the model's shape: 2 (K and V) × layers × KV heads × head dim × ctx × bytes per
  element. A llama.cpp variant on the CPU adds the tensors llama.cpp repacks, held beside the
  mapped file, and the runtime (worker, libraries, vocabulary, one ubatch of activations):
  qbench.report.memory_model; it predicts peak RSS, checked within 1 % at 1B and 8B
  (benchmarks/memory_fit.py), 1 % in qbench's own 1B speed cells, +2 to +7 % on SmolLM2-135M
  (benchmarks/README.md);
- measured = the peak memory of the variant's own cell (speed first; VRAM on GPU, else RSS: it
  includes the runtime and compute buffers) plus the KV cache's growth from that cell's context
  to ``kv_ctx``. Never the peak of a perplexity/KLD cell that also loaded the base;
- needed = the larger of the two (what is known), less the repacked tensors' copy in the mapped
  file: clean page cache the kernel drops under a memory limit without slowing decode (a 1B
  Q4_K_M whose peak RSS is 1.47 GiB decodes at full speed in a 1.12 GiB cgroup limit, and
  slows ×1.8 below what this leaves: benchmarks/README.md). A variant fits when needed ≤ budget.

Variants are *ranked* by what the variant itself needs (weights + KV: a repacked tensor
replaces its mapped copy; the runtime, the same for every llama.cpp variant of a model and not
modelled for transformers, is left out), never by one noisy RSS sample: two within ``TIE_BAND`` of each other are tied and
the smaller loss wins.

Loss = ΔPPL % against the model's base, as the one judge gives it (qbench.results.judge: t on
the per-chunk ln PPL ratio, the same interval the gate uses), judged at its 95 % interval: it
passes when the interval's upper end is within the tolerated loss; a variant whose point value
passes but whose upper end does not is *borderline*: never recommended, shown with the sample
that would resolve it at 80 % power (or "cannot be resolved with this dataset"). A variant is
eligible when its loss passes, its output is not degenerate, and - where the suite measures
MMLU for it - its MMLU cell is ok and shows no significant drop; a failed MMLU cell is "MMLU not
measured" (never a pass), and an MMLU whose base cannot discriminate (at chance, or answering
one letter) is said so and decides nothing.
With a budget: the eligible variant that fits with the smallest loss (ties: faster generation,
when the timing is reliable). Without one: the eligible variant needing the least memory.
"""

from __future__ import annotations

import math
from typing import Any

from qbench.report.memory_model import repack_mb, runtime_mb
from qbench.report.table import memory_of
from qbench.results.judge import Judgement, unreliable

DEFAULT_KV_CTX = 4096
MIB = 2 ** 20
PASS, BORDERLINE, FAIL, UNKNOWN = "pass", "borderline", "fail", "unknown"
TIE_BAND = 0.02    # estimates within 2 % are the same memory: the smaller loss is ranked first


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
    if cell == "speed":   # its deepest test holds the most: depth + prompt + generated tokens
        o = ((row.get("cells") or {}).get("speed") or {}).get("options") or {}
        return (max(o.get("depths") or [0]) + (o.get("prompt_tokens") or 0)
                + (o.get("gen_tokens") or 0)) or None
    if cell in ("perplexity", "kld"):
        return row.get("ppl_ctx")
    return None


def recommend(rows: list[dict[str, Any]], *, budget_gb: float | None,
              max_loss_pct: float | None, kv_ctx: int = DEFAULT_KV_CTX) -> list[dict[str, Any]]:
    """One recommendation per model of the suite (``budget_gb``: GiB)."""
    tol = 1.0 if max_loss_pct is None else max_loss_pct
    budget_mb = budget_gb * 1024 if budget_gb else None
    out = []
    for model in sorted({r["model"] for r in rows}):
        cands = [_candidate(r, kv_ctx, budget_mb, tol) for r in rows if r["model"] == model]
        ok = ranked([c for c in cands if c["eligible"] and c["fits"]], budget_mb)
        choice = ok[0] if ok else None
        border = ranked([c for c in cands if c["borderline"] and c["fits"]], budget_mb)
        if choice is not None:   # only those the rule would have taken over the choice
            border = [c for c in border if ranked([c, choice], budget_mb)[0] is c]
        open_text = [_open_text(c) for c in cands if c["open"]]
        out.append({"model": model, "kv_ctx": kv_ctx, "budget_gb": budget_gb,
                    "open_text": open_text,
                    "max_loss_pct": tol, "tol_default": max_loss_pct is None,
                    "choice": choice, "borderline": border,
                    "why": _why(choice, cands, budget_mb, tol, kv_ctx),
                    "borderline_text": [_borderline_text(c, tol) for c in border],
                    "candidates": sorted(cands, key=lambda c: (c["rank_mb"] or 0)),
                    "kv_formula": kv_formula(cands[0]["row"].get("model_shape") or {}, kv_ctx)
                    if cands else ""})
    return out


def ranked(cands: list[dict[str, Any]], budget_mb: float | None) -> list[dict[str, Any]]:
    """With a budget: smallest loss first (ties: faster reliable generation). Without: least
    memory by the estimate, where estimates within TIE_BAND are tied and the smaller loss
    wins - one RSS sample's noise never picks a bigger, worse file."""
    if budget_mb:
        return sorted(cands, key=lambda c: (c["loss"], -(c["tg_rank"] or 0), c["label"]))
    order = sorted(cands, key=lambda c: (c["rank_mb"] if c["rank_mb"] is not None else math.inf,
                                         c["loss"], c["label"]))
    out: list[dict[str, Any]] = []
    while order:
        lead = order[0]["rank_mb"]
        band = [c for c in order if lead is not None and c["rank_mb"] is not None
                and c["rank_mb"] <= lead * (1 + TIE_BAND)] or order[:1]
        band.sort(key=lambda c: (c["loss"], c["label"]))
        out += band
        order = [c for c in order if c not in band]
    return out


def loss_verdict(r: dict[str, Any], tol: float) -> dict[str, Any]:
    """Judge a row's ΔPPL (the judge's interval, ``r["dppl_judged"]``) against ``tol`` (%).

    pass: the upper end is within ``tol``; borderline: the point is, the upper end is not
    (with what would resolve it at 80 % power); fail: the point exceeds ``tol``; unknown: no
    ΔPPL (with the reason).
    """
    point, high = (0.0, 0.0) if r["is_base"] else (r.get("dppl_pct"), r.get("dppl_ci_high"))
    j: Judgement | None = r.get("dppl_judged")
    out = {"loss": point, "low": r.get("dppl_ci_low"), "high": high,
           "paired": r.get("dppl_paired"), "n": r.get("dppl_n"), "resolve": None,
           "how": r.get("dppl_how"), "level": j.level if j is not None else 0.95}
    if point is None:
        return out | {"status": UNKNOWN}
    if point > tol:
        return out | {"status": FAIL}
    if high is not None and high <= tol:
        return out | {"status": PASS}
    out["status"] = BORDERLINE
    if j is not None and high is not None:
        out["resolve"] = j.to_resolve(tol)
    return out


def interval_text(v: dict[str, Any]) -> str:
    """'ΔPPL +0.85 % [95 %: −0.10, +1.80] (chunk-paired t, 8 chunks, 2,040 tokens)'."""
    if v["loss"] is None:
        return "ΔPPL unknown"
    text = f"ΔPPL {v['loss']:+.2f} %"
    if v["low"] is not None and v["high"] is not None:
        text += f" [{100 * v.get('level', 0.95):.3g} %: {v['low']:+.2f}, {v['high']:+.2f}]"
    else:
        text += " (no interval)"
    facts = [x for x in (v.get("paired"), f"{v['n']:,} tokens" if v.get("n") else None) if x]
    return text + (f" ({', '.join(facts)})" if facts else "")


def _loss_reasons(r: dict[str, Any], v: dict[str, Any], tol: float) -> list[str]:
    if v["status"] == UNKNOWN:
        failed = [p for p in r.get("problems", []) if p["metric"] in ("perplexity", "kld")]
        if failed:
            return [f"loss unknown: {failed[0]['metric']} {failed[0]['status']}"]
        return ["loss unknown: " + (v.get("how") or "no perplexity measured")]
    if v["status"] == FAIL:
        return [f"{interval_text(v)} > tolerated {tol:g} %"]
    if v["status"] == BORDERLINE:
        return [f"borderline: {interval_text(v)}; " + _resolve_text(v, tol)]
    return []


def _resolve_text(v: dict[str, Any], tol: float) -> str:
    """What would settle a borderline loss (80 % power, two significant figures)."""
    if v["high"] is None:
        return "no error estimate: cannot tell whether it is within the loss"
    res = v.get("resolve")
    if res and res.get("n"):
        return f"upper end above {tol:g} %; {res['text']}"
    if res:
        return f"upper end above {tol:g} %; {res['text']}"
    return f"upper end above {tol:g} %"


def _memory(r: dict[str, Any], kv_ctx: int) -> dict[str, Any]:
    """Estimate, measured peak (+ KV growth to kv_ctx) and the memory needed."""
    shape = r.get("model_shape") or {}
    kvb = r.get("kv_bytes") or 2.0
    kv = kv_cache_mb(shape, kv_ctx, kvb)
    weights = r.get("weights_mb", r.get("size_mb"))
    repack, repack_how = repack_mb(r)
    runtime = runtime_mb(r, shape)
    held = weights + (repack or 0.0) + kv if weights and kv is not None else None
    estimate = held + (runtime or 0.0) if held is not None else None
    measured, kind = memory_of(r)
    run_ctx = _run_ctx(r)
    kv_run = kv_cache_mb(shape, run_ctx, kvb) if run_ctx else 0.0
    measured_at_ctx = None
    if measured is not None:
        growth = (kv - kv_run) if kv is not None and kv_run is not None else 0.0
        measured_at_ctx = measured + max(growth, 0.0)
    known = [x for x in (estimate, measured_at_ctx) if x is not None]
    # the repacked tensors' pages of the mapped file: in peak RSS, not in what the variant needs
    evictable = repack or 0.0
    return {"weights_mb": weights, "weights_how": r.get("weights_how"),
            "file_mb": r.get("size_mb"), "kv_mb": kv, "estimate_mb": estimate,
            "repack_mb": repack, "repack_how": repack_how, "runtime_mb": runtime,
            "evictable_mb": evictable,
            "measured_mb": measured, "measured_kind": kind, "run_ctx": run_ctx,
            "kv_run_mb": kv_run, "measured_at_ctx_mb": measured_at_ctx,
            "need_mb": max(known) - evictable if known else None,
            "rank_mb": held - evictable if held is not None else (
                max(known) - evictable if known else None)}


def _mmlu_reasons(r: dict[str, Any]) -> tuple[list[str], str]:
    """(what excludes the variant on MMLU, what to say of MMLU beside the choice)."""
    cell = (r.get("cells") or {}).get("mmlu")
    if cell is None:
        return [], "MMLU not measured"
    if cell.get("status") != "ok":
        return [f"MMLU not measured (cell {cell.get('status')})"], ""
    if r.get("mmlu_fitness"):
        return [], f"MMLU cannot discriminate on this model ({r['mmlu_fitness']})"
    p = r.get("mmlu_paired")
    if r["is_base"]:
        return [], ""
    if not p:
        return [f"MMLU not compared: {r.get('mmlu_note') or 'no paired test'}"], ""
    if p["significant"] and p["diff"] < 0:
        return [f"significant MMLU drop ({100 * p['diff']:+.1f} points, McNemar p = "
                f"{p['p_value']:.2g})"], ""
    lvl = 100 * p.get("level", 0.95)
    return [], (f"MMLU {100 * p['diff']:+.1f} points vs base ({lvl:.3g} % "
                f"[{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}], not significant)")


def _candidate(r: dict[str, Any], kv_ctx: int, budget_mb: float | None,
               tol: float) -> dict[str, Any]:
    mem = _memory(r, kv_ctx)
    need = mem["need_mb"]
    v = loss_verdict(r, tol)
    reasons = _loss_reasons(r, v, tol)
    if r.get("degenerate"):
        reasons.append(f"degenerate output: {r['degenerate']}")
    mmlu_out, mmlu_text = _mmlu_reasons(r)
    reasons += mmlu_out
    other = len(reasons) - (v["status"] == BORDERLINE)   # reasons besides the borderline loss
    fits = True
    if budget_mb is not None:
        if need is None:
            fits = False
            reasons.append("memory unknown")
        elif need > budget_mb:
            fits = False
            reasons.append(f"needs {need / 1024:.2f} GiB > budget {budget_mb / 1024:g} GiB")
    speed = (r.get("cells") or {}).get("speed") or {}
    tg_reliable = speed.get("status") == "ok" and unreliable(speed) is None
    straddles = (v["low"] is not None and v["high"] is not None
                 and v["low"] <= tol < v["high"])
    return {"row": r, "label": r["label"], **mem, "fits": fits,
            # the loss is undecided (its interval straddles the tolerance) and nothing else
            # rules the variant out: more chunks could decide it (--until-decided)
            "open": straddles and fits and len(reasons) == (1 if v["status"] in (
                BORDERLINE, FAIL) else 0),
            "loss": v["loss"] if v["loss"] is not None else math.inf,
            "loss_known": v["loss"] is not None, "loss_err": r.get("dppl_err"),
            "loss_low": v["low"], "loss_high": v["high"], "loss_paired": v["paired"],
            "loss_n": v["n"], "loss_status": v["status"], "resolve": v["resolve"],
            "interval": interval_text(v), "mmlu_text": mmlu_text,
            "tg_rank": r.get("tg_tps") if tg_reliable else None,
            "eligible": v["status"] == PASS and other == 0,
            "borderline": v["status"] == BORDERLINE and other == 0,
            "reasons": reasons}


def _open_text(c: dict[str, Any]) -> str:
    """What an undecided variant cost so far and why it is still open: its sample, whether
    it was measured under the sequential plan, and whether that plan's ceiling was reached."""
    cell = (c["row"].get("cells") or {}).get("perplexity") or {}
    d, plan = cell.get("details") or {}, cell.get("decide")
    chunks = d.get("chunks")
    where = (f"look {plan['look']} of {len(plan['looks'])}" if plan else "the suite's sample")
    ceiling = bool(plan) and chunks == plan["looks"][-1]
    resolve = c.get("resolve") or {}
    if ceiling:
        then = "; still open at the plan's ceiling"
    elif resolve.get("resolvable") is False:
        then = f"; {resolve['text']}"
    else:
        then = "; qbench run --until-decided would measure it further"
    return (f"{c['label']} is undecided after {chunks} chunks ({d.get('scored_tokens'):,} "
            f"tokens, {where}): {c['interval']}{then}.")


def _borderline_text(c: dict[str, Any], tol: float, lead: str = " is borderline and not "
                     "recommended") -> str:
    return (f"{c['label']}{lead}: {c['interval']}; "
            + _resolve_text({"high": c["loss_high"], "resolve": c["resolve"]}, tol) + ".")


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
                f"lose at most {tol:g} % at the upper end of their interval")
    else:
        rule = (f"the least memory (weights + KV cache, ties within {100 * TIE_BAND:g} % to the "
                f"smaller loss) among the variants that lose at most {tol:g} % at the upper end "
                "of their interval (no budget given)")
    extra = []
    if choice["tg_rank"]:
        extra.append(f"generates {r['tg_tps']:.1f} tokens/s")
    elif r.get("tg_tps"):
        extra.append("its generation speed is not reliable (measured while other work ran)")
    if choice["mmlu_text"]:
        extra.append(choice["mmlu_text"])
    return (f"{r['label']}: {rule}. It {need}, {loss}"
            + (", " + ", ".join(extra) if extra else "") + ".")


def _why_none(cands: list[dict[str, Any]], budget_mb: float | None, tol: float,
              kv_ctx: int) -> str:
    """Nothing eligible fits: say so with each variant's own reason, and name the best
    borderline one and what would resolve it."""
    parts = ["No measured variant qualifies."]
    border = ranked([c for c in cands if c["borderline"] and c["fits"]], budget_mb)
    if border:
        parts.append("The best borderline one (not recommended) is "
                     + _borderline_text(border[0], tol, lead=""))
    excluded = [c for c in cands if not (c["eligible"] and c["fits"]) and not c["borderline"]
                and c["reasons"]]
    if excluded:
        parts.append("Excluded: " + "; ".join(f"{c['label']}: {c['reasons'][0]}"
                                                for c in excluded) + ".")
    eligible = [c for c in cands if c["eligible"]]
    if eligible:
        small = ranked(eligible, None)[0]
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
