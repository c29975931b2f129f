"""What qbench keeps in its cache directory, and removing it (`qbench cache info|clear`).

The one place that names the cache's folders: every module asks :func:`folder` for its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

KINDS = {
    "artifacts": "quantized model files, by recipe hash",
    "kld": "base next-token distributions for KLD (folder kld-base)",
    "imatrix": "importance matrices",
    "inspect": "memoised GGUF tensor summaries",
    "hf": "Hugging Face hub downloads",
    "tools": "llama.cpp's HF-to-GGUF converter, installed on first use",
    "host": "measurements of this machine (memory bandwidth), once per hardware id",
    "synthetic": "synthetic models (random weights of a real architecture), by recipe",
}
HASH_MEMO = "sha256.json"   # a file's stamp (path, size, mtime) -> its sha256
FOLDERS = {"kld": "kld-base"}


def folder(cache_dir: Path, kind: str) -> Path:
    """The folder holding ``kind`` (a key of KINDS) under ``cache_dir``."""
    if kind not in KINDS:
        raise KeyError(f"unknown cache kind {kind!r} (known: {', '.join(KINDS)})")
    return cache_dir / FOLDERS.get(kind, kind)


_built_here: list[str] = []


def note_built(kind: str, name: str) -> None:
    """Record that this process builds ``kind``/``name`` (a cache miss it pays for; called
    before building, so a build that fails counts too). A backend that builds into the cache
    calls it for the worker to start the variant's next cells in a fresh process."""
    _built_here.append(f"{kind}/{name}")


def built_here() -> tuple[str, ...]:
    """What this process has built so far, in order: a worker compares it before and after
    a cell (a build leaves its heap behind), and a build another process made while the cell
    ran, such as the next variant's prepared ahead (qbench.run.prefetch), is not in it."""
    return tuple(_built_here)


def usage(cache_dir: Path) -> dict[str, int]:
    """Bytes used per kind."""
    out = {}
    for kind in KINDS:
        f = folder(cache_dir, kind)
        out[kind] = sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) if f.is_dir() else 0
    return out


def clear(cache_dir: Path, kind: str) -> int:
    """Remove one kind (or 'all'); return bytes freed."""
    kinds = list(KINDS) if kind == "all" else [kind]
    freed = 0
    for k in kinds:
        f = folder(cache_dir, k)
        if f.is_dir():
            freed += sum(p.stat().st_size for p in f.rglob("*") if p.is_file())
            shutil.rmtree(f)
    return freed


def default_cache_dir(suite_default: str = "", cli: str | None = None) -> Path:
    """The cache folder: --cache-dir, else $QBENCH_CACHE_DIR, else the suite's, else
    ~/.cache/qbench."""
    for candidate in (cli, os.environ.get("QBENCH_CACHE_DIR"), suite_default):
        if candidate:
            return Path(candidate).expanduser().resolve()
    return Path("~/.cache/qbench").expanduser()
