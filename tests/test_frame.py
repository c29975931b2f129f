"""qbench.load / load_details (pandas) and `qbench export --format parquet`: typed columns,
a lossless round trip, per-question / per-chunk details for paired analyses, and a clear error
naming the extra when pandas or pyarrow is missing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import qbench
from qbench.cli import main
from qbench.errors import MissingExtraError, QbenchError
from qbench.results.export import COLUMNS
from synthetic_records import make_record
from qbench.results.schema import STATUSES
from qbench.results.store import Store

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

QIDS = [3, 7, 11, 19]


def _v(value: float, stderr: float | None = None, n: int | None = None, **extra) -> dict:
    return {"value": value, "stderr": stderr, "n": n} | extra


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A suite 'demo': two GGUF variants with PPL, MMLU and speed cells, one crashed cell,
    one skipped transformers cell."""
    store = Store(tmp_path / "results", "demo")
    for quant, ppls, correct in (("f16", [10.0, 12.0], [1, 1, 0, 1]),
                                 ("Q4_K_M", [11.0, 13.5], [1, 0, 1, 0])):
        store.save(make_record("m", "llama.cpp", quant, "perplexity", is_base=quant == "f16",
                               values={"ppl": _v(sum(ppls) / 2, 0.3, 256),
                                       "bits_per_byte": _v(1.1, None, 256, unit="bits/byte")},
                               details={"per_chunk_ppl": ppls}
                               | ({"per_chunk_nll_sum": [math.log(x) * 100 for x in ppls],
                                   "per_chunk_tokens": [100, 100]} if quant == "f16" else {})))
        if quant != "f16":
            store.save(make_record("m", "llama.cpp", quant, "kld",
                                   values={"kld_mean": _v(0.05, 0.001, 200)},
                                   details={"per_chunk_kld": [0.04, 0.06],
                                            "per_chunk_same_top": [0.9, 0.8]}))
        acc = sum(correct) / len(correct)
        store.save(make_record("m", "llama.cpp", quant, "mmlu",
                               values={"acc": _v(acc, 0.2, len(correct))},
                               details={"question_ids": QIDS, "correct": correct,
                                        "predicted": ["A", "B", "C", "D"]}))
        store.save(make_record("m", "llama.cpp", quant, "speed", values={
            "tg_tokens_per_s": _v(50.0, 1.0, 3, unit="tokens/s", samples=[49.0, 50.0, 51.0],
                                  tokens=128)}))
    store.save(make_record("m", "llama.cpp", "Q2_K", "perplexity", status="crashed",
                           error="the cell process died of SIGSEGV"))
    store.save(make_record("m", "transformers", "bnb-nf4", "mmlu", status="skipped",
                           error="bitsandbytes is not installed"))
    return store.dir


def test_load_is_the_export_table_with_types(results, capsys):
    df = qbench.load(results)
    assert list(df.columns) == list(COLUMNS)
    assert main(["export", str(results)]) == 0
    exported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(df) == len(exported) == 2 * 4 + 1 + 2   # 4 values per variant, KLD, 2 failed
    assert df["value"].dtype == "float64" and df["stderr"].dtype == "float64"
    assert str(df["n"].dtype) == "Int64"
    for col in ("suite", "model", "backend", "quant", "metric", "name", "status"):
        assert isinstance(df[col].dtype, pd.CategoricalDtype), col
    assert list(df["status"].cat.categories) == list(STATUSES)
    rows = df.set_index(["quant", "metric", "name"])
    assert rows.loc[("Q4_K_M", "perplexity", "ppl"), "value"] == pytest.approx(12.25)
    assert rows.loc[("Q4_K_M", "perplexity", "ppl"), "n"] == 256
    crashed = df[df["status"] == "crashed"].iloc[0]
    assert crashed["quant"] == "Q2_K" and math.isnan(crashed["value"])
    assert crashed["error"] == "the cell process died of SIGSEGV"
    assert crashed["id"] == "m/llama.cpp/Q2_K/perplexity" and len(crashed["key"]) == 24


def test_the_readme_pivot_works(results):
    df = qbench.load(results)
    ok = df[df["status"] == "ok"]
    wide = ok.pivot_table(index=["backend", "quant"], columns=["metric", "name"],
                          values="value", observed=True)
    assert wide.loc[("llama.cpp", "f16"), ("perplexity", "ppl")] == pytest.approx(11.0)
    assert wide.loc[("llama.cpp", "Q4_K_M"), ("mmlu", "acc")] == pytest.approx(0.5)


