"""benchmarks/decode_roofline.py's summary: each round's tg is set against *that round's*
bandwidth (a machine whose load moves between rounds moves both halves of the ratio), and the
one-thread scaling is the ratio of the paired rounds, not of the medians."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def roofline():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("decode_roofline",
                                                  REPO / "benchmarks" / "decode_roofline.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_percent_of_bandwidth_is_per_round(roofline):
    files = {"Q8_0": Path("q8.gguf")}
    traffic = {"Q8_0": {"weights": 1e9, "kv": 0.0, "total": 1e9, "file": 1e9}}
    rounds = [  # round 0: busy machine (low bandwidth, low tg); round 1: quiet
        {"quants": {"Q8_0": {"bw_gbs": 5.0, "qbench_tg": 4.0, "llama_bench_tg": 4.0,
                             "bw_gbs_1t": 4.0, "llama_bench_tg_1t": 2.0}}},
        {"quants": {"Q8_0": {"bw_gbs": 10.0, "qbench_tg": 8.0, "llama_bench_tg": 8.4,
                             "bw_gbs_1t": 8.0, "llama_bench_tg_1t": 7.0}}},
    ]
    e = roofline.summarise(rounds, files, traffic)["Q8_0"]
    # 4 GB/s of 5 and 8 GB/s of 10: 80 % both rounds; against the median bandwidth (7.5)
    # they would be 53 % and 107 %
    assert e["qbench"]["pct_of_bandwidth"]["min"] == pytest.approx(80.0)
    assert e["qbench"]["pct_of_bandwidth"]["max"] == pytest.approx(80.0)
    assert e["qbench"]["gbs"]["median"] == pytest.approx(6.0)
    assert e["ratio"]["paired"] == pytest.approx([1.0, 8.0 / 8.4])
    s = e["scaling"]
    assert s["tg_gain_2_over_1"]["min"] == pytest.approx(8.4 / 7.0)
    assert s["tg_gain_2_over_1"]["max"] == pytest.approx(2.0)
    assert s["bandwidth_gain_2_over_1"]["median"] == pytest.approx(1.25)


def test_spread_of_nothing_is_empty(roofline):
    assert roofline.spread([]) == {"median": None, "min": None, "max": None, "n": 0}
    assert roofline.fmt(roofline.spread([])) == "-"
