"""llama.cpp's command-line tools (llama-imatrix, llama-quantize, llama-perplexity, llama-bench),
built on first use from the very llama.cpp the installed llama-cpp-python wheel was built from.

llama-cpp-python does not expose the importance matrix to ``llama_model_quantize`` (the C API
takes a C++ object), so imatrix quants need the tools. They are built from the llama-cpp-python
sdist of the installed version with the same CMake flags as the wheel
(:func:`qbench.host.buildflags.cmake_args`, never AMX), into a folder keyed exactly as
``scripts/bootstrap.sh`` keys the wheel: sha256 of "<version> <flags>". So tool and library run
the same kernels, and a folder is built once per machine (under a lock; a second process waits).

``python -m qbench.quantize.llama_tools [TARGET...]`` builds (default: the four tools) and prints
the folder; ``benchmarks/build_llama_tools.sh`` calls it.

The source is trusted on its hash, not its name: the sdist's sha256 is pinned in
``qbench/data/pins.json`` (computed from the file PyPI serves), and :func:`verified_sdist`
downloads it once into ``$QBENCH_SDIST_CACHE`` (``~/.cache/qbench/sdist``) and checks it there.
``scripts/bootstrap.sh`` builds the llama-cpp-python wheel from that same verified file
(``python -m qbench.quantize.llama_tools --sdist VERSION`` prints its path), so bootstrap and the
tools build share one download. A cached file that no longer matches is downloaded again; a
download that does not match is refused.

Provenance names what ran: :func:`tool_version` hashes the tool binaries themselves, those of
``$QBENCH_LLAMA_CPP_BIN`` when it is set (then they, not qbench's recipe, key the importance
matrix cache).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qbench.errors import QbenchError

DEFAULT_TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity", "llama-bench")
PROVENANCE_TOOLS = ("llama-imatrix", "llama-quantize")   # what qbench runs to make variants
DISTRIBUTION = "llama-cpp-python"
PINS = Path(__file__).resolve().parents[1] / "data" / "pins.json"


def pinned_sdist_sha256(version: str) -> str:
    """The sha256 of the llama-cpp-python ``version`` sdist, from qbench/data/pins.json."""
    try:
        return str(json.loads(PINS.read_text())["llama-cpp-python-sdist"][version])
    except KeyError:
        raise QbenchError(f"no sha256 pinned for the {DISTRIBUTION} {version} source in {PINS}: "
                          "add the hash of the sdist PyPI serves (sha256sum of the .tar.gz "
                          "from pip download --no-deps --no-binary :all:) before building from "
                          "it") from None
    except (OSError, ValueError) as exc:
        raise QbenchError(f"cannot read the pins file {PINS}: {exc}") from None


def sdist_cache() -> Path:
    return Path(os.environ.get("QBENCH_SDIST_CACHE") or "~/.cache/qbench/sdist").expanduser()


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _download_sdist(version: str, dest: Path) -> Path:
    """``pip download`` the sdist into the empty folder ``dest``; the file it wrote."""
    log = dest / "download.log"
    with log.open("wb") as out:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                               "--no-binary", ":all:", f"{DISTRIBUTION}=={version}", "-d",
                               str(dest)], stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_bytes()[-2000:].decode("utf-8", "replace")
        raise QbenchError(f"downloading the {DISTRIBUTION} {version} source failed (exit "
                          f"{proc.returncode}):\n{tail}")
    found = sorted(dest.glob("*.tar.gz"))
    if not found:
        raise QbenchError(f"pip downloaded no source archive of {DISTRIBUTION} {version}")
    return found[0]


def verified_sdist(version: str, *, say: Callable[[str], None] | None = None,
                   download: Callable[[str, Path], Path] = _download_sdist) -> Path:
    """The llama-cpp-python ``version`` sdist in the sdist cache, its sha256 checked against the
    pin: reused when it matches, else downloaded (once, under a lock) and kept only if it
    matches. Raises QbenchError naming both hashes when PyPI's file does not."""
    say = say or _say
    want = pinned_sdist_sha256(version)
    folder = sdist_cache()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"llama_cpp_python-{version}.tar.gz"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # bootstrap and a cell may both want it
        if target.is_file():
            got = _sha256(target)
            if got == want:
                return target
            say(f"the cached {target.name} has sha256 {got}, not the pinned {want}: "
                "downloading it again")
            target.unlink()
        say(f"downloading the {DISTRIBUTION} {version} source (once; checked against the "
            "pinned sha256)")
        with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
            got_path = download(version, Path(tmp))
            got = _sha256(got_path)
            if got != want:
                raise QbenchError(
                    f"the downloaded {got_path.name} has sha256 {got}, but {PINS} pins {want}: "
                    "refusing to build from it (a changed upload, a proxy or a mirror serving "
                    "another file)")
            with got_path.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(got_path, target)
    return target


