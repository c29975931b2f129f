"""A quantized GGUF of a synthetic model, written directly: llama.cpp's quantizer picks every
tensor's type (dry-run mode: no weight is quantized), and each tensor is filled with valid
blocks of that type made by ggml's own quantizer from a few random rows, repeated.

Why: a synthetic model's values are random, so only the file's shapes and types matter to
what it is for (speed, memory, footprint) - and those are exactly the real quantizer's. Really
quantizing an 8B synthetic F16 to Q4_K_M takes 45 minutes or more on two cores; writing it this
way takes as long as writing 4.6 GB. The file has the size llama.cpp's quantizer would write to
the byte and the same tensor-type mix (tests/test_synthetic_blocks.py checks both against a
real quantization). Types that need an importance matrix are never written this way.
"""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from qbench.errors import QbenchError
from qbench.quantize.gguf_types import FTYPES, NEEDS_IMATRIX, TENSOR_TYPES

GENERATOR = 1              # bump when the bytes written change (keys the cached files)
TEMPLATE_ROWS = 8          # distinct random rows per (type, row length), cycled through a tensor
ROWS_PER_WRITE = 4096      # rows handed to the writer at a time (a few MiB)

# "[  4/147] blk.0.attn_k.weight - [ 2048, 512, 1, 1], type = f16, size = ... -> 0.56 MiB (q4_K)"
_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type =\s*(\w+),(.*)$")
_TARGET = re.compile(r"->\s*[\d.]+ MiB \((\w+)\)\s*$")


def direct_supported(quant: str) -> bool:
    """Whether ``quant`` can be written directly (no importance matrix needed)."""
    return quant in FTYPES and quant not in NEEDS_IMATRIX and not quant.startswith(("IQ", "TQ"))


def dry_run_types(f16: Path, quant: str, tensors: dict[str, str] | None = None) -> dict[str, str]:
    """The ggml type llama.cpp's quantizer gives each tensor of ``f16`` for ``quant`` (with the
    output / token-embedding overrides in ``tensors``), from its dry run. In a child process:
    the quantizer reports on the C library's stderr."""
    overrides = {k: TENSOR_TYPES[v] for k, v in (tensors or {}).items() if v}
    code = ("import ctypes, json, sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            "p.ftype = int(sys.argv[2]); p.nthread = 1; p.dry_run = True\n"
            "for k, v in json.loads(sys.argv[3]).items(): setattr(p, k, v)\n"
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), b'/dev/null', "
            "ctypes.byref(p)))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(f16), str(FTYPES[quant]),
                           json.dumps(overrides)], capture_output=True, text=True)
    types = parse_dry_run(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not types:
        raise QbenchError(f"llama.cpp's quantizer in dry-run mode ({quant}) failed on {f16} "
                          f"(exit {proc.returncode}): {(proc.stdout + proc.stderr)[-800:]}")
    return types


def parse_dry_run(log: str) -> dict[str, str]:
    """tensor name -> ggml type name (``Q4_K``, ``F32``) from a dry run's per-tensor lines: the
    type after the arrow when it converts the tensor, else the type it keeps."""
    out = {}
    for line in log.splitlines():
        m = _LINE.match(line.strip())
        if m:
            target = _TARGET.search(m.group(3))
            out[m.group(1)] = (target.group(1) if target else m.group(2)).upper()
    return out


@cache
def _ggml() -> Any:
    """ggml's C library as llama-cpp-python ships it (ggml_quantize_chunk: the quantizer every
    llama.cpp tool uses)."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    names = sorted(folder.glob("libggml-base.*")) + sorted(folder.glob("libggml.*"))
    for path in names:
        try:
            lib = ctypes.CDLL(str(path))
            fn = lib.ggml_quantize_chunk
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        return lib
    raise QbenchError(f"no ggml library with ggml_quantize_chunk in {folder}")


def row_bytes(type_name: str, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements of a ggml type."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    if n_per_row % block:
        raise QbenchError(f"a row of {n_per_row} elements is not whole blocks of {type_name} "
                          f"({block})")
    return n_per_row // block * size


@cache
def template(type_name: str, n_per_row: int, seed: int = 0) -> bytes:
    """TEMPLATE_ROWS rows of random values (sd 0.02) in ``type_name``, made by ggml's quantizer
    (so every block's scales are the quantizer's own), as one byte string."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    src = (np.random.default_rng([seed, int(qtype), n_per_row])
           .standard_normal((TEMPLATE_ROWS, n_per_row)).astype(np.float32) * 0.02)
    if type_name == "F32":
        return src.tobytes()
    if type_name == "F16":
        return src.astype(np.float16).tobytes()
    dst = np.zeros(TEMPLATE_ROWS * row_bytes(type_name, n_per_row), dtype=np.uint8)
    written = _ggml().ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0,
                                          TEMPLATE_ROWS, n_per_row, None)
    if written != dst.nbytes:
        raise QbenchError(f"ggml_quantize_chunk wrote {written} bytes of {type_name}, expected "
                          f"{dst.nbytes}")
    return dst.tobytes()


def tensor_pieces(type_name: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """The bytes of a tensor of numpy ``shape`` (rows x row length) in ``type_name``: the
    template's rows, cycled, a few thousand rows at a time."""
    n_per_row = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    tmpl = np.frombuffer(template(type_name, n_per_row), dtype=np.uint8).reshape(
        TEMPLATE_ROWS, -1)
    for start in range(0, rows, ROWS_PER_WRITE):
        n = min(ROWS_PER_WRITE, rows - start)
        idx = (np.arange(start, start + n) % TEMPLATE_ROWS)
        yield tmpl[idx].reshape(-1)


def tensor_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of numpy ``shape`` in ``type_name``."""
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * row_bytes(type_name, shape[-1])



def write_quantized_gguf(shape: Any, seed: int, quant: str, types: dict[str, str], path: Path,
                         *, say: Callable[[str], None] | None = None) -> int:
    """Write a ``quant`` GGUF of the synthetic ``shape`` (qbench.inputs.synthetic.Shape)
    directly: each tensor in its type in ``types`` (the quantizer's dry run), filled with the
    template's valid blocks. Returns its size."""
    import gguf

    from qbench.inputs import synthetic as syn

    missing = [t.gguf_name for t in syn.tensor_plan(shape) if t.gguf_name not in types]
    if missing:
        raise QbenchError(f"synthetic {shape.name}: the quantizer's dry run named no type for "
                          f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")

    def tensor(t: Any) -> tuple[int, int, Iterator[np.ndarray]]:
        name = types[t.gguf_name]
        return (int(gguf.GGMLQuantizationType[name]), tensor_nbytes(name, t.shape),
                tensor_pieces(name, t.shape))

    kw = {"say": say} if say is not None else {}
    return syn.write_typed_gguf(shape, seed, path, what=f"{quant} GGUF",
                                file_type=FTYPES[quant], tensor=tensor, **kw)
