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
        return list(self._records)      # a snapshot, as Store.records() reads the files


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
    key = ("m", "llama.cpp", "Q8_0", "perplexity")
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


SUITE_MMLU = SUITE.replace('metrics = ["perplexity"]',
                           'metrics = ["perplexity", "mmlu"]').replace(
    "[decide]\n", "[metrics.mmlu]\nsubset = 57\n[decide]\nmax_questions = 456\n"
    "memory_budget_gb = 2\n")


class GrowingStore(Records):
    """Records, plus what each fake look adds: a cell of the grown size per id it ran."""

    def add(self, ids: tuple[str, ...], metric: str, size: int,
            decide: dict[str, Any]) -> None:
        for cid in ids:
            quant = cid.split("/")[2]
            rec = mmlu(size, quant) if metric == "mmlu" else ppl(size, None) | {
                "variant": {"backend": "llama.cpp", "quant": quant}}
            self._records.append(rec | {"decide": decide})


def mmlu(n: int, quant: str = "Q8_0") -> dict[str, Any]:
    return {"suite": "d", "metric": "mmlu", "status": "ok", "model": {"id": "m"},
            "variant": {"backend": "llama.cpp", "quant": quant},
            "details": {"n": n, "questions_in_dataset": 14042}}


def test_an_open_mmlu_decision_grows_the_questions_of_the_variant_and_its_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qbench.run.decide as decide
    from qbench.results.sequential import looks

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    path = tmp_path / "d.toml"
    path.write_text(SUITE_MMLU.format(gguf=gguf))
    suite = load_suite(path)
    assert suite.decide.budget_gib == 2
    store = GrowingStore([ppl(8, None), mmlu(57), mmlu(57, "F16")])
    calls: list[dict[str, Any]] = []

    def fake_run(grown: Any, ctx: Any, st: GrowingStore, *, only: tuple[str, ...],
                 decide: dict[str, Any], **kw: Any) -> Any:
        metric = only[0].rsplit("/", 1)[1]
        size = grown.metrics["mmlu"].subset if metric == "mmlu" else \
            grown.metrics["perplexity"].chunks
        calls.append({"ids": only, "metric": metric, "size": size, "decide": decide})
        st.add(only, metric, size, decide)
        return type("S", (), {"counts": {"ok": len(only)}, "any_failed": False})()

    def still_open(records: list[dict[str, Any]], lvl: float) -> dict[Any, Open]:
        q8 = max(r["details"]["n"] for r in records if r["metric"] == "mmlu"
                 and r["variant"]["quant"] == "Q8_0")
        return {} if q8 >= 200 else {("m", "llama.cpp", "Q8_0", "mmlu"): Open(
            "claim 1: drop +0.4 pts [-0.6, +1.3]", 660, 14042)}

    monkeypatch.setattr(decide, "run_suite", fake_run)
    out = io.StringIO()
    summary = decide.run_until_decided(suite, None, store,  # type: ignore[arg-type]
                                       open_variants=still_open,
                                       console=Console(file=out, width=200))
    q_plan, c_plan = looks(57, 456, 2.0), looks(8, 32, 2.0)
    assert summary.plans == {"perplexity": c_plan, "mmlu": q_plan}
    k = max(len(q_plan), len(c_plan))           # one level for every metric's looks
    assert summary.level == pytest.approx(level(0.05, k))
    # only MMLU grew, only for the open variant and the base it is paired with, look by look
    assert [(c["metric"], c["size"]) for c in calls] == [("mmlu", 114), ("mmlu", 228)]
    assert all(c["ids"] == ("m/llama.cpp/F16/mmlu", "m/llama.cpp/Q8_0/mmlu") for c in calls)
    assert [c["decide"]["look"] for c in calls] == [2, 3]
    assert all(c["decide"]["n_looks"] == k and c["decide"]["looks"] == q_plan for c in calls)
    text = " ".join(out.getvalue().split())
    assert f"looks at {c_plan} chunks and looks at {q_plan} questions" in text
    assert "every decision more data can settle is made after 2 more look(s): 114 questions" in text


