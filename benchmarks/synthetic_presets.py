"""Each synthetic preset against its real model: parameter count, and quantized file sizes
beside the published ones, without downloading or generating any weights.

    .venv/bin/python benchmarks/synthetic_presets.py [--types F16,Q8_0,Q4_K_M] \
        [--measured PRESET=TYPE:PATH ...] [--json out.json]

Per preset: the parameters of its tensor plan (qbench.inputs.synthetic.n_params), and per type
the file size llama.cpp's own quantizer gives it, from a *sparse* F16 GGUF (the real header and
tensor table, the data a hole: a 70B's 141 GB take no disk) quantized in dry-run mode
(``llama_model_quantize_params.dry_run``: llama.cpp picks every tensor's type by its own rules
and adds up the sizes without reading a weight). Predicted file = the F16 file's header + the
tensor bytes of the dry run's types (the header changes by a few bytes: the file type). ``--measured`` adds
the size of a file really quantized (e.g. by benchmarks/decode_roofline.py) to check the dry
run against. Published figures come from ``PUBLISHED`` below, each with where it was read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 2**30

# Published figures: parameter counts from the model cards, file sizes from hub listings or
# llama.cpp's own tables (unit as published: GB = 1e9 bytes on the hub, GiB in llama.cpp's logs).
PUBLISHED: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "params": ("1.23B", "Llama 3.2 model card, meta-llama/Llama-3.2-1B README (table 'Params': "
                            "'1B (1.23B)'); read from the copy in ZHUI/paddlenlp_model_readme "
                            "meta-llama/Llama-3.2-1B/index.md @ 0abc042b"),
        "sizes": {"F16": (2.48e9, "GB"), "Q8_0": (1.32e9, "GB"), "Q4_K_M": (0.81e9, "GB")},
        "sizes_source": "bartowski/Llama-3.2-1B-Instruct-GGUF, README file table (llama.cpp "
                        "b3821, imatrix: sizes are the type mix's, the imatrix changes no byte "
                        "count): f16 2.48GB, Q8_0 1.32GB, Q4_K_M 0.81GB",
    },
    "llama-3.1-8b": {
        "params": ("8.03B", "model.safetensors.index.json total_size 16,060,522,496 bytes of bf16 "
                            "(the Llama 3 8B index quoted in transformers' docs; 3.1 adds no "
                            "parameter) = 8,030,261,248; the card says '8B'"),
        "sizes": {"F16": (14.97 * GIB, "GiB"), "Q8_0": (7.96 * GIB, "GiB"),
                  "Q4_K_M": (4.58 * GIB, "GiB")},
        "sizes_source": "llama.cpp tools/perplexity/README.md, 'LLaMA 3 8b Scoreboard' (Llama 3 "
                        "8B: the same tensors as 3.1 but rope_freqs, 256 bytes); qbench's "
                        "qbench/data/published.json source llamacpp-l3-8b-scoreboard",
    },
    "llama-3.1-70b": {
        "params": ("70B", "Llama 3.1 model card ('8B, 70B, 405B')"),
        "sizes": {"F16": (131.43 * GIB, "GiB"), "Q8_0": (69.83 * GIB, "GiB"),
                  "Q4_K_M": (39.60 * GIB, "GiB"), "Q3_K_M": (31.91 * GIB, "GiB")},
        "sizes_source": "llama.cpp PR #6745, dranger003's Llama 3 70B table (2024-05-03; qbench's "
                        "published.json source llamacpp-pr6745-l3-70b-imatrix)",
    },
    "qwen2.5-0.5b": {
        "params": ("0.49B", "Qwen/Qwen2.5-0.5B README ('Number of Parameters: 0.49B'); read from "
                            "ZHUI/paddlenlp_model_readme Qwen/Qwen2.5-0.5B/index.md @ ffc26950"),
        "sizes": {}, "sizes_source": "no published Q4_K_M size found in the stores searched",
    },
    "qwen2.5-7b": {
        "params": ("7.61B", "Qwen/Qwen2.5-7B README ('Number of Parameters: 7.61B'); read from "
                            "ZHUI/paddlenlp_model_readme Qwen/Qwen2.5-7B/index.md @ ffc26950"),
        "sizes": {}, "sizes_source": "no published Q4_K_M size found in the stores searched",
    },
    "mistral-7b": {
        "params": ("7.25B", "the hub's parameter count of mistralai/Mistral-7B-v0.3 "
                            "(safetensors metadata, as shown on its page)"),
        "sizes": {}, "sizes_source": "no published Q4_K_M size found in the stores searched",
    },
}

def dry_run(f16: Path, quant: str, shape: Any) -> dict[str, Any]:
    """llama.cpp's quantizer in dry-run mode on ``f16`` (qbench.quantize.synthetic_blocks, the
    same call `qbench run` uses for a synthetic variant): each tensor's type, and the tensor
    bytes those types take, counted exactly (each tensor padded to the GGUF alignment) rather
    than read from the quantizer's rounded MiB total."""
    from qbench.inputs import synthetic as syn
    from qbench.quantize.synthetic_blocks import dry_run_types, tensor_nbytes

    types = dry_run_types(f16, quant)
    align = syn.GGUF_ALIGN
    data = sum(-(-tensor_nbytes(types[t.gguf_name], t.shape) // align) * align
               for t in syn.tensor_plan(shape))
    mix: dict[str, int] = {}
    by_type: dict[str, dict[str, int]] = {}
    embed = 0
    for t in syn.tensor_plan(shape):
        name = types[t.gguf_name]
        mix[name] = mix.get(name, 0) + 1
        n = tensor_nbytes(name, t.shape)
        entry = by_type.setdefault(name, {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += n
        if t.gguf_name == "token_embd.weight":
            embed = n
    return {"tensor_bytes": data, "types": mix, "tensor_types": by_type,
            "roles": {"token_embd": types.get("token_embd.weight")}, "embed_bytes": embed}


def sizes(preset: str, types: list[str], work: Path) -> dict[str, Any]:
    """Parameters and per-type predicted file sizes of ``preset`` (nothing but a sparse file),
    each type's footprint as the report reads one (tensor bytes by type, the embedding's type and
    bytes)."""
    from qbench.inputs import synthetic as syn
    from qbench.quantize.gguf import tensor_summary

    shape = syn.load_shape(preset, REPO)
    f16 = work / f"{preset}.gguf"
    syn.write_gguf(shape, 0, f16, data=False, say=lambda m: None)
    header = f16.stat().st_size - syn.gguf_data_bytes(shape)
    summary = tensor_summary(f16)      # the header only: the shape and the F16 type mix
    out: dict[str, Any] = {"params": syn.n_params(shape), "header_bytes": header,
                           "sparse_disk_bytes": f16.stat().st_blocks * 512, "types": {},
                           "shape": summary["shape"]}
    for q in types:
        if q == "F16":
            d = {"tensor_bytes": summary["tensor_bytes"], "types": {},
                 "tensor_types": summary["types"], "roles": summary["roles"],
                 "embed_bytes": summary["traffic"]["embed_bytes"]}
            out["types"][q] = {"predicted_bytes": f16.stat().st_size}
        else:
            d = dry_run(f16, q, shape)
            out["types"][q] = {"predicted_bytes": header + d["tensor_bytes"], "mix": d["types"]}
        out["types"][q]["footprint"] = {
            "file_bytes": out["types"][q]["predicted_bytes"], "tensor_bytes": d["tensor_bytes"],
            "tensor_types": d["tensor_types"], "roles": {"token_embd": d["roles"]["token_embd"]},
            "embed_bytes": d["embed_bytes"]}
    f16.unlink()
    return out


def footprints_file(rows: dict[str, Any]) -> dict[str, Any]:
    """qbench/data/preset_footprints.json (qbench.report.sizes) from the presets' rows."""
    import llama_cpp

    return {"about": "Per synthetic preset and GGUF type: the tensor bytes by type, the token "
                     "embedding's type and bytes, and the file size that llama.cpp's quantizer "
                     "in dry-run mode gives a sparse F16 GGUF of the preset (no weights "
                     "written); the shape as qbench reads it from the GGUF header. Written by "
                     "benchmarks/synthetic_presets.py --write-footprints; read by "
                     "qbench.report.sizes.",
            "llama_cpp_python": llama_cpp.__version__,
            "presets": {p: {"params": r["params"], "shape": r["shape"],
                            "types": {q: t["footprint"] for q, t in r["types"].items()}}
                        for p, r in rows.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="")
    p.add_argument("--types", default="F16,Q8_0,Q4_K_M,Q3_K_M")
    p.add_argument("--measured", action="append", default=[],
                   help="PRESET=TYPE:PATH of a file really quantized, to check the dry run")
    p.add_argument("--memory-ctx", type=int, default=0,
                   help="also the memory each type needs at this context (f16 KV), as the "
                        "recommendation computes it, on this CPU and on a GPU")
    p.add_argument("--write-footprints", type=Path, default=None,
                   help="write the presets' footprints for the report "
                        "(qbench/data/preset_footprints.json)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    from qbench.inputs.synthetic import preset_names
    info = ""
    if a.memory_ctx:
        from qbench.backends.llamacpp import system_info
        info = system_info()

    presets = [x for x in a.presets.split(",") if x] or list(preset_names())
    types = [x for x in a.types.split(",") if x]
    measured: dict[tuple[str, str], int] = {}
    for m in a.measured:
        left, _, path = m.partition(":")
        preset, _, q = left.partition("=")
        measured[(preset, q)] = Path(path).stat().st_size
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            rows[preset] = sizes(preset, types, Path(tmp))
            pub = PUBLISHED.get(preset, {})
            for q, r in rows[preset]["types"].items():
                if (preset, q) in measured:
                    r["measured_bytes"] = measured[(preset, q)]
                if q in pub.get("sizes", {}):
                    value, unit = pub["sizes"][q]
                    r["published_bytes"] = value
                    r["published_unit"] = unit
                    r["vs_published_pct"] = 100 * (r["predicted_bytes"] / value - 1)
            rows[preset]["published"] = pub
            print(f"{preset}: {json.dumps(rows[preset]['types'])}", file=sys.stderr, flush=True)
    print(f"\n{'preset':<15}{'params':>14}{'card':>7}  " + "".join(f"{q:>24}" for q in types))
    for preset, r in rows.items():
        pub = r["published"]
        cells = []
        for q in types:
            t = r["types"][q]
            gb = t["predicted_bytes"] / (GIB if t.get("published_unit") == "GiB" else 1e9)
            unit = t.get("published_unit", "GB")
            cell = f"{gb:.2f} {unit}"
            if "published_bytes" in t:
                cell += f" ({t['vs_published_pct']:+.1f} %)"
            cells.append(f"{cell:>24}")
        print(f"{preset:<15}{r['params']:>14,}{pub.get('params', ('?',))[0]:>7}  " + "".join(cells))
    if a.memory_ctx:   # the report's own computation (qbench.report.sizes) on these rows
        from qbench.report.sizes import answer, preset_rows
        mem = preset_rows(a.memory_ctx, None, {"system_info": info}, footprints_file(rows))
        print(f"\nmemory at {a.memory_ctx:,} tokens, f16 KV, GiB: peak RSS on this CPU (weights "
              "+ repacked copy + KV + runtime) / needs on this CPU (weights + KV + runtime) / "
              "needs on a GPU (weights + KV)")

        def gib(x: float | None) -> str:
            return "      -" if x is None else f"{x:7.2f}"
        for m in mem:
            print(f"{m['preset']:<15}{m['quant']:>8} {gib(m['cpu_peak_gib'])} / "
                  f"{gib(m['cpu_gib'])} / {gib(m['gpu_gib'])}")
        print("\n".join(answer(mem, a.memory_ctx)))
    if a.write_footprints:
        a.write_footprints.write_text(json.dumps(footprints_file(rows), indent=1) + "\n")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
