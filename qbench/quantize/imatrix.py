"""Importance matrices for GGUF quantization, computed with llama.cpp's ``llama-imatrix`` tool.

llama-cpp-python does not expose the imatrix to ``llama_model_quantize`` (the C API takes a C++
object), so imatrix variants use llama.cpp's command-line tools. The calibration text's sha256
and the tool's arguments go into the cache key and the result's provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from qbench.inputs.datasets import load_text
from qbench.errors import QbenchError
from qbench.host.cache import folder as cache_folder
from qbench.host.fsutil import atomic_write_text, file_lock
from qbench.quantize.gguf import build_variant, find_tool
from qbench.quantize.request import PrepareRequest

IMATRIX_CHUNKS = 100  # llama-imatrix --chunks: 100 x 512 tokens, the common published setting
IMATRIX_CTX = 512
# how the imatrix is computed from its text: part of the artifact key and of the cell key
IMATRIX_RECIPE: dict[str, int] = {"chunks": IMATRIX_CHUNKS, "ctx": IMATRIX_CTX}


def build_imatrix(req: PrepareRequest) -> tuple[Path, str]:
    """Path and sha256 of the imatrix for this model's base and the named calibration text."""
    cache_dir, threads = req.cache_dir, req.threads
    text = load_text(req.variant["imatrix"], req.data_dir, req.base_dir)
    base = build_variant(req.model_file, req.model_sha, req.model["base"], req.model["base"],
                         cache_dir=cache_dir, threads=threads)
    recipe = {"base_sha256": base.sha256, "calibration_sha256": text.sha256, **IMATRIX_RECIPE}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:32]
    folder = cache_folder(cache_dir, "imatrix") / digest
    out = folder / "imatrix.dat"
    with file_lock(folder.with_suffix(".lock")):
        if out.exists():
            return out, hashlib.sha256(out.read_bytes()).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        calib = folder / "calibration.txt"
        atomic_write_text(calib, text.text)
        tmp = folder / f".imatrix.{os.getpid()}.tmp"
        cmd = [find_tool("llama-imatrix"), "-m", str(base.path), "-f", str(calib), "-o",
               str(tmp), "--chunks", str(IMATRIX_CHUNKS), "-c", str(IMATRIX_CTX),
               "-t", str(threads or 1)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not tmp.exists():
            raise QbenchError(f"llama-imatrix failed (exit {proc.returncode}): "
                              f"{proc.stderr[-800:]}")
        os.replace(tmp, out)
        atomic_write_text(folder / "provenance.json", json.dumps(
            recipe | {"calibration": text.origin, "command": cmd}, indent=1))
    return out, hashlib.sha256(out.read_bytes()).hexdigest()
