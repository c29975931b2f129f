"""What a variant costs on disk and what it really contains, read from the file itself.

For GGUF: llama.cpp's own reader (the ``gguf`` package) gives every tensor's type and size, so a
"Q4_K_M" whose tensors mostly fell back to Q5_0/Q8_0 (SmolLM2's 576-wide rows are not a multiple
of the 256-element K-quant block) shows as what it is. Bits per weight = 8 x tensor bytes /
parameters, as llama-quantize prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbench.metrics import MetricInfo
from qbench.metrics.context import CellContext, value

INFO = MetricInfo(
    name="footprint", version="1", primary="file_size_mb", higher_is_better=False,
    implicit=True,
    methodology=(
        "Read from the model file: size on disk; parameters, bytes and type of every tensor "
        "(GGUF via llama.cpp's gguf reader); bits per weight = 8 x tensor bytes / parameters, "
        "as llama-quantize reports it; the fp16 rule of thumb 2 bytes x parameters for "
        "comparison."),
)


@dataclass(frozen=True)
class Options:
    enabled: bool = True


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    if ctx.artifact_path.name == "variant.json" or ctx.artifact.get("format") == "hf":
        from qbench.quantize.hf import footprint  # a transformers variant: safetensors + load settings
        return footprint(ctx.artifact_path)
    from qbench.quantize.gguf import inspect_gguf

    summary = inspect_gguf(ctx.artifact_path, ctx.cache_dir)
    # a split GGUF is all of its shards: the reader sums them (the first shard alone is a
    # fraction of what a user downloads and loads)
    size = summary.get("file_bytes") or ctx.artifact_path.stat().st_size
    n_params = summary["n_params"]
    return {
        "values": {
            "file_size_mb": value(size / 2**20, unit="MiB"),
            "bpw": value(summary["bpw"], unit="bits/weight"),
            "n_params": value(n_params),
            "fp16_estimate_mb": value(2 * n_params / 2**20, unit="MiB"),
        },
        "details": {"tensor_types": summary["types"], "file_type": summary["file_type"],
                    "architecture": summary["architecture"], "shape": summary["shape"],
                    "n_tensors": summary["n_tensors"], "file_size_bytes": size},
    }
