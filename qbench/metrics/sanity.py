"""A short greedy generation, flagged when degenerate.

A broken quant or kernel often still yields a finite perplexity; its text gives it away (one
token repeated, a 1-4 token loop, "!!!!"-style punctuation, nothing at all). The flag is stored
with the text so the report can mark the variant untrustworthy instead of averaging it in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from qbench.metrics import NONE, POINTS, MetricInfo, Value
from qbench.metrics.context import CellContext, value

INFO = MetricInfo(
    name="sanity", version="1", primary="degenerate", higher_is_better=False, implicit=True,
    # greedy generation is deterministic: any output turning degenerate is a regression
    values=(Value("degenerate", False, change=POINTS, scale=100.0, tolerance=0.0, spread=NONE),),
    cost=lambda options: 0.1 * max(getattr(options, "max_tokens", 32), 1) / 32.0,
    methodology=(
        "Greedy generation of max_tokens from a fixed prompt; flagged degenerate when nothing is "
        "generated, one token makes up over half of the output, the second half is a loop of "
        "1-4 tokens, or under half of the characters are letters, digits or spaces."),
)


@dataclass(frozen=True)
class Options:
    enabled: bool = True
    prompt: str = "The history of the Roman Empire begins"
    max_tokens: int = 32


def degenerate_reason(tokens: list[int], text: str) -> str | None:
    """Why this output looks broken, or None if it looks like text."""
    if not tokens:
        return "no tokens generated"
    if len(tokens) >= 8:
        tok, count = Counter(tokens).most_common(1)[0]
        if count > len(tokens) / 2:
            return f"token {tok} is {count} of {len(tokens)} tokens"
        tail = tokens[len(tokens) // 2:]
        for period in range(1, 5):
            if len(tail) >= 4 * period and all(tail[i] == tail[i - period]
                                               for i in range(period, len(tail))):
                return f"loops on a {period}-token pattern"
    stripped = text.strip()
    if stripped:
        wordy = sum(ch.isalnum() or ch.isspace() for ch in stripped)
        if wordy < len(stripped) / 2:
            return f"mostly symbols: {stripped[:40]!r}"
    return None


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    backend = ctx.backend
    prompt = backend.tokenize(options.prompt, add_special=True)
    tokens = backend.greedy(prompt, options.max_tokens)
    text = backend.detokenize(tokens)
    reason = degenerate_reason(tokens, text)
    return {"values": {"degenerate": value(1.0 if reason else 0.0, n=len(tokens))},
            "details": {"prompt": options.prompt, "output": text, "reason": reason,
                        "tokens": tokens}}
