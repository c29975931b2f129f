"""The transformers variant names qbench knows, parsed without importing torch.

- ``fp32`` / ``bf16`` / ``fp16``: the unquantized model in that dtype (a base may be one of them).
- ``bnb-int8`` / ``bnb-nf4`` / ``bnb-fp4``: bitsandbytes at load time (LLM.int8, 4-bit NF4/FP4
  with bf16 compute); never saved, since a saved bnb 4-bit checkpoint can come back corrupt.
- ``awq-w{bits}g{group}`` / ``gptq-w{bits}g{group}``: weight-only integer quantization with
  llm-compressor (AWQModifier + QuantizationModifier, GPTQModifier), saved in compressed-tensors
  format and loaded by transformers; e.g. ``awq-w4g64``, ``gptq-w4g128``, ``gptq-w8g128``.
  Bits 2-8, group 16-1024 (a power of two) or ``-1`` spelled ``gc`` for per-channel
  (``gptq-w8gc``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qbench.errors import did_you_mean

FLOAT_TYPES = frozenset({"fp32", "bf16", "fp16"})
BNB_TYPES = frozenset({"bnb-int8", "bnb-nf4", "bnb-fp4"})

# torch dtype name per float type
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# other spellings users write
ALIASES = {
    "float32": "fp32", "f32": "fp32", "float16": "fp16", "f16": "fp16", "half": "fp16",
    "bfloat16": "bf16", "int8": "bnb-int8", "llm.int8": "bnb-int8", "bnb-8bit": "bnb-int8",
    "nf4": "bnb-nf4", "bnb-4bit": "bnb-nf4", "fp4": "bnb-fp4",
}

_INT_QUANT = re.compile(r"^(awq|gptq)-w(\d+)g(\d+|c)$")
METHODS = ("awq", "gptq")

# listed in messages and docs; any awq-w{b}g{g} / gptq-w{b}g{g} is accepted
EXAMPLES = ("fp32", "bf16", "fp16", "bnb-int8", "bnb-nf4", "bnb-fp4", "awq-w4g64", "awq-w4g32",
            "awq-w4g128", "gptq-w4g64", "gptq-w4g128", "gptq-w8g128")

# the bit width each fixed name promises (the measured bits per weight are what reports use)
NOMINAL_BITS = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "bnb-int8": 8.0, "bnb-nf4": 4.0,
               "bnb-fp4": 4.0}


@dataclass(frozen=True)
class IntQuant:
    """A parsed ``awq-w{bits}g{group}`` / ``gptq-w{bits}g{group}``."""

    method: str        # awq | gptq
    bits: int
    group_size: int    # -1: per output channel

    @property
    def name(self) -> str:
        g = "c" if self.group_size < 0 else str(self.group_size)
        return f"{self.method}-w{self.bits}g{g}"


def parse_int_quant(name: str) -> IntQuant | None:
    """``awq-w4g64`` -> IntQuant('awq', 4, 64); None when ``name`` is not of that form or out of
    range."""
    m = _INT_QUANT.match(name.strip().lower())
    if not m:
        return None
    method, bits, group = m.group(1), int(m.group(2)), m.group(3)
    group_size = -1 if group == "c" else int(group)
    if not 2 <= bits <= 8:
        return None
    if group_size != -1 and (group_size < 16 or group_size > 1024
                             or group_size & (group_size - 1)):
        return None
    return IntQuant(method, bits, group_size)


def canonical(name: str) -> str | None:
    """The qbench spelling of ``name`` (case-insensitive), or None if it is not a known type."""
    low = name.strip().lower()
    low = ALIASES.get(low, low)
    if low in FLOAT_TYPES or low in BNB_TYPES:
        return low
    parsed = parse_int_quant(low)
    return parsed.name if parsed else None


def kind(name: str) -> str:
    """float | bnb | awq | gptq, for a canonical name."""
    if name in FLOAT_TYPES:
        return "float"
    if name in BNB_TYPES:
        return "bnb"
    parsed = parse_int_quant(name)
    if parsed is None:
        raise ValueError(f"not a transformers quant: {name!r}")
    return parsed.method


def unknown_message(name: str) -> str:
    """The error text for a name that is not a transformers variant."""
    low = name.strip().lower()
    m = re.match(r"^(awq|gptq)-w(\d+)g(\d+|c)$", low)
    if m:
        return (f"unsupported {m.group(1).upper()} settings in '{name}': bits must be 2-8 and "
                "the group size a power of two from 16 to 1024, or 'c' for per-channel "
                "(e.g. awq-w4g64, gptq-w8g128)")
    return (f"unknown transformers quant '{name}'{did_you_mean(low, EXAMPLES)}; expected one of "
            f"{', '.join(EXAMPLES[:6])} or awq-w{{bits}}g{{group}} / gptq-w{{bits}}g{{group}} "
            "(e.g. awq-w4g64, gptq-w4g128)")


def nominal_bits(name: str) -> float | None:
    """The bit width a transformers variant's name promises: fp32 32, bf16/fp16 16, bnb-int8 8,
    bnb-nf4/fp4 4, awq-w4g64 4 (the measured bits per weight are the footprint metric's)."""
    low = ALIASES.get(name.strip().lower(), name.strip().lower())
    if low in NOMINAL_BITS:
        return NOMINAL_BITS[low]
    parsed = parse_int_quant(low)
    return float(parsed.bits) if parsed else None


def method_of(name: str) -> str:
    """awq | gptq | bnb, for a quantized transformers variant."""
    low = ALIASES.get(name.strip().lower(), name.strip().lower())
    if low in BNB_TYPES:
        return "bnb"
    parsed = parse_int_quant(low)
    return parsed.method if parsed else "other"
