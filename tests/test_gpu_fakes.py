"""The GPU code paths on a CPU machine, against fake NVML, torch and llama_cpp modules.

CI has no GPU, so without fakes the per-process VRAM sampler, the container case, torch's max
allocated and llama.cpp's offload flags would only ever run on the nightly GPU job. The fakes
stand in for the libraries only; the processes, pids and the executor are real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from qbench.run import child as ex
from qbench.run.job import Job
from qbench.run.child import (VRAM_NOT_ATTRIBUTABLE, VRAM_NOT_REPORTED, Outcome, _Sampler, run_in_child)

MiB = 2**20
PATIENCE_S = 300    # only ever reached when something is broken


class FakeNvml(types.ModuleType):
    """pynvml as the sampler uses it. ``compute``/``graphics`` map a device index to a
    function returning [(pid, bytes or None)]; ``queried`` is set after every full round."""

    def __init__(self, n_devices: int,
                 compute: Callable[[int], list[tuple[int, int | None]]],
                 graphics: Callable[[int], list[tuple[int, int | None]]] | None = None) -> None:
        super().__init__("pynvml")
        self.n_devices = n_devices
        self.compute = compute
        self.graphics = graphics or (lambda device: [])
        self.queried = threading.Event()
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.n_devices

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    @staticmethod
    def _procs(rows: list[tuple[int, int | None]]) -> list[types.SimpleNamespace]:
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in rows]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[types.SimpleNamespace]:
        return self._procs(self.compute(handle))

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[types.SimpleNamespace]:
        rows = self._procs(self.graphics(handle))
        if handle == self.n_devices - 1:
            self.queried.set()
        return rows


@pytest.fixture
def tree() -> Iterator[tuple[int, int]]:
    """A real process tree: (child pid, grandchild pid), both sleeping until killed."""
    code = ("import subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])\n"
            "print(g.pid, flush=True)\n"
            "time.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    yield proc.pid, grandchild
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def unused_pid() -> int:
    """A pid no process here can have (above the kernel's pid_max): a host pid seen from a
    container's PID namespace."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return pid_max + 4242


def sample_once(monkeypatch: pytest.MonkeyPatch, nvml: FakeNvml, pid: int) -> _Sampler:
    """Run the sampler on ``pid`` until the fake NVML was queried, then stop it and wait for
    its thread (no fixed delay: the thread ends after the sample it is taking)."""
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = _Sampler(pid, interval=0.05)
    sampler.start()
    assert nvml.queried.wait(PATIENCE_S), "the sampler never queried NVML"
    sampler._halt.set()
    sampler.join()
    return sampler


# --- the sampler ---------------------------------------------------------------------------


def test_vram_is_attributed_per_pid_to_the_cell_tree(monkeypatch, tree):
    child, grandchild = tree
    stranger = os.getpid()          # a visible GPU process that is not in the cell's tree
    nvml = FakeNvml(
        2,
        compute=lambda d: [(child, 300 * MiB), (stranger, 5000 * MiB)] if d == 0
        else [(grandchild, 100 * MiB)],
        graphics=lambda d: [(child, 300 * MiB)] if d == 0 else [])   # listed twice: once
    sampler = sample_once(monkeypatch, nvml, child)
    assert sampler.peak_vram == 400 * MiB
    assert sampler.vram_note is None
    assert sampler.peak_rss > 0
    assert nvml.inits == 1 and nvml.shutdowns == 1   # opened and closed by the thread


def test_container_pid_mismatch_is_recorded_not_hidden(monkeypatch, tree):
    """NVML lists GPU processes under PIDs from the host's namespace; none is ours: the VRAM
    cannot be attributed, and says so instead of reporting 0 or falling back to RSS."""
    child, _ = tree
    nvml = FakeNvml(1, compute=lambda d: [(unused_pid(), 700 * MiB),
                                          (unused_pid() + 1, 300 * MiB)])
    sampler = sample_once(monkeypatch, nvml, child)
    assert sampler.peak_vram is None
    assert sampler.vram_note == VRAM_NOT_ATTRIBUTABLE
    assert "not attributable" in sampler.vram_note and "PID namespace" in sampler.vram_note


def test_gpu_used_only_by_others_or_idle_is_zero(monkeypatch, tree):
    child, _ = tree
    for rows in ([(os.getpid(), 900 * MiB)], []):
        nvml = FakeNvml(1, compute=lambda d, rows=rows: rows)
        sampler = sample_once(monkeypatch, nvml, child)
        assert (sampler.peak_vram, sampler.vram_note) == (0, None), rows


def test_nvml_without_sizes_says_so(monkeypatch, tree):
    child, _ = tree
    nvml = FakeNvml(1, compute=lambda d: [(child, None)])
    sampler = sample_once(monkeypatch, nvml, child)
    assert (sampler.peak_vram, sampler.vram_note) == (None, VRAM_NOT_REPORTED)


@pytest.mark.parametrize("how", ["not installed", "no driver"])
def test_no_nvml_means_not_measured(monkeypatch, tree, how):
    child, _ = tree
    if how == "not installed":
        monkeypatch.setitem(sys.modules, "pynvml", None)      # import pynvml -> ImportError
    else:
        broken = types.ModuleType("pynvml")

        def fail() -> None:
            raise RuntimeError("NVML Shared Library Not Found")

        broken.nvmlInit = fail  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "pynvml", broken)
    probe = ex._NvmlProbe()
    assert probe.handles == [] and probe.sample({child}) is None
    sampler = _Sampler(child, interval=0.05)
    sampler.start()
    sampler.stop()
    assert (sampler.peak_vram, sampler.vram_note) == (None, None)


