"""Energy counters against fakes: a powercap tree in tmp_path (RAPL zones, wraparound,
unreadable counters) and a fake pynvml module (energy per GPU, GPUs without a counter).
No real counter and no timing is involved: the fakes' values are set between readings."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from qbench.host import energy
from qbench.host.energy import EnergyMeter, rapl_counters

UJ = 1e-6


def zone(root: Path, dirname: str, name: str, energy_uj: int,
         max_uj: int | None = 262_143_328_850) -> Path:
    z = root / dirname
    z.mkdir(parents=True)
    (z / "name").write_text(name + "\n")
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    if max_uj is not None:
        (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def set_uj(z: Path, value: int) -> None:
    (z / "energy_uj").write_text(f"{value}\n")


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)      # import pynvml -> ImportError


class FakeNvml(types.ModuleType):
    """pynvml's energy API: ``mj[i]`` is GPU i's counter (mJ); None: no counter there."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's name
        pass

    def __init__(self, mj: list[int | None]) -> None:
        super().__init__("pynvml")
        self.mj = mj
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.mj)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        if self.mj[handle] is None:
            raise self.NVMLError_NotSupported("Not Supported")
        return self.mj[handle]


# --- RAPL -----------------------------------------------------------------------------------


def test_rapl_sums_packages_and_dram_only(tmp_path, no_nvml):
    """Top-level package and DRAM zones count; sub-zones, psys and the MMIO duplicate of the
    package would count the same joules twice and are left out."""
    pkg0 = zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    pkg1 = zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    dram = zone(tmp_path, "intel-rapl:2", "dram", 0)
    core = zone(tmp_path, "intel-rapl:0:0", "core", 0)
    psys = zone(tmp_path, "intel-rapl:3", "psys", 0)
    mmio = zone(tmp_path, "intel-rapl-mmio:0", "package-0", 0)
    meter = EnergyMeter(powercap_root=tmp_path).start()
    set_uj(pkg0, 3_500_000)          # +2.5 J
    set_uj(pkg1, 6_000_000)          # +1 J
    set_uj(dram, 250_000)            # +0.25 J
    for z in (core, psys, mmio):
        set_uj(z, 99_000_000)        # would add 99 J each if counted
    res = meter.stop()
    assert res["available"] is True
    assert res["sources"] == pytest.approx({"rapl:package-0": 2.5, "rapl:package-1": 1.0,
                                            "rapl:dram": 0.25})
    assert res["joules"] == pytest.approx(3.75)
    assert "other process" in res["scope"]
    assert any("pynvml" in r for r in res["not_read"])     # NVML absence is said, not hidden


def test_rapl_wraparound_adds_the_range(tmp_path, no_nvml):
    z = zone(tmp_path, "intel-rapl:0", "package-0", 999_000, max_uj=1_000_000)
    meter = EnergyMeter(powercap_root=tmp_path).start()
    set_uj(z, 500)                   # wrapped: 1,000 uJ to the top, then 500
    res = meter.stop()
    assert res["joules"] == pytest.approx(1_500 * UJ)
    assert res["wraps"] == {"rapl:package-0": 1}


def test_sampling_between_catches_every_wrap(tmp_path, no_nvml):
    """Two wraps between start and stop are only seen if sampled in between."""
    z = zone(tmp_path, "intel-rapl:0", "package-0", 900_000, max_uj=1_000_000)
    meter = EnergyMeter(powercap_root=tmp_path).start()
    for value in (200_000, 800_000, 100_000, 300_000):   # wraps at the 1st and 3rd step
        set_uj(z, value)
        meter.sample()
    res = meter.stop()
    assert res["joules"] == pytest.approx((100_000 + 200_000 + 600_000 + 300_000 + 200_000)
                                          * UJ)
    assert res["wraps"] == {"rapl:package-0": 2}


def test_amd_zones_are_read(tmp_path, no_nvml):
    """AMD Zen CPUs appear as intel-rapl:N under the kernel's RAPL driver; an amd-rapl:N zone
    is read too."""
    a = zone(tmp_path, "amd-rapl:0", "package-0", 10)
    meter = EnergyMeter(powercap_root=tmp_path).start()
    set_uj(a, 2_000_010)
    assert meter.stop()["sources"] == pytest.approx({"rapl:package-0": 2.0})


def test_unreadable_counter_is_a_reason_not_zero(tmp_path, monkeypatch, no_nvml):
    zone(tmp_path, "intel-rapl:0", "package-0", 10)
    real = energy._read_int

    def denied(path: Path) -> int:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(energy, "_read_int", denied)   # root reads anything: fake the 0400 file
    res = EnergyMeter(powercap_root=tmp_path).start().stop()
    assert res["available"] is False
    assert "permission denied" in res["reason"] and "energy_uj" in res["reason"]
    assert "joules" not in res


def test_no_powercap_tree(tmp_path, no_nvml):
    res = EnergyMeter(powercap_root=tmp_path / "powercap").start().stop()
    assert res["available"] is False
    assert f"no {tmp_path / 'powercap'} here" in res["reason"]
    assert "pynvml" in res["reason"]


def test_missing_range_means_a_wrap_is_not_guessed(tmp_path, no_nvml):
    z = zone(tmp_path, "intel-rapl:0", "package-0", 5_000, max_uj=None)
    meter = EnergyMeter(powercap_root=tmp_path).start()
    set_uj(z, 1_000)
    res = meter.stop()
    assert res["joules"] == 0.0 and any("wraparound" in r for r in res["not_read"])
    counters, _ = rapl_counters(tmp_path)
    assert counters[0].wrap_j is None


# --- NVML -----------------------------------------------------------------------------------


def test_nvml_energy_per_gpu_and_gpus_without_a_counter(tmp_path, monkeypatch):
    nvml = FakeNvml([10_000, None, 500])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with EnergyMeter(powercap_root=tmp_path / "none") as meter:
        nvml.mj[0] += 2_500              # +2.5 J
        nvml.mj[2] += 1_000              # +1 J
    res = meter.result
    assert res["sources"] == pytest.approx({"nvml:gpu0": 2.5, "nvml:gpu2": 1.0})
    assert res["joules"] == pytest.approx(3.5)
    assert "NVML has no energy counter on GPU 1 (not supported on this GPU)" in res["not_read"]
    assert nvml.shutdowns == 1                          # closed when the block ends


def test_nvml_without_any_counter(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([None]))
    res = EnergyMeter(powercap_root=tmp_path / "none").start().stop()
    assert res["available"] is False
    assert "NVML has no energy counter on GPU 0" in res["reason"]


def test_nvml_without_a_driver(tmp_path, monkeypatch):
    broken = FakeNvml([1])

    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = fail  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    res = EnergyMeter(powercap_root=tmp_path / "none").start().stop()
    assert res["available"] is False and "no driver or no GPU" in res["reason"]


def test_one_meter_times_several_stretches(tmp_path, monkeypatch):
    """start/stop pairs are independent: the second reports only its own joules."""
    nvml = FakeNvml([0])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    z = zone(tmp_path, "intel-rapl:0", "package-0", 0)
    meter = EnergyMeter(powercap_root=tmp_path)
    meter.start()
    nvml.mj[0] = 1_000
    set_uj(z, 1_000_000)
    first = meter.stop()
    meter.start()
    nvml.mj[0] = 4_000
    set_uj(z, 1_500_000)
    second = meter.stop()
    meter.close()
    assert first["joules"] == pytest.approx(2.0) and second["joules"] == pytest.approx(3.5)
    assert second["sources"] == pytest.approx({"rapl:package-0": 0.5, "nvml:gpu0": 3.0})
