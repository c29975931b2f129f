"""qbench on a GPU in one command, on a bare CUDA machine with no internet.

    # here, once (needs the verified llama-cpp-python sdist qbench downloads for bootstrap):
    .venv/bin/python benchmarks/gpu_proof.py trim            # -> build/gpu-proof/ (ignored)
    # there (nvcc, CMake, Python with torch, transformers, nvidia-ml-py; no models, no network):
    python benchmarks/gpu_proof.py run --out OUT             # <= 10 minutes, OUT/gpu_proof.md

What travels with the repository is the llama-cpp-python source trimmed to what a CUDA build
needs (``trim``: from the sdist whose sha256 qbench/data/pins.json pins, keeping the Python
package, llama.cpp's CMake files, include/, src/, common/, vendor/, gguf-py/ and ggml with only
its CPU and CUDA backends; dropping docs, models (75 MB of test vocabularies), tools, tests,
examples and every other ggml backend; the manifest beside the archive lists what was kept and
dropped, with sizes and both archives' sha256). ~6 MB instead of the sdist's 76.6 MB.

``run`` does, each step timed, a failed step recorded and the next one run:

1. the machine: nvidia-smi, torch, nvcc, cmake;
2. build: llama.cpp's shared libraries with CUDA for this GPU's architecture only
   (``CMAKE_CUDA_ARCHITECTURES`` from nvidia-smi's compute capability, LLAVA_BUILD off),
   installed into the unpacked source's Python package, which then runs from there (no pip:
   the machine has no index); meanwhile the synthetic models are generated on the machine
   (qbench.inputs.synthetic: ``llama-3.1-8b`` F16, and the check model);
3. the ladder: the 8B shape quantized (Q8_0, Q4_K_M) with llama.cpp's quantizer, then per
   type a speed cell (qbench.metrics.speed: pp512 / tg128 x 3, every layer offloaded) in a
   process of its own whose VRAM qbench's NVML sampler follows per pid
   (qbench.run.child._Sampler), with tg's GB/s against the GPU's measured read bandwidth
   (qbench.host.bandwidth; below 50 % is flagged);
4. transformers: the bf16 8B shape (random init from its config on the GPU, seeded): prefill
   512 and decode 128 tokens, NVML per-process VRAM and torch's max allocated;
5. the numerical check: llama.cpp's next-token distributions on the check model for the same
   tokens on the CPU (a process with ``CUDA_VISIBLE_DEVICES=""``, so nothing is offloaded) and on
   the GPU: mean / p99 / max KLD and the same-top-token rate;
6. one Markdown summary (``OUT/gpu_proof.md``) and the raw numbers (``OUT/gpu_proof.json``).

A deadline (``--budget-s``, default 570 s) keeps the whole run within 10 minutes: a step that
would start after it is recorded as skipped. ``--device cpu`` runs the same steps without a GPU
(tests/test_gpu_proof.py runs it so, against fakes of NVML and the build tools).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MIB = 2**20
DEFAULT_OUT = REPO / "build" / "gpu-proof"
HBM_FLAG_PCT = 50.0          # design.md: a GPU decode below 50 % of measured HBM is flagged

# -- trim -------------------------------------------------------------------------------------
# paths under the sdist's top folder kept for a CUDA build (a folder keeps everything below it)
KEEP = ("CMakeLists.txt", "pyproject.toml", "README.md", "LICENSE.md", "PKG-INFO", "llama_cpp/",
        "vendor/llama.cpp/CMakeLists.txt", "vendor/llama.cpp/LICENSE",
        "vendor/llama.cpp/cmake/", "vendor/llama.cpp/include/", "vendor/llama.cpp/src/",
        "vendor/llama.cpp/common/", "vendor/llama.cpp/vendor/", "vendor/llama.cpp/gguf-py/",
        "vendor/llama.cpp/ggml/CMakeLists.txt", "vendor/llama.cpp/ggml/cmake/",
        "vendor/llama.cpp/ggml/include/", "vendor/llama.cpp/ggml/src/ggml-cpu/",
        "vendor/llama.cpp/ggml/src/ggml-cuda/")
KEEP_FILES_IN = ("vendor/llama.cpp/ggml/src/",)     # its files, not its other backend folders


def kept(rel: str) -> bool:
    """Whether a path (relative to the sdist's top folder) is part of the trimmed source."""
    if any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in KEEP):
        return True
    return any(rel.startswith(d) and "/" not in rel[len(d):] for d in KEEP_FILES_IN)