# --- through the executor: the cell's real process -----------------------------------------


def _worker_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=False)
            if "qbench.run.worker" in " ".join(p.cmdline())]


def _hang_job() -> Job:
    return Job(cell={"id": "m/llama.cpp/F16/speed", "key": "k"}, base_dir=".", cache_dir=".")


def _ending_nvml(rows_for: Callable[[list[int]], list[tuple[int, int | None]]]) -> FakeNvml:
    """A fake whose processes derive from the running cell; once a round reported them, the
    cell is ended (SIGTERM), as a finishing GPU cell would be."""
    def compute(device: int) -> list[tuple[int, int | None]]:
        return rows_for([p.pid for p in _worker_children()])

    def graphics(device: int) -> list[tuple[int, int | None]]:
        cells = _worker_children()
        if cells and rows_for([p.pid for p in cells]):
            for p in cells:
                p.terminate()
        return []

    return FakeNvml(1, compute=compute, graphics=graphics)


def test_run_in_child_records_the_cells_vram(monkeypatch, tmp_path):
    monkeypatch.setenv("QBENCH_FAULT", "*=hang")
    nvml = _ending_nvml(lambda pids: [(pid, 256 * MiB) for pid in pids])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    out = run_in_child(_hang_job(), log_path=tmp_path / "cell.log", timeout_s=PATIENCE_S)
    assert out.signal == "SIGTERM"                # ended by the fake, not by the timeout
    assert out.peak_vram_mb == 256 and out.vram_note is None


def test_run_in_child_in_a_container_records_not_attributable(monkeypatch, tmp_path):
    monkeypatch.setenv("QBENCH_FAULT", "*=hang")
    nvml = _ending_nvml(lambda pids: [(unused_pid(), 256 * MiB)] if pids else [])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    out = run_in_child(_hang_job(), log_path=tmp_path / "cell.log", timeout_s=PATIENCE_S)
    assert out.signal == "SIGTERM"
    assert out.peak_vram_mb is None and out.vram_note == VRAM_NOT_ATTRIBUTABLE
    assert out.peak_rss_mb > 0                    # RSS is still measured, never used as VRAM


# --- torch's max allocated, from the cell to the record ------------------------------------


def fake_torch(per_device_bytes: list[int], *, initialized: bool = True) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        is_available=lambda: True, is_initialized=lambda: initialized,
        device_count=lambda: len(per_device_bytes),
        max_memory_allocated=lambda i: per_device_bytes[i])
    return torch


def _run_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """qbench.run.worker's main, in this process, on a cell whose metric is faked."""
    from qbench.run import worker
    monkeypatch.delenv("QBENCH_FAULT", raising=False)
    monkeypatch.setattr(worker, "execute", lambda job: {
        "status": "ok", "values": {}, "details": {}, "artifact": {}, "backend": {},
        "timings": {}})
    job, result = tmp_path / "job.json", tmp_path / "result.json"
    job.write_text(_hang_job().to_json())
    assert worker.main([str(job), str(result)]) == 0
    return json.loads(result.read_text())


