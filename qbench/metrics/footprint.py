"""What a variant costs on disk and what it really contains, read from the file itself.

For GGUF: llama.cpp's own reader (the ``gguf`` package) gives every tensor's type and size, so a
"Q4_K_M" whose tensors mostly fell back to Q5_0/Q8_0 (SmolLM2's 576-wide rows are not a multiple
of the 256-element K-quant block) shows as what it is. Bits per weight = 8 x tensor bytes /
parameters, as llama-quantize prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbench.backends import backend_function
from qbench.errors import NotApplicable
from qbench.metrics import MetricInfo
from qbench.metrics.context import CellContext

INFO = MetricInfo(
    name="footprint", version="1", primary="file_size_mb", higher_is_better=False,
    implicit=True, own_memory=False, loads_model=False,
    # sizes change when a recipe changes, on purpose: reported by compare, never gated
    reported=("file_size_mb", "bpw"),
    cost=lambda options: 0.02,
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
    """The variant's backend reads its own file format (BackendInfo.footprint): GGUF through
    llama.cpp's reader, a transformers variant from its safetensors and load settings."""
    read = backend_function(ctx.backend_name, "footprint")
    if read is None:
        raise NotApplicable(f"the {ctx.backend_name} backend does not read a footprint from "
                            "its files")
    return read(ctx.artifact_path, ctx.cache_dir)
