"""Energy counters: joules used over a stretch of work, from the hardware's own meters.

Sources, each read before and after (and, with :meth:`EnergyMeter.sample`, in between):

- **NVML** ``nvmlDeviceGetTotalEnergyConsumption``: millijoules since the driver loaded, per
  GPU (Volta and later; older GPUs raise NotSupported). A 64-bit counter: no wraparound.
- **RAPL through powercap** ``/sys/class/powercap/intel-rapl:N/energy_uj``: microjoules per CPU
  package (and a separate DRAM domain on some servers). The kernel's intel_rapl driver also
  serves AMD Zen CPUs under the same ``intel-rapl:N`` names (AMD's own hwmon ``amd_energy``
  driver was removed from Linux in 5.13); zones named ``amd-rapl:N`` are read too, should a
  kernel use that name. The counter wraps at ``max_energy_range_uj``: a reading below the
  previous one adds the range once. More than one wrap between two readings cannot be seen,
  so long stretches should call :meth:`EnergyMeter.sample` now and then (a package counter
  wraps after ~260 kJ on Intel: 20+ minutes at 200 W).
  ``energy_uj`` is root-only since Linux 5.10 (CVE-2020-8694, "Platypus"): unreadable
  counters are reported as such, not as zero.

What is measured is the whole package / GPU, every process on it, not only ours: on a busy
machine the joules include the neighbours' work. Each result says so in ``scope``.

Top-level zones only: sub-zones (core, uncore) are parts of their package, and ``psys`` covers
the platform including the packages, so adding either would count energy twice.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

POWERCAP_ROOT = Path("/sys/class/powercap")
_ZONE = re.compile(r"^(intel-rapl|amd-rapl):(\d+)$")      # top level: not intel-rapl:0:1, not -mmio
_SUMMED_DOMAINS = ("package", "dram")                      # disjoint domains; psys overlaps
SCOPE = ("whole CPU package(s) / GPU(s) as the hardware counters see them, including any other "
         "process running on them at the same time")


@dataclass
class Counter:
    """One cumulative energy counter."""

    source: str                      # "rapl:package-0", "nvml:gpu0"
    read_j: Any                      # () -> joules, cumulative
    wrap_j: float | None = None      # the counter's range in joules (None: never wraps)
    last: float = 0.0
    total: float = 0.0
    wraps: int = 0

    def start(self) -> None:
        self.last = self.read_j()
        self.total = 0.0
        self.wraps = 0

    def sample(self) -> None:
        now = self.read_j()
        delta = now - self.last
        if delta < 0:
            if self.wrap_j is None:         # a counter reset (driver reload): keep what we had
                delta = 0.0
            else:
                delta += self.wrap_j
                self.wraps += 1
        self.total += delta
        self.last = now


# -- RAPL via powercap -----------------------------------------------------------------------
def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def rapl_counters(root: Path | None = None) -> tuple[list[Counter], list[str]]:
    """Counters for the top-level package/DRAM zones under ``root`` and the reasons for the
    ones (or the whole tree) that cannot be read."""
    root = POWERCAP_ROOT if root is None else root
    if not root.is_dir():
        return [], [f"no {root} here (no RAPL powercap driver, or not exposed to this "
                    "container/VM)"]
    counters: list[Counter] = []
    reasons: list[str] = []
    zones = sorted((p for p in root.iterdir() if _ZONE.match(p.name)),
                   key=lambda p: (p.name.split(":")[0], int(p.name.split(":")[1])))
    for zone in zones:
        try:
            name = (zone / "name").read_text().strip()
        except OSError:
            name = zone.name
        if not name.startswith(_SUMMED_DOMAINS):
            continue                          # psys: overlaps the packages
        energy = zone / "energy_uj"
        try:
            _read_int(energy)
        except PermissionError:
            reasons.append(f"permission denied reading {energy} (root-only since Linux 5.10, "
                           "CVE-2020-8694; run as root or make it readable)")
            continue
        except (OSError, ValueError) as exc:
            reasons.append(f"cannot read {energy}: {exc}")
            continue
        try:
            wrap = _read_int(zone / "max_energy_range_uj") * 1e-6
        except (OSError, ValueError):
            wrap = None
            reasons.append(f"{zone / 'max_energy_range_uj'} unreadable: a wraparound of "
                           f"{name} would go unnoticed")
        counters.append(Counter(f"rapl:{name}", lambda p=energy: _read_int(p) * 1e-6, wrap))
    if not zones:
        reasons.append(f"no RAPL zone (intel-rapl:N) under {root}")
    elif not counters and not reasons:
        reasons.append(f"no package or DRAM zone under {root}")
    return counters, reasons


# -- NVML ------------------------------------------------------------------------------------
def _import_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def nvml_counters() -> tuple[list[Counter], list[str], Any]:
    """Counters per GPU with an energy counter, reasons for the others, and a closer."""
    nv = _import_nvml()
    if nv is None:
        return [], ["NVML: pynvml (nvidia-ml-py) is not installed"], None
    try:
        nv.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return [], [f"NVML: no driver or no GPU ({exc})"], None
    counters: list[Counter] = []
    reasons: list[str] = []
    try:
        n = nv.nvmlDeviceGetCount()
    except Exception as exc:  # noqa: BLE001
        nv.nvmlShutdown()
        return [], [f"NVML: cannot count GPUs ({exc})"], None
    if n == 0:
        reasons.append("NVML: no GPU")
    for i in range(n):
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
            nv.nvmlDeviceGetTotalEnergyConsumption(h)
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"NVML has no energy counter on GPU {i} ({_nvml_why(nv, exc)})")
            continue
        counters.append(Counter(
            f"nvml:gpu{i}", lambda h=h: nv.nvmlDeviceGetTotalEnergyConsumption(h) * 1e-3))
    return counters, reasons, nv.nvmlShutdown


def _nvml_why(nv: ModuleType, exc: Exception) -> str:
    for name, why in (("NVMLError_NotSupported", "not supported on this GPU"),
                      ("NVMLError_NoPermission", "permission denied")):
        cls = getattr(nv, name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return why
    return f"{type(exc).__name__}: {exc}"


# -- the meter -------------------------------------------------------------------------------
@dataclass
class EnergyMeter:
    """Joules between :meth:`start` and :meth:`stop` from every readable counter::

        with EnergyMeter() as m:
            work()
        m.result  # {"available": True, "joules": 12.3, "sources": {...}, ...}

    ``available`` is False (with ``reason``) when no counter is readable here. One meter can
    time several stretches (start ... stop, start ... stop); :meth:`close` (or leaving the
    ``with`` block) releases NVML."""

    powercap_root: Path | None = None
    use_rapl: bool = True
    use_nvml: bool = True
    counters: list[Counter] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    _close: Any = None
    _t0: float = 0.0

    def __post_init__(self) -> None:
        if self.use_rapl:
            c, r = rapl_counters(self.powercap_root)
            self.counters += c
            self.reasons += r
        if self.use_nvml:
            c, r, self._close = nvml_counters()
            self.counters += c
            self.reasons += r

    @property
    def available(self) -> bool:
        return bool(self.counters)

    def start(self) -> EnergyMeter:
        self._t0 = time.perf_counter()
        for c in self.counters:
            c.start()
        return self

    def sample(self) -> None:
        """Read every counter now (catches a wraparound before a second one can happen)."""
        for c in self.counters:
            c.sample()

    def stop(self) -> dict[str, Any]:
        if not self.counters:
            self.result = unavailable("; ".join(self.reasons) or "no energy counter")
            return self.result
        self.sample()
        seconds = time.perf_counter() - self._t0
        total = sum(c.total for c in self.counters)
        self.result = {
            "available": True, "joules": total, "seconds": seconds,
            "sources": {c.source: c.total for c in self.counters},
            "wraps": {c.source: c.wraps for c in self.counters if c.wraps},
            "not_read": list(self.reasons), "scope": SCOPE,
        }
        return self.result

    def close(self) -> None:
        if self._close is not None:
            try:
                self._close()
            except Exception:  # noqa: BLE001
                pass
            self._close = None

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.close()


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}
