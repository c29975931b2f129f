"""Issue 25, CI as an attack surface: secrets reach only the steps that need them, and no `run:`
script has a ${{ }} expression spliced into it (values arrive as environment variables)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it comes with gguf)")

WORKFLOWS = Path(__file__).resolve().parents[1] / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml"))
# the steps allowed to see HF_TOKEN: they download models or data from the hub
HUB_STEPS = {("gpu-nightly.yml", "run", "Prepare evaluation data (WikiText-2 raw, MMLU test)"),
             ("gpu-nightly.yml", "run", "Plan shard ${{ matrix.shard }} of ${{ env.SHARDS }}"),
             ("gpu-nightly.yml", "run", "Run shard ${{ matrix.shard }} of ${{ env.SHARDS }}")}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _mentions_secret(value: Any) -> bool:
    return "secrets." in str(value)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_expression_is_spliced_into_a_script(path):
    wf = _load(path)
    for job_name, job in wf["jobs"].items():
        for step in job.get("steps", []):
            script = step.get("run", "")
            found = re.findall(r"\$\{\{[^}]*\}\}", script)
            assert not found, (f"{path.name} {job_name} '{step.get('name')}': {found} in a run "
                               "script (pass it through env:)")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_secrets_only_in_the_steps_that_download(path):
    wf = _load(path)
    assert not _mentions_secret(wf.get("env", {})), f"{path.name}: a secret for every job"
    for job_name, job in wf["jobs"].items():
        assert not _mentions_secret(job.get("env", {})), f"{path.name} {job_name}: job-wide"
        for step in job.get("steps", []):
            if _mentions_secret(step.get("env", {})) or _mentions_secret(step.get("with", {})):
                assert (path.name, job_name, step.get("name")) in HUB_STEPS, (
                    f"{path.name} {job_name} '{step.get('name')}' is given a secret")


def test_the_hub_steps_still_get_the_token():
    wf = _load(WORKFLOWS / "gpu-nightly.yml")
    named = {s.get("name"): s for s in wf["jobs"]["run"]["steps"]}
    for _, _, name in HUB_STEPS:
        assert named[name]["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
