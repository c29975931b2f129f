"""Plan expansion: which cells, in which order, under which stable keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbench.cli import main
from qbench.suite.config import load_suite
from qbench.errors import QbenchError
from qbench.suite.plan import PlanContext, expand

SUITE = """
[suite]
name = "plan"

[[models]]
id = "a"
source = "a.gguf"
base = "F16"

[[models]]
id = "b"
source = "b.gguf"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["Q8_0", "F16", "Q4_K_M"]

[[variants]]
backend = "llama.cpp"
quant = ["Q2_K"]
models = ["a"]

[metrics.perplexity]
dataset = "text.txt"
ctx = 64
chunks = 2

[metrics.speed]
prompt_tokens = 8
"""


@pytest.fixture
def suite_dir(tmp_path: Path, write_suite) -> Path:
    # expand() hashes the model files but never parses them: any bytes will do
    (tmp_path / "a.gguf").write_bytes(b"model a" * 10)
    (tmp_path / "b.gguf").write_bytes(b"model b" * 10)
    (tmp_path / "text.txt").write_text("some evaluation text\n" * 50)
    write_suite(SUITE)
    return tmp_path


def plan(path: Path, **kw) -> list:
    suite = load_suite(path)
    ctx = PlanContext(base_dir=path.parent, data_dir=None, cache_dir=path.parent / "cache")
    return expand(suite, ctx, **kw)


def test_cell_count_and_order(suite_dir):
    cells = plan(suite_dir / "suite.toml")
    # metrics: footprint + sanity (implicit) + perplexity + speed = 4
    # model a: 4 variants (Q2_K is for a only), model b: 3
    assert len(cells) == (4 + 3) * 4
    a = [c for c in cells if c.model.id == "a"]
    b = [c for c in cells if c.model.id == "b"]
    assert cells == a + b  # model by model
    assert {c.variant.quant for c in b} == {"Q8_0", "F16", "Q4_K_M"}
    # base variant first, then the others in suite order
    assert [c.variant.quant for c in a[::4]] == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]
    assert all(c.is_base == (c.variant.quant == "F16") for c in cells)
    # cheap implicit metrics before long ones, per variant
    assert [c.metric for c in a[:4]] == ["footprint", "sanity", "perplexity", "speed"]
    assert a[0].id == "a/llama.cpp/F16/footprint"
    assert len({c.key for c in cells}) == len(cells)
    assert len({c.id for c in cells}) == len(cells)


def test_keys_are_stable(suite_dir):
    first = [(c.id, c.key) for c in plan(suite_dir / "suite.toml")]
    second = [(c.id, c.key) for c in plan(suite_dir / "suite.toml")]
    assert first == second
    assert all(len(k) == 24 and k.isalnum() for _, k in first)


def test_key_follows_metric_options(suite_dir):
    before = {c.id: c.key for c in plan(suite_dir / "suite.toml")}
    path = suite_dir / "suite.toml"
    path.write_text(path.read_text().replace("ctx = 64", "ctx = 128"))
    after = {c.id: c.key for c in plan(path)}
    assert before.keys() == after.keys()
    for cid in before:
        changed = before[cid] != after[cid]
        assert changed == cid.endswith("/perplexity"), cid


def test_key_follows_model_content(suite_dir):
    before = {c.id: c.key for c in plan(suite_dir / "suite.toml")}
    (suite_dir / "a.gguf").write_bytes(b"model a, re-uploaded with a fix" * 10)
    after = {c.id: c.key for c in plan(suite_dir / "suite.toml")}
    for cid in before:
        assert (before[cid] != after[cid]) == cid.startswith("a/"), cid


def test_key_follows_dataset_content(suite_dir):
    before = {c.id: c.key for c in plan(suite_dir / "suite.toml")}
    (suite_dir / "text.txt").write_text("a different text\n" * 70)
    after = {c.id: c.key for c in plan(suite_dir / "suite.toml")}
    for cid in before:
        assert (before[cid] != after[cid]) == cid.endswith("/perplexity"), cid


def test_key_does_not_depend_on_suite_name_or_location(suite_dir, tmp_path):
    before = {c.id: c.key for c in plan(suite_dir / "suite.toml")}
    path = suite_dir / "suite.toml"
    path.write_text(path.read_text().replace('name = "plan"', 'name = "renamed"'))
    assert {c.id: c.key for c in plan(path)} == before


def test_key_follows_variant_params(suite_dir):
    before = {c.id: c.key for c in plan(suite_dir / "suite.toml")}
    path = suite_dir / "suite.toml"
    path.write_text(path.read_text().replace('quant = ["Q2_K"]', 'quant = ["Q2_K"]\nubatch = 256'))
    after = {c.id: c.key for c in plan(path)}
    for cid in before:
        assert (before[cid] != after[cid]) == ("/Q2_K/" in cid), cid


def test_hub_model_is_planned_without_download(write_suite, tmp_path):
    text = SUITE.replace('source = "b.gguf"', 'source = "hf:org/repo/model.gguf"')
    (tmp_path / "a.gguf").write_bytes(b"model a")
    (tmp_path / "text.txt").write_text("text\n" * 10)
    cells = plan(write_suite(text))
    assert {c.model_sha256 for c in cells if c.model.id == "b"} == {
        "ref:hf:org/repo/model.gguf"}


def test_only_filters_by_glob(suite_dir):
    cells = plan(suite_dir / "suite.toml", only=("*/Q8_0/*",))
    assert len(cells) == 2 * 4 and all(c.variant.quant == "Q8_0" for c in cells)
    cells = plan(suite_dir / "suite.toml", only=("a/*/perplexity", "b/*/F16/speed"))
    assert [c.id for c in cells] == [
        "a/llama.cpp/F16/perplexity", "a/llama.cpp/Q8_0/perplexity",
        "a/llama.cpp/Q4_K_M/perplexity", "a/llama.cpp/Q2_K/perplexity",
        "b/llama.cpp/F16/speed"]
    # filtering never changes a key
    full = {c.id: c.key for c in plan(suite_dir / "suite.toml")}
    assert all(full[c.id] == c.key for c in cells)


def test_only_matching_nothing_is_an_error(suite_dir):
    with pytest.raises(QbenchError) as info:
        plan(suite_dir / "suite.toml", only=("*/Q5_K_M/*",))
    assert str(info.value) == ("--only */Q5_K_M/* matches no cell of suite 'plan' "
                               "(cell ids look like model/backend/quant/metric)")


def test_missing_model_file_is_an_error(suite_dir):
    (suite_dir / "b.gguf").unlink()
    with pytest.raises(QbenchError, match="model file not found: .*b.gguf"):
        plan(suite_dir / "suite.toml")


def test_cli_plan_json_and_only_error(suite_dir, capsys, isolated_env, monkeypatch):
    monkeypatch.setattr("qbench.cli._check_inputs", lambda suite, ctx: None)  # fake GGUFs
    path = str(suite_dir / "suite.toml")
    out = str(suite_dir / "results")
    assert main(["plan", path, "--out", out, "--json", "--only", "a/*/F16/*"]) == 0
    import json
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["a/llama.cpp/F16/footprint", "a/llama.cpp/F16/sanity",
                                       "a/llama.cpp/F16/perplexity", "a/llama.cpp/F16/speed"]
    assert all(r["status"] == "todo" and r["base"] for r in rows)
    assert main(["plan", path, "--out", out, "--only", "nothing/*"]) == 1
    assert "qbench: error: --only nothing/* matches no cell" in capsys.readouterr().err
