"""`--shard i/n`: every cell in exactly one shard, the same split on every machine, balanced."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from qbench.suite.config import load_suite
from qbench.errors import QbenchError
from qbench.suite.plan import PlanContext, expand
from qbench.suite.shard import (assign_shards, estimate_cost, model_params_b, parse_shard, precision_factor, select_shard, shard_loads, shard_selector)

# three model sizes, a ladder, all the metrics that need no data dir (hf: sources are never
# downloaded by planning)
SUITE = """
[suite]
name = "shardy"

[[models]]
id = "qwen2.5-0.5b"
source = "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-fp16.gguf"
base = "F16"

[[models]]
id = "qwen2.5-7b"
source = "hf:Qwen/Qwen2.5-7B-Instruct-GGUF/qwen2.5-7b-instruct-fp16-00001-of-00004.gguf"
base = "F16"

[[models]]
id = "qwen2.5-72b"
source = "hf:Qwen/Qwen2.5-72B-Instruct-GGUF/qwen2.5-72b-instruct-fp16-00001-of-00042.gguf"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]

[metrics.perplexity]
dataset = "text.txt"
ctx = 512
chunks = 16

[metrics.kld]

[metrics.speed]
"""


@pytest.fixture
def cells(tmp_path: Path, write_suite) -> list:
    (tmp_path / "text.txt").write_text("evaluation text\n" * 100)
    suite = load_suite(write_suite(SUITE))
    ctx = PlanContext(base_dir=tmp_path, data_dir=None, cache_dir=tmp_path / "cache")
    return expand(suite, ctx)


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [("1/1", (1, 1)), ("2/4", (2, 4)), (" 3 / 3 ", (3, 3)),
                                           ("10/12", (10, 12))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text,why", [
    ("0/4", "between 1 and 4"), ("5/4", "between 1 and 4"), ("2/0", "at least 1 shard"),
    ("2", "I/N"), ("a/b", "I/N"), ("-1/4", "I/N"), ("1/4/2", "I/N"), ("", "I/N"),
    ("1.5/4", "I/N")])
def test_parse_shard_rejects(text, why):
    with pytest.raises(QbenchError) as err:
        parse_shard(text)
    assert why in str(err.value)
    assert "--shard" in str(err.value)


def test_shard_selector(cells):
    assert shard_selector(None) is None
    assert shard_selector("") is None
    with pytest.raises(QbenchError):
        shard_selector("3/2")
    assert shard_selector("1/1")(cells) == cells  # one shard: everything, in plan order
    assert shard_selector("2/3")(cells) == select_shard(cells, 2, 3)


# --- the cost model ------------------------------------------------------------------------


def test_model_size_from_id_or_source(cells):
    sizes = {c.model.id: model_params_b(c) for c in cells}
    assert sizes == {"qwen2.5-0.5b": 0.5, "qwen2.5-7b": 7.0, "qwen2.5-72b": 72.0}


def test_costs_follow_model_size_metric_and_precision(cells):
    by = {(c.model.id, c.variant.quant, c.metric): estimate_cost(c) for c in cells}
    assert by[("qwen2.5-72b", "Q4_K_M", "perplexity")] > by[("qwen2.5-7b", "Q4_K_M",
                                                              "perplexity")]
    assert by[("qwen2.5-7b", "F16", "perplexity")] > by[("qwen2.5-7b", "Q2_K", "perplexity")]
    assert by[("qwen2.5-7b", "Q8_0", "kld")] > by[("qwen2.5-7b", "Q8_0", "footprint")]
    assert all(v > 0 for v in by.values())
    c = next(c for c in cells if c.variant.quant == "F16")
    assert precision_factor(c) == 1.0


# --- the split -----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_every_cell_in_exactly_one_shard(cells, count):
    shards = [select_shard(cells, i, count) for i in range(1, count + 1)]
    keys = [c.key for s in shards for c in s]
    assert len(keys) == len(set(keys)) == len(cells)
    assert set(keys) == {c.key for c in cells}


def test_shards_keep_plan_order(cells):
    order = {c.key: i for i, c in enumerate(cells)}
    for i in (1, 2, 3):
        pos = [order[c.key] for c in select_shard(cells, i, 3)]
        assert pos == sorted(pos)


def test_deterministic_whatever_the_plan_order(cells):
    expected = [[c.key for c in s] for s in assign_shards(cells, 4)]
    for seed in range(5):
        shuffled = list(cells)
        random.Random(seed).shuffle(shuffled)
        got = [sorted(c.key for c in s) for s in assign_shards(shuffled, 4)]
        assert got == [sorted(s) for s in expected]


def test_balanced_by_cost(cells):
    costs = [estimate_cost(c) for c in cells]
    for count in (2, 3, 4):
        loads = shard_loads(cells, count)
        mean = sum(costs) / count
        # greedy LPT: no shard exceeds the mean by more than the largest single cell
        assert max(loads) <= mean + max(costs) + 1e-9
        # and, with many small cells, the shards are close to one another
        assert max(loads) - min(loads) <= max(costs) + 1e-9
    # the 72B cells dominate: they do not all land in one shard
    big = [c.key for c in cells if c.model.id == "qwen2.5-72b" and c.metric == "perplexity"]
    homes = {i for i, s in enumerate(assign_shards(cells, 4)) for c in s if c.key in big}
    assert len(homes) > 1


def test_better_than_round_robin(cells):
    count = 3
    rr = [0.0] * count
    for i, c in enumerate(cells):
        rr[i % count] += estimate_cost(c)
    assert max(shard_loads(cells, count)) <= max(rr) + 1e-9


def test_more_shards_than_cells(cells):
    few = cells[:3]
    shards = [select_shard(few, i, 5) for i in range(1, 6)]
    assert sum(len(s) for s in shards) == 3
    assert sum(1 for s in shards if not s) == 2      # empty shards are fine: they run nothing


def test_select_shard_rejects_bad_index(cells):
    with pytest.raises(QbenchError):
        select_shard(cells, 0, 2)
    with pytest.raises(QbenchError):
        select_shard(cells, 3, 2)