def trim(sdist: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir/<top>-cuda-src.tar.gz`` with the kept files of ``sdist`` and a manifest
    (``.json``) recording what was kept and dropped; return the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kept_files, dropped = 0, {}
    kept_bytes = 0
    with tarfile.open(sdist) as src:
        members = [m for m in src.getmembers() if m.isfile()]
        top = members[0].name.split("/", 1)[0]
        archive = out_dir / f"{top}-cuda-src.tar.gz"
        with tarfile.open(archive, "w:gz", compresslevel=9) as dst:
            for m in sorted(members, key=lambda m: m.name):
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if kept(rel):
                    fh = src.extractfile(m)
                    assert fh is not None
                    info = tarfile.TarInfo(m.name)
                    info.size, info.mode, info.mtime = m.size, m.mode, 0
                    dst.addfile(info, io.BytesIO(fh.read()))
                    kept_files += 1
                    kept_bytes += m.size
                else:
                    depth = (5 if rel.startswith("vendor/llama.cpp/ggml/src/") else
                             3 if rel.startswith("vendor/llama.cpp/") else 1)
                    group = "/".join(rel.split("/")[:depth])
                    entry = dropped.setdefault(group, {"files": 0, "bytes": 0})
                    entry["files"] += 1
                    entry["bytes"] += m.size
    manifest = {"source": sdist.name, "source_sha256": _sha256(sdist),
                "source_bytes": sdist.stat().st_size, "archive": archive.name,
                "archive_sha256": _sha256(archive), "archive_bytes": archive.stat().st_size,
                "kept": {"rules": list(KEEP) + [f"{d} (files only)" for d in KEEP_FILES_IN],
                         "files": kept_files, "bytes": kept_bytes},
                "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1]["bytes"])),
                "why": "a CUDA build of llama-cpp-python needs its CMake files, the Python "
                       "package, llama.cpp's library sources (src, include, common, vendor) and "
                       "ggml's core with the CPU and CUDA backends; gguf-py lets the GPU machine "
                       "generate synthetic models without installing anything"}
    (out_dir / f"{top}-cuda-src.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# -- run: steps -------------------------------------------------------------------------------
class Steps:
    """Each step timed; an exception is recorded as the step's failure, never raised; a step
    that would start after the deadline is skipped and says so."""

    def __init__(self, budget_s: float, log: Callable[[str], None]) -> None:
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.log = log
        self.records: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], Any], *, needs: tuple[str, ...] = ()) -> Any:
        missing = [n for n in needs if self.records.get(n, {}).get("status") != "ok"]
        if missing:
            self.records[name] = {"status": "not run", "why": f"needs {', '.join(missing)}"}
            self.log(f"{name}: not run (needs {', '.join(missing)})")
            return None
        if time.monotonic() > self.deadline:
            self.records[name] = {"status": "skipped", "why": "the time budget was spent"}
            self.log(f"{name}: skipped (budget)")
            return None
        start = time.monotonic()
        self.log(f"{name} ...")
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - a failed step is a result, the run goes on
            self.records[name] = {"status": "failed", "seconds": round(time.monotonic() - start, 1),
                                  "error": f"{type(exc).__name__}: {exc}"[-3000:]}
            self.log(f"{name}: FAILED: {type(exc).__name__}: {str(exc)[-500:]}")
            return None
        self.records[name] = {"status": "ok", "seconds": round(time.monotonic() - start, 1)}
        self.log(f"{name}: ok ({self.records[name]['seconds']} s)")
        return out

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _cmd(cmd: list[str], timeout: float | None = None, env: dict[str, str] | None = None
         ) -> str:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... exit {proc.returncode}: {proc.stdout[-2500:]}")
    return proc.stdout


