"""A fingerprint of the machine and software a result was measured on.

Collected without importing inference libraries (versions come from package metadata); the
llama.cpp build string comes from the cell's own process, which has llama.cpp loaded anyway.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from qbench.version import __version__

FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16",
                     "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "sve")
LIBRARIES = ("llama-cpp-python", "gguf", "numpy", "torch", "transformers", "bitsandbytes",
             "llmcompressor", "compressed-tensors", "gptqmodel", "lm_eval", "nvidia-ml-py")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """Vendor, family, model and stepping of the first CPU (x86's /proc/cpuinfo; an ARM
    kernel's "CPU implementer/part/variant/revision" instead): a VM that shows only "AMD EPYC"
    as its model name still tells a Zen 3 (family 25) from a Zen 4 (family 25, model 17)."""
    keys = {"vendor_id": "vendor", "cpu family": "family", "model": "model",
            "stepping": "stepping", "CPU implementer": "implementer", "CPU part": "part",
            "CPU variant": "variant", "CPU revision": "revision"}
    out: dict[str, Any] = {}
    try:
        text = cpuinfo.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        if not line.strip():
            if out:
                break          # the first processor's block is enough
            continue
        name, sep, val = line.partition(":")
        name = name.strip()
        if sep and name in keys and keys[name] not in out:
            val = val.strip()
            out[keys[name]] = int(val) if val.isdigit() else val
    return out


def usable_cpus() -> int | None:
    """CPUs this process may run on (its affinity mask: taskset, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller -> cgroup path of this process ("" is the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                out[controller] = parts[2]
    return out


def cgroup_cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"),
                     root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU bandwidth this process's cgroup may use, in CPUs (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), the tightest along its path to the root;
    None when unlimited or unreadable. A container limited to 1.5 CPUs on a 16-core host times
    like neither a 16-core nor a 2-core machine."""
    paths = _cgroup_paths(proc_cgroup)
    limits: list[float] = []

    def walk(base: Path, rel: str) -> list[Path]:
        here = base / rel.lstrip("/")
        return [here, *[p for p in here.parents if p.is_relative_to(base)]]

    if "" in paths:                                     # v2
        for folder in walk(root, paths[""]):
            try:
                fields = (folder / "cpu.max").read_text().split()
            except OSError:
                continue
            if len(fields) == 2 and fields[0] != "max":
                try:
                    limits.append(int(fields[0]) / int(fields[1]))
                except (ValueError, ZeroDivisionError):
                    pass
    if "cpu" in paths:                                  # v1
        for mount in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
            if not mount.is_dir():
                continue
            for folder in walk(mount, paths["cpu"]):
                try:
                    quota_us = int((folder / "cpu.cfs_quota_us").read_text())
                    period_us = int((folder / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                if quota_us > 0 and period_us > 0:
                    limits.append(quota_us / period_us)
            break
    return round(min(limits), 3) if limits else None


def has_amx() -> bool:
    return bool(cpu_flags() & {"amx_tile", "amx_int8", "amx_bf16"})


def gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs via NVML; [] when there is no NVML or no GPU."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return []
    try:
        out = []
        driver = pynvml.nvmlSystemGetDriverVersion()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            out.append({"index": i, "name": name if isinstance(name, str) else name.decode(),
                        "memory_total_mb": mem.total / 2**20, "memory_free_mb": mem.free / 2**20,
                        "driver": driver if isinstance(driver, str) else driver.decode()})
        return out
    finally:
        pynvml.nvmlShutdown()


def library_versions() -> dict[str, str]:
    out = {"qbench": __version__}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


@lru_cache(maxsize=1)
def collect() -> dict[str, Any]:
    flags = cpu_flags()
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_id": cpu_identity(),
        "cpus_usable": usable_cpus(),
        "cpu_quota": cgroup_cpu_quota(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_flags": sorted(flags & set(FLAGS_OF_INTEREST)),
        "memory_total_mb": round(psutil.virtual_memory().total / 2**20),
        "gpus": gpus(),
        "libraries": library_versions(),
        "qbench_git": git_sha(),
    }


# what a newer qbench adds to the fingerprint; an environment stored before it lacks them, and
# keeps the id it had (two such records still compare with each other, not with new ones)
FINER = ("cpu_id", "cpus_usable", "cpu_quota")


def hardware_fingerprint(env: dict[str, Any]) -> dict[str, Any]:
    """What of a stored environment decides speed and memory: CPU model string, its vendor,
    family, model and stepping, flags and core count, the CPUs the process could use (affinity,
    cgroup quota), and each GPU's name, memory and driver. Two results are only comparable on
    speed or memory when these agree (used in speed/memory cell keys and by the regression
    gate)."""
    gpus_ = [{"name": g.get("name"), "memory_total_mb": round(g.get("memory_total_mb") or 0),
              "driver": g.get("driver")}
             for g in env.get("gpus") or [] if isinstance(g, dict)]
    out = {"cpu": env.get("cpu"), "cpu_flags": sorted(env.get("cpu_flags") or []),
           "cpu_cores_logical": env.get("cpu_cores_logical"), "gpus": gpus_}
    return out | {k: env[k] for k in FINER if k in env}


def hardware_id(env: dict[str, Any]) -> str:
    """A short stable digest of :func:`hardware_fingerprint`."""
    import hashlib
    import json
    blob = json.dumps(hardware_fingerprint(env), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def library_version(distribution: str) -> str:
    """An installed distribution's version from its metadata (nothing is imported)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not-installed"
