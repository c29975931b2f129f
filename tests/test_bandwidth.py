"""The memory-bandwidth roofline: LLC and buffer rules, the read kernel's arithmetic on a fake
clock, the GPU path on a fake torch, the per-machine cache, the detached measurement, the
effective-bandwidth formula and the bytes a token reads (GGUF, torch, file size).

Only the slow test measures this machine for real (and checks plausibility, not a speed)."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import psutil
import pytest

from qbench.host import bandwidth as bw
from qbench.metrics import roofline

MiB, GiB = 2**20, 2**30


# --- the LLC and the buffer rule ------------------------------------------------------------


@pytest.mark.parametrize("text, size", [("32768K", 32 * MiB), ("32M", 32 * MiB),
                                        ("512K\n", 512 * 1024), ("1024", 1024), ("1G", GiB)])
def test_parse_size(text, size):
    assert bw.parse_size(text) == size


def _cache_index(root: Path, i: int, level: int, kind: str, size: str) -> None:
    d = root / f"index{i}"
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "type").write_text(f"{kind}\n")
    (d / "size").write_text(f"{size}\n")


def test_llc_is_the_highest_data_or_unified_level(tmp_path):
    _cache_index(tmp_path, 0, 1, "Data", "32K")
    _cache_index(tmp_path, 1, 1, "Instruction", "32K")
    _cache_index(tmp_path, 2, 2, "Unified", "1024K")
    _cache_index(tmp_path, 3, 3, "Unified", "32768K")
    assert bw.llc(tmp_path) == (32 * MiB, 3)
    assert bw.llc(tmp_path / "absent") == (None, None)


def test_llc_ignores_a_bigger_instruction_cache(tmp_path):
    _cache_index(tmp_path, 0, 2, "Unified", "512K")
    _cache_index(tmp_path, 1, 3, "Instruction", "64M")       # nonsense, but must not win
    assert bw.llc(tmp_path) == (512 * 1024, 2)


@pytest.mark.parametrize("llc, available, expect", [
    (32 * MiB, 24 * GiB, 2 * GiB),           # 8 x 32 MiB < 2 GiB: the floor
    (480 * MiB, 24 * GiB, 3840 * MiB),       # 8 x LLC above the floor
    (480 * MiB, 8 * GiB, 2 * GiB),           # capped at a quarter of the RAM
    (None, 24 * GiB, 2 * GiB),               # LLC unknown: the floor
])
def test_buffer_rule(llc, available, expect):
    assert bw.buffer_bytes(llc, available) == expect


# --- the CPU kernel on a fake clock ---------------------------------------------------------


class StepClock:
    """perf_counter_ns that advances ``step`` ns per call: every pass takes ``step`` ns."""

    def __init__(self, step: int) -> None:
        self.t, self.step = 0, step

    def __call__(self) -> int:
        self.t += self.step
        return self.t


def test_cpu_read_arithmetic_on_a_fake_clock():
    res = bw.cpu_read_bandwidth(3 * MiB + 12345, passes=4, threads=2, clock=StepClock(1_000))
    row = 8 * bw.ROW
    assert res["buffer_bytes"] == (3 * MiB + 12345) // (row * 2) * 2 * row   # whole rows/thread
    assert len(res["passes"]) == 4                                   # the warm-up is not kept
    assert res["gbs"] == pytest.approx(res["buffer_bytes"] / 1e-6 / 1e9)
    assert res["threads"] == 2 and "np.add.reduce" in res["method"]


def test_cpu_read_refuses_a_buffer_below_one_row_per_thread():
    with pytest.raises(ValueError, match="too small"):
        bw.cpu_read_bandwidth(1000, threads=2)


# --- the GPU path on a fake torch -----------------------------------------------------------


def fake_torch(*, available: bool = True, devices: int = 1, ms: dict[str, float] | None = None,
               l2: int = 50 * MiB, free: int = 100 * GiB) -> Any:
    """torch.cuda as gpu_bandwidth uses it; kernels take ``ms[kind]`` by the fake events."""
    ms = ms or {"copy": 2.0, "sum": 1.0}
    state: dict[str, Any] = {"last": None, "allocated": []}

    class Tensor:
        def __init__(self, n: int) -> None:
            self.n = n
            state["allocated"].append(n)

        def copy_(self, other: Tensor) -> Tensor:
            state["last"] = "copy"
            return self

        def sum(self) -> float:
            state["last"] = "sum"
            return 0.0

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.at: str | None = None

        def record(self) -> None:
            self.at = state["last"]

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: Event) -> float:
            return ms[end.at]

    class DeviceCtx:
        def __init__(self, i: int) -> None:
            pass

        def __enter__(self) -> None:
            return None

        def __exit__(self, *a: object) -> None:
            return None

    cuda = types.SimpleNamespace(
        is_available=lambda: available, device_count=lambda: devices,
        get_device_properties=lambda i: types.SimpleNamespace(name=f"Fake GPU {i}",
                                                              L2_cache_size=l2),
        mem_get_info=lambda i: (free, 2 * free), Event=Event, device=DeviceCtx,
        empty_cache=lambda: None)
    return types.SimpleNamespace(
        cuda=cuda, float32="float32", device=lambda kind, i: (kind, i),
        ones=lambda n, dtype, device: Tensor(n), empty_like=lambda t: Tensor(t.n),
        _state=state)


def test_gpu_copy_and_read_bandwidth_on_fakes():
    torch = fake_torch(ms={"copy": 2.0, "sum": 1.0}, devices=2)
    res = bw.gpu_bandwidth(passes=3, torch=torch)
    assert res["available"] is True and len(res["devices"]) == 2
    d = res["devices"][0]
    assert d["buffer_bytes"] == GiB                     # max(8 x 50 MiB, 1 GiB)
    assert d["copy_gbs"] == pytest.approx(2 * GiB / 2e-3 / 1e9)     # read + written bytes
    assert d["gbs"] == pytest.approx(GiB / 1e-3 / 1e9)              # read bytes
    assert len(d["read_passes"]) == 3 and len(d["copy_passes"]) == 3


def test_gpu_buffer_follows_l2_and_free_memory():
    d = bw.gpu_bandwidth(passes=1, torch=fake_torch(l2=256 * MiB))["devices"][0]
    assert d["buffer_bytes"] == 2 * GiB and d["l2_bytes"] == 256 * MiB
    d = bw.gpu_bandwidth(passes=1, torch=fake_torch(free=2 * GiB))["devices"][0]
    assert d["buffer_bytes"] == GiB // 2                # a quarter of what is free


def test_gpu_skipped_with_the_reason(monkeypatch):
    res = bw.gpu_bandwidth(torch=fake_torch(available=False))
    assert res == {"available": False,
                   "reason": "no CUDA GPU (torch.cuda.is_available() is False)"}
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    assert bw.gpu_bandwidth() == {"available": False, "reason": "torch is not installed"}


# --- the per-machine cache ------------------------------------------------------------------


def _record(gbs: float = 12.5) -> dict[str, Any]:
    return {"schema": bw.SCHEMA, "gbs": gbs, "passes": [gbs], "buffer_bytes": 2 * GiB,
            "llc_bytes": 32 * MiB, "method": "fake", "when": "2026-01-01T00:00:00+00:00",
            "gpu": {"available": False, "reason": "fake"}}


def test_measured_once_per_machine(tmp_path):
    calls = []

    def measure() -> dict[str, Any]:
        calls.append(1)
        return _record(10.0 + len(calls))

    first = bw.measured_bandwidth(tmp_path, hw_id="hw1", measure_fn=measure)
    path = tmp_path / "host" / "bandwidth-hw1.json"
    assert path.is_file() and json.loads(path.read_text())["gbs"] == 11.0
    assert first["cached"] is False and first["hardware_id"] == "hw1"
    again = bw.measured_bandwidth(tmp_path, hw_id="hw1", measure_fn=measure)
    assert again["gbs"] == 11.0 and again["cached"] is True and len(calls) == 1
    other = bw.measured_bandwidth(tmp_path, hw_id="hw2", measure_fn=measure)  # other hardware
    assert other["gbs"] == 12.0 and len(calls) == 2
    fresh = bw.measured_bandwidth(tmp_path, hw_id="hw1", refresh=True, measure_fn=measure)
    assert fresh["gbs"] == 13.0 and len(calls) == 3


@pytest.mark.parametrize("content", ["{not json", '{"schema": 999, "gbs": 1}', '{"schema": 1}'])
def test_unusable_cache_is_measured_again(tmp_path, content):
    path = bw.cache_path(tmp_path, "hw")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    rec = bw.measured_bandwidth(tmp_path, hw_id="hw", measure_fn=lambda: _record(7.0))
    assert rec["gbs"] == 7.0 and rec["cached"] is False


def test_detached_measurement_is_not_our_descendant(tmp_path):
    """ensure_measured measures in a process that is re-parented away from this one (so a
    cell's memory sampler, which follows its process tree, never sees the buffer), caches
    the record, and the next call reads the cache without starting anything."""
    rec = bw.ensure_measured(tmp_path, hw_id="hwd", timeout_s=300,
                             extra_args=("--buffer-mib", "16", "--passes", "1", "--no-gpu"))
    assert rec.get("gbs", 0) > 0, rec
    assert rec["buffer_bytes"] == 16 * MiB and len(rec["passes"]) == 1
    ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    assert rec["pid"] not in ours and rec["ppid"] not in ours     # re-parented away
    assert rec["gpu"] == {"available": False, "reason": "not asked (--no-gpu)"}
    assert any("8 x LLC" in n for n in rec["notes"]) or not rec["llc_bytes"] \
        or rec["llc_bytes"] * 8 <= 16 * MiB
    assert bw.cache_path(tmp_path, "hwd").is_file()
    assert bw.ensure_measured(tmp_path, hw_id="hwd", extra_args=("--bogus",))["cached"] is True


def test_failed_detached_measurement_says_why(tmp_path):
    rec = bw.ensure_measured(tmp_path, hw_id="hwf", timeout_s=300,
                             extra_args=("--buffer-mib", "0", "--no-gpu"))
    assert rec["available"] is False and "failed" in rec["reason"]


@pytest.mark.slow
def test_real_bandwidth_is_plausible_and_cached(tmp_path):
    """Measures this machine (a ~2 GiB buffer, a few seconds): > 1 GB/s, buffer by the rule,
    and the second call is served from the cache."""
    first = bw.measured_bandwidth(tmp_path)
    assert first["cached"] is False
    assert first["gbs"] > 1.0, first
    assert len(first["passes"]) == 5 and all(p > 0 for p in first["passes"])
    llc_bytes, _ = bw.llc()
    assert first["llc_bytes"] == llc_bytes
    rule = bw.buffer_bytes(llc_bytes, first["available_ram_bytes"])
    assert rule - 8 * bw.ROW * first["threads"] < first["buffer_bytes"] <= rule
    second = bw.measured_bandwidth(tmp_path)
    assert second["cached"] is True and second["when"] == first["when"]
    assert second["gbs"] == first["gbs"]


# --- effective bandwidth --------------------------------------------------------------------


def test_effective_bandwidth_arithmetic():
    eff = bw.effective_bandwidth(100e6, 1e6, 50.0, 10.0, llc_bytes=32 * MiB)
    assert eff["gbs"] == pytest.approx(101e6 * 50 / 1e9)          # 5.05 GB/s
    assert eff["pct_of_measured"] == pytest.approx(50.5)
    assert eff["cache_caveat"] is False and eff["caveat"] is None
    assert eff["above_measured"] is False


def test_weights_that_fit_in_cache_carry_the_caveat():
    eff = bw.effective_bandwidth(20 * MiB, 0, 1000.0, 10.0, llc_bytes=32 * MiB)
    assert eff["cache_caveat"] is True
    assert "last-level cache" in eff["caveat"] and "not a memory-bandwidth figure" in \
        eff["caveat"]
    assert eff["above_measured"] is True                 # 21 GB/s > 10 measured
    unknown = bw.effective_bandwidth(20 * MiB, 0, 1000.0, None, llc_bytes=None)
    assert unknown["cache_caveat"] is None and unknown["pct_of_measured"] is None


# --- bytes per token ------------------------------------------------------------------------


SMOL_SHAPE = {"block_count": 30, "embedding_length": 576, "attention.head_count": 9,
              "attention.head_count_kv": 3, "context_length": 8192}


def test_kv_bytes_formula():
    # 2 (K and V) x 30 layers x 3 KV heads x 64 dims x 2 bytes (f16) per position
    assert roofline.kv_bytes_per_position(30, 3, 64) == 2 * 30 * 3 * 64 * 2 == 23040
    assert roofline.kv_bytes(23040, 512) == 23040 * 512
    assert roofline.mean_tg_positions(512, 128) == 512 + 64.5


def test_tied_embedding_is_read_in_full_untied_is_not():
    summary = {"tensor_bytes": 1000, "shape": SMOL_SHAPE}
    tied = roofline.traffic_from_gguf(summary, {"embed_bytes": 300, "has_output": False})
    assert tied["weight_bytes_per_token"] == 1000 and tied["tied_output"] is True
    untied = roofline.traffic_from_gguf(summary, {"embed_bytes": 300, "output_bytes": 300,
                                                  "has_output": True})
    assert untied["weight_bytes_per_token"] == 700
    assert untied["kv_bytes_per_position"] == 23040          # head_dim = 576 / 9 = 64


def test_explicit_key_value_lengths_and_experts():
    summary = {"tensor_bytes": 10_000, "shape": SMOL_SHAPE}
    facts = {"embed_bytes": 1000, "has_output": True, "key_length": 128, "value_length": 96,
             "expert_bytes": 8000, "expert_count": 8, "expert_used_count": 2}
    t = roofline.traffic_from_gguf(summary, facts)
    assert t["weight_bytes_per_token"] == 10_000 - 1000 - 8000 + 2000   # 2 of 8 experts
    assert t["kv_bytes_per_position"] == 30 * 3 * (128 + 96) * 2


def test_per_layer_kv_heads_are_summed():
    summary = {"tensor_bytes": 1, "shape": SMOL_SHAPE | {"block_count": 3}}
    t = roofline.traffic_from_gguf(summary, {"head_count_kv": [1, 2, 3], "key_length": 64})
    assert t["kv_bytes_per_position"] == (1 + 2 + 3) * (64 + 64) * 2


def test_no_shape_means_kv_zero_said():
    t = roofline.traffic_from_gguf({"tensor_bytes": 5, "shape": {}}, {"has_output": True})
    assert t["kv_bytes_per_position"] is None
    assert any("KV cache size unknown" in n for n in t["notes"])


@pytest.mark.slow
def test_smollm2_gguf_traffic(smollm2_ref, tmp_path):
    from qbench.inputs.sources import locate
    from qbench.quantize.gguf import inspect_gguf
    path = locate(smollm2_ref, base_dir=tmp_path).path
    t = roofline.gguf_traffic(path, tmp_path)
    summary = inspect_gguf(path, tmp_path)
    assert t["tied_output"] is True                     # SmolLM2 has no output.weight
    assert t["weight_bytes_per_token"] == summary["tensor_bytes"]
    assert 0 < t["embed_bytes"] < summary["tensor_bytes"]
    assert t["kv_bytes_per_position"] == 23040
    assert summary["traffic"]["embed_bytes"] == t["embed_bytes"]     # one reader pass, kept
    assert list((tmp_path / "inspect").glob("*-v*.json"))             # memoised
    again = roofline.gguf_traffic(path, tmp_path)
    assert again == t


class _T:
    def __init__(self, numel: int, size: int, ptr: int) -> None:
        self._n, self._s, self._p = numel, size, ptr

    def numel(self) -> int:
        return self._n

    def element_size(self) -> int:
        return self._s

    def data_ptr(self) -> int:
        return self._p


def _fake_model(tied: bool) -> Any:
    emb = _T(1000, 2, 1)
    head = emb if tied else _T(1000, 2, 2)
    layers = [_T(500, 1, 10 + i) for i in range(4)]              # packed 8-bit weights
    params = [emb, *layers] + ([] if tied else [head])
    cfg = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, hidden_size=64)
    return types.SimpleNamespace(
        parameters=lambda: params, buffers=lambda: [], config=cfg,
        get_input_embeddings=lambda: types.SimpleNamespace(weight=emb),
        get_output_embeddings=lambda: types.SimpleNamespace(weight=head),
        dtype=types.SimpleNamespace(itemsize=2))


def test_torch_model_traffic_from_loaded_tensors():
    tied = roofline.torch_model_traffic(_fake_model(True))
    assert tied["weight_bytes_per_token"] == 2000 + 4 * 500 and tied["tied_output"]
    assert tied["kv_bytes_per_position"] == 2 * 2 * 16 * 2 * 2     # layers x kv x (K+V) x 2 B
    untied = roofline.torch_model_traffic(_fake_model(False), kv_element_size=4)
    assert untied["weight_bytes_per_token"] == 2000 + 4 * 500      # the head, not the table
    assert untied["kv_bytes_per_position"] == 2 * 2 * 16 * 2 * 4


def test_model_traffic_falls_back_to_the_file_size(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 1234)
    t = roofline.model_traffic(f, {}, types.SimpleNamespace(model=None), None)
    assert t["source"] == "file size" and t["weight_bytes_per_token"] == 1234
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF")
    t = roofline.model_traffic(bad, {"size_bytes": 99}, object(), None)
    assert t["weight_bytes_per_token"] == 99 and "GGUF not readable" in t["notes"][0]


def _at(gbs: float, load: float, when: str) -> dict[str, Any]:
    return _record(gbs) | {"load_avg": [load, load, load], "cpus": 2, "when": when}


def test_a_busy_measurement_is_provisional_and_the_higher_figure_is_kept(tmp_path):
    """Load only lowers the figure (measured here: 5.7 GB/s at load 5.8, 17.6 at load 1.3): a
    record taken with the load above the cores is measured again once it is old enough, the
    higher kept; a quiet one is final."""
    now = bw._dt.datetime.now(bw._dt.timezone.utc)
    old = (now - bw._dt.timedelta(seconds=bw.REMEASURE_BUSY_AFTER_S + 60)).isoformat()
    recent = now.isoformat()
    runs = iter([_at(5.7, 5.8, old), _at(17.6, 1.3, recent), _at(3.0, 9.0, recent)])
    first = bw.measured_bandwidth(tmp_path, hw_id="hw", measure_fn=lambda: next(runs))
    assert first["gbs"] == 5.7 and bw.busy(first)
    assert any("busy" in n for n in first["notes"])
    second = bw.measured_bandwidth(tmp_path, hw_id="hw", measure_fn=lambda: next(runs))
    assert second["gbs"] == 17.6 and second["cached"] is False and not bw.busy(second)
    third = bw.measured_bandwidth(tmp_path, hw_id="hw", measure_fn=lambda: next(runs))
    assert third["gbs"] == 17.6 and third["cached"] is True     # quiet: never measured again


def test_a_lower_remeasurement_keeps_the_higher_record_and_waits_again(tmp_path):
    now = bw._dt.datetime.now(bw._dt.timezone.utc)
    old = (now - bw._dt.timedelta(seconds=bw.REMEASURE_BUSY_AFTER_S + 60)).isoformat()
    calls = []

    def measure() -> dict[str, Any]:
        calls.append(1)
        return _at(8.0, 6.0, old) if len(calls) == 1 else _at(4.0, 7.0, now.isoformat())

    bw.measured_bandwidth(tmp_path, hw_id="hw", measure_fn=measure)
    kept = bw.measured_bandwidth(tmp_path, hw_id="hw", measure_fn=measure)
    assert kept["gbs"] == 8.0 and len(calls) == 2
    assert "4.00 GB/s, lower" in kept["notes"][-1]
    again = bw.measured_bandwidth(tmp_path, hw_id="hw", measure_fn=measure)
    assert again["gbs"] == 8.0 and again["cached"] is True and len(calls) == 2   # checked recently
