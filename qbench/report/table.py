"""Stored cell records -> one row per variant, with deltas against the model's base.

Pure functions, no I/O. A row carries every number the report shows for one variant (model,
backend, quant): size, bits per weight, PPL, KLD, MMLU (with the paired test against the base),
speed, peak memory, sanity, and the reasons of any failed cell. Nothing is dropped: a variant
whose cells all failed still gets a row with its errors.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from qbench.backends import kv_bytes_per_element, method_of, nominal_bits
from qbench.metrics import ReportColumn, known_metric_info, metric_names
from qbench.results.schema import FAILED
from qbench.suite.identity import record_point, variant_key

MIB = 2 ** 20

from qbench.results.judge import LEVEL, Judgement, judge, unreliable


def own_cells() -> tuple[str, ...]:
    """Metrics whose cells load only the variant itself (never the base), so their peak
    memory is the variant's own (MetricInfo.own_memory): the machine's own measurement (speed)
    first, then the rest in run order, the footprint (which loads nothing) left out."""
    infos = [i for i in map(known_metric_info, metric_names()) if i and i.own_memory]
    return tuple(i.name for i in sorted(infos, key=lambda i: not i.hardware_bound))


def cell_key(rec: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """What identifies a cell across runs: suite, model, backend, variant, metric."""
    return (*variant_key(rec), rec["metric"])


def value_of(rec: dict[str, Any] | None, name: str) -> tuple[float | None, float | None]:
    """(value, stderr) of a stored value; (None, None) unless the cell is ok and has it."""
    if not rec or rec.get("status") != "ok":
        return None, None
    v = (rec.get("values") or {}).get(name) or {}
    val, err = v.get("value"), v.get("stderr")
    if isinstance(val, float) and math.isnan(val):
        val = None
    return val, err


def _short_error(rec: dict[str, Any]) -> str:
    err = (rec.get("error") or "").strip() or (rec.get("signal") or "") or "no error text"
    return err


def variant_rows(records: list[dict[str, Any]], *, level: float | None = None
                 ) -> list[dict[str, Any]]:
    """Pivot cells into rows: one per (suite, model, backend, variant), metrics as columns.
    Of several records of one cell (a larger sample measured later, --until-decided), the ok
    one with the largest sample, then the latest. ``level``: the comparisons' interval level
    (default: 95 %, or the sequential plan's a record was measured under). Cells at a metric's
    other listed contexts (``@ctx=N``, qbench.metrics.depth) go to
    ``row["points"][point][metric]``; the table's columns are the main context's."""
    groups: dict[tuple[str, str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    points: dict[tuple[str, str, str, str], dict[str, dict[str, dict[str, Any]]]] = \
        defaultdict(lambda: defaultdict(dict))
    for rec in records:
        point = record_point(rec)
        cells = points[variant_key(rec)][point] if point else groups[variant_key(rec)]
        old = cells.get(rec["metric"])
        if old is None or _preference(rec) >= _preference(old):
            cells[rec["metric"]] = rec
    for key in points:   # a variant measured at other contexts only
        if key not in groups:
            groups[key] = {}
    rows = [_row(key, cells or next(iter(points[key].values())))
            | {"points": {p: dict(c) for p, c in points.get(key, {}).items()}}
            for key, cells in groups.items()]
    _model_facts(rows)
    _add_deltas(rows, level)
    rows.sort(key=lambda r: (r["suite"], r["model"], not r["is_base"], r["backend"],
                             -(r["bpw"] or r["bits"] or 0), r["quant"]))
    return rows


def _row(key: tuple[str, str, str, str], cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    suite, model, backend, quant = key
    any_rec = next(iter(cells.values()))
    variant = any_rec["variant"]
    row: dict[str, Any] = {
        "suite": suite, "model": model, "backend": backend, "quant": quant,
        "label": f"{model} / {backend} / {quant}",
        "is_base": bool(variant.get("is_base")),
        "bits": nominal_bits(backend, quant), "method": method_of(backend, quant),
        "cells": cells,
        "statuses": {m: c["status"] for m, c in sorted(cells.items())},
        "problems": [{"metric": m, "status": c["status"], "error": _short_error(c)}
                     for m, c in sorted(cells.items()) if c["status"] in FAILED],
        "skipped": [{"metric": m, "error": _short_error(c)}
                    for m, c in sorted(cells.items()) if c["status"] == "skipped"],
    }
    fp = cells.get("footprint")
    row["size_mb"], _ = value_of(fp, "file_size_mb")
    row["bpw"], _ = value_of(fp, "bpw")
    # load-time quantization (bitsandbytes): the file is the float base, the weights in memory
    # are not; plots and the table use the in-memory estimate and say so
    loaded, _ = value_of(fp, "bpw_loaded_estimate")
    row["bpw_file"] = None
    if loaded is not None and row["bpw"] is not None and loaded < row["bpw"] - 0.01:
        row["bpw_file"], row["bpw"] = row["bpw"], loaded
    row["n_params"], _ = value_of(fp, "n_params")
    row["fp16_estimate_mb"], _ = value_of(fp, "fp16_estimate_mb")
    fp_ok = bool(fp and fp["status"] == "ok")
    row["tensor_types"] = (fp.get("details") or {}).get("tensor_types", {}) if fp_ok else {}
    row["shape"] = (fp.get("details") or {}).get("shape", {}) if fp_ok else {}

    ppl = cells.get("perplexity")
    row["ppl"], row["ppl_err"] = value_of(ppl, "ppl")
    row["bpb"], _ = value_of(ppl, "bits_per_byte")
    row["ppl_ctx"] = (ppl or {}).get("options", {}).get("ctx") if ppl else None

    kld = cells.get("kld")
    row["kld"], row["kld_err"] = value_of(kld, "kld_mean")
    row["kld_p99"], _ = value_of(kld, "kld_p99")
    row["same_top"], row["same_top_err"] = value_of(kld, "same_top_pct")
    row["ln_ppl_ratio"], row["ln_ppl_ratio_err"] = value_of(kld, "ln_ppl_ratio")

    mmlu = cells.get("mmlu")
    row["acc"], row["acc_err"] = value_of(mmlu, "acc")
    row["mmlu_letters"] = letter_shares(mmlu)
    row["acc_n"] = ((mmlu or {}).get("values", {}).get("acc") or {}).get("n") if mmlu else None

    sp = cells.get("speed")
    row["pp_tps"], _ = value_of(sp, "pp_tokens_per_s")
    row["tg_tps"], _ = value_of(sp, "tg_tokens_per_s")
    spv = (sp or {}).get("values", {}) if sp and sp["status"] == "ok" else {}
    row["pp_sd"] = (spv.get("pp_tokens_per_s") or {}).get("sd")
    row["tg_sd"] = (spv.get("tg_tokens_per_s") or {}).get("sd")
    # a timing that says it was disturbed (other work on the machine): shown greyed, never
    # ranked by (qbench.results.judge.unreliable)
    row["speed_unreliable"] = unreliable(sp) if sp and sp["status"] == "ok" else None
    lock = (sp or {}).get("lock") or {}
    row["speed_waited_s"] = lock.get("waited_s")
    row.update(_roofline(sp))

    lm = cells.get("lm_eval")
    row["lm_eval"] = {k: (v.get("value"), v.get("stderr"), v.get("n"))
                      for k, v in ((lm or {}).get("values") or {}).items()
                      if k not in ("score", "docs_per_s")} if lm and lm["status"] == "ok" else {}

    row["extra"] = extra_values(cells)
    row["values"] = all_values(cells)

    san = cells.get("sanity")
    row["degenerate"] = None          # None: not measured; "": looks fine; text: why it is broken
    row["sanity_text"] = None
    if san and san["status"] == "ok":
        row["degenerate"] = (san.get("details") or {}).get("reason") or ""
        row["sanity_text"] = (san.get("details") or {}).get("output", "")

    measured = [c for c in cells.values() if c.get("metric") != "footprint"]
    rss = [(c.get("memory") or {}).get("peak_rss_mb") for c in measured]
    vram = [(c.get("memory") or {}).get("peak_vram_mb") for c in measured]
    # the maximum over every cell (a perplexity or KLD cell may also have loaded the base)
    row["peak_rss_mb"] = max((r for r in rss if r), default=None)
    row["peak_vram_mb"] = max((r for r in vram if r), default=None)
    row["own_peak_cell"], row["own_peak_rss_mb"], row["own_peak_vram_mb"] = _own_peak(
        cells, bool(variant.get("is_base")))
    row["weights_mb"], row["weights_how"] = _weights_in_memory(row, cells)
    devices = {str((c.get("backend") or {}).get("device")) for c in measured
               if (c.get("backend") or {}).get("device")}
    row["device"] = ", ".join(sorted(devices)) or None
    row.update(runtime_facts(list(cells.values())))

    recipe = ((fp or any_rec).get("artifact") or {}).get("recipe") or {}
    base_recipe = recipe.get("base_recipe", recipe) if isinstance(recipe, dict) else {}
    row["requantized_from"] = (base_recipe.get("input_type")
                               if isinstance(base_recipe, dict) and base_recipe.get("requantized")
                               else None)
    row["imatrix"] = variant.get("imatrix") or None
    row["kv_cache"] = variant.get("kv_cache") or None
    # the tensors people choose: what was asked (the variant) and what the file holds
    row["output_asked"] = variant.get("output_tensor_type") or None
    row["token_embd_asked"] = variant.get("token_embedding_type") or None
    row["roles"] = dict((fp.get("details") or {}).get("roles") or {}) if fp_ok else {}
    row["tensor_bytes"] = (fp.get("details") or {}).get("tensor_bytes") if fp_ok else None
    row["embed_bytes"] = (fp.get("details") or {}).get("embed_bytes") if fp_ok else None
    row["kv_bytes"] = kv_bytes_per_element(backend, row["kv_cache"])
    row["source_label"] = variant.get("tag") or None
    row["provenance"] = gguf_provenance(fp) if fp_ok else {}
    return row


def letter_shares(mmlu: dict[str, Any] | None) -> list[tuple[str, int]]:
    """How often an MMLU cell answered each letter ([("A", 55), ("B", 1), ...]): a model that
    answers one letter measures letter bias, and the reader should see it."""
    if not mmlu or mmlu.get("status") != "ok":
        return []
    predicted = (mmlu.get("details") or {}).get("predicted") or []
    return [(x, predicted.count(x)) for x in "ABCD"] if predicted else []


def detectable(r: dict[str, Any], key: str) -> float | None:
    """The smallest change against the base this row's sample would detect with 80 % power
    (the judge's error at 95 %), in the judgement's unit."""
    j = (r.get("judged") or {}).get(key)
    return j.detectable(0.0) if j is not None and j.comparable and j.se else None


def _roofline(sp: dict[str, Any] | None) -> dict[str, Any]:
    """Effective bandwidth of generation (depth 0), the machine's measured bandwidth, bytes
    read per token, the cache caveat, and the speed-vs-depth curve of an ok speed cell."""
    out: dict[str, Any] = {"tg_gbs": None, "tg_bw_pct": None, "bytes_per_token": None,
                           "measured_gbs": None, "cache_caveat": None, "depth_curve": []}
    if not sp or sp.get("status") != "ok":
        return out
    out["tg_gbs"], _ = value_of(sp, "tg_effective_gbs")
    out["tg_bw_pct"], _ = value_of(sp, "tg_bandwidth_pct")
    details = sp.get("details") or {}
    bw = details.get("bandwidth") or {}
    first = next(iter(bw.get("per_depth") or []), {})
    out["bytes_per_token"] = first.get("bytes_per_token")
    out["measured_gbs"] = (bw.get("reference") or {}).get("gbs")
    out["cache_caveat"] = bw.get("caveat") if bw.get("cache_caveat") else None
    out["depth_curve"] = [p for p in details.get("depths") or [] if "depth" in p]
    return out


def gguf_provenance(footprint: dict[str, Any] | None) -> dict[str, Any]:
    """What a file's own metadata says about its making (general.*, quantize.imatrix.*)."""
    return dict(((footprint or {}).get("details") or {}).get("provenance") or {})


def file_facts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant made elsewhere (a pre-quantized file) or with an importance matrix: where
    it came from, so "same name, different file" and "with or without imatrix" are visible."""
    out = []
    for r in rows:
        cells = r["cells"]
        any_rec = next(iter(cells.values()))
        variant = any_rec.get("variant") or {}
        artifact = next((c.get("artifact") for c in cells.values() if c.get("artifact")), {})
        recipe = (artifact or {}).get("recipe") or {}
        if not variant.get("source") and not recipe.get("imatrix"):
            continue
        keep = {k: v for k, v in r["provenance"].items()
                if k.startswith("quantize.") or k in PROVENANCE_SHOWN}
        out.append({"label": r["label"], "file": variant.get("source") or None,
                    "sha256": (artifact or {}).get("sha256"), "metadata": keep,
                    "imatrix": recipe.get("imatrix") or None})
    return out


PROVENANCE_SHOWN = ("general.name", "general.quantized_by", "general.author",
                    "general.organization", "general.quantization_version",
                    "general.source.url", "general.source.huggingface.repository",
                    "general.file_type", "general.url")


def all_values(cells: dict[str, dict[str, Any]]) -> dict[str, tuple[float | None, float | None]]:
    """metric.value -> (value, stderr) of every value every ok cell stored (figures and
    generic columns read these, by the registry's declarations)."""
    return {f"{metric}.{name}": value_of(rec, name) for metric, rec in cells.items()
            for name in (rec.get("values") or {})}


def _columns(metric: str) -> list[ReportColumn]:
    info = known_metric_info(metric)
    if info is None or metric in DEDICATED:
        return []
    return [ReportColumn(v.name, v.column, v.digits) for v in info.value_specs() if v.column]


# metrics the table shows in columns of their own (every other metric's declared columns are
# shown generically)
DEDICATED = ("footprint", "sanity", "perplexity", "kld", "mmlu", "speed", "lm_eval")


def extra_values(cells: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Values of metrics the report has no dedicated view for but whose registry entry names
    report columns (Value.column: plugin metrics): metric -> column value -> (value, stderr)."""
    out: dict[str, dict[str, Any]] = {}
    for metric, rec in sorted(cells.items()):
        cols = _columns(metric)
        if cols:
            out[metric] = {col.value: value_of(rec, col.value) for col in cols}
    return out


def extra_columns(rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(metric, ReportColumn) for every generic column some row has a value for."""
    seen: list[tuple[str, Any]] = []
    for metric in sorted({m for r in rows for m in r.get("extra", {})}):
        seen.extend((metric, col) for col in _columns(metric))
    return seen


def _own_peak(cells: dict[str, dict[str, Any]], is_base: bool
              ) -> tuple[str | None, float | None, float | None]:
    """(cell, peak RSS, peak VRAM) of the first ok cell that loaded only this variant: speed,
    then MMLU, then sanity. A variant's perplexity and KLD cells may also load the base (to
    build the base's log-probs), so their peak is not the variant's; for the base they are."""
    order = own_cells() + (("perplexity", "kld") if is_base else ())
    for metric in order:
        c = cells.get(metric)
        mem = (c or {}).get("memory") or {}
        if c and c.get("status") == "ok" and (mem.get("peak_rss_mb") or mem.get("peak_vram_mb")):
            return metric, mem.get("peak_rss_mb") or None, mem.get("peak_vram_mb") or None
    return None, None, None


def runtime_facts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the memory model (qbench.report.memory_model) needs of the machine and the load,
    from a variant's cells (or a whole suite's records): llama.cpp's system info, ubatch and
    batch from a cell that loaded a model; the CPU, its flags and whether the machine had a
    GPU from any record."""
    loaded = [c for c in records if (c.get("backend") or {}).get("system_info")]
    env = next((c.get("env") for c in records if c.get("env")), None) or {}
    return {"system_info": (loaded[0]["backend"]["system_info"] if loaded else None),
            "n_ubatch": (loaded[0]["backend"].get("n_ubatch") if loaded else None),
            "n_batch": (loaded[0]["backend"].get("n_batch") if loaded else None),
            "cpu": env.get("cpu"), "cpu_flags": list(env.get("cpu_flags") or []),
            "machine_gpus": bool(env.get("gpus"))}


def _weights_in_memory(row: dict[str, Any], cells: dict[str, dict[str, Any]]
                       ) -> tuple[float | None, str | None]:
    """The weights' size once loaded: torch's measured footprint of a transformers variant,
    else the footprint cell's load-time estimate (bitsandbytes quantizes a float file at load
    time, so its file is not what sits in memory), else the file size."""
    for metric in own_cells() + ("perplexity", "kld"):
        c = cells.get(metric)
        if not c or c.get("status") != "ok":
            continue
        facts = (c.get("backend") or {}).get("weights_now") or {}
        if facts.get("memory_footprint_bytes"):
            return facts["memory_footprint_bytes"] / MIB, f"measured in memory ({metric} cell)"
    loaded, _ = value_of(cells.get("footprint"), "loaded_weights_estimate_mb")
    if loaded is not None:
        return loaded, "estimated in memory (load-time quantization)"
    if row.get("size_mb") is not None:
        return row["size_mb"], "file size"
    return None, None


def _model_facts(rows: list[dict[str, Any]]) -> None:
    """Parameter count and shape are properties of the model: share them across its rows."""
    params: dict[tuple[str, str], float] = {}
    shapes: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        k = (r["suite"], r["model"])
        if r["n_params"]:
            params[k] = max(params.get(k, 0), r["n_params"])
        if r["shape"] and k not in shapes:
            shapes[k] = r["shape"]
    for r in rows:
        k = (r["suite"], r["model"])
        r["model_params"] = params.get(k)
        r["model_shape"] = shapes.get(k, {})


def _preference(rec: dict[str, Any]) -> tuple[bool, int, str]:
    """Which record of a cell the report shows: ok first, then the larger sample (the
    metric's sample_option), then the later run."""
    info = known_metric_info(rec["metric"])
    sample = info.sample_option if info else None
    n = int((rec.get("options") or {}).get(sample) or 0) if sample else 0
    return rec.get("status") == "ok", n if n > 0 else 1 << 30, str(rec.get("run_id") or "")


def sequential_level(*records: dict[str, Any] | None) -> float | None:
    """The interval level of the sequential plan (--until-decided) a record was measured
    under: 1 - alpha / looks (the plan's count over every metric it grows, ``n_looks``, else
    this metric's looks); None when none was."""
    from qbench.results.sequential import level

    plans = [r["decide"] for r in records if r and isinstance(r.get("decide"), dict)]
    if not plans:
        return None
    return min(level(float(p["alpha"]), int(p.get("n_looks") or len(p["looks"])))
               for p in plans)


def _add_deltas(rows: list[dict[str, Any]], level: float | None = None) -> None:
    """Every paired comparison of a variant with its base, by the one judge
    (:func:`qbench.results.judge.judge`): ``row["judged"]["metric.value"]`` for each value a
    metric declares with a pairing, at ``level``, else 95 % - or, in a suite where
    --until-decided measured any cell, at its sequential plan's level for every comparison:
    the loop judged them all at it, so a variant it left decided reads the same here. Each
    backend's variants are compared with that backend's base (same engine, tokenizer), else any
    base of the model. ΔPPL and the MMLU flips are spelled out for the table from those
    judgements."""
    plan_levels: dict[str, float] = {}
    for r in rows if level is None else ():
        lv = sequential_level(*r["cells"].values())
        if lv is not None:
            plan_levels[r["suite"]] = min(lv, plan_levels.get(r["suite"], 1.0))
    bases = {(r["suite"], r["model"], r["backend"]): r for r in rows if r["is_base"]}
    model_bases: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r["is_base"]:
            model_bases.setdefault((r["suite"], r["model"]), r)
    for r in rows:
        base = (bases.get((r["suite"], r["model"], r["backend"]))
                or model_bases.get((r["suite"], r["model"])))
        r["base_label"] = base["label"] if base else None
        r["judged"] = {} if r["is_base"] or base is None else judged_against(
            r, base, level or plan_levels.get(r["suite"]))
        r.update(dppl_fields(r, base))
        _add_mmlu_delta(r, base)
        r["dppl_detects"] = detectable(r, "perplexity.ppl")
        r["dacc_detects"] = detectable(r, "mmlu.acc")


def judged_against(r: dict[str, Any], base: dict[str, Any], level: float | None = None
                   ) -> dict[str, Judgement]:
    """metric.value -> the judge's comparison of ``r`` with ``base`` for every paired value of
    every metric both rows measured ok, at ``level`` (else 95 %, or the sequential plan's)."""
    out: dict[str, Judgement] = {}
    for metric, cell in r["cells"].items():
        ref = base["cells"].get(metric)
        info = known_metric_info(metric)
        if info is None or cell.get("status") != "ok" or not ref or ref.get("status") != "ok":
            continue
        lvl = level or sequential_level(cell, ref) or LEVEL
        for spec in info.value_specs():
            if spec.pairing is not None and spec.name in (cell.get("values") or {}):
                out[f"{metric}.{spec.name}"] = judge(metric, spec, ref, cell, level=lvl)
    return out


DPPL_NONE = {"dppl_pct": None, "dppl_err": None, "dppl_how": None, "dppl_ci_low": None,
             "dppl_ci_high": None, "dppl_paired": None, "dppl_n": None, "dppl_judged": None}


def dppl_fields(r: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """ΔPPL % of ``r`` against ``base`` with its 95 % interval, as the judge gives it (paired
    by chunk: t on the per-chunk ln PPL ratio, mapped to % through exp, so asymmetric); the
    reason when the two are not comparable (another text, no per-chunk data)."""
    if r["is_base"]:
        return DPPL_NONE | {"dppl_pct": 0.0, "dppl_err": 0.0, "dppl_how": "base",
                            "dppl_ci_low": 0.0, "dppl_ci_high": 0.0, "dppl_paired": "base",
                            "dppl_n": _scored_tokens(r)}
    j = r.get("judged", {}).get("perplexity.ppl")
    if j is None:
        why = ("no ok perplexity cell for the base" if base is not None and r["ppl"] is not None
               else None)
        return DPPL_NONE | {"dppl_how": why}
    if not j.comparable:
        return DPPL_NONE | {"dppl_how": "not comparable: " + j.reason, "dppl_judged": j}
    seq = (r["cells"].get("perplexity") or {}).get("decide")
    paired = f"chunk-paired t, {j.n} chunks" if j.n else j.method
    if j.level != LEVEL:
        paired += (f", {100 * j.level:.3g} % interval (sequential: "
                   f"{seq.get('n_looks') or len(seq['looks'])} looks)"
                   if seq else f", {100 * j.level:.3g} % interval")
    return DPPL_NONE | {"dppl_pct": j.change, "dppl_err": j.se, "dppl_how": j.method,
                        "dppl_ci_low": j.low, "dppl_ci_high": j.high, "dppl_paired": paired,
                        "dppl_n": round(j.n * j.item_size) if j.n and j.item_size
                        else _scored_tokens(r), "dppl_judged": j}


def _ppl_details(r: dict[str, Any]) -> dict[str, Any]:
    c = r["cells"].get("perplexity")
    return (c.get("details") or {}) if c and c.get("status") == "ok" else {}


def _scored_tokens(r: dict[str, Any]) -> int | None:
    d = _ppl_details(r)
    if d.get("scored_tokens"):
        return int(d["scored_tokens"])
    c = r["cells"].get("perplexity")
    n = (((c or {}).get("values") or {}).get("ppl") or {}).get("n") if c else None
    return int(n) if n else None


def _add_mmlu_delta(r: dict[str, Any], base: dict[str, Any] | None) -> None:
    """The judge's McNemar comparison of r's MMLU answers with the base's, as the table shows
    it; whether the base can discriminate at all (a model at chance cannot)."""
    r["mmlu_paired"] = None
    r["mmlu_note"] = None
    mmlu = r["cells"].get("mmlu")
    spec = known_metric_info("mmlu")
    r["mmlu_fitness"] = None
    if spec is not None and base is not None and base["cells"].get("mmlu", {}).get("status") == "ok":
        fit = spec.value_spec("acc")
        if fit is not None and fit.fitness is not None:
            r["mmlu_fitness"] = fit.fitness(base["cells"]["mmlu"])
    if r["is_base"]:
        if mmlu and mmlu.get("status") == "ok" and spec is not None:
            fit = spec.value_spec("acc")
            r["mmlu_fitness"] = fit.fitness(mmlu) if fit and fit.fitness else None
        return
    if mmlu is not None and mmlu.get("status") != "ok":
        r["mmlu_note"] = f"MMLU not measured (cell {mmlu.get('status')})"
        return
    if r["acc"] is None:
        return
    if not base or base["acc"] is None:
        r["mmlu_note"] = "no ok MMLU cell for the base"
        return
    r["dacc_pts"] = 100.0 * (r["acc"] - base["acc"])
    j = r["judged"].get("mmlu.acc")
    if j is None or not j.comparable or j.flips is None:
        r["mmlu_note"] = "no paired test: " + (j.reason if j is not None else "no per-question data")
        return
    gained, lost = j.flips
    r["mmlu_paired"] = {
        "n": j.n, "acc_base": base["acc"], "acc_other": r["acc"], "flips_gained": gained,
        "flips_lost": lost, "diff": j.change / 100.0, "ci_low": j.low / 100.0,
        "ci_high": j.high / 100.0, "p_value": j.p_value,
        # significant at the level the interval was taken at (95 %, or the plan's)
        "significant": j.p_value is not None and j.p_value < 1 - j.level, "level": j.level,
        "method": j.method,
        "cannot_discriminate": r["mmlu_fitness"]}


def memory_of(row: dict[str, Any]) -> tuple[float | None, str | None]:
    """The measured peak memory that limits this variant: VRAM when it used a GPU, else RSS,
    of its own cell (speed first: see :func:`_own_peak`), never the maximum over cells that
    also loaded the base for KLD. None when no such cell is ok."""
    cell = row.get("own_peak_cell")
    # a peak that is not a finite positive number was not measured (a NaN would otherwise
    # win or lose every max() it meets, depending on the order)
    vram, rss = (row.get(k) for k in ("own_peak_vram_mb", "own_peak_rss_mb"))
    if isinstance(vram, (int, float)) and math.isfinite(vram) and vram > 0:
        return vram, f"peak VRAM ({cell} cell)"
    if isinstance(rss, (int, float)) and math.isfinite(rss) and rss > 0:
        return rss, f"peak RSS ({cell} cell)"
    return None, None


def type_mix(types: dict[str, dict[str, int]]) -> str:
    """'Q5_0 62% · Q8_0 21% · F32 0.1%' by share of parameters, largest first."""
    if not types:
        return "–"
    total = sum(t.get("params", 0) for t in types.values()) or 1
    parts = []
    for name, t in sorted(types.items(), key=lambda kv: -kv[1].get("params", 0)):
        share = 100 * t.get("params", 0) / total
        parts.append(f"{name} {share:.0f}%" if share >= 1 else f"{name} {share:.1g}%")
    return " · ".join(parts)


def fmt(x: float | None, digits: int = 3) -> str:
    """Significant digits for small numbers, thousands separators for large ones; '–' for none."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "–"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"


def signed(x: float | None, decimals: int = 2, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{decimals}f}{unit}"
