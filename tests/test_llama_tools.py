"""llama.cpp's tools for imatrix quants, from the default install: built on first use from the
installed llama-cpp-python's source, keyed as bootstrap.sh keys the wheel, with a clear error
when the build cannot run."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from qbench.errors import QbenchError
from qbench.quantize import llama_tools

REPO = Path(__file__).resolve().parent.parent


def test_build_key_is_bootstraps_wheel_key():
    """bootstrap.sh: HASH=$(printf '%s %s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" | sha256sum)."""
    flags = "-DGGML_NATIVE=OFF -DGGML_AVX=ON"
    shell = subprocess.run(["bash", "-c", f"printf '%s %s' 0.3.36 '{flags}' | sha256sum"],
                           capture_output=True, text=True, check=True).stdout[:16]
    assert llama_tools.build_hash("0.3.36", flags) == shell
    assert shell == hashlib.sha256(f"0.3.36 {flags}".encode()).hexdigest()[:16]
    text = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert """HASH="$(printf '%s %s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" | sha256sum""" in text


def test_existing_tools_are_used_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_LLAMA_TOOLS", str(tmp_path))
    monkeypatch.setenv("QBENCH_CMAKE_ARGS", "-DGGML_NATIVE=OFF")
    monkeypatch.delenv("QBENCH_LLAMA_CPP_BIN", raising=False)
    monkeypatch.setattr(llama_tools, "llama_cpp_version", lambda: "9.9.9")
    folder = llama_tools.bin_dir()
    assert folder == tmp_path / llama_tools.build_hash("9.9.9", "-DGGML_NATIVE=OFF") / "bin"
    folder.mkdir(parents=True)
    (folder / "llama-imatrix").write_text("#!/bin/sh\n")
    built = []
    monkeypatch.setattr(llama_tools, "_build", lambda *a, **k: built.append(a))
    assert llama_tools.find_tool("llama-imatrix") == str(folder / "llama-imatrix")
    assert built == []
    llama_tools.find_tool("llama-quantize")                 # missing: built, only that one
    assert [a[2] for a in built] == [["llama-quantize"]]


def test_explicit_tool_folder_must_hold_the_tool(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_LLAMA_CPP_BIN", str(tmp_path))
    with pytest.raises(QbenchError, match="holds no llama-imatrix"):
        llama_tools.find_tool("llama-imatrix")
    (tmp_path / "llama-imatrix").write_text("")
    assert llama_tools.find_tool("llama-imatrix") == str(tmp_path / "llama-imatrix")


def test_a_failing_build_says_where_and_what_to_do(tmp_path, monkeypatch):
    """A compiler that fails: the error names the step, shows the log's end and the way out."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for name, body in (("cmake", "echo 'CMake Error: no compiler found' >&2; exit 3"),
                       ("c++", "exit 0")):
        script = fake / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("QBENCH_LLAMA_TOOLS", str(tmp_path / "tools"))
    monkeypatch.setattr(llama_tools, "llama_cpp_version", lambda: "0.3.36")

    def fake_download(cmd, log, what):
        if "pip" in cmd:        # the sdist: a folder with a vendored llama.cpp
            src = tmp_path / "tools"
            sdist = Path(cmd[cmd.index("-d") + 1])
            sdist.mkdir(parents=True)
            import tarfile
            tree = tmp_path / "tree" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
            tree.mkdir(parents=True)
            (tree / "CMakeLists.txt").write_text("project(x)\n")
            with tarfile.open(sdist / "llama_cpp_python-0.3.36.tar.gz", "w:gz") as tar:
                tar.add(tmp_path / "tree" / "llama_cpp_python-0.3.36",
                        arcname="llama_cpp_python-0.3.36")
            return src
        return real_run(cmd, log, what)

    real_run = llama_tools._run
    monkeypatch.setattr(llama_tools, "_run", fake_download)
    messages: list[str] = []
    with pytest.raises(QbenchError) as err:
        llama_tools.ensure_tools(("llama-imatrix",), say=messages.append)
    text = str(err.value)
    assert "failed at cmake configure (exit 3)" in text
    assert "CMake Error: no compiler found" in text and "QBENCH_LLAMA_CPP_BIN" in text
    assert any("once per machine" in m for m in messages)      # progress was shown
    assert not list((tmp_path / "tools").rglob("llama-imatrix"))   # nothing half-built kept


def test_missing_cmake_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))        # nothing on PATH
    monkeypatch.setenv("QBENCH_LLAMA_TOOLS", str(tmp_path / "tools"))
    monkeypatch.setattr(llama_tools, "llama_cpp_version", lambda: "0.3.36")
    with pytest.raises(QbenchError, match="needs cmake, which is not on PATH"):
        llama_tools.ensure_tools(("llama-imatrix",), say=lambda m: None)
