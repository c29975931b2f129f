"""The recommendation's memory, predicted then measured: peak RSS of llama.cpp running a
synthetic model's quantized file at a given context and KV-cache type, beside what
qbench.report.recommend predicts for it (``_memory``'s estimate: the predicted peak RSS,
weights + repacked copy + KV cache + runtime, qbench.report.memory_model).

    .venv/bin/python benchmarks/memory_fit.py [--presets llama-3.2-1b,llama-3.1-8b] \
        [--quants Q4_K_M] [--ctx 4096,8192] [--kv f16,q8_0] [--reps 2] [--fill] \
        [--threads 2] [--no-mmap] [--cache-dir DIR] [--json out.json]

Each configuration runs in a fresh process (``--child``) that loads the file as qbench's
llama.cpp backend does (mmap, the suite's default batch 2048 / ubatch 512), makes a context of
exactly ``ctx`` positions with the KV type, decodes a 512-token prompt then 16 single tokens,
and reports its peak RSS (VmHWM: Python, the libraries, the mapped weights it touched, the KV
cache, llama.cpp's compute buffers). ``--fill`` decodes a prompt of ctx - 16 tokens instead: the
whole cache written, for checking that the short prompt already reaches the peak (llama.cpp
clears its KV buffer when it makes the context, so the cache is resident from the start).

The prediction is recommend's own: ``_memory`` on a row holding what the report's table holds
for such a variant (the file size in MiB as its weights, the footprint's type mix and shape,
the KV type's bytes per element, llama.cpp's system info): weights + the repacked copy + KV
cache at ``ctx`` + the runtime (qbench.report.memory_model). Error = predicted / measured - 1.
The child also keeps llama.cpp's own log of the buffers it allocated ("CPU_REPACK model buffer
size", "CPU KV", "CPU compute"), printed beside the predicted repacked copy. The model is for
qbench's default, the mapped file; with ``--no-mmap`` the repacked tensors are not held twice
and the prediction overstates by their size.
The 70B, which no file here can hold, is computed instead: benchmarks/synthetic_presets.py
--memory-ctx (a sparse F16 GGUF, header only, and llama.cpp's quantizer in dry-run mode, through
the same model: qbench.report.sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MIB = 2**20
PROMPT = 512
GEN = 16


def child(path: Path, ctx: int, kv: str, threads: int, fill: bool, mmap: bool = True
          ) -> dict[str, Any]:
    """Run one configuration in this process; its peak RSS and the stages' RSS (MiB)."""
    import numpy as np
    import llama_cpp

    if not mmap:   # read the weights into memory instead of mapping the file
        default = llama_cpp.llama_model_default_params

        def no_mmap() -> Any:   # this llama.cpp's load_mode replaced use_mmap
            params = default()
            params.load_mode = 0          # LLAMA_LOAD_MODE_NONE: read, don't map
            return params
        llama_cpp.llama_model_default_params = no_mmap

    from qbench.backends.base import LoadOptions
    from qbench.backends.llamacpp import load
    from qbench.host.procmem import hwm_kib, status_kib

    def rss() -> float:
        return (status_kib("VmRSS")[0] or 0) / 1024

    from qbench.backends import llama_log
    logged = llama_log.capture()
    stages = {"python": rss()}
    t0 = time.perf_counter()
    backend = load(path, LoadOptions(device="cpu", threads=threads, kv_cache=kv))
    stages["loaded"] = rss()
    backend.size_context(ctx)
    stages["context"] = rss()
    rng = np.random.default_rng(0)
    n_prompt = ctx - GEN if fill else PROMPT
    tokens = [int(t) for t in rng.integers(0, backend.n_vocab, n_prompt)]
    backend.decode_tokens(tokens, backend.n_batch)
    stages["prompt"] = rss()
    for t in rng.integers(0, backend.n_vocab, GEN):
        backend.decode_tokens([int(t)], 1)
    stages["generated"] = rss()
    anon, file_backed = status_kib("RssAnon", "RssFile")
    stages["anon"], stages["file"] = (anon or 0) / 1024, (file_backed or 0) / 1024
    from qbench.backends.llamacpp import system_info
    backend.close()
    return {"peak_rss_mb": (hwm_kib() or 0) / 1024, "stages_mb": stages,
            "seconds": round(time.perf_counter() - t0, 1), "prompt_tokens": n_prompt,
            "buffers_mb": llama_log.buffer_sizes("".join(logged)),
            "system_info": system_info()}


