"""Context depth: a list of contexts under [metrics.perplexity]/[metrics.kld] expands into
cells, the first keeping its plain id and key, the others named @ctx=N."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbench.errors import ConfigError
from qbench.suite.config import load_suite
from qbench.suite.identity import record_cell_id, record_point
from qbench.suite.plan import PlanContext, cell_ids, expand

SUITE = """
[suite]
name = "depth"

[[models]]
id = "m"
source = "m.gguf"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q4_K_M"]

[[variants]]
backend = "llama.cpp"
quant = "F16"
kv_cache = ["q8_0", "q4_0"]

[metrics.perplexity]
dataset = "text.txt"
{ppl}

[metrics.kld]

[metrics.speed]
prompt_tokens = 8
"""


def _plan(tmp_path: Path, write_suite, ppl: str) -> list:
    (tmp_path / "m.gguf").write_bytes(b"model" * 10)
    (tmp_path / "text.txt").write_text("some evaluation text\n" * 50)
    path = write_suite(SUITE.replace("{ppl}", ppl))
    ctx = PlanContext(base_dir=tmp_path, data_dir=None, cache_dir=tmp_path / "cache")
    return expand(load_suite(path), ctx)


def test_a_ctx_list_makes_one_cell_per_context_with_unique_ids(tmp_path, write_suite) -> None:
    cells = _plan(tmp_path, write_suite, "ctx = [512, 4096, 8192]\nchunks = [16, 2, 1]")
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids))
    for variant in ("F16", "Q4_K_M", "F16+kv=q8_0", "F16+kv=q4_0"):
        for metric in ("perplexity", "kld"):
            got = {c.id: c for c in cells if c.id.startswith(f"m/llama.cpp/{variant}/{metric}")}
            assert sorted(got) == sorted([f"m/llama.cpp/{variant}/{metric}",
                                          f"m/llama.cpp/{variant}/{metric}@ctx=4096",
                                          f"m/llama.cpp/{variant}/{metric}@ctx=8192"])
            by_ctx = {c.options.ctx: c.options.chunks for c in got.values()}
            assert by_ctx == {512: 16, 4096: 2, 8192: 1}     # chunks zipped with ctx
    # speed and the implicit metrics have no context list: one cell each
    assert sum(c.metric == "speed" for c in cells) == 4


def test_listing_more_contexts_keeps_the_main_cells_keys(tmp_path, write_suite) -> None:
    """A suite that had ctx = 512 and now lists [512, 8192] adds cells and changes none."""
    one = {c.id: c.key for c in _plan(tmp_path, write_suite, "ctx = 512\nchunks = 16")}
    many = {c.id: c.key for c in _plan(tmp_path, write_suite,
                                       "ctx = [512, 8192]\nchunks = [16, 1]")}
    assert set(one) < set(many)
    assert all(many[i] == k for i, k in one.items())
    new = set(many) - set(one)
    assert new and all("@ctx=8192" in i for i in new)


def test_each_contexts_perplexity_cell_serves_that_contexts_kld_cell(tmp_path,
                                                                     write_suite) -> None:
    cells = _plan(tmp_path, write_suite, "ctx = [512, 8192]\nchunks = [16, 1]")
    kld = {(c.variant, c.options.ctx): c.key for c in cells if c.metric == "kld"}
    served = [c for c in cells if c.metric == "perplexity"]
    assert len(served) == 8
    for c in served:
        assert c.companions["kld"]["cell_key"] == kld[(c.variant, c.options.ctx)]
        assert c.companions["kld"]["ctx"] == c.options.ctx


def test_the_gates_expected_ids_are_the_plans(tmp_path, write_suite) -> None:
    cells = _plan(tmp_path, write_suite, "ctx = [512, 8192]\nchunks = [16, 1]")
    suite = load_suite(tmp_path / "suite.toml")
    assert cell_ids(suite) == [c.id for c in cells]


def test_a_stored_records_id_names_its_context(tmp_path, write_suite) -> None:
    """The gate matches runs by record_cell_id: a depth cell's record must come back with its
    @ctx=N, a main cell's without."""
    cells = _plan(tmp_path, write_suite, "ctx = [512, 8192]\nchunks = [16, 1]")
    for c in cells:
        rec = c.describe() | {"metric": c.metric}
        assert record_cell_id(rec) == c.id
        assert record_point(rec) == c.point
    old = {"id": "m/llama.cpp/F16/perplexity", "metric": "perplexity",
           "model": {"id": "m"}, "variant": {"backend": "llama.cpp", "quant": "F16"}}
    assert record_cell_id(old) == "m/llama.cpp/F16/perplexity"


@pytest.mark.parametrize("text,key,says", [
    ("ctx = [512, 8192]\nchunks = [16]", "metrics.perplexity.chunks", "one per context"),
    ("ctx = [512, 512]", "metrics.perplexity.ctx", "names a context twice"),
    ("ctx = [512, 4095]", "metrics.perplexity.ctx[1]", "even context"),
    ("ctx = []", "metrics.perplexity.ctx", "empty ctx list"),
])
def test_bad_context_lists_are_refused_naming_the_key(tmp_path, write_suite, text, key,
                                                      says) -> None:
    path = write_suite(SUITE.replace("{ppl}", text))
    with pytest.raises(ConfigError) as err:
        load_suite(path)
    assert f": {key}: " in str(err.value) and says in str(err.value)


def test_kld_chunk_list_needs_a_context_list(tmp_path, write_suite) -> None:
    path = write_suite(SUITE.replace("{ppl}", "ctx = 512").replace(
        "[metrics.kld]\n", "[metrics.kld]\nchunks = [4, 2]\n"))
    with pytest.raises(ConfigError, match="metrics.kld.chunks"):
        load_suite(path)
