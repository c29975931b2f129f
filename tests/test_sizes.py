"""The report's "Memory at the sizes people run" (qbench.report.sizes): the presets' footprints it
ships are what llama.cpp's quantizer gives today and what the model cards publish; the 8B-vs-70B
answer is the memory model applied to them; the suite's measured variants are stated against
the budget."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from qbench.report.recommend import kv_cache_mb
from qbench.report.sizes import (answer, measured_lines, preset_footprints, preset_rows,
                                 sizes_view)

REPO = Path(__file__).resolve().parent.parent
GIB = 2 ** 30
AVX2 = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | FMA = 1 | OPENMP = 1 | REPACK = 1 | "


def _benchmark() -> object:
    """benchmarks/synthetic_presets.py (it writes the data file and holds the cited figures)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "synthetic_presets", REPO / "benchmarks" / "synthetic_presets.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_footprints_match_the_published_file_sizes() -> None:
    """A stale or wrong data file fails here: each preset's Q4_K_M (and other published types)
    against the figures synthetic_presets.json cites (stated to 2-3 digits)."""
    data = preset_footprints()["presets"]
    checked = 0
    for preset, p in _benchmark().PUBLISHED.items():
        for quant, (value, unit) in (p.get("sizes") or {}).items():   # value in bytes
            if preset not in data or quant not in data[preset]["types"]:
                continue
            got = data[preset]["types"][quant]["file_bytes"]
            assert got == pytest.approx(value, rel=0.01), (preset, quant, got, value, unit)
            checked += 1
    assert checked >= 6     # 1B F16/Q8_0/Q4_K_M, 8B Q8_0/Q4_K_M, 70B Q4_K_M ...


def test_a_fresh_dry_run_gives_the_shipped_footprint(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the quantizer's dry run)")
    fresh = _benchmark().sizes("llama-3.2-1b", ["Q4_K_M"], tmp_path)
    shipped = preset_footprints()["presets"]["llama-3.2-1b"]
    assert fresh["types"]["Q4_K_M"]["footprint"] == shipped["types"]["Q4_K_M"]
    assert fresh["shape"] == shipped["shape"]


def test_the_70b_answer_is_weights_plus_kv_on_a_gpu_and_more_on_a_cpu() -> None:
    data = preset_footprints()
    rows = preset_rows(8192, 48.0, {"system_info": AVX2}, data)
    by = {(r["preset"], r["quant"]): r for r in rows}
    big = by[("llama-3.1-70b", "Q4_K_M")]
    entry = data["presets"]["llama-3.1-70b"]
    kv = kv_cache_mb(entry["shape"], 8192) / 1024      # 2 x 80 x 8 x 128 x 8192 x 2 B
    assert kv == pytest.approx(2.5)
    assert big["gpu_gib"] == pytest.approx(
        entry["types"]["Q4_K_M"]["tensor_bytes"] / GIB + kv)
    # on the CPU: needs weights + KV + the runtime; peak RSS adds the repacked tensors' pages
    assert big["cpu_gib"] == pytest.approx(big["gpu_gib"] + big["runtime_gib"])
    assert big["cpu_peak_gib"] == pytest.approx(big["cpu_gib"] + big["repack_gib"])
    assert big["repack_gib"] > 20                                   # its Q4_K tensors
    assert big["fits_gpu"] is True and by[("llama-3.1-70b", "Q8_0")]["fits_gpu"] is False
    text = " ".join(answer(rows, 8192))
    assert "Llama-3.1-70B at Q4_K_M" in text and "Llama-3.1-8B at Q8_0" in text
    small = by[("llama-3.1-8b", "Q8_0")]
    assert f"×{big['gpu_gib'] / small['gpu_gib']:.1f}" in text


def test_an_unknown_cpu_gives_no_cpu_figure_but_the_gpu_one() -> None:
    rows = preset_rows(4096, None, {"system_info": None, "cpu_flags": ["asimd"]})
    q4 = next(r for r in rows if r["preset"] == "llama-3.1-8b" and r["quant"] == "Q4_K_M")
    assert q4["repack_gib"] is None and "not known" in q4["repack_how"]
    assert q4["gpu_gib"] is not None and q4["fits_cpu"] is None


def test_measured_variants_are_stated_against_the_budget() -> None:
    cand = {"label": "m / llama.cpp / Q8_0", "measured_at_ctx_mb": 1700.0, "estimate_mb": 1680.0,
            "measured_kind": "peak RSS (speed cell)", "measured_mb": 1560.0, "run_ctx": 4128,
            "need_mb": 1700.0, "evictable_mb": 0.0, "runtime_mb": 170.0}
    fits = measured_lines([{"candidates": [cand]}], 2.0)
    assert "1.66 GiB measured" in fits[0] and "(-1.2 %)" in fits[0] and fits[0].endswith("fits")
    assert measured_lines([{"candidates": [cand]}], 1.5)[0].endswith("does not fit")
    # a Q4_K variant: its peak holds the repacked tensors twice, its need does not
    q4 = cand | {"need_mb": 1300.0, "evictable_mb": 400.0}
    line = measured_lines([{"candidates": [q4]}], 1.5)[0]
    assert "peak 1.66 GiB" in line and "needs 1.27 GiB" in line and line.endswith("; fits")
    assert measured_lines([{"candidates": [cand | {"measured_at_ctx_mb": None}]}], 2.0) == []
    # no runtime modelled (transformers, GPU): the estimate is not held against the peak
    hf = measured_lines([{"candidates": [cand | {"runtime_mb": None}]}], 2.0)[0]
    assert "%" not in hf and "the measured peak decides" in hf


def test_the_section_renders_in_the_report() -> None:
    from qbench.report.build import render_suite
    from synthetic_records import demo_records

    html = render_suite("demo", demo_records(), budget_gb=8.0, kv_ctx=8192)
    assert 'id="sizes"' in html and "Llama-3.1-70B at Q4_K_M needs" in html
    view = sizes_view([], demo_records(), [], 8192, 8.0)
    assert view["presets"] and view["cpu"] == "Synthetic CPU @ 3.0GHz"
