"""What qbench keeps in its cache directory, and removing it (`qbench cache info|clear`)."""

from __future__ import annotations

import shutil
from pathlib import Path

KINDS = {
    "artifacts": "quantized model files, by recipe hash",
    "kld": "base next-token distributions for KLD (folder kld-base)",
    "imatrix": "importance matrices",
    "inspect": "memoised GGUF tensor summaries",
    "hf": "Hugging Face hub downloads",
}
FOLDERS = {"kld": "kld-base"}


def folder(cache_dir: Path, kind: str) -> Path:
    return cache_dir / FOLDERS.get(kind, kind)


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