def machine(device: str) -> dict[str, Any]:
    """nvidia-smi's GPU, torch's view, the build tools' versions (what is missing is said)."""
    out: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        q = _cmd(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                  "--format=csv,noheader"]).strip().splitlines()
        out["gpus"] = [dict(zip(("name", "memory", "driver", "compute_cap"),
                                (x.strip() for x in line.split(",")))) for line in q]
    else:
        out["gpus"] = []
    for tool, args in (("nvcc", ["--version"]), ("cmake", ["--version"])):
        path = shutil.which(tool)
        try:
            text = _cmd([path, *args]).strip().splitlines() if path else ["not found"]
            out[tool] = next((x for x in text if "release" in x or "version" in x), text[0])
        except (RuntimeError, OSError, IndexError) as exc:
            out[tool] = f"{path} does not run: {str(exc)[-200:]}"
    try:
        import torch
        out["torch"] = torch.__version__
        out["torch_cuda"] = bool(torch.cuda.is_available())
    except ImportError:
        out["torch"] = "not installed"
    if device == "cuda" and not out["gpus"]:
        raise RuntimeError("device cuda, but nvidia-smi lists no GPU")
    return out


def cuda_arch(info: dict[str, Any]) -> str:
    """CMAKE_CUDA_ARCHITECTURES for this machine's first GPU ("90" for 9.0)."""
    caps = [g.get("compute_cap", "") for g in info.get("gpus", []) if g.get("compute_cap")]
    if not caps:
        raise RuntimeError("no compute capability from nvidia-smi")
    return caps[0].replace(".", "")


def unpack(archive: Path, work: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    found = next(work.glob("llama_cpp_python-*"), None)
    if found is None:
        raise RuntimeError(f"{archive} holds no llama_cpp_python-* folder")
    return found


def build(src: Path, arch: str | None, jobs: int, extra: list[str]) -> dict[str, Any]:
    """cmake configure/build/install of the unpacked llama-cpp-python: its shared libraries land
    in ``src/llama_cpp/lib``, where the package loads them from."""
    b = src / "build"
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             f"-DSKBUILD_PLATLIB_DIR={src / 'platlib'}"]
    if arch:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
    flags += extra
    t0 = time.monotonic()
    _cmd(["cmake", "-S", str(src), "-B", str(b), *flags])
    _cmd(["cmake", "--build", str(b), f"-j{jobs}"])
    _cmd(["cmake", "--install", str(b)])
    return {"flags": flags, "seconds": round(time.monotonic() - t0, 1),
            "libs": sorted(p.name for p in (src / "llama_cpp" / "lib").glob("*.so*"))}


def child_env(src: Path | None, shim: Path, hide_gpu: bool = False) -> dict[str, str]:
    """The environment of a child that imports llama_cpp from the built source (when built),
    gguf from its gguf-py, qbench from this repository."""
    env = dict(os.environ)
    paths = [str(REPO), str(shim)]
    if src is not None:
        paths = [str(src), str(src / "vendor" / "llama.cpp" / "gguf-py")] + paths
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                 else []))
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def make_shim(folder: Path) -> Path:
    """Stand-ins for llama_cpp's import-time dependency diskcache (only its disk cache class,
    never used here, needs it), when the machine lacks it."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import diskcache  # noqa: F401
    except ImportError:
        (folder / "diskcache.py").write_text('"""stand-in: llama_cpp imports it, qbench never '
                                             'uses its disk cache"""\nclass Cache:\n    pass\n')
    return folder


