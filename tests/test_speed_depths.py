"""The speed metric's depths, roofline and energy, on a fake backend whose decode advances a
fake clock (a cost per token growing with its position) and a fake RAPL counter (1 mJ per
token): every tokens/s, GB/s and J/token below is exact arithmetic, never a timing."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from qbench.errors import ConfigError
from qbench.host import bandwidth as bw
from qbench.host import energy
from qbench.host.contamination import Snapshot, WindowMeter
from qbench.metrics import speed, speed_hw
from qbench.metrics.context import CellContext
from qbench.options import from_table

QUIET = Snapshot(at=0.0, wall=0.0, busy_s=0.0, steal_s=0.0, own_s=0.0, load1=None,
                 freq_mhz=None)
BASE_NS, PER_POS_NS = 1_000_000, 1_000       # a token at position p costs 1 ms + 1 us x p
UJ_PER_TOKEN = 1_000                         # 1 mJ per decoded token
FILE_BYTES = 50_000_000


class Clock:
    def __init__(self) -> None:
        self.t = 0

    def perf_counter_ns(self) -> int:
        return self.t


class FakeBackend:
    n_vocab, bos_id, add_bos, n_batch, device = 1000, 1, True, 256, "cpu"

    def __init__(self, clock: Clock, zone: Path | None) -> None:
        self.clock, self.zone = clock, zone
        self.pos = 0
        self.n_ctx = 0
        self.resets: list[int | None] = []
        self.sizes: list[int] = []
        self.decodes: list[tuple[int, int]] = []        # (first position, tokens)

    def reset(self, n_ctx: int | None = None) -> None:
        self.resets.append(n_ctx)
        if n_ctx is not None:
            self.n_ctx = max(self.n_ctx, n_ctx)
        self.pos = 0

    def size_context(self, n_ctx: int) -> None:
        """As llama.cpp's backend: an empty cache of exactly n_ctx positions."""
        self.sizes.append(n_ctx)
        self.n_ctx = n_ctx
        self.pos = 0

    def decode_tokens(self, tokens: list[int], n_batch: int) -> None:
        n = len(tokens)
        assert self.pos + n <= self.n_ctx, "decoded past the KV cache the metric sized"
        self.decodes.append((self.pos, n))
        self.clock.t += sum(BASE_NS + PER_POS_NS * p for p in range(self.pos, self.pos + n))
        if self.zone is not None:
            uj = int((self.zone / "energy_uj").read_text())
            (self.zone / "energy_uj").write_text(str(uj + UJ_PER_TOKEN * n))
        self.pos += n

    def close(self) -> None:
        pass


def tokens_per_s(depth: int, n: int) -> float:
    return n * 1e9 / sum(BASE_NS + PER_POS_NS * p for p in range(depth, depth + n))


@pytest.fixture
def cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """cell(rapl=True) -> (CellContext on a FakeBackend, the backend). A fake clock for the
    metric, a fake powercap tree, no NVML, a 50 MB 'model' and a cached 10 GB/s record."""
    clock = Clock()
    monkeypatch.setattr(speed, "time", clock)
    # the machine's real load would have disturbed windows measured again (tests of that:
    # tests/test_contamination.py): here every window is quiet
    monkeypatch.setattr(speed, "_meter", lambda: WindowMeter(lambda: QUIET))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(bw, "this_hardware_id", lambda: "hw-test")
    cache = tmp_path / "cache"
    rec = {"schema": bw.SCHEMA, "available": True, "gbs": 10.0, "passes": [10.0],
           "buffer_bytes": 2**31, "llc_bytes": 32 * 2**20, "method": "fake", "when": "then",
           "gpu": {"available": False, "reason": "fake"}}
    path = bw.cache_path(cache, "hw-test")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    model = tmp_path / "model.bin"
    with model.open("wb") as f:
        f.truncate(FILE_BYTES)                       # sparse: the size without the bytes

    def make(rapl: bool = True) -> tuple[CellContext, FakeBackend]:
        root = tmp_path / "powercap"
        zone = None
        if rapl:
            zone = root / "intel-rapl:0"
            zone.mkdir(parents=True, exist_ok=True)
            (zone / "name").write_text("package-0\n")
            (zone / "energy_uj").write_text("0\n")
            (zone / "max_energy_range_uj").write_text("262143328850\n")
        monkeypatch.setattr(energy, "POWERCAP_ROOT", root)
        backend = FakeBackend(clock, zone)
        ctx = CellContext(cell_id="m/fake/X/speed", model_id="m", artifact_path=model,
                          artifact={"size_bytes": FILE_BYTES}, base_dir=tmp_path,
                          data_dir=None, cache_dir=cache, is_base=False,
                          _load=lambda: backend)
        return ctx, backend

    return make


