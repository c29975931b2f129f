"""Which GGUF tensors llama.cpp's CPU backend repacks when it loads a model, and their bytes.

Why it matters for memory: on a CPU, llama.cpp copies the weights of some types into an
interleaved layout its matmul kernels read faster (the ``CPU_REPACK`` buffer, anonymous
memory). With the file mapped (llama.cpp's default, and qbench's), the file pages those tensors
were read from stay resident too, so peak RSS holds them twice: an 8B Q4_K_M peaked at 8.6 GiB
for a 4.6 GiB file (benchmarks/README.md, memory_fit.py). The mapped copy is clean page cache
the kernel may drop under memory pressure; peak RSS, what a monitor shows, includes it.

The rule is llama.cpp's own (``ggml_repack_get_optimal_repack_type`` in
ggml/src/ggml-cpu/repack.cpp, as vendored by llama-cpp-python 0.3.36, the version
scripts/bootstrap.sh builds), read from the build's system info (``AVX2 = 1``, ``REPACK = 1``):
a tensor is repacked when its type has a kernel for the CPU and its row count is a multiple of
the kernel's 4 or 8 rows (true of every tensor of the supported architectures). The token
embedding is never repacked: it is read by row (GET_ROWS), and the repack buffer serves only
matrix products. A build or CPU this rule does not know gives None ("not known"), never 0.
"""

from __future__ import annotations

import re
from typing import Any

# kernel families by the build's features (system info names), in llama.cpp's order
_X86_AVX2 = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})
_X86_AVX512 = frozenset({"Q2_K"})                        # in addition to AVX2's
_ARM_DOTPROD = frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"})
_ARM_I8MM = frozenset({"Q1_0"})                          # in addition to DOTPROD's


def build_features(system_info: str) -> dict[str, bool]:
    """``{"AVX2": True, "REPACK": True, ...}`` from llama.cpp's system info string."""
    return {k: v == "1" for k, v in re.findall(r"([A-Z0-9_]+) = (\d)", system_info or "")}


def features_from_cpu_flags(flags: list[str] | set[str]) -> str | None:
    """A system-info string for an x86 CPU from its /proc/cpuinfo flags, for a variant no
    llama.cpp cell has loaded yet (a native build compiles what the CPU has; the repack buffer
    is on by default, GGML_CPU_REPACK). None for other CPUs: their flags here do not say
    which dot-product extensions they have."""
    have = set(flags)
    if not have & {"avx", "avx2", "sse3"}:
        return None
    return (f"AVX2 = {int('avx2' in have)} | AVX512 = {int('avx512f' in have)} | "
            "REPACK = 1 | (from the CPU's flags)")


def repacked_types(system_info: str | None) -> frozenset[str] | None:
    """The tensor types this llama.cpp build repacks on its CPU; None when the system info is
    missing or names a CPU family the rule does not cover (RISC-V, s390x, ...)."""
    if not system_info:
        return None
    f = build_features(system_info)
    if not f:
        return None
    if "REPACK" not in f:
        return None                 # llama.cpp lists REPACK only when built with it; an older
                                    # build named it otherwise: not known
    if not f["REPACK"]:
        return frozenset()          # built without the repack buffer: nothing is copied
    if f.get("AVX2"):
        return _X86_AVX2 | (_X86_AVX512 if f.get("AVX512") else frozenset())
    if f.get("NEON"):
        if f.get("MATMUL_INT8"):
            return _ARM_DOTPROD | _ARM_I8MM
        return _ARM_DOTPROD if f.get("DOTPROD") else frozenset()
    if "AVX2" in f or f.get("SSE3") or f.get("AVX"):
        return frozenset()          # x86 without AVX2: no repack kernel applies
    return None


def repacked_bytes(tensor_types: dict[str, dict[str, int]], roles: dict[str, Any],
                   embed_bytes: int | None, system_info: str | None) -> int | None:
    """Bytes llama.cpp copies into its repack buffer for a GGUF with this type mix
    (``{"Q4_K": {"bytes": ...}, ...}``, the footprint's ``tensor_types``); None when not known
    (no rule for this build, or a repacked type on the token embedding whose bytes the record
    lacks)."""
    types = repacked_types(system_info)
    if types is None:
        return None
    total = sum(int(e.get("bytes") or 0) for name, e in tensor_types.items() if name in types)
    if (roles or {}).get("token_embd") in types:
        if embed_bytes is None:
            return None
        total -= int(embed_bytes)
    return total
