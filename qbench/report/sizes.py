"""Memory at the sizes people run: what an 8B or a 70B needs at the report's context, computed
from the synthetic presets' tensor plans, beside what this suite measured.

The seeds ask "an 8B at 8-bit or a 70B at 3-4-bit: how much memory?". Nobody here can load a
70B, and nothing needs to: a quantized file's tensors (each one's type, by llama.cpp's own rules)
follow from the architecture alone. ``qbench/data/preset_footprints.json`` holds, per preset and
type, the tensor bytes by type that llama.cpp's quantizer in dry-run mode gives a *sparse* F16
GGUF of the preset (the header and tensor table, no data: the 70B's 141 GB take 6.4 MB of
disk; benchmarks/synthetic_presets.py --write-footprints regenerates it, and
tests/test_sizes.py checks it against a fresh dry run). This module passes each entry through
the recommendation's own memory model (qbench.report.recommend._memory): on the CPU the
records were measured on (the runtime counted; peak RSS also holds the repacked tensors' mapped
pages, which the need leaves out) and on a GPU (weights + KV: the CUDA runtime is not
modelled). These rows are computed, never measured, and say so; the
suite's own rows carry their measured peaks in the recommendation.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from qbench.report.recommend import _memory
from qbench.report.table import runtime_facts

GIB = 2 ** 30
MIB = 2 ** 20


def preset_footprints() -> dict[str, Any]:
    text = resources.files("qbench").joinpath("data/preset_footprints.json").read_text("utf-8")
    return json.loads(text)


def preset_rows(kv_ctx: int, budget_gb: float | None, machine: dict[str, Any],
                data: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per preset and type: parameters, file, KV cache at ``kv_ctx`` (f16), the need
    on this CPU and on a GPU (GiB), and whether each fits ``budget_gb``."""
    data = data or preset_footprints()
    out = []
    for preset, entry in data["presets"].items():
        for quant, t in entry["types"].items():
            row = {"backend": "llama.cpp", "model_shape": entry["shape"],
                   "size_mb": t["tensor_bytes"] / MIB, "tensor_types": t["tensor_types"],
                   "roles": t["roles"], "embed_bytes": t["embed_bytes"], "kv_bytes": 2.0,
                   "system_info": machine.get("system_info"),
                   "cpu_flags": machine.get("cpu_flags") or []}
            cpu = _memory(row | {"device": "cpu"}, kv_ctx)
            gpu = _memory(row | {"device": "cuda"}, kv_ctx)
            peak_cpu = (cpu["estimate_mb"] / 1024 if cpu["estimate_mb"] is not None
                        and cpu["repack_mb"] is not None else None)
            need_cpu = (cpu["need_mb"] / 1024 if cpu["need_mb"] is not None
                        and cpu["repack_mb"] is not None else None)
            need_gpu = gpu["estimate_mb"] / 1024 if gpu["estimate_mb"] is not None else None
            out.append({
                "preset": preset, "quant": quant, "params": entry["params"],
                "file_gib": t["file_bytes"] / GIB, "kv_gib": (cpu["kv_mb"] or 0) / 1024,
                "repack_gib": cpu["repack_mb"] / 1024 if cpu["repack_mb"] is not None else None,
                "repack_how": cpu["repack_how"],
                "runtime_gib": (cpu["runtime_mb"] or 0) / 1024,
                "cpu_peak_gib": peak_cpu, "cpu_gib": need_cpu, "gpu_gib": need_gpu,
                "fits_cpu": None if budget_gb is None or need_cpu is None else need_cpu <= budget_gb,
                "fits_gpu": None if budget_gb is None or need_gpu is None else need_gpu <= budget_gb})
    return out


def answer(rows: list[dict[str, Any]], kv_ctx: int) -> list[str]:
    """The seeds' memory question in sentences: an 8B at 8-bit against a 70B at 4 and 3 bits."""
    by = {(r["preset"], r["quant"]): r for r in rows}
    small = by.get(("llama-3.1-8b", "Q8_0"))
    out = []
    for quant in ("Q4_K_M", "Q3_K_M"):
        big = by.get(("llama-3.1-70b", quant))
        if not (small and big and small["gpu_gib"] and big["gpu_gib"]):
            continue
        out.append(
            f"At {kv_ctx:,} tokens (f16 KV cache), Llama-3.1-70B at {quant} needs "
            f"{big['gpu_gib']:.1f} GiB on a GPU (weights {big['file_gib']:.1f} + KV "
            f"{big['kv_gib']:.2f}) against {small['gpu_gib']:.1f} GiB for Llama-3.1-8B at Q8_0: "
            f"×{big['gpu_gib'] / small['gpu_gib']:.1f}"
            + (f"; on this CPU it needs {big['cpu_gib']:.1f} against {small['cpu_gib']:.1f} "
               f"GiB with the runtime, and its peak RSS reads {big['cpu_peak_gib']:.1f} GiB: "
               f"llama.cpp repacks {big['repack_gib']:.1f} GiB of its tensors and their pages "
               "in the mapped file stay resident until memory is short"
               if big["cpu_gib"] and small["cpu_gib"] else "") + ".")
    return out


def measured_lines(recs: list[dict[str, Any]], budget_gb: float | None) -> list[str]:
    """Per variant of the suite, what it needs at the report's context from its own measured
    peak (+ the KV cache's growth to that context), beside the estimate and whether it fits."""
    out = []
    for rec in recs:
        for c in rec["candidates"]:
            at = c.get("measured_at_ctx_mb")
            if at is None:
                continue
            est = c.get("estimate_mb")
            vs = (f"; the estimate {est / 1024:.2f} GiB ({100 * (est / at - 1):+.1f} %)"
                  if est and c.get("runtime_mb") is not None else
                  "; no estimate of the runtime for it (a GPU or the transformers backend): "
                  "the measured peak decides" if est else "")
            copy = c.get("evictable_mb") or 0.0
            need = (f"; needs {c['need_mb'] / 1024:.2f} GiB (less the repacked tensors' "
                    f"{copy / 1024:.2f} GiB in the mapped file, page cache the kernel drops)"
                    if copy else "")
            fit = ("" if budget_gb is None else
                   "; fits" if c["need_mb"] <= budget_gb * 1024 else "; does not fit")
            out.append(f"{c['label']}: peak {at / 1024:.2f} GiB measured ({c['measured_kind']} "
                       f"{c['measured_mb'] / 1024:.2f} GiB at "
                       f"{format(c['run_ctx'], ',') if c['run_ctx'] else 'its own short'} "
                       f"context + KV "
                       f"growth){vs}{need}{fit}")
    return out


def sizes_view(rows: list[dict[str, Any]], records: list[dict[str, Any]],
               recs: list[dict[str, Any]], kv_ctx: int, budget_gb: float | None
               ) -> dict[str, Any]:
    """What the report's "Memory at the sizes people run" section shows."""
    machine = runtime_facts(records)      # the same reading the suite's own rows get
    data = preset_footprints()
    presets = preset_rows(kv_ctx, budget_gb, machine, data)
    return {"measured": measured_lines(recs, budget_gb), "presets": presets,
            "answer": answer(presets, kv_ctx), "cpu": machine.get("cpu"),
            "source": f"qbench/data/preset_footprints.json, llama-cpp-python "
                      f"{data.get('llama_cpp_python', '?')}"}
