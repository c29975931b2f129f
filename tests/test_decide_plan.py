"""The level ``--until-decided`` judges at counts every look spent on a variant, including
looks an earlier run made under another plan (another [decide] max_chunks): Bonferroni holds
only over all the looks actually taken."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from qbench.results.sequential import level
from qbench.run.decide import Open, run_until_decided
from qbench.suite.config import load_suite

SUITE = """
[suite]
name = "d"
[[models]]
id = "m"
source = "{gguf}"
base = "F16"
[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0"]
metrics = ["perplexity"]
[metrics.perplexity]
dataset = "wikitext-2"
ctx = 256
chunks = 8
[decide]
max_chunks = 32
"""


class Records:
    """The part of a Store run_until_decided reads before it measures anything."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self._records = records

    def records(self) -> list[dict[str, Any]]:
        return self._records


def ppl(chunks: int, decide: dict[str, Any] | None) -> dict[str, Any]:
    rec = {"suite": "d", "metric": "perplexity", "status": "ok", "model": {"id": "m"},
           "variant": {"backend": "llama.cpp", "quant": "Q8_0"},
           "details": {"chunks": chunks, "ctx": 256, "tokens_in_text": 256 * 1000}}
    return rec | ({"decide": decide} if decide else {})


@pytest.mark.parametrize("earlier, spent", [
    ([], 3),                       # this plan's looks: 8, 16, 32
    ([16], 3),                     # an earlier look at one of this plan's sizes: nothing more
    ([16, 64, 128], 5),            # a run with a higher ceiling looked at 64 and 128 too
])
def test_earlier_looks_count(tmp_path: Path, earlier: list[int], spent: int) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    path = tmp_path / "d.toml"
    path.write_text(SUITE.format(gguf=gguf))
    suite = load_suite(path)
    recs = [ppl(8, None)] + [ppl(n, {"alpha": 0.05, "looks": [8, 16, 64, 128]})
                             for n in earlier]
    out = io.StringIO()
    summary = run_until_decided(suite, None, Records(recs),  # type: ignore[arg-type]
                                open_variants=lambda records, lvl: {},
                                console=Console(file=out, width=200))
    assert summary.plan == [8, 16, 32]
    assert summary.level == pytest.approx(level(0.05, spent))
    assert f"spent over {spent} looks" in out.getvalue()
    assert ("of an earlier plan" in out.getvalue()) == (spent > 3)


@pytest.mark.parametrize("needed, chunks, expect", [
    (5600, 8, "futile"),           # 5.6x the text: not grown, said so (nothing is run)
    (1000, 32, "ceiling"),         # resolvable in principle, but the plan's last look is made
])
def test_open_variants_that_more_chunks_cannot_decide_stop(tmp_path: Path, needed: int,
                                                           chunks: int, expect: str) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    path = tmp_path / "d.toml"
    path.write_text(SUITE.format(gguf=gguf))
    suite = load_suite(path)
    recs = [ppl(chunks, None)]
    key = ("m", "llama.cpp", "Q8_0")
    out = io.StringIO()
    summary = run_until_decided(suite, None, Records(recs),  # type: ignore[arg-type]
                                open_variants=lambda records, lvl: {
                                    key: Open("ΔPPL +0.47 %", needed, 1000)},
                                console=Console(file=out, width=200))
    text = " ".join(out.getvalue().split())
    assert summary.rounds == []
    assert (key in summary.futile) == (expect == "futile")
    assert (key in summary.open_at_ceiling) == (expect == "ceiling")
    assert "stopped with 1 decision(s) open" in text
    if expect == "futile":
        assert "not measured further: m/llama.cpp/Q8_0" in text and "the text holds 1,000" in text


@pytest.mark.parametrize("decide, resolve, says", [
    (None, {"resolvable": True, "text": "about 280 chunks would resolve it"},
     "qbench run --until-decided would measure it further"),
    (None, {"resolvable": False, "text": "cannot be resolved with this dataset: about 5,600"},
     "cannot be resolved with this dataset: about 5,600"),
    ({"look": 3, "looks": [8, 16, 32]}, {"resolvable": True, "text": "about 64 chunks"},
     "look 3 of 3): ΔPPL +0.47 %; still open at the plan's ceiling"),
])
def test_the_report_says_why_an_undecided_variant_stays_open(
        decide: dict[str, Any] | None, resolve: dict[str, Any], says: str) -> None:
    from qbench.report.recommend import _open_text
    cell = {"details": {"chunks": 32, "scored_tokens": 8160}} | ({"decide": decide}
                                                                 if decide else {})
    text = _open_text({"row": {"cells": {"perplexity": cell}}, "label": "m / Q8_0",
                       "interval": "ΔPPL +0.47 %", "resolve": resolve})
    assert text.startswith("m / Q8_0 is undecided after 32 chunks (8,160 tokens")
    assert says in text