OPTS = dict(prompt_tokens=64, gen_tokens=16, repetitions=2)


def test_each_test_runs_in_a_context_sized_as_llama_bench_sizes_it(cell):
    """llama-bench: n_ctx = n_prompt + n_gen + n_depth of the test (a tg test has no prompt);
    a cache sized for both tests made tg at depth 512 read 14 % slow against it. The fake
    refuses to decode past the size, so each warm-up must be of its test's kind too."""
    ctx, backend = cell()
    speed.run(ctx, speed.Options(**OPTS, depths=(0, 512)))
    assert backend.sizes == [0 + 64 + 1, 0 + 16 + 1, 512 + 64 + 1, 512 + 16 + 1]


def test_depth_zero_keeps_todays_names_and_numbers(cell):
    ctx, _ = cell()
    out = speed.run(ctx, speed.Options(**OPTS))
    v = out["values"]
    assert {"pp_tokens_per_s", "tg_tokens_per_s", "tg_effective_gbs", "tg_bandwidth_pct",
            "pp_joules_per_token", "tg_joules_per_token", "peak_rss_mb"} == set(v)
    assert v["pp_tokens_per_s"]["value"] == pytest.approx(tokens_per_s(0, 64))
    assert v["tg_tokens_per_s"]["value"] == pytest.approx(tokens_per_s(0, 16))
    assert v["tg_tokens_per_s"]["samples"] == [round(tokens_per_s(0, 16), 3)] * 2
    assert out["details"]["test_names"] == ["pp64", "tg16"]


def test_depths_fill_the_cache_untimed_then_time_at_depth(cell):
    ctx, backend = cell()
    out = speed.run(ctx, speed.Options(**OPTS, depths=(512, 0)))
    v = out["values"]
    # timed tokens sit at positions 512.. and cost more; the 512 fill tokens are not timed
    assert v["pp_tokens_per_s@d512"]["value"] == pytest.approx(tokens_per_s(512, 64))
    assert v["tg_tokens_per_s@d512"]["value"] == pytest.approx(tokens_per_s(512, 16))
    assert v["tg_tokens_per_s"]["value"] == pytest.approx(tokens_per_s(0, 16))
    assert v["tg_tokens_per_s@d512"]["value"] < v["tg_tokens_per_s"]["value"]
    # depth 0 first, whatever order the suite gave (each test sized for itself)
    assert backend.sizes == [64 + 1, 16 + 1, 512 + 64 + 1, 512 + 16 + 1]
    fills = [d for d in backend.decodes if d == (0, 512)]
    assert len(fills) == 2 * OPTS["repetitions"]       # one fill per repetition, pp and tg
    assert out["details"]["test_names"] == ["pp64", "tg16", "pp64@d512", "tg16@d512"]
    curve = out["details"]["depths"]
    assert [p["depth"] for p in curve] == [0, 512]
    assert curve[1]["tg_tokens_per_s"] == pytest.approx(tokens_per_s(512, 16))
    assert curve[1]["tg_effective_gbs"] == pytest.approx(
        FILE_BYTES * tokens_per_s(512, 16) / 1e9)


