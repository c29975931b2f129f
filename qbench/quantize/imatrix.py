"""Importance matrices for GGUF quantization, computed with llama.cpp's ``llama-imatrix`` tool.

llama-cpp-python does not expose the imatrix to ``llama_model_quantize`` (the C API takes a C++
object), so imatrix variants use llama.cpp's command-line tools, built on first use from the
installed llama-cpp-python's own source (:mod:`qbench.quantize.llama_tools`).

The calibration text is cut from the *end* of the named text (as AWQ/GPTQ calibration is), so
it never overlaps the perplexity/KLD chunks, which are scored from the start: a suite that
scores wikitext-2 and calibrates on wikitext-2 does not measure on its own calibration data
(unless it scores every chunk of the text: the provenance says which region was used). The
calibration slice's sha256, its region, the chunks, context and the tools' build go into the
cache key and the result's provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from qbench.host.cores import physical_cores
from qbench.errors import QbenchError
from qbench.host.cache import folder as cache_folder
from qbench.host.cache import note_built
from qbench.host.fsutil import atomic_write_text, file_lock
from qbench.inputs.datasets import load_text
from qbench.quantize.gguf import build_variant
from qbench.quantize.llama_tools import find_tool, tool_version
from qbench.quantize.request import PrepareRequest

IMATRIX_CHUNKS = 100  # llama-imatrix --chunks: 100 x 512 tokens, the common published setting
MAX_IMATRIX_CHUNKS = 10_000
IMATRIX_CTX = 512
CHARS_PER_TOKEN = 6   # a generous bound for English BPE text: the slice holds enough tokens


def imatrix_recipe(chunks: int = IMATRIX_CHUNKS) -> dict[str, Any]:
    """How the imatrix is computed from its text: part of the artifact key and of the cell key
    (a suite's ``imatrix_chunks`` changes both; the default leaves earlier keys as they were)."""
    return {"chunks": chunks, "ctx": IMATRIX_CTX, "region": "tail",
            "chars_per_token": CHARS_PER_TOKEN}


def calibration_slice(text: str, chunks: int = IMATRIX_CHUNKS) -> tuple[str, dict[str, Any]]:
    """The end of ``text`` that llama-imatrix reads (at most chunks x ctx x CHARS_PER_TOKEN
    characters, from a line start), and where it lies."""
    want = chunks * IMATRIX_CTX * CHARS_PER_TOKEN
    start = max(0, len(text) - want)
    if start:
        nl = text.find("\n", start)
        start = nl + 1 if 0 <= nl < len(text) - 1 else start
    piece = text[start:]
    return piece, {"region": f"characters {start:,}..{len(text):,} of {len(text):,} (the end; "
                             "perplexity and KLD chunks are scored from the start)",
                   "start_char": start, "chars": len(piece),
                   "slice_sha256": hashlib.sha256(piece.encode()).hexdigest()}


def build_imatrix(req: PrepareRequest) -> tuple[Path, str]:
    """Path and sha256 of the imatrix for this model's base and the named calibration text."""
    cache_dir, threads = req.cache_dir, req.threads
    text = load_text(req.variant["imatrix"], req.data_dir, req.base_dir)
    base = build_variant(req.model_file, req.model_sha, req.model["base"], req.model["base"],
                         cache_dir=cache_dir, threads=threads)
    chunks = int(req.variant.get("imatrix_chunks") or IMATRIX_CHUNKS)
    piece, region = calibration_slice(text.text, chunks)
    tools = tool_version()
    recipe = {"base_sha256": base.sha256, "calibration_sha256": text.sha256,
              "slice_sha256": region["slice_sha256"], "tools": tools["build"],
              **imatrix_recipe(chunks)}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:32]
    folder = cache_folder(cache_dir, "imatrix") / digest
    out = folder / "imatrix.dat"
    with file_lock(folder.with_suffix(".lock")):
        if out.exists():
            return out, hashlib.sha256(out.read_bytes()).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".imatrix.*.tmp"):   # a computation killed earlier (lock held)
            stale.unlink(missing_ok=True)
        note_built("imatrix", digest)        # the attempt: a failed one counts as well
        calib = folder / "calibration.txt"
        atomic_write_text(calib, piece)
        tmp = folder / f".imatrix.{os.getpid()}.tmp"
        cmd = [find_tool("llama-imatrix"), "-m", str(base.path), "-f", str(calib), "-o",
               str(tmp), "--chunks", str(chunks), "-c", str(IMATRIX_CTX),
               "-t", str(threads or physical_cores())]
        log = folder / "llama-imatrix.log"   # follow it: the tool prints its progress
        print(f"computing the importance matrix: llama-imatrix on {chunks} x "
              f"{IMATRIX_CTX} tokens (progress in {log})", file=sys.stderr, flush=True)
        with log.open("wb") as log_file:
            proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not tmp.exists():
            tail = log.read_bytes()[-800:].decode("utf-8", "replace")
            raise QbenchError(f"llama-imatrix failed (exit {proc.returncode}): {tail}")
        os.replace(tmp, out)
        sha = hashlib.sha256(out.read_bytes()).hexdigest()
        atomic_write_text(folder / "provenance.json", json.dumps(
            recipe | {"calibration": text.origin, "dataset": req.variant["imatrix"],
                      **{k: v for k, v in region.items() if k != "slice_sha256"},
                      "imatrix_sha256": sha, "tools": tool_version(), "command": cmd}, indent=1))
    return out, hashlib.sha256(out.read_bytes()).hexdigest()


def provenance(imatrix_path: Path) -> dict[str, Any]:
    """The provenance written beside an imatrix (calibration text, region, tools)."""
    try:
        return json.loads((imatrix_path.parent / "provenance.json").read_text())
    except (OSError, ValueError):
        return {}