def test_torch_max_allocated_reaches_the_record(monkeypatch, tmp_path, write_suite):
    from qbench.suite.config import load_suite
    from qbench.suite.plan import PlanContext, expand
    from qbench.results.schema import make_record
    monkeypatch.setitem(sys.modules, "torch", fake_torch([512 * MiB, 256 * MiB]))
    result = _run_worker(monkeypatch, tmp_path)
    assert result["torch_max_allocated_mb"] == 768.0      # summed over the devices
    suite = load_suite(write_suite("""
        [suite]
        name = "gpu-fakes"
        [[models]]
        id = "m"
        source = "hf:example/m-GGUF/m-f16.gguf"
        base = "F16"
        [[variants]]
        backend = "llama.cpp"
        quant = ["F16"]
        [metrics.speed]
        """))
    cell = expand(suite, PlanContext(base_dir=tmp_path, data_dir=None,
                                     cache_dir=tmp_path / "cache"))[0]
    record = make_record(cell.describe(), Outcome(status="ok", result=result, peak_vram_mb=900.0),
                         "run-1", "2026-01-01T00:00:00+00:00", {})
    assert record["memory"]["torch_max_allocated_mb"] == 768.0
    assert record["memory"]["peak_vram_mb"] == 900.0
    assert record["memory"]["vram_note"] is None
    hidden = make_record(cell.describe(), Outcome(status="ok", result=result, peak_vram_mb=None,
                                       vram_note=VRAM_NOT_ATTRIBUTABLE),
                         "run-1", "2026-01-01T00:00:00+00:00", {})
    assert hidden["memory"]["peak_vram_mb"] is None
    assert hidden["memory"]["vram_note"] == VRAM_NOT_ATTRIBUTABLE    # said, not a silent 0


@pytest.mark.parametrize("torch", [None, fake_torch([1], initialized=False)],
                         ids=["torch never imported", "CUDA never initialised"])
def test_no_torch_peak_without_cuda_use(monkeypatch, tmp_path, torch):
    if torch is None:
        monkeypatch.delitem(sys.modules, "torch", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "torch", torch)
    result = _run_worker(monkeypatch, tmp_path)
    assert "torch_max_allocated_mb" not in result
    assert sys.modules.get("torch") is torch           # the worker imported nothing


# --- llama.cpp's offload flags --------------------------------------------------------------


class FakeLlamaCpp(types.ModuleType):
    """The part of llama_cpp's C API that loading a model touches; records n_gpu_layers."""

    def __init__(self, offload: bool) -> None:
        super().__init__("llama_cpp")
        self.offload = offload
        self.loaded_with: list[int] = []

    def llama_backend_init(self) -> None:
        pass

    def llama_supports_gpu_offload(self) -> bool:
        return self.offload

    def llama_model_default_params(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(n_gpu_layers=999)     # never what qbench sends

    def llama_model_load_from_file(self, path: bytes, params: types.SimpleNamespace) -> object:
        self.loaded_with.append(params.n_gpu_layers)
        return object()

    def llama_model_get_vocab(self, model: object) -> object:
        return object()

    def llama_vocab_n_tokens(self, vocab: object) -> int:
        return 64

    def llama_vocab_get_add_bos(self, vocab: object) -> bool:
        return True

    def llama_vocab_bos(self, vocab: object) -> int:
        return 1


@pytest.fixture
def llamacpp_with(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], Any]:
    """llamacpp_with(offload) -> (qbench.backends.llamacpp on a FakeLlamaCpp, the fake)."""
    def make(offload: bool) -> Any:
        fake = FakeLlamaCpp(offload)
        try:
            from qbench.backends import llamacpp
        except ImportError:          # no llama-cpp-python here: import the module on the fake
            monkeypatch.setitem(sys.modules, "llama_cpp", fake)
            monkeypatch.delitem(sys.modules, "qbench.backends.llamacpp", raising=False)
            from qbench.backends import llamacpp
        monkeypatch.setattr(llamacpp, "llama_cpp", fake)
        monkeypatch.setattr(llamacpp, "_BACKEND_READY", False)
        return llamacpp, fake
    return make


@pytest.mark.parametrize("device, offload, layers, expect_device, expect_layers", [
    ("auto", True, -1, "cuda", 10**6),    # all layers on the GPU
    ("auto", True, 8, "cuda", 8),         # the variant's n_gpu_layers
    ("auto", False, -1, "cpu", 0),        # a CPU build: nothing offloaded
    ("cpu", True, -1, "cpu", 0),          # device = cpu wins over a GPU build
    ("cuda", True, 0, "cuda", 0),         # n_gpu_layers = 0 kept as asked
])
def test_llamacpp_offload_flags(llamacpp_with, tmp_path, device, offload, layers,
                                expect_device, expect_layers):
    from qbench.backends.base import LoadOptions
    llamacpp, fake = llamacpp_with(offload)
    backend = llamacpp.LlamaCppBackend(tmp_path / "m.gguf",
                                       LoadOptions(device=device, n_gpu_layers=layers))
    assert fake.loaded_with == [expect_layers]
    assert (backend.device, backend.n_gpu_layers) == (expect_device, expect_layers)


def test_llamacpp_cuda_without_an_offloading_build_is_a_clear_error(llamacpp_with, tmp_path):
    from qbench.backends.base import LoadOptions
    from qbench.errors import QbenchError
    llamacpp, fake = llamacpp_with(False)
    with pytest.raises(QbenchError, match="cannot offload"):
        llamacpp.LlamaCppBackend(tmp_path / "m.gguf", LoadOptions(device="cuda"))
    assert fake.loaded_with == []               # refused before loading anything