def test_effective_bandwidth_and_percent_of_measured(cell):
    ctx, _ = cell()
    out = speed.run(ctx, speed.Options(**OPTS, depths=(0, 512)))
    v, bwd = out["values"], out["details"]["bandwidth"]
    gbs = FILE_BYTES * tokens_per_s(0, 16) / 1e9        # file size: no KV known
    assert v["tg_effective_gbs"]["value"] == pytest.approx(gbs)
    assert v["tg_effective_gbs"]["unit"] == "GB/s"
    assert v["tg_bandwidth_pct"]["value"] == pytest.approx(100 * gbs / 10.0)
    assert v["tg_bandwidth_pct"]["unit"] == "%"
    assert v["tg_effective_gbs@d512"]["value"] == pytest.approx(
        FILE_BYTES * tokens_per_s(512, 16) / 1e9)
    assert bwd["weight_bytes_per_token"] == FILE_BYTES
    assert bwd["kv_bytes_per_token"] == {"0": 0.0, "512": 0.0}     # JSON keys
    assert bwd["measured"]["gbs"] == 10.0 and bwd["reference"]["what"].startswith("CPU")
    assert bwd["cache_caveat"] is False                  # 50 MB > the 32 MiB LLC
    assert bwd["traffic"]["source"] == "file size"


def test_energy_counts_the_timed_tokens_only(cell):
    ctx, _ = cell()
    out = speed.run(ctx, speed.Options(**OPTS, depths=(0, 512)))
    v = out["values"]
    for name in ("pp_joules_per_token", "tg_joules_per_token",
                 "pp_joules_per_token@d512", "tg_joules_per_token@d512"):
        # 1 mJ per token; had the warm-up or the 512-token fills been counted, it would be more
        assert v[name]["value"] == pytest.approx(UJ_PER_TOKEN * 1e-6), name
        assert v[name]["unit"] == "J/token"
    assert v["tg_joules_per_token"]["n"] == 2 * 16
    e = out["details"]["energy"]
    assert e["available"] is True and e["sources"] == ["rapl:package-0"]
    assert e["runs"]["pp@d512"]["joules"] == pytest.approx(2 * 64 * UJ_PER_TOKEN * 1e-6)


def test_no_energy_counter_is_said_not_zero(cell):
    ctx, _ = cell(rapl=False)
    out = speed.run(ctx, speed.Options(**OPTS))
    assert not any("joules" in name for name in out["values"])
    e = out["details"]["energy"]
    assert e["available"] is False
    assert "powercap here" in e["reason"] and "pynvml" in e["reason"]


def test_roofline_off(cell):
    ctx, _ = cell()
    out = speed.run(ctx, speed.Options(**OPTS, roofline=False))
    assert "tg_effective_gbs" not in out["values"] and "tg_bandwidth_pct" not in out["values"]
    assert out["details"]["bandwidth"]["available"] is False
    assert out["details"]["bandwidth"]["reason"] == "roofline = false"


def test_failed_bandwidth_measurement_keeps_the_gbs(cell, monkeypatch):
    monkeypatch.setattr(bw, "ensure_measured",
                        lambda cache_dir: {"available": False, "reason": "boom"})
    ctx, _ = cell()
    out = speed.run(ctx, speed.Options(**OPTS))
    assert "tg_effective_gbs" in out["values"] and "tg_bandwidth_pct" not in out["values"]
    assert out["details"]["bandwidth"]["reference"]["reason"] == "boom"


def test_a_gpu_cell_is_compared_with_the_gpu(tmp_path):
    rec = {"gbs": 5.0, "llc_bytes": 32 * 2**20,
           "gpu": {"available": True, "devices": [
               {"gbs": 4000.0, "l2_bytes": 50 * 2**20, "name": "Fake H200"}]}}
    model = tmp_path / "m.bin"
    model.write_bytes(b"x" * 1000)
    ctx = types.SimpleNamespace(artifact_path=model, artifact={}, cache_dir=tmp_path)
    gpu = types.SimpleNamespace(device="cuda", n_gpu_layers=10**6)
    roof = speed_hw.roofline_setup(ctx, gpu, measure=lambda cache_dir: rec)
    assert roof["reference"]["gbs"] == 4000.0 and roof["reference"]["llc_bytes"] == 50 * 2**20
    values, details = speed_hw.bandwidth_values(roof, {"value": 100.0, "n": 3}, 0, 16)
    assert values["tg_bandwidth_pct"]["value"] == pytest.approx(100 * 1000 * 100 / 1e9 / 4000)
    assert details["cache_caveat"] is True        # 1000 bytes of weights fit in 50 MiB of L2
    no_gpu = speed_hw.roofline_setup(ctx, gpu, measure=lambda cache_dir: rec | {
        "gpu": {"available": False, "reason": "torch is not installed"}})
    assert no_gpu["reference"]["gbs"] is None
    assert no_gpu["reference"]["reason"] == "torch is not installed"
    cpu = speed_hw.roofline_setup(ctx, types.SimpleNamespace(device="cpu"),
                                  measure=lambda cache_dir: rec)
    assert cpu["reference"]["gbs"] == 5.0