def test_a_futile_mmlu_decision_is_said_in_questions(tmp_path: Path) -> None:
    from qbench.run.decide import run_until_decided

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    path = tmp_path / "d.toml"
    path.write_text(SUITE_MMLU.format(gguf=gguf))
    suite = load_suite(path)
    key = ("m", "llama.cpp", "Q8_0", "mmlu")
    out = io.StringIO()
    summary = run_until_decided(suite, None,  # type: ignore[arg-type]
                                Records([ppl(8, None), mmlu(57), mmlu(57, "F16")]),
                                open_variants=lambda records, lvl: {
                                    key: Open("claim 1: drop +0.1 pts", 90_000, 14042)},
                                console=Console(file=out, width=200))
    text = " ".join(out.getvalue().split())
    assert key in summary.futile and summary.rounds == []
    assert ("not measured further: m/llama.cpp/Q8_0 (questions)" in text
            and "about 90,000 questions would decide it at 80 % power, the dataset holds "
            "14,042" in text)


@pytest.mark.parametrize("decide_table, expect", [
    ("max_tokens = 4080", 16),          # 255 scored tokens a chunk: 16 chunks
    ("max_tokens = 4080\nmax_chunks = 12", 12),   # the smaller ceiling wins
    ("", 1000),                         # the text's end
])
def test_the_chunk_ceiling_takes_max_tokens_in_scored_tokens(tmp_path: Path, decide_table: str,
                                                             expect: int) -> None:
    from qbench.run.decide import SAMPLES, ceiling

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    path = tmp_path / "d.toml"
    path.write_text(SUITE.format(gguf=gguf).replace("max_chunks = 32", decide_table))
    rec = ppl(8, None)
    rec["details"]["scored_tokens"] = 8 * 255
    assert ceiling(load_suite(path), [rec], SAMPLES["perplexity"]) == expect


def test_the_budget_is_given_once(tmp_path: Path) -> None:
    from qbench.errors import ConfigError

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    path = tmp_path / "d.toml"
    path.write_text(SUITE_MMLU.format(gguf=gguf) + "memory_budget_gib = 2\n")
    with pytest.raises(ConfigError, match="give the budget once") as info:
        load_suite(path)
    assert info.value.key == "decide.memory_budget_gb"


def test_a_model_whose_text_holds_fewer_chunks_stops_at_its_own_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two models cut the same text into different numbers of chunks (their tokenizers): the
    plan's ceiling is the larger, but a variant of the other model is grown only to its own
    text's end, then named as open there - never asked for the same look again."""
    import qbench.run.decide as decide

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    path = tmp_path / "d.toml"
    path.write_text(SUITE.format(gguf=gguf).replace("max_chunks = 32", "max_chunks = 64"))
    suite = load_suite(path)

    def rec(model: str, quant: str, chunks: int, held: int) -> dict[str, Any]:
        r = ppl(chunks, None) | {"model": {"id": model},
                                 "variant": {"backend": "llama.cpp", "quant": quant}}
        r["details"] = dict(r["details"], tokens_in_text=256 * held)
        return r

    store = GrowingStore([rec("big", "F16", 8, 64), rec("m", "F16", 8, 40),
                          rec("m", "Q8_0", 8, 40)])
    looks_run: list[int] = []

    def fake_run(grown: Any, ctx: Any, st: GrowingStore, *, only: tuple[str, ...],
                 **kw: Any) -> Any:
        size = grown.metrics["perplexity"].chunks
        looks_run.append(size)
        for cid in only:
            st._records.append(rec("m", cid.split("/")[2], min(size, 40), 40))
        assert len(looks_run) < 10, "the same look asked for again and again"
        return type("S", (), {"counts": {"ok": len(only)}, "any_failed": False})()

    key = ("m", "llama.cpp", "Q8_0", "perplexity")
    monkeypatch.setattr(decide, "run_suite", fake_run)
    out = io.StringIO()
    summary = decide.run_until_decided(suite, None, store,  # type: ignore[arg-type]
                                       open_variants=lambda records, lvl: {
                                           key: Open("ΔPPL +0.47 %", 100, 40)},
                                       console=Console(file=out, width=200))
    assert summary.plan == [8, 16, 32, 64]
    assert looks_run == [16, 32, 40]          # its own text's end, not the plan's 64
    assert key in summary.open_at_ceiling
    assert "stopped with 1 decision(s) open" in " ".join(out.getvalue().split())