def build_flags() -> str:
    """The CMake flags of this machine's build ($QBENCH_CMAKE_ARGS overrides, as in
    bootstrap.sh)."""
    from qbench.host.buildflags import cmake_args

    return os.environ.get("QBENCH_CMAKE_ARGS") or cmake_args()


def llama_cpp_version() -> str:
    from qbench.host.envinfo import library_version

    version = library_version(DISTRIBUTION)
    if version == "not-installed":
        raise QbenchError("llama.cpp's tools are built from the installed llama-cpp-python's "
                          "source, and llama-cpp-python is not installed (pip install "
                          "'qbench-llm[gguf]', or run scripts/bootstrap.sh)")
    return version


def build_hash(version: str, flags: str) -> str:
    """The key of a build: the same recipe bootstrap.sh uses for the wheel cache."""
    return hashlib.sha256(f"{version} {flags}".encode()).hexdigest()[:16]


def tools_root() -> Path:
    return Path(os.environ.get("QBENCH_LLAMA_TOOLS") or "~/.cache/qbench/llama-tools").expanduser()


def bin_dir(version: str | None = None, flags: str | None = None) -> Path:
    version = version or llama_cpp_version()
    flags = build_flags() if flags is None else flags
    return tools_root() / build_hash(version, flags) / "bin"


def tool_version(names: Sequence[str] = PROVENANCE_TOOLS) -> dict[str, Any]:
    """What identifies the tools that run (recorded in provenance; ``build`` keys the
    importance matrix cache): the sha256 of each binary of ``names`` that exists. With
    $QBENCH_LLAMA_CPP_BIN set those binaries are the build, whatever made them; otherwise
    qbench's recipe (llama-cpp-python version and CMake flags) is, and the binaries built from
    it are hashed beside it ("not built yet" before the first use)."""
    external = os.environ.get("QBENCH_LLAMA_CPP_BIN")
    if external:
        folder = Path(external)
        binaries = {n: _sha256(folder / n) if (folder / n).is_file() else "missing"
                    for n in names}
        digest = hashlib.sha256(json.dumps(binaries, sort_keys=True).encode()).hexdigest()[:16]
        return {"bin_dir": str(folder), "binaries": binaries, "build": f"external-{digest}"}
    version, flags = llama_cpp_version(), build_flags()
    folder = bin_dir(version, flags)
    binaries = {n: _sha256(folder / n) if (folder / n).is_file() else "not built yet"
                for n in names}
    return {"llama_cpp_python": version, "cmake_args": flags,
            "build": build_hash(version, flags), "bin_dir": str(folder), "binaries": binaries}


def _say(message: str) -> None:
    print(f"qbench: {message}", file=sys.stderr, flush=True)


def ensure_tools(names: Sequence[str] = DEFAULT_TOOLS, *,
                 say: Callable[[str], None] = _say) -> Path:
    """The bin folder holding ``names``, building the missing ones first (minutes, once)."""
    version, flags = llama_cpp_version(), build_flags()
    folder = bin_dir(version, flags)
    missing = [n for n in names if not (folder / n).is_file()]
    if not missing:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # another cell may be building the same folder
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            _build(version, flags, missing, folder, say)
    return folder