def test_kv_bytes_grow_with_depth():
    roof = {"available": True, "reference": {"gbs": 10.0, "llc_bytes": 2**20},
            "traffic": {"weight_bytes_per_token": 96_000_000, "kv_bytes_per_position": 23040}}
    _, d0 = speed_hw.bandwidth_values(roof, {"value": 10.0}, 0, 128)
    _, d512 = speed_hw.bandwidth_values(roof, {"value": 10.0}, 512, 128)
    assert d0["kv_bytes_per_token"] == 23040 * 64.5
    assert d512["kv_bytes_per_token"] == 23040 * (512 + 64.5)
    assert d512["gbs"] == pytest.approx((96_000_000 + 23040 * 576.5) * 10 / 1e9)


@pytest.mark.parametrize("depths, error", [
    ([-1], "expected a depth >= 0"), ([0, 0], "depths repeat"), ([], "at least one depth"),
    (512, "expected a list of integers"), (["512"], "expected an integer"),
])
def test_depths_are_validated(depths, error):
    with pytest.raises(ConfigError, match=error):
        from_table(speed.Options, {"depths": depths}, file="s.toml", key="metrics.speed")


def test_depths_default_and_parse():
    assert from_table(speed.Options, {}, file="s.toml", key="metrics.speed").depths == (0,)
    opts = from_table(speed.Options, {"depths": [0, 512, 4096]}, file="s.toml",
                      key="metrics.speed")
    assert opts.depths == (0, 512, 4096) and opts.roofline is True


def test_suffix():
    assert speed_hw.suffix(0) == "" and speed_hw.suffix(512) == "@d512"


def test_the_depth_benchmark_says_when_its_rounds_cannot_resolve_five_percent():
    """benchmarks/speed_depth.py's verdict on the paired per-round ratios: the 95 % t interval
    of their geometric mean inside 0.95-1.05 agrees, wholly outside differs; the measured
    tg@d512 rounds (0.908, 1.083, 1.115) resolve nothing, and the number of rounds it names
    does resolve them when the same rounds recur."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "speed_depth", Path(__file__).resolve().parent.parent / "benchmarks" / "speed_depth.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tight = bench.verdict([1.0, 0.99, 1.01, 1.0, 1.02])
    assert tight["verdict"].startswith("within 5 %") and tight["ci_low"] > 0.95
    assert bench.verdict([0.80, 0.82, 0.81])["verdict"].startswith("differs")
    assert bench.verdict([1.08, 1.09, 1.085])["verdict"].startswith("differs")
    # every round within 5 % is not enough with three of them: the interval is wide
    assert bench.verdict([0.96, 1.0, 1.049])["verdict"].startswith("not resolved")
    measured = [0.908, 1.083, 1.115]
    v = bench.verdict(measured)
    assert v["verdict"].startswith("not resolved in 3 rounds")
    need = v["rounds_to_resolve"]
    assert need > 3 and f"about {need} rounds" in v["verdict"]
    # the same three rounds recurring: a little past the named count resolves (the count uses
    # the normal quantile, the verdict Student's t), well short of it does not
    more = bench.verdict(measured * (need // 3 + 2))
    assert more["verdict"].startswith("within 5 %"), more
    fewer = bench.verdict(measured * max(2, need // 6))
    assert fewer["verdict"].startswith("not resolved"), fewer