def run_child(args: list[str], env: dict[str, str], sampler: bool, timeout: float
              ) -> dict[str, Any]:
    """``gpu_proof.py child ARGS`` in its own process, its VRAM sampled per pid by qbench's
    NVML sampler; its last stdout line is JSON."""
    from qbench.run.sampler import _Sampler

    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "child", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    s = _Sampler(proc.pid, interval=0.05) if sampler else None
    if s is not None:
        s.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"child {args[0]} timed out after {timeout:.0f} s: {err[-1500:]}")
    finally:
        if s is not None:
            s.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed (exit {proc.returncode}): {err[-2500:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if s is not None:
        result["nvml_peak_vram_mb"] = s.peak_vram / MIB if s.peak_vram is not None else None
        result["nvml_note"] = s.vram_note
        result["peak_rss_mb"] = s.peak_rss / MIB if s.peak_rss else None
    return result


# -- children ---------------------------------------------------------------------------------
def child_quantize(f16: str, quant: str, cache_dir: str, threads: int) -> dict[str, Any]:
    from qbench.inputs.sources import sha256_file
    from qbench.quantize.gguf import build_variant

    path = Path(f16)
    t0 = time.monotonic()
    art = build_variant(path, sha256_file(path, Path(cache_dir)), quant, "F16",
                        cache_dir=Path(cache_dir), threads=threads)
    return {"path": str(art.path), "bytes": art.path.stat().st_size,
            "seconds": round(time.monotonic() - t0, 1)}


def child_speed(path: str, device: str, cache_dir: str, prompt: int, gen: int, reps: int,
                threads: int) -> dict[str, Any]:
    from qbench.backends.base import LoadOptions
    from qbench.backends.llamacpp import load
    from qbench.metrics import speed
    from qbench.metrics.context import CellContext
    from qbench.metrics.roofline import gguf_traffic

    p = Path(path)
    ctx = CellContext(cell_id="gpu-proof", model_id=p.stem, artifact_path=p,
                      artifact={"path": path, "size_bytes": p.stat().st_size},
                      base_dir=REPO, data_dir=None, cache_dir=Path(cache_dir), is_base=False,
                      _load=lambda: load(p, LoadOptions(device=device, threads=threads)))
    try:   # the roofline is the proof's own (the GPU's bandwidth, measured once)
        res = speed.run(ctx, speed.Options(prompt, gen, reps, max_rounds=1, roofline=False))
        desc = ctx.backend.describe()
    finally:
        ctx.close()
    v = res["values"]
    tg = v.get("tg_tokens_per_s", {}).get("value")
    per_token = gguf_traffic(p, Path(cache_dir))["weight_bytes_per_token"]
    return {"pp": v.get("pp_tokens_per_s", {}).get("value"), "tg": tg,
            "tg_sd": v.get("tg_tokens_per_s", {}).get("sd"),
            "weight_bytes_per_token": per_token, "tg_gbs": tg * per_token / 1e9 if tg else None,
            "device": desc.get("device"), "n_gpu_layers": desc.get("n_gpu_layers"),
            "peak_vram_reps_mb": v.get("peak_vram_mb", {}).get("value")}


def child_transformers(config: str, device: str, prompt: int, gen: int, seed: int
                       ) -> dict[str, Any]:
    """The bf16 model of ``config`` (a preset name or config.json), random init on the device:
    prefill and decode tokens/s, torch's max allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qbench.inputs.synthetic import load_shape

    shape = load_shape(config, REPO)
    cfg = AutoConfig.for_model(**shape.config)
    torch.manual_seed(seed)
    dtype = torch.bfloat16
    t0 = time.monotonic()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model.eval()
    init_s = time.monotonic() - t0
    ids = torch.randint(0, shape.n_vocab, (1, prompt), device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        model(ids[:, :8])                              # warm-up
        sync()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        sync()
        pp_s = time.perf_counter() - t0
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(gen):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        tg_s = time.perf_counter() - t0
    max_alloc = (torch.cuda.max_memory_allocated() / MIB
                 if device == "cuda" and torch.cuda.is_available() else None)
    return {"params": sum(p.numel() for p in model.parameters()), "init_s": round(init_s, 1),
            "pp": prompt / pp_s, "tg": gen / tg_s, "torch_max_allocated_mb": max_alloc,
            "dtype": "bf16", "device": device}


def child_logits(path: str, device: str, out: str, n_chunks: int, n_ctx: int, threads: int
                 ) -> dict[str, Any]:
    """Every position's logits over ``n_chunks`` chunks of seeded random tokens -> ``out``."""
    import numpy as np

    from qbench.backends.base import LoadOptions
    from qbench.backends.llamacpp import load

    backend = load(Path(path), LoadOptions(device=device, threads=threads))
    try:
        rng = np.random.default_rng(0)
        chunks = [[int(t) for t in rng.integers(0, backend.n_vocab, n_ctx)]
                  for _ in range(n_chunks)]
        logits = np.concatenate([np.array(x, dtype=np.float32, copy=True)
                                 for x in backend.chunk_logits(chunks, 0)])
        desc = backend.describe()
    finally:
        backend.close()
    np.save(out, logits)
    return {"positions": int(logits.shape[0]), "device": desc.get("device"),
            "n_gpu_layers": desc.get("n_gpu_layers")}


def compare_logits(ref: Any, other: Any) -> dict[str, float]:
    """KLD(ref || other) per position (mean, p99, max) and the same-top-token rate."""
    import numpy as np

    def log_softmax(x: Any) -> Any:
        x = x.astype(np.float64)
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    p, q = log_softmax(ref), log_softmax(other)
    kld = (np.exp(p) * (p - q)).sum(axis=1)
    return {"positions": int(len(kld)), "kld_mean": float(kld.mean()),
            "kld_p99": float(np.percentile(kld, 99)), "kld_max": float(kld.max()),
            "same_top_pct": float(100 * (ref.argmax(1) == other.argmax(1)).mean())}


# -- run --------------------------------------------------------------------------------------
def generate(refs: list[str], cache_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from qbench.inputs.synthetic import ensure

    out = {}
    for ref in refs:
        t0 = time.monotonic()
        path = ensure(ref, base_dir=REPO, cache_dir=cache_dir, say=log)
        out[ref] = {"path": str(path), "bytes": path.stat().st_size,
                    "seconds": round(time.monotonic() - t0, 1)}
    return out


def gpu_read_bandwidth(device: str) -> float | None:
    if device != "cuda":
        return None
    from qbench.host.bandwidth import gpu_bandwidth
    got = gpu_bandwidth(passes=3)
    devs = got.get("devices") or []
    if not devs:
        raise RuntimeError(f"no GPU bandwidth: {got.get('reason')}")
    return float(devs[0]["gbs"])


def run(a: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-proof-", dir=a.work or None))
    cache_dir = work / "cache"
    log_lines: list[str] = []

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        log_lines.append(line)
        print(line, file=sys.stderr, flush=True)

    steps = Steps(a.budget_s, log)
    res: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}}
    res["machine"] = steps.run("machine", lambda: machine(a.device)) or {}
    shim = make_shim(work / "shim")
    ladder_ref, check_ref = f"synthetic:{a.ladder_preset}", f"synthetic:{a.check_preset}"

    # build and generate at once: the build is compile-bound, the generation disk-bound
    gen_box: dict[str, Any] = {}
    gen_thread = threading.Thread(target=lambda: gen_box.update(
        out=steps.run("generate", lambda: generate([ladder_ref, check_ref], cache_dir, log))))
    gen_thread.start()
    src: Path | None = None
    if a.src:
        src = steps.run("unpack", lambda: unpack(Path(a.src), work))
        arch = None
        if a.device == "cuda":
            arch = steps.run("cuda-arch", lambda: cuda_arch(res["machine"]))
        res["build"] = steps.run("build", lambda: build(src, arch, a.jobs, a.cmake_arg or []),
                                 needs=("unpack",))
    else:
        steps.records["build"] = {"status": "not run", "why": "no --src (the installed llama_cpp "
                                                               "is used)"}
    gen_thread.join()
    res["generated"] = gen_box.get("out")
    built = steps.records.get("build", {}).get("status") == "ok"
    lib_src = src if built else None
    if a.src and not built:
        log("build failed or did not run: the llama.cpp steps use whatever llama_cpp is "
            "importable here, if any")
    env = child_env(lib_src, shim)
    res["hbm_read_gbs"] = steps.run("gpu-bandwidth", lambda: gpu_read_bandwidth(a.device))

    # the ladder
    f16 = (res["generated"] or {}).get(ladder_ref, {}).get("path")
    files: dict[str, str] = {"F16": f16} if f16 else {}
    for q in [q for q in a.quants if q != "F16"]:
        got = steps.run(f"quantize {q}", lambda q=q: run_child(
            ["quantize", f16, q, str(cache_dir), str(a.threads)], env, False, a.step_timeout),
            needs=("generate",))
        if got:
            files[q] = got["path"]
    res["ladder"] = {}
    for q in a.quants:
        if q not in files:
            res["ladder"][q] = {"status": steps.records.get(f"quantize {q}", {}).get("status",
                                                                                     "not run")}
            continue
        got = steps.run(f"speed {q}", lambda q=q: run_child(
            ["speed", files[q], a.device, str(cache_dir), str(a.prompt), str(a.gen),
             str(a.reps), str(a.threads)], env, True, a.step_timeout))
        row = dict(got or {"status": steps.records[f"speed {q}"]["status"]})
        row["file_bytes"] = Path(files[q]).stat().st_size
        if got and got.get("tg") and got.get("weight_bytes_per_token") and res["hbm_read_gbs"]:
            row["tg_pct_of_hbm"] = 100 * got["tg"] * got["weight_bytes_per_token"] / 1e9 \
                / res["hbm_read_gbs"]
            row["flag"] = row["tg_pct_of_hbm"] < HBM_FLAG_PCT
        res["ladder"][q] = row

    # transformers bf16
    res["transformers"] = steps.run("transformers bf16", lambda: run_child(
        ["transformers", a.transformers_preset, a.device, str(a.prompt), str(a.gen), "0"],
        child_env(None, shim), True, a.step_timeout))

    # numerical check: CPU (GPU hidden) vs the device, same tokens
    check = (res["generated"] or {}).get(check_ref, {}).get("path")

    def numerics() -> dict[str, Any]:
        import numpy as np
        cpu_npy, dev_npy = work / "cpu.npy", work / "dev.npy"
        cpu = run_child(["logits", check, "cpu", str(cpu_npy), str(a.check_chunks),
                         str(a.check_ctx), str(a.threads)], child_env(lib_src, shim, True),
                        False, a.step_timeout)
        dev = run_child(["logits", check, a.device, str(dev_npy), str(a.check_chunks),
                         str(a.check_ctx), str(a.threads)], env, False, a.step_timeout)
        return compare_logits(np.load(cpu_npy), np.load(dev_npy)) | {
            "cpu": cpu, "device": dev, "model": check_ref}

    res["numerics"] = steps.run("numerical check", numerics, needs=("generate",))
    res["steps"] = steps.records
    res["wall_s"] = round(steps.elapsed, 1)
    res["log"] = log_lines
    (out_dir / "gpu_proof.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "gpu_proof.md").write_text(summary(res, a))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _f(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}" if isinstance(x, (int, float)) else str(x)


def summary(res: dict[str, Any], a: argparse.Namespace) -> str:
    """The one Markdown page of the run."""
    m = res.get("machine") or {}
    gpus = ", ".join(f"{g.get('name')} ({g.get('memory')}, cc {g.get('compute_cap')})"
                     for g in m.get("gpus", [])) or "none"
    drivers = ", ".join(g.get("driver", "") for g in m.get("gpus", [])) or "–"
    lines = [f"# qbench GPU proof ({a.device})", "",
             f"- machine: {gpus}; driver {drivers}; {m.get('cpus')} CPUs; torch {m.get('torch')} "
             f"(CUDA {m.get('torch_cuda')}); nvcc: {m.get('nvcc')}; cmake: {m.get('cmake')}",
             f"- wall time: {res['wall_s']} s (budget {a.budget_s:g} s)", ""]
    b = res["steps"].get("build", {})
    lines += ["## Build", "", f"- status: **{b.get('status')}**"
              + (f" in {b.get('seconds')} s" if b.get("seconds") else "")
              + (f" ({b.get('why')})" if b.get("why") else "")]
    if b.get("error"):
        lines += ["", "```", b["error"][-1500:], "```"]
    if res.get("build"):
        lines += [f"- flags: `{' '.join(res['build']['flags'])}`",
                  f"- libraries: {', '.join(res['build']['libs'])}"]
    lines += ["", "## Synthetic models (generated here)", ""]
    for ref, g in (res.get("generated") or {}).items():
        lines.append(f"- `{ref}`: {g['bytes'] / 1e9:.2f} GB in {g['seconds']} s")
    if not res.get("generated"):
        lines.append(f"- not generated: {res['steps'].get('generate')}")
    lines += ["", f"## llama.cpp ladder: {a.ladder_preset}, pp{a.prompt} / tg{a.gen} x {a.reps}, "
              "every layer offloaded", "",
              f"GPU read bandwidth (measured): {_f(res.get('hbm_read_gbs'))} GB/s", "",
              "| type | file GB | pp t/s | tg t/s | tg GB/s | % of read bw | peak VRAM (NVML, "
              "per pid) MiB | device / layers |", "|---|---|---|---|---|---|---|---|"]
    for q, r in res["ladder"].items():
        if "tg" not in r:
            lines.append(f"| {q} | {_f(r.get('file_bytes', 0) / 1e9, 2)} | {r.get('status')} "
                         "| | | | | |")
            continue
        pct = r.get("tg_pct_of_hbm")
        flag = " ⚑ below 50 %" if r.get("flag") else ""
        lines.append(f"| {q} | {r['file_bytes'] / 1e9:.2f} | {_f(r['pp'])} | {_f(r['tg'])} | "
                     f"{_f(r.get('tg_gbs'))} | {_f(pct)}{flag} | "
                     f"{_f(r.get('nvml_peak_vram_mb'), 0)}"
                     + (f" ({r['nvml_note']})" if r.get("nvml_note") else "")
                     + f" | {r.get('device')} / {r.get('n_gpu_layers')} |")
    t = res.get("transformers")
    lines += ["", f"## transformers bf16: {a.transformers_preset} (random init on the device)", ""]
    if t:
        lines += [f"- {t['params'] / 1e9:.2f} B parameters, init {t['init_s']} s; prefill "
                  f"{_f(t['pp'])} t/s, decode {_f(t['tg'])} t/s",
                  f"- peak VRAM (NVML, per pid): {_f(t.get('nvml_peak_vram_mb'), 0)} MiB"
                  + (f" ({t['nvml_note']})" if t.get("nvml_note") else "")
                  + f"; torch max allocated: {_f(t.get('torch_max_allocated_mb'), 0)} MiB"]
    else:
        lines.append(f"- {res['steps'].get('transformers bf16')}")
    n = res.get("numerics")
    lines += ["", f"## Numerical check: llama.cpp {a.device} vs CPU on {a.check_preset} F16", ""]
    if n:
        lines += [f"- {n['positions']:,} positions ({a.check_chunks} x {a.check_ctx} seeded random "
                  f"tokens); KLD mean {n['kld_mean']:.3g}, p99 {n['kld_p99']:.3g}, max "
                  f"{n['kld_max']:.3g}; same top token {n['same_top_pct']:.2f} %",
                  f"- reference: device {n['cpu'].get('device')}, {n['cpu'].get('n_gpu_layers')} "
                  f"layers offloaded (GPU hidden); checked: device {n['device'].get('device')}, "
                  f"{n['device'].get('n_gpu_layers')} layers"]
    else:
        lines.append(f"- {res['steps'].get('numerical check')}")
    lines += ["", "## Steps", "", "| step | status | s | note |", "|---|---|---|---|"]
    for name, r in res["steps"].items():
        note = (r.get("why") or r.get("error") or "").replace("\n", " ").replace("|", "/")[:160]
        lines.append(f"| {name} | {r['status']} | {_f(r.get('seconds'))} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        kind, rest = argv[1], argv[2:]
        fn = {"quantize": lambda: child_quantize(rest[0], rest[1], rest[2], int(rest[3])),
              "speed": lambda: child_speed(rest[0], rest[1], rest[2], int(rest[3]),
                                           int(rest[4]), int(rest[5]), int(rest[6])),
              "transformers": lambda: child_transformers(rest[0], rest[1], int(rest[2]),
                                                         int(rest[3]), int(rest[4])),
              "logits": lambda: child_logits(rest[0], rest[1], rest[2], int(rest[3]),
                                             int(rest[4]), int(rest[5]))}[kind]
        print(json.dumps(fn(), default=str))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trim", help="make the trimmed llama-cpp-python source (here)")
    t.add_argument("--sdist", type=Path, help="default: the verified sdist of the installed "
                                              "llama-cpp-python (qbench.quantize.llama_tools)")
    t.add_argument("--out", type=Path, default=DEFAULT_OUT)
    r = sub.add_parser("run", help="the proof (on the GPU machine)")
    r.add_argument("--src", help="the trimmed source archive (default: the one in "
                                 "build/gpu-proof/, if any)")
    r.add_argument("--out", default=os.environ.get("OUT") or str(DEFAULT_OUT / "out"))
    r.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r.add_argument("--ladder-preset", default="llama-3.1-8b")
    r.add_argument("--transformers-preset", default="llama-3.1-8b")
    r.add_argument("--check-preset", default="llama-3.2-1b")
    r.add_argument("--quants", type=lambda s: [q for q in s.split(",") if q],
                   default=["F16", "Q8_0", "Q4_K_M"])
    r.add_argument("--prompt", type=int, default=512)
    r.add_argument("--gen", type=int, default=128)
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--check-chunks", type=int, default=4)
    r.add_argument("--check-ctx", type=int, default=128)
    r.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    r.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    r.add_argument("--cmake-arg", action="append", help="an extra CMake flag (repeatable)")
    r.add_argument("--budget-s", type=float, default=570.0)
    r.add_argument("--step-timeout", type=float, default=420.0)
    r.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = p.parse_args(argv)
    if a.cmd == "trim":
        sdist = a.sdist
        if sdist is None:
            from qbench.quantize.llama_tools import llama_cpp_version, verified_sdist
            sdist = verified_sdist(llama_cpp_version())
        manifest = trim(sdist, a.out)
        print(json.dumps({k: manifest[k] for k in ("archive", "archive_bytes", "archive_sha256",
                                                   "source_sha256")}, indent=1))
        return 0
    if a.src is None:
        found = sorted(DEFAULT_OUT.glob("llama_cpp_python-*-cuda-src.tar.gz"))
        a.src = str(found[-1]) if found else ""
    res = run(a)
    print(Path(a.out, "gpu_proof.md").read_text())
    failed = [n for n, r in res["steps"].items() if r["status"] == "failed"]
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