def _run(cmd: list[str], log: Path, what: str) -> None:
    with log.open("wb") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_bytes()[-3000:].decode("utf-8", "replace")
        raise QbenchError(f"building llama.cpp's tools failed at {what} (exit "
                          f"{proc.returncode}); the end of its log:\n{tail}\n"
                          "Needs cmake and a C++ compiler; or point $QBENCH_LLAMA_CPP_BIN at "
                          "a folder holding llama-imatrix and llama-quantize of the same "
                          f"llama.cpp as llama-cpp-python {llama_cpp_version()}")


def _build(version: str, flags: str, targets: list[str], folder: Path,
           say: Callable[[str], None]) -> None:
    for program in ("cmake", "c++"):
        if shutil.which(program) is None and not (program == "c++" and shutil.which("g++")):
            raise QbenchError(f"building llama.cpp's tools ({', '.join(targets)}) needs "
                              f"{program}, which is not on PATH; install it, or point "
                              "$QBENCH_LLAMA_CPP_BIN at prebuilt tools")
    say(f"building llama.cpp tools {', '.join(targets)} from llama-cpp-python {version} "
        f"(once per machine: about 5-10 min on 2 idle cores, longer on a busy machine) into {folder}")
    sdist = verified_sdist(version, say=say)   # the pinned source, shared with bootstrap.sh
    with tempfile.TemporaryDirectory(prefix=".build-", dir=folder.parent) as tmp:
        work = Path(tmp)
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
        if src is None or not (src / "CMakeLists.txt").is_file():
            raise QbenchError(f"no llama.cpp source in the {DISTRIBUTION} {version} sdist")
        say("configuring llama.cpp (cmake)")
        _run(["cmake", "-S", str(src), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", *flags.split()],
             work / "configure.log", "cmake configure")
        say(f"compiling {', '.join(targets)}")
        _run(["cmake", "--build", str(work / "build"), f"-j{os.cpu_count() or 1}",
              "--target", *targets], work / "build.log", "compiling")
        folder.mkdir(parents=True, exist_ok=True)
        for name in targets:    # each lands atomically, beside those built before
            tmp_copy = folder / f".{name}.tmp"
            shutil.copy2(work / "build" / "bin" / name, tmp_copy)
            os.replace(tmp_copy, folder / name)
        (folder / "BUILD_INFO").write_text(f"llama-cpp-python {version}\nCMAKE_ARGS={flags}\n")
    say(f"built {', '.join(targets)}")


def find_tool(name: str) -> str:
    """A llama.cpp tool: from $QBENCH_LLAMA_CPP_BIN when set (prebuilt tools, your choice),
    else qbench's own build of the installed llama-cpp-python (built on first use)."""
    folder = os.environ.get("QBENCH_LLAMA_CPP_BIN")
    if folder:
        candidate = Path(folder) / name
        if not candidate.is_file():
            raise QbenchError(f"$QBENCH_LLAMA_CPP_BIN is {folder}, which holds no {name}")
        return str(candidate)
    return str(ensure_tools((name,)) / name)


def main(argv: list[str] | None = None) -> int:
    """``[TARGET...]``: build the tools, print their folder. ``--sdist VERSION``: fetch (or
    find) the verified llama-cpp-python sdist, print its path (scripts/bootstrap.sh)."""
    args = argv if argv is not None else sys.argv[1:]
    try:
        if args[:1] == ["--sdist"]:
            if len(args) != 2:
                raise QbenchError("usage: python -m qbench.quantize.llama_tools --sdist VERSION")
            print(verified_sdist(args[1]))
            return 0
        print(ensure_tools(args or list(DEFAULT_TOOLS)))
    except QbenchError as exc:
        print(f"qbench: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
