"""Per-token numbers stored in a record at two bytes a token: a log-scale uint16 code.

Why not float16: its smallest normal number is 6.1e-5 and its smallest subnormal 6e-8, so the
per-token KLD of a near-lossless variant (1e-6 .. 1e-4 nats on most tokens) would be stored in
subnormals with one to ten significant bits, or flushed to 0 (exllamav3 moved its per-token KLD
side files from fp16 to fp32 for exactly this). A uint16 code of log2(x) spends its 65,535
steps evenly over 64 octaves: from 2^-40 (9.1e-13) to 2^24 (1.7e7), each step 2^(1/1024), so
any stored value is within 0.034 % of the original, at every scale. Code 0 is "0 or below
2^-40" (a KL divergence is never negative; the unbiased estimator's rounding can give -1e-17).

The codes travel base64-encoded inside the record's ``details`` (2,040 tokens of the default
suite: 5.4 KB per cell), so they merge, export and compare with the record itself; no side
file can go missing.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np

ENCODING = "log2-uint16"
LOG2_MIN = -40.0          # code 1 is 2^-40
STEPS_PER_OCTAVE = 1024   # 64 octaves in 65,535 codes
_MAX_CODE = 65535


def encode(values: np.ndarray) -> dict[str, Any]:
    """``values`` (non-negative, in order) as a JSON-able record entry of 2 bytes each."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected one number per token, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("per-token values must be finite")
    codes = np.zeros(len(x), dtype=np.uint16)
    pos = x >= 2.0 ** LOG2_MIN
    steps = np.rint((np.log2(x[pos]) - LOG2_MIN) * STEPS_PER_OCTAVE) + 1
    codes[pos] = np.clip(steps, 1, _MAX_CODE).astype(np.uint16)
    return {"encoding": ENCODING, "log2_min": LOG2_MIN, "steps_per_octave": STEPS_PER_OCTAVE,
            "n": int(len(x)), "data": base64.b64encode(codes.astype("<u2").tobytes()).decode()}


def decode(entry: Mapping[str, Any] | None) -> np.ndarray | None:
    """The per-token values of an :func:`encode` entry (None when absent or not this
    encoding, so a record from another version reads as "no per-token data")."""
    if not isinstance(entry, Mapping) or entry.get("encoding") != ENCODING:
        return None
    try:
        codes = np.frombuffer(base64.b64decode(str(entry["data"])), dtype="<u2")
        lo, steps = float(entry["log2_min"]), float(entry["steps_per_octave"])
    except (KeyError, ValueError, TypeError):
        return None
    if len(codes) != int(entry.get("n", len(codes))):
        return None
    out = np.zeros(len(codes), dtype=np.float64)
    nz = codes > 0
    out[nz] = np.exp2((codes[nz].astype(np.float64) - 1) / steps + lo)
    return out


def per_token(details: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """name -> values of every per-token series a record's details carry (``per_token``):
    what the report's paired histograms read, for any metric that stores them."""
    got = (details or {}).get("per_token")
    if not isinstance(got, Mapping):
        return {}
    out = {}
    for name, entry in got.items():
        values = decode(entry)
        if values is not None:
            out[str(name)] = values
    return out
