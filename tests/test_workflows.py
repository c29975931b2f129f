"""The GitHub Actions workflows: parsed and checked for what they promise (schedule, CUDA build,
caches, doctor, sharded run + merge, artifacts, Pages, the regression gate), linted with
actionlint and shellcheck when those are installed (skipped with the reason otherwise)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it comes with gguf)")

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
NIGHTLY = WORKFLOWS / "gpu-nightly.yml"
CI = WORKFLOWS / "ci.yml"


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def triggers(wf: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 reads the key `on` as the boolean True
    on = wf.get("on", wf.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return {k: None for k in on}
    return on or {}


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job.get("steps", [])


def runs(job: dict[str, Any]) -> str:
    return "\n".join(s.get("run", "") for s in steps(job))


def uses(job: dict[str, Any]) -> list[str]:
    return [s["uses"] for s in steps(job) if "uses" in s]


def step_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in steps(job) if s.get("uses", "").startswith(action + "@")]


@pytest.fixture(scope="module")
def nightly() -> dict[str, Any]:
    return load(NIGHTLY)


@pytest.fixture(scope="module")
def ci() -> dict[str, Any]:
    return load(CI)


# --- the nightly GPU workflow --------------------------------------------------------------


def test_nightly_is_scheduled_and_dispatchable(nightly):
    on = triggers(nightly)
    assert "workflow_dispatch" in on
    crons = [entry["cron"] for entry in on["schedule"]]
    assert crons and all(len(c.split()) == 5 for c in crons)
    assert "push" not in on and "pull_request" not in on   # never on untrusted PR code


def test_nightly_runs_sharded_on_a_self_hosted_gpu_runner(nightly):
    job = nightly["jobs"]["run"]
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    shards = job["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, len(shards) + 1))
    assert int(nightly["env"]["SHARDS"]) == len(shards)
    assert job["strategy"]["fail-fast"] is False          # one shard's failure keeps the other
    script = runs(job)
    assert re.search(r"qbench run \"\$SUITE\" --shard \"\$\{SHARD\}/\$\{SHARDS\}\"", script)
    assert job["env"]["SHARD"] == "${{ matrix.shard }}"   # through env, not spliced (issue 25)
    assert "suites/ci-gpu.toml" in nightly["env"]["SUITE"]
    assert (REPO / "suites" / "ci-gpu.toml").is_file()


def test_nightly_installs_with_cuda(nightly):
    script = runs(nightly["jobs"]["run"])
    assert "-DGGML_CUDA=on" in script
    assert "bash scripts/bootstrap.sh" in script and (REPO / "scripts" / "bootstrap.sh").is_file()
    assert "QBENCH_CMAKE_ARGS" in (REPO / "scripts" / "bootstrap.sh").read_text()
    assert "download.pytorch.org/whl/cu" in NIGHTLY.read_text()   # torch's CUDA wheels
    assert "torch.cuda.is_available()" in script                  # fail early without a GPU
    assert "qbench doctor" in script


def test_nightly_caches_hub_and_qbench_artifacts(nightly):
    caches = step_using(nightly["jobs"]["run"], "actions/cache")
    paths = "\n".join(c["with"]["path"] for c in caches)
    for needed in ("~/.cache/huggingface", "~/.cache/qbench/hf", "~/.cache/qbench/artifacts",
                   "~/.cache/qbench/kld-base", "~/.cache/qbench/wheels", "~/.cache/qbench-data"):
        assert needed in paths, needed
    assert all(c["with"].get("key") for c in caches)


def test_nightly_uploads_results_and_merges(nightly):
    jobs = nightly["jobs"]
    up = step_using(jobs["run"], "actions/upload-artifact")
    assert up and up[0]["with"]["name"] == "results-shard-${{ matrix.shard }}"
    assert up[0]["if"] == "${{ !cancelled() }}"           # failed cells still upload
    merge = jobs["merge"]
    assert merge["needs"] == "run" and "!cancelled()" in merge["if"]
    down = step_using(merge, "actions/download-artifact")
    assert down[0]["with"]["pattern"] == "results-shard-*"
    assert "qbench merge shards --out merged" in runs(merge)
    assert "qbench report" in runs(merge)
    names = {s["with"]["name"] for s in step_using(merge, "actions/upload-artifact")}
    assert {"results", "report"} <= names
    # a shard whose cells failed fails its job, after its results are uploaded
    run_steps = [s.get("name", "") for s in steps(jobs["run"])]
    assert run_steps.index("Fail if cells failed") > run_steps.index("Upload shard results")


def test_nightly_publishes_to_pages(nightly):
    jobs = nightly["jobs"]
    assert step_using(jobs["merge"], "actions/upload-pages-artifact")
    deploy = jobs["deploy"]
    assert step_using(deploy, "actions/deploy-pages")
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert "default_branch" in deploy["if"]
    assert nightly["permissions"] == {"contents": "read"}  # least privilege elsewhere


def test_nightly_gates_on_regressions(nightly):
    gate = nightly["jobs"]["gate"]
    [step] = [s for s in steps(gate) if "qbench compare" in s.get("run", "")]
    script = step["run"]
    assert 'qbench compare "$baseline" "merged/${SUITE_NAME}"' in script
    assert '--suite "$SUITE"' in script       # dropped cells are not reported as missing
    assert 'baseline="results/baselines/${SUITE_NAME}"' in script
    assert 'exit "$rc"' in script                          # exit 2 (regression) fails the job
    assert not step.get("continue-on-error")
    assert not gate.get("continue-on-error")
    assert (REPO / "results" / "baselines" / "README.md").is_file()


def test_nightly_gate_script_exit_codes(tmp_path):
    """Run the gate step's script with a fake qbench: a regression (2) fails, 0 passes, no
    baseline warns, and a dispatch with the gate off only warns."""
    wf = load(NIGHTLY)
    [step] = [s for s in steps(wf["jobs"]["gate"]) if "qbench compare" in s.get("run", "")]
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    fake = tmp_path / ".venv" / "bin" / "qbench"

    def gate(rc: int, baseline: bool = True, gate_on: str = "on") -> subprocess.CompletedProcess:
        fake.write_text(f"#!/bin/sh\necho fake qbench \"$@\"\nexit {rc}\n")
        fake.chmod(0o755)
        base = tmp_path / "results" / "baselines" / "ci-gpu"
        if baseline:
            base.mkdir(parents=True, exist_ok=True)
        elif base.exists():
            base.rmdir()
        return subprocess.run([bash, "-e", "-c", step["run"]], cwd=tmp_path, text=True,
                              capture_output=True, env={"PATH": "/usr/bin:/bin",
                                                        "SUITE_NAME": "ci-gpu", "GATE": gate_on})

    assert gate(0).returncode == 0
    assert gate(2).returncode == 2 and "::error::regression" in gate(2).stdout
    assert gate(1).returncode == 1
    assert gate(2, gate_on="off").returncode == 0
    missing = gate(2, baseline=False)
    assert missing.returncode == 0 and "::warning::no baseline" in missing.stdout


def test_qbench_commands_in_workflows_exist():
    """Every `qbench ...` command line in the workflows parses with the real CLI parser."""
    from qbench.cli import build_parser

    parser = build_parser()
    text = (NIGHTLY.read_text() + CI.read_text()).replace("\\\n", " ")   # join continued lines
    lines = re.findall(r"\.venv/bin/qbench ([^\n]+)", text)
    assert len(lines) >= 6
    for line in lines:
        line = line.strip()
        line = re.sub(r"\$\{\{[^}]*\}\}", "1", line)
        argv = [re.sub(r"\$\{?SHARDS\}?", "2", a) for a in shlex.split(line)]
        argv = [a.replace("${SUITE_NAME}", "ci-gpu").replace("$SUITE", "suites/ci-gpu.toml")
                .replace("$baseline", "results/baselines/ci-gpu") for a in argv]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"`qbench {line}` does not parse (exit {exc.code})")


def test_actions_are_pinned_to_versions(nightly, ci):
    for wf in (nightly, ci):
        for job in wf["jobs"].values():
            for ref in uses(job):
                assert re.search(r"@v?\d", ref) or ref.startswith("docker://"), ref


# --- the CPU workflow ------------------------------------------------------------------------


def test_ci_runs_the_tests_on_push_and_pull_requests(ci):
    on = triggers(ci)
    assert "push" in on and "pull_request" in on
    test = ci["jobs"]["test"]
    assert test["runs-on"] == "ubuntu-latest"
    assert "bash .ci/run" in runs(test) and (REPO / ".ci" / "run").is_file()
    assert step_using(test, "actions/setup-python")[0]["with"]["python-version"] == "3.11"
    assert any("actionlint" in u for u in uses(ci["jobs"]["lint-workflows"]))


# --- linters -------------------------------------------------------------------------------


def test_actionlint_clean():
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed (it runs in the lint-workflows job of ci.yml)")
    proc = subprocess.run([exe, "-no-color", str(NIGHTLY), str(CI)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", [NIGHTLY, CI], ids=lambda p: p.name)
def test_run_scripts_pass_shellcheck(path, tmp_path):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (bash scripts/bootstrap.sh --test-tools installs it)")
    wf = load(path)
    for job_name, job in wf["jobs"].items():
        for i, step in enumerate(steps(job)):
            if "run" not in step:
                continue
            script = tmp_path / f"{job_name}-{i}.sh"
            # expressions are substituted by Actions before bash sees the script
            body = re.sub(r"\$\{\{[^}]*\}\}", "X", step["run"])
            script.write_text("#!/bin/bash\nset -e\n" + body)
            proc = subprocess.run([exe, "-S", "style", str(script)], capture_output=True,
                                  text=True)
            assert proc.returncode == 0, f"{path.name} {job_name} step {i}:\n{proc.stdout}"
