"""Issue 25, `--executor ray`: a Ray with token authentication on by default (>= 2.59), and the
driver's secrets (HF_TOKEN) in the task's environment, never in its arguments.

No Ray cluster here: a stand-in for the ``ray`` module records what the executor asks of it. The
real local cluster of tests/test_ray_executor.py checks that variables still reach the cells
(its injected faults travel the same way)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from packaging.requirements import Requirement

from qbench.errors import QbenchError
from qbench.results.schema import Outcome
from qbench.run.executors import WorkItem
from qbench.run.job import Job
from qbench.run.ray_executor import RayExecutor, import_ray, outcome_to_dict

REPO = Path(__file__).resolve().parents[1]


def test_the_ray_extra_requires_token_authentication_by_default():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    [req] = [Requirement(r) for r in extras["ray"]]
    assert req.name == "ray"
    assert not req.specifier.contains("2.58.1") and not req.specifier.contains("2.40.0")
    assert req.specifier.contains("2.59.0") and req.specifier.contains("2.60.0")


@pytest.mark.parametrize("version", ["2.40.0", "2.58.1", "2.9.3"])
def test_an_older_ray_is_refused(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(__version__=version))
    with pytest.raises(QbenchError, match="ray >= 2.59"):
        import_ray()


def test_a_current_ray_is_accepted(monkeypatch):
    fake = SimpleNamespace(__version__="2.59.0")
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert import_ray() is fake


class FakeRay:
    """What RayExecutor.run calls on the ``ray`` module, recorded; every task returns ok."""

    __version__ = "2.60.0"
    exceptions = SimpleNamespace(RayError=RuntimeError)

    def __init__(self) -> None:
        self.submitted: list[tuple[dict[str, Any], tuple[Any, ...]]] = []

    def is_initialized(self) -> bool:
        return True                      # "someone else's cluster": never started or stopped

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def remote(self, fn: Any) -> Any:
        fake = self

        class Task:
            def options(self, **options: Any) -> Any:
                return SimpleNamespace(remote=lambda *args: fake._submit(options, args))
        return Task()

    def _submit(self, options: dict[str, Any], args: tuple[Any, ...]) -> int:
        self.submitted.append((options, args))
        return len(self.submitted)

    def wait(self, refs: list[Any], num_returns: int = 1, **_: Any) -> tuple[list, list]:
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: Any) -> dict[str, Any]:
        return {"outcome": outcome_to_dict(Outcome(status="ok")), "log": "", "node": "n",
                "gpu_ids": []}


def test_secrets_travel_in_the_task_environment_not_its_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("QBENCH_FAULT", "")
    executor = RayExecutor()
    executor.ray = FakeRay()
    job = Job(cell={"id": "m/llama.cpp/Q8_0/speed", "key": "k1", "metric": "speed",
                    "variant": {"n_gpu_layers": 0}}, base_dir=".", cache_dir=".", device="cpu")
    cell = SimpleNamespace(id=job.cell_id, key=job.key)
    items = [WorkItem(cell, job, tmp_path / "k1.log", 60, 0)]     # type: ignore[arg-type]
    [(_, outcome)] = list(executor.run(items))
    assert outcome.status == "ok"
    [(options, args)] = executor.ray.submitted
    assert "hf_secret_value_123" not in repr(args)
    assert options["runtime_env"]["env_vars"]["HF_TOKEN"] == "hf_secret_value_123"
