"""The skip policy of tests/conftest.py, run for real: a pytest session in a temp folder with a
copy of our conftest and tiny test files, under CI=true and without it.

Without the policy a missing chromium, llama-cpp-python or data folder turns tests into skips
and CI stays green; these runs show that CI now fails on any skip not in EXPECTED_SKIPS, that
an allow-listed test skipping for another cause fails too, and that a newcomer's run lists the
skipped tests with how to enable them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

PASSING = "def test_passes():\n    assert 1 + 1 == 2\n"
EXPECTED = textwrap.dedent("""
    import pytest

    def test_actionlint_clean():
        pytest.skip("actionlint is not installed (it runs in the lint-workflows job of ci.yml)")
    """)
GPU = textwrap.dedent("""
    import pytest

    @pytest.mark.gpu
    def test_on_the_gpu():
        pass
    """)
UNEXPECTED = textwrap.dedent("""
    import pytest

    def test_in_a_browser():
        pytest.skip("no chromium binary (/usr/bin/chromium)")
    """)
WRONG_CAUSE = textwrap.dedent("""
    import pytest

    def test_actionlint_clean():
        pytest.skip("PyYAML is not installed")
    """)
MODULE_SKIP = 'import pytest\nnot_there = pytest.importorskip("qbench_no_such_module")\n' \
              "def test_never():\n    pass\n"
FAILING = "def test_fails():\n    assert 1 + 1 == 3\n"


def run_session(tmp_path: Path, files: dict[str, str], *, ci: bool,
                args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """pytest on ``files`` (names under tests/) with our conftest; CI=true when ``ci``."""
    root = tmp_path / "proj"
    (root / "tests").mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
    shutil.copy(CONFTEST, root / "tests" / "conftest.py")
    for name, text in files.items():
        (root / "tests" / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rfEs", "tests", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def test_expected_skips_keep_ci_green(tmp_path):
    proc = run_session(tmp_path, {"test_workflows.py": EXPECTED, "test_gpu.py": GPU,
                                  "test_ok.py": PASSING}, ci=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "actionlint is not installed" in proc.stdout      # -rs: listed with its reason
    assert "EXPECTED_SKIPS" not in proc.stdout


def test_unexpected_skip_fails_ci_and_names_the_test(tmp_path):
    proc = run_session(tmp_path, {"test_browser.py": UNEXPECTED, "test_ok.py": PASSING},
                       ci=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "skips not in EXPECTED_SKIPS (tests/conftest.py): CI fails" in proc.stdout
    assert "tests/test_browser.py::test_in_a_browser: no chromium binary" in proc.stdout


def test_newcomer_run_passes_but_says_what_did_not_run_and_how(tmp_path):
    proc = run_session(tmp_path, {"test_browser.py": UNEXPECTED, "test_ok.py": PASSING},
                       ci=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tests skipped that a full setup runs" in proc.stdout
    assert "tests/test_browser.py::test_in_a_browser: no chromium binary" in proc.stdout
    assert "bash scripts/bootstrap.sh --test-tools" in proc.stdout


def test_allow_listed_test_skipping_for_another_cause_fails_ci(tmp_path):
    proc = run_session(tmp_path, {"test_workflows.py": WRONG_CAUSE, "test_ok.py": PASSING},
                       ci=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "test_actionlint_clean: PyYAML is not installed" in proc.stdout


def test_module_level_skip_fails_ci(tmp_path):
    proc = run_session(tmp_path, {"test_mod.py": MODULE_SKIP, "test_ok.py": PASSING}, ci=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tests/test_mod.py: could not import 'qbench_no_such_module'" in proc.stdout


def test_failures_keep_their_exit_code(tmp_path):
    proc = run_session(tmp_path, {"test_browser.py": UNEXPECTED, "test_bad.py": FAILING},
                       ci=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED tests/test_bad.py::test_fails" in proc.stdout


@pytest.mark.parametrize("ci", [True, False])
def test_no_tests_is_never_green(tmp_path, ci):
    """Exit 5 (nothing ran) must stay non-zero: .ci/run treats any non-zero as a failure."""
    proc = run_session(tmp_path, {"test_ok.py": PASSING}, ci=ci, args=("-k", "nothing_named"))
    assert proc.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, proc.stdout + proc.stderr
