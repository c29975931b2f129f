"""CMake flags for building llama-cpp-python on this CPU: its own instruction sets, never AMX.

A native build (-march=native) picks up AMX on Sapphire Rapids-class CPUs and then segfaults in
ggml_backend_amx_mul_mat on quantized models; a build with a fixed flag list (AVX512_BF16, say)
dies of SIGILL on a CPU without it. Deriving the list from /proc/cpuinfo avoids both.
``python -m qbench.host.buildflags`` prints the CMAKE_ARGS value.
"""

from __future__ import annotations

import sys

from qbench.host.envinfo import cpu_flags, has_amx

# ggml CMake option -> the /proc/cpuinfo flag(s) it needs (all of them)
GGML_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}

# llama_print_system_info() feature -> the cpuinfo flag it needs at run time
SYSTEM_INFO_FLAGS: dict[str, str] = {
    "AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}


def cmake_args(flags: set[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    if not flags or "avx" not in flags:  # not x86, or unknown: let ggml choose, AMX still off
        return "-DGGML_NATIVE=OFF"
    opts = ["-DGGML_NATIVE=OFF"]
    for option, needs in GGML_OPTIONS.items():
        opts.append(f"-D{option}={'ON' if all(n in flags for n in needs) else 'OFF'}")
    opts += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return " ".join(opts)


def missing_features(system_info: str, flags: set[str] | None = None) -> list[str]:
    """Features llama.cpp was built with ('AVX512_BF16 = 1') that this CPU does not have."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return []
    out = []
    for part in system_info.split("|"):
        name, _, on = part.strip().rpartition(" = ")
        name = name.split(":")[-1].strip()
        if on.strip() == "1" and name in SYSTEM_INFO_FLAGS and SYSTEM_INFO_FLAGS[name] not in flags:
            out.append(name)
    return out


AMX_HINT = (
    "llama.cpp crashed on this CPU, which has AMX: llama-cpp-python built natively uses the AMX "
    "backend, which segfaults in ggml_backend_amx_mul_mat on quantized models. Rebuild it "
    "without AMX: CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON "
    "-DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
    "-DGGML_AVX_VNNI=ON\" pip install --force-reinstall --no-cache-dir --no-binary "
    "llama-cpp-python llama-cpp-python   (qbench doctor checks this)")


def build_mismatch(log_text: str) -> list[str]:
    """CPU features the crashed cell's llama.cpp build uses but this CPU lacks."""
    for line in log_text.splitlines():
        if line.startswith("llama.cpp system info:"):
            return missing_features(line.split(":", 1)[1])
    return []


def amx_suspect(log_tail: str) -> bool:
    """Did a llama.cpp build with the AMX backend crash on an AMX CPU?"""
    if "ggml_backend_amx" in log_tail:
        return True
    return has_amx() and "AMX_INT8 = 1" in log_tail


def diagnose_llamacpp_crash(log_text: str, signal_name: str) -> str | None:
    """The llama.cpp backend's crash diagnosis (its BackendInfo.diagnose): a build for CPU
    features this CPU lacks (SIGILL), or the AMX backend's known segfault."""
    if signal_name == "SIGILL" and (missing := build_mismatch(log_text)):
        return (f": llama.cpp was built for CPU features this CPU lacks "
                f"({', '.join(missing)}). Rebuild llama-cpp-python with "
                "CMAKE_ARGS=\"$(python -m qbench.host.buildflags)\" (scripts/bootstrap.sh "
                "does this)")
    if signal_name in ("SIGSEGV", "SIGILL", "SIGBUS") and amx_suspect(log_text):
        return ". " + AMX_HINT
    return None


if __name__ == "__main__":
    sys.stdout.write(cmake_args() + "\n")
