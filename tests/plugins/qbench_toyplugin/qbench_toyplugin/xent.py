"""The ``toy_xent`` metric: mean cross-entropy (nats) of each next byte of a fixed sentence
given its prefix: lower is better."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qbench.metrics import MetricInfo, Pairing, Value
from qbench.metrics.context import CellContext, value

INFO = MetricInfo(
    name="toy_xent", version="1", primary="xent", higher_is_better=False,
    methodology="Mean cross-entropy of each next byte of a fixed sentence given its prefix "
                "(a plugin metric, for tests).",
    # its value declared once: paired by byte (the same sentence, the same prefixes), shown in
    # its own column and drawn against bits per weight - qbench names none of it
    values=(Value("xent", False, tolerance=2.0, column="toy cross-entropy (nats)", digits=4,
                  figure="Toy cross-entropy vs bits per weight",
                  pairing=Pairing(items="per_byte", unit="bytes", identity=("prefixes",))),),
    cost=lambda options: 0.01,
)

SENTENCE = "the quick brown fox jumps over the lazy dog"


@dataclass(frozen=True)
class Options:
    prefixes: int = 20

    def validate(self, *, file: str, key: str) -> None:
        if self.prefixes < 2:
            from qbench.errors import ConfigError
            raise ConfigError("expected at least 2 prefixes", file=file, key=f"{key}.prefixes")


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    backend = ctx.backend
    tokens = backend.tokenize(SENTENCE, add_special=True)
    n = min(options.prefixes, len(tokens) - 1)
    prompts = [tokens[:i] for i in range(1, n + 1)]
    nll = []
    for i, logits in enumerate(backend.last_logits(prompts), start=1):
        lg = np.asarray(logits, dtype=np.float64)
        lse = lg.max() + np.log(np.exp(lg - lg.max()).sum())
        nll.append(float(lse - lg[tokens[i]]))
    arr = np.asarray(nll)
    return {"values": {"xent": value(arr.mean(), arr.std(ddof=1) / np.sqrt(len(arr)),
                                     len(arr), "nats")},
            "details": {"per_byte": nll}}
