"""The llama.cpp quantization types qbench knows, by the names `llama-quantize` uses.

Kept as a static table so `qbench validate` works without importing llama-cpp-python; a test
checks every id against the installed ``llama_cpp.LLAMA_FTYPE_MOSTLY_*`` constants.
"""

from __future__ import annotations

import re

from qbench.errors import did_you_mean

# name -> llama_ftype value (llama.h, enum llama_ftype)
FTYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
}

# Unquantized storage types: a base may be one of these.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})

# llama-quantize refuses these without an importance matrix (quantize.cpp).
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"})

def canonical(name: str) -> str | None:
    """The llama.cpp spelling of ``name`` (case-insensitive), or None if it is not a type."""
    upper = name.strip().upper()
    return upper if upper in FTYPES else None


def unknown_message(name: str) -> str:
    """The error text for a name that is not a llama.cpp type."""
    return f"unknown llama.cpp type '{name}'{did_you_mean(name, FTYPES)}"


def nominal_bits(name: str) -> float | None:
    """The bit width a llama.cpp type's name promises: F32 32, F16/BF16 16, Q8_0 8, Q4_K_M 4,
    IQ3_XXS 3, TQ2_0 2 (the measured bits per weight are the footprint metric's)."""
    q = name.strip().upper()
    if q == "F32":
        return 32.0
    if q in ("F16", "BF16"):
        return 16.0
    m = re.match(r"^(?:I?Q|TQ)(\d)", q)
    return float(m.group(1)) if m else None


def method_of(name: str) -> str:
    """Every quantized llama.cpp type is a GGUF quant (float types are classed by the caller)."""
    return "gguf"


# KV-cache element types llama.cpp accepts for type_k / type_v (ggml_type values, ggml.h), and
# their bytes per element (block size / elements per block) for the memory estimate. Quantizing
# V needs flash attention, which qbench then turns on.
KV_CACHE_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2,
                                  "q4_1": 3, "q5_0": 6, "q5_1": 7, "iq4_nl": 20}
KV_BYTES_PER_ELEMENT: dict[str, float] = {"f32": 4.0, "f16": 2.0, "bf16": 2.0,
                                          "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                                          "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
KV_DEFAULT = "f16"


def canonical_kv(name: str) -> str | None:
    low = name.strip().lower()
    return low if low in KV_CACHE_TYPES else None


# Tensor storage types llama-quantize's --output-tensor-type / --token-embedding-type take
# (ggml_type values, ggml.h; llama_model_quantize_params.output_tensor_type and
# token_embedding_type). Spelled as ggml_type_name upper-cased; the CLI matches them case-
# insensitively. A K-quant on a row not a multiple of 256 wide (SmolLM2's 576) is replaced by
# llama.cpp with a type that fits: the report shows the type the file really holds.
TENSOR_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10,
    "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ2_XS": 17,
    "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23,
    "IQ1_M": 29, "BF16": 30, "TQ1_0": 34, "TQ2_0": 35,
}
# ... of which llama-quantize refuses these without an importance matrix
TENSOR_TYPES_NEED_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S"})


def canonical_tensor_type(name: str) -> str | None:
    """The ggml spelling of a tensor type (case-insensitive), None when it is not one."""
    upper = name.strip().upper()
    return upper if upper in TENSOR_TYPES else None
