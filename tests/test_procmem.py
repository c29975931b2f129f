"""Memory per speed repetition (issue 24 §4): the kernel's RSS high-water mark reset before each
repetition without losing the cell's own peak, and GPU memory from (fake) NVML.

The RSS figures are the kernel's, not sampled: a buffer touched inside a repetition is in that
repetition's peak whatever the machine's load.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from qbench.host import procmem
from qbench.host.contamination import Snapshot, WindowMeter
from qbench.metrics import speed, speed_hw
from qbench.metrics.context import CellContext
from qbench.options import from_table
from test_gpu_fakes import FakeNvml

MiB = 2**20
PAGE = 4096


def touch(mb: int) -> int:
    """Allocate ``mb`` MiB, make every page resident, free it; the bytes touched."""
    buf = bytearray(mb * MiB)
    buf[::PAGE] = b"\x01" * len(range(0, len(buf), PAGE))
    n = sum(buf[::PAGE]) * PAGE
    del buf
    return n


@pytest.fixture
def resettable() -> None:
    if not procmem.start_window():
        pytest.skip("this kernel refuses to reset the RSS high-water mark "
                    "(/proc/self/clear_refs): no per-repetition peak here")


def test_each_repetition_has_its_own_peak_and_the_cell_keeps_its_own(resettable: None) -> None:
    assert procmem.reset_within_window()
    assert touch(256) == 256 * MiB
    big = procmem.hwm_kib()
    assert procmem.reset_within_window()
    small = procmem.hwm_kib()
    assert big is not None and small is not None
    assert big - small > 200 * 1024                 # the 256 MiB went with the reset
    # the cell's peak (the worker's record["memory"]) still has the big repetition in it,
    # whether read since the cell's reset or over the process's life
    assert procmem.peak_rss_kib(since_reset=True) >= big
    assert procmem.peak_rss_kib(since_reset=False) >= big
    # a new cell forgets it
    assert procmem.start_window()
    assert procmem.peak_rss_kib(since_reset=True) < big - 200 * 1024


def test_the_worker_peak_reads_through_the_carry(resettable: None) -> None:
    from qbench.run import peak
    assert peak.reset_peak_rss()
    procmem.reset_within_window()
    touch(128)
    procmem.reset_within_window()                   # a speed repetition's reset
    got = peak.peak_rss_mb(since_reset=True)
    assert got is not None and got >= 128 + (procmem.hwm_kib() or 0) / 1024 - 16


# -- the speed metric's values ---------------------------------------------------------------
class Backend:
    """Generation (one token at a time) allocates 64 MiB per token step and frees it; a
    prompt allocates nothing."""

    n_vocab, bos_id, add_bos, n_batch, device = 100, 1, True, 64, "cpu"

    def reset(self, n_ctx: int | None = None) -> None:
        pass

    def decode_tokens(self, tokens: list[int], n_batch: int) -> None:
        if len(tokens) == 1:
            touch(64)

    def close(self) -> None:
        pass


QUIET = Snapshot(at=0.0, wall=0.0, busy_s=0.0, steal_s=0.0, own_s=0.0, load1=None,
                 freq_mhz=None)


def run_speed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: Any
              ) -> dict[str, Any]:
    monkeypatch.setattr(speed, "_meter", lambda: WindowMeter(lambda: QUIET))
    ctx = CellContext(cell_id="m/fake/x/speed", model_id="m", artifact_path=tmp_path / "m",
                      artifact={}, base_dir=tmp_path, data_dir=None, cache_dir=tmp_path,
                      is_base=True, _load=lambda: backend)
    opts = from_table(speed.Options, {"prompt_tokens": 16, "gen_tokens": 2, "repetitions": 3,
                                      "roofline": False}, file="t", key="speed")
    try:
        return speed.run(ctx, opts)
    finally:
        ctx.close()


def test_speed_stores_peak_rss_per_repetition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              resettable: None) -> None:
    out = run_speed(tmp_path, monkeypatch, Backend())
    rss = out["values"]["peak_rss_mb"]
    assert rss["n"] == 3 and len(rss["samples"]) == 3 and rss["unit"] == "MiB"
    assert rss["value"] == sorted(rss["samples"])[1]               # the median
    assert rss["sd"] >= 0
    assert "peak_vram_mb" not in out["values"]                     # not on a GPU
    per_test = {t["test"]: t["rss_mb"] for t in out["details"]["memory_per_repetition"]
                ["per_test"]}
    assert set(per_test) == {"pp", "tg"}
    # tg's repetitions touched 64 MiB each, pp's nothing: the peak of each repetition of the
    # cell is its tg repetition's
    for pp, tg, cell in zip(per_test["pp"], per_test["tg"], rss["samples"]):
        assert tg - pp > 56 and cell == tg


class GpuBackend(Backend):
    device = "cuda:0"


def test_speed_stores_peak_vram_per_repetition_from_nvml(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML (fake) lists this process with more memory after each repetition, and another
    process that must not count."""
    used = iter(range(1000, 100000, 100))
    me = os.getpid()
    nvml = FakeNvml(1, compute=lambda d: [(me, next(used) * MiB), (me + 1, 5000 * MiB)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    out = run_speed(tmp_path, monkeypatch, GpuBackend())
    vram = out["values"]["peak_vram_mb"]
    # 6 readings (pp x3, tg x3): 1000, 1100, 1200 then 1300, 1400, 1500; repetition i's
    # peak is the larger of its pp and tg readings
    assert vram["samples"] == [1300.0, 1400.0, 1500.0] and vram["value"] == 1400.0
    assert vram["n"] == 3 and vram["sd"] == pytest.approx(100.0)
    assert nvml.shutdowns == nvml.inits      # every NVML session closed (energy has its own)


def test_no_vram_figure_where_nvml_cannot_attribute(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A container: NVML lists GPU processes under another PID namespace's ids."""
    nvml = FakeNvml(1, compute=lambda d: [(10**9, 800 * MiB)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    out = run_speed(tmp_path, monkeypatch, GpuBackend())
    assert "peak_vram_mb" not in out["values"]
    assert "another PID namespace" in out["details"]["memory_per_repetition"]["vram_reason"]


def test_vram_probe_counts_a_process_in_both_lists_once() -> None:
    me = os.getpid()
    nvml = FakeNvml(2, compute=lambda d: [(me, 300 * MiB)],
                    graphics=lambda d: [(me, 300 * MiB)] if d == 0 else [])
    probe = procmem.VramProbe(nvml)
    assert probe.available and probe.used_mb() == 600.0     # 300 on each of 2 devices
    assert procmem.VramProbe(FakeNvml(1, compute=lambda d: [])).used_mb() == 0.0
    no_size = procmem.VramProbe(FakeNvml(1, compute=lambda d: [(me, None)]))
    assert no_size.used_mb() is None and "no size" in (no_size.reason or "")


def test_vram_probe_without_nvml() -> None:
    class Broken:
        def nvmlInit(self) -> None:
            raise RuntimeError("driver not loaded")

    probe = procmem.VramProbe(Broken())
    assert not probe.available and probe.used_mb() is None
    assert "NVML not available" in (probe.reason or "")
    mem = speed_hw.RepetitionMemory(on_gpu=True, probe=lambda: probe)
    assert mem.values() == {} and "NVML not available" in mem.details()["vram_reason"]


def test_transformers_speed_has_fitness_and_memory_per_repetition(
        tiny_hf_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        resettable: None) -> None:
    """The transformers backend runs the same speed code (a 1-layer random Llama)."""
    from qbench.backends.base import LoadOptions
    from qbench.backends.transformers import TransformersBackend

    backend = TransformersBackend(tiny_hf_model, LoadOptions(device="cpu", threads=1))
    out = run_speed(tmp_path, monkeypatch, backend)
    assert out["fitness"]["reliable"] is True and out["fitness"]["rounds"] == 1
    assert len(out["fitness"]["windows"]) == 6
    rss = out["values"]["peak_rss_mb"]
    assert rss["n"] == 3 and all(s > 50 for s in rss["samples"])    # torch alone is > 50 MiB
    assert out["values"]["tg_tokens_per_s"]["n"] == 3