def run_child(path: Path, ctx: int, kv: str, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(path), str(ctx), kv, str(a.threads)] + \
        (["--fill"] if a.fill else []) + (["--no-mmap"] if a.no_mmap else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted(path: Path, kv: str, ctx: int, cache_dir: Path, system_info: str
              ) -> dict[str, Any]:
    """recommend._memory on the row the report would hold for this file and KV type, run by
    llama.cpp on this CPU (the footprint record's type mix, roles and embedding bytes; the
    speed cell's system info and ubatch)."""
    from qbench.backends import kv_bytes_per_element
    from qbench.quantize.gguf import footprint
    from qbench.report.recommend import _memory

    fp = footprint(path, cache_dir)["details"]
    row = {"backend": "llama.cpp", "device": "cpu", "model_shape": fp.get("shape") or {},
           "size_mb": path.stat().st_size / MIB, "tensor_types": fp["tensor_types"],
           "roles": fp.get("roles") or {}, "embed_bytes": fp.get("embed_bytes"),
           "system_info": system_info, "n_ubatch": 512,
           "kv_bytes": kv_bytes_per_element("llama.cpp", "" if kv == "f16" else kv)}
    mem = _memory(row, ctx)
    return {k: mem[k] for k in ("estimate_mb", "weights_mb", "kv_mb", "repack_mb",
                                "repack_how", "runtime_mb")}


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        path, ctx, kv, threads = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        try:
            from llama_cpp import _logger
            _logger.set_verbose(False)
        except (ImportError, AttributeError):
            pass
        print(json.dumps(child(Path(path), ctx, kv, threads, "--fill" in sys.argv,
                               mmap="--no-mmap" not in sys.argv)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="llama-3.2-1b,llama-3.1-8b")
    p.add_argument("--quants", default="Q4_K_M")
    p.add_argument("--ctx", default="4096,8192")
    p.add_argument("--kv", default="f16,q8_0")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fill", action="store_true", help="fill the whole context (slow)")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into memory (llama.cpp use_mmap = false) instead of "
                        "mapping the file, as qbench's backend does")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    a.cache_dir = a.cache_dir or Path(os.environ.get("QBENCH_CACHE_DIR")
                                      or Path.home() / ".cache" / "qbench")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from decode_roofline import prepare

    rows = []
    for preset in [x for x in a.presets.split(",") if x]:
        files = prepare(preset, [q for q in a.quants.split(",") if q], a.cache_dir, a.threads)
        for q, path in files.items():
            for ctx in [int(x) for x in a.ctx.split(",")]:
                for kv in [x for x in a.kv.split(",") if x]:
                    runs = [run_child(path, ctx, kv, a) for _ in range(a.reps)]
                    peaks = [r["peak_rss_mb"] for r in runs]
                    pred = predicted(path, kv, ctx, a.cache_dir, runs[-1]["system_info"])
                    measured = statistics.median(peaks)
                    row = {"preset": preset, "quant": q, "ctx": ctx, "kv": kv,
                           "file_mb": path.stat().st_size / MIB, "predicted": pred,
                           "peak_rss_mb": peaks, "measured_mb": measured,
                           "error_pct": 100 * (pred["estimate_mb"] / measured - 1),
                           "stages_mb": runs[-1]["stages_mb"], "fill": a.fill,
                           "llama_buffers_mb": runs[-1]["buffers_mb"],
                           "mmap": not a.no_mmap,
                           "prompt_tokens": runs[-1]["prompt_tokens"]}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\n{'preset':<14}{'quant':<8}{'ctx':>6}{'kv':>6}{'file MiB':>10}{'repack':>8}"
          f"{'(logged)':>9}{'runtime':>8}{'KV MiB':>9}"
          f"{'predicted':>11}{'measured':>10}{'range':>18}{'error':>9}")
    for r in rows:
        pr = r["predicted"]
        logged = r["llama_buffers_mb"].get("CPU_REPACK model", 0.0)
        print(f"{r['preset']:<14}{r['quant']:<8}{r['ctx']:>6}{r['kv']:>6}{r['file_mb']:>10.0f}"
              f"{pr['repack_mb'] if pr['repack_mb'] is not None else float('nan'):>8.0f}"
              f"{logged:>9.0f}{pr['runtime_mb'] or float('nan'):>8.0f}"
              f"{pr['kv_mb']:>9.0f}{pr['estimate_mb']:>11.0f}"
              f"{r['measured_mb']:>10.0f}{min(r['peak_rss_mb']):>9.0f}-{max(r['peak_rss_mb']):<8.0f}"
              f"{r['error_pct']:>+8.1f}%")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"rows": rows, "threads": a.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
