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
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_flags": sorted(flags & set(FLAGS_OF_INTEREST)),
        "memory_total_mb": round(psutil.virtual_memory().total / 2**20),
        "gpus": gpus(),
        "libraries": library_versions(),
        "qbench_git": git_sha(),
    }


def hardware_fingerprint(env: dict[str, Any]) -> dict[str, Any]:
    """What of a stored environment decides speed and memory: CPU model, its flags and core
    count, and each GPU's name, memory and driver. Two results are only comparable on speed
    or memory when these agree (used in speed/memory cell keys and by the regression gate)."""
    gpus_ = [{"name": g.get("name"), "memory_total_mb": round(g.get("memory_total_mb") or 0),
              "driver": g.get("driver")}
             for g in env.get("gpus") or [] if isinstance(g, dict)]
    return {"cpu": env.get("cpu"), "cpu_flags": sorted(env.get("cpu_flags") or []),
            "cpu_cores_logical": env.get("cpu_cores_logical"), "gpus": gpus_}


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
