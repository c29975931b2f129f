"""benchmarks/gpu_proof.py on the CPU: the trimmed source it carries, and the whole run with
fakes of what only a GPU machine has (nvidia-smi, NVML, a CUDA toolchain whose build fails),
on tiny synthetic models. The processes, the quantizer, llama.cpp, transformers and qbench's
NVML sampler are real; the device is the CPU on both sides of the numerical check.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import tarfile
import types
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


@pytest.fixture(scope="module")
def proof() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_proof", REPO / "benchmarks" / "gpu_proof.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_trim_keeps_what_a_cuda_build_needs_and_records_the_rest(proof, tmp_path):
    top = "llama_cpp_python-9.9.9"
    keep = ["CMakeLists.txt", "pyproject.toml", "README.md", "llama_cpp/__init__.py",
            "llama_cpp/llama_cpp.py", "vendor/llama.cpp/CMakeLists.txt",
            "vendor/llama.cpp/src/llama.cpp", "vendor/llama.cpp/common/common.cpp",
            "vendor/llama.cpp/gguf-py/gguf/__init__.py", "vendor/llama.cpp/ggml/src/ggml.c",
            "vendor/llama.cpp/ggml/src/CMakeLists.txt",
            "vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu",
            "vendor/llama.cpp/ggml/src/ggml-cpu/ggml-cpu.c", "vendor/llama.cpp/vendor/nlohmann/json.hpp"]
    drop = {"docs/index.md": 10, "vendor/llama.cpp/models/ggml-vocab-llama.gguf": 5000,
            "vendor/llama.cpp/ggml/src/ggml-vulkan/vk.cpp": 300,
            "vendor/llama.cpp/tools/server/server.cpp": 200, "tests/test_llama.py": 20}
    files = {f"{top}/{k}": b"x" for k in keep} | {f"{top}/{k}": b"y" * n for k, n in drop.items()}
    sdist = _tar(tmp_path / f"{top}.tar.gz", files)
    manifest = proof.trim(sdist, tmp_path / "out")
    with tarfile.open(tmp_path / "out" / manifest["archive"]) as tar:
        names = sorted(m.name for m in tar.getmembers())
    assert names == sorted(f"{top}/{k}" for k in keep)
    assert manifest["dropped"]["vendor/llama.cpp/models"] == {"files": 1, "bytes": 5000}
    assert manifest["dropped"]["vendor/llama.cpp/ggml/src/ggml-vulkan"]["bytes"] == 300
    assert set(manifest["dropped"]) == {"docs", "tests", "vendor/llama.cpp/models",
                                        "vendor/llama.cpp/ggml/src/ggml-vulkan",
                                        "vendor/llama.cpp/tools"}
    assert manifest["source_sha256"] == proof._sha256(sdist)
    on_disk = json.loads((tmp_path / "out" / f"{top}-cuda-src.json").read_text())
    assert on_disk["archive_sha256"] == proof._sha256(tmp_path / "out" / manifest["archive"])


class FakeNvml(types.ModuleType):
    """pynvml reporting 512 MiB for every process below this one (the proof's children)."""

    def __init__(self) -> None:
        super().__init__("pynvml")

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[types.SimpleNamespace]:
        return [types.SimpleNamespace(pid=p.pid, usedGpuMemory=512 * MiB)
                for p in psutil.Process().children(recursive=True)]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[types.SimpleNamespace]:
        return []


TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1000, "rms_norm_eps": 1e-5, "max_position_embeddings": 512}


@pytest.fixture
def fake_gpu_tools(tmp_path, monkeypatch) -> Path:
    """nvidia-smi answering for one GPU, and a cmake that fails as a CUDA-less one would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake H100, 81559 MiB, 550.54, 9.0'\n")
    (bin_dir / "cmake").write_text("#!/bin/sh\necho 'fake cmake: CUDA toolkit not found' >&2\n"
                                   "exit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    return bin_dir


@pytest.mark.slow
def test_the_run_goes_on_past_a_failed_build_and_writes_one_summary(proof, tmp_path,
                                                                    fake_gpu_tools):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("transformers")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    src = _tar(tmp_path / "src.tar.gz", {"llama_cpp_python-9.9.9/CMakeLists.txt": b"project(x)"})
    out = tmp_path / "out"
    rc = proof.main(["run", "--device", "cpu", "--src", str(src), "--out", str(out),
                     "--work", str(tmp_path), "--ladder-preset", str(cfg),
                     "--check-preset", str(cfg), "--transformers-preset", str(cfg),
                     "--quants", "F16,Q8_0", "--prompt", "16", "--gen", "4", "--reps", "1",
                     "--check-chunks", "2", "--check-ctx", "16", "--threads", "1",
                     "--budget-s", "600"])
    assert rc == 2                                       # a step failed: the build
    res = json.loads((out / "gpu_proof.json").read_text())
    md = (out / "gpu_proof.md").read_text()
    steps = res["steps"]
    assert steps["build"]["status"] == "failed" and "CUDA toolkit not found" in steps["build"]["error"]
    assert res["machine"]["gpus"][0]["compute_cap"] == "9.0"
    assert "cuda-arch" not in steps                      # no CUDA architecture on the CPU
    for q in ("F16", "Q8_0"):                            # the ladder ran on what was importable
        row = res["ladder"][q]
        assert row["tg"] > 0 and row["pp"] > 0 and row["device"] == "cpu"
        assert row["nvml_peak_vram_mb"] == 512           # qbench's per-pid NVML sampler
    assert res["ladder"]["Q8_0"]["file_bytes"] < res["ladder"]["F16"]["file_bytes"]
    t = res["transformers"]
    from qbench.inputs import synthetic
    assert t["params"] == synthetic.n_params(synthetic.load_shape(str(cfg), tmp_path))
    assert t["torch_max_allocated_mb"] is None and t["nvml_peak_vram_mb"] == 512
    n = res["numerics"]
    assert n["positions"] == 2 * 15 and n["same_top_pct"] == 100.0 and n["kld_max"] < 1e-6
    assert n["cpu"]["n_gpu_layers"] == 0
    for needle in ("## Build", "status: **failed**", "CUDA toolkit not found",
                   "| Q8_0 |", "| F16 |", "## transformers bf16", "torch max allocated: –",
                   "## Numerical check", "same top token 100.00 %", "| build | failed |"):
        assert needle in md, needle


def test_the_budget_skips_what_would_start_late(proof, tmp_path, fake_gpu_tools):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "out"
    rc = proof.main(["run", "--device", "cpu", "--src", "", "--out", str(out), "--work",
                     str(tmp_path), "--ladder-preset", str(cfg), "--check-preset", str(cfg),
                     "--transformers-preset", str(cfg), "--quants", "F16,Q8_0",
                     "--budget-s", "0"])
    res = json.loads((out / "gpu_proof.json").read_text())
    assert rc == 0                                       # nothing failed; nothing ran either
    assert res["steps"]["machine"]["status"] == "skipped"
    assert res["steps"]["transformers bf16"]["status"] == "skipped"
    assert res["steps"]["quantize Q8_0"]["status"] == "not run"     # needs the models
    assert "the time budget was spent" in (out / "gpu_proof.md").read_text()