def test_parquet_export_round_trips_through_load(results, tmp_path, capsys):
    out = tmp_path / "out" / "demo.parquet"
    assert main(["export", str(results), "--format", "parquet", "-o", str(out)]) == 0
    assert "wrote 11 rows" in capsys.readouterr().err
    assert out.read_bytes()[:4] == b"PAR1"
    pd.testing.assert_frame_equal(qbench.load(out), qbench.load(results))
    # a Parquet file and a results folder load together, with the same types
    both = qbench.load([out, results])
    assert len(both) == 22 and isinstance(both["quant"].dtype, pd.CategoricalDtype)
    assert set(both["quant"].cat.categories) == {"f16", "Q4_K_M", "Q2_K", "bnb-nf4"}


def test_parquet_needs_an_output_file(results, capsys):
    assert main(["export", str(results), "--format", "parquet"]) == 1
    assert "give the file to write with -o FILE" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["pandas", "pyarrow"])
def test_a_missing_extra_is_named(results, tmp_path, capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)     # import now raises ImportError
    out = tmp_path / "x.parquet"
    assert main(["export", str(results), "--format", "parquet", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"'{missing}'" in err and "pip install 'qbench-llm[pandas]'" in err
    assert not out.exists()
    if missing == "pandas":
        with pytest.raises(MissingExtraError, match=r"qbench-llm\[pandas\]"):
            qbench.load(results)


def test_mmlu_details_give_paired_outcomes(results):
    d = qbench.load_details(results, metric="mmlu")
    assert len(d) == 2 * len(QIDS)                    # the skipped cell has no questions
    assert d["correct"].dtype == bool and d["question_id"].dtype == "int64"
    assert list(d["predicted"].cat.categories) == list("ABCD")
    paired = d.pivot_table(index="question_id", columns="quant", values="correct",
                           observed=True)
    flips = paired[paired["f16"] != paired["Q4_K_M"]]
    assert list(flips.index) == [7, 11, 19]
    assert set(d["id"]) == {"m/llama.cpp/f16/mmlu", "m/llama.cpp/Q4_K_M/mmlu"}


def test_perplexity_details_give_per_chunk_nll(results):
    d = qbench.load_details(results, metric="perplexity")
    assert len(d) == 4                                # two ok cells x two chunks; crash left out
    q4 = d[d["quant"] == "Q4_K_M"].sort_values("chunk")
    assert list(q4["ppl"]) == [11.0, 13.5]
    assert list(q4["mean_nll"]) == pytest.approx([math.log(11.0), math.log(13.5)])
    assert q4["nll_sum"].isna().all() and q4["tokens"].isna().all()   # an older record
    f16 = d[d["quant"] == "f16"].sort_values("chunk")               # sums and token counts
    assert list(f16["tokens"]) == [100, 100] and str(f16["tokens"].dtype) == "Int64"
    assert list(f16["mean_nll"]) == pytest.approx([math.log(10.0), math.log(12.0)])


def test_kld_details_give_per_chunk_kld(results):
    d = qbench.load_details(results, metric="kld")
    assert list(d["kld_mean"]) == [0.04, 0.06] and list(d["same_top_frac"]) == [0.9, 0.8]
    assert set(d["quant"]) == {"Q4_K_M"}


def test_speed_details_give_each_repetition(results):
    d = qbench.load_details(results, metric="speed")
    assert list(d[d["quant"] == "f16"]["tokens_per_s"]) == [49.0, 50.0, 51.0]
    assert list(d["repetition"][:3]) == [0, 1, 2] and set(d["name"]) == {"tg_tokens_per_s"}


def test_details_of_an_unknown_metric_is_an_error(results):
    with pytest.raises(QbenchError, match="no per-item details for metric 'sanity'"):
        qbench.load_details(results, metric="sanity")


def test_plain_import_and_run_path_never_import_pandas():
    code = ("import sys, qbench, qbench.cli, qbench.run.runner, qbench.run.summary, qbench.results.export,"
            " qbench.report.build, qbench.run.worker;"
            "qbench.cli.build_parser();"
            "assert 'pandas' not in sys.modules and 'pyarrow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
