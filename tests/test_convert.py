"""HF folder -> GGUF with llama.cpp's converter (qbench.quantize.convert)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from qbench.errors import QbenchError, SourceError
from qbench.quantize import convert


def test_converter_override_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QBENCH_CONVERT_HF_TO_GGUF", str(tmp_path / "nope.py"))
    with pytest.raises(QbenchError, match="nope.py: no such file"):
        convert.ensure_converter(tmp_path)


def test_converter_override_puts_checkout_gguf_py_first(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("")
    (tmp_path / "gguf-py").mkdir()
    monkeypatch.setenv("QBENCH_CONVERT_HF_TO_GGUF", str(script))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    cmd, env = convert.ensure_converter(tmp_path / "cache")
    assert cmd[-1] == str(script)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "gguf-py"), "/elsewhere"]


def test_only_float_bases_and_real_folders(tmp_path: Path) -> None:
    with pytest.raises(QbenchError, match="F32, F16, BF16 only"):
        convert.convert(tmp_path, tmp_path / "o.gguf", "Q8_0", tmp_path)
    with pytest.raises(SourceError, match="no config.json"):
        convert.convert(tmp_path, tmp_path / "o.gguf", "F16", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert convert.is_hf_folder(tmp_path) and not convert.is_hf_folder(tmp_path / "config.json")


SUITE = """
[suite]
name = "convert-test"

[defaults]
threads = 2
timeout_s = 900

[[models]]
id = "smollm2-twin"
source = "{folder}"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0"]

[[variants]]
backend = "transformers"
quant = ["fp32"]

[metrics.perplexity]
ctx = 256
chunks = 4
"""


@pytest.mark.slow
def test_hf_folder_yields_both_ladders(tmp_path: Path, data_dir: Path, smollm2_ref: str
                                      ) -> None:
    """The HF twin of SmolLM2, converted by llama.cpp's converter, scores like transformers does
    on the same folder: one HF base, both ladders."""
    from qbench.cli import main

    for mod in ("llama_cpp", "transformers", "torch"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"needs {mod} (bash scripts/bootstrap.sh)")
    from qbench.quantize import hf
    from qbench.inputs.sources import resolve

    gguf = resolve(smollm2_ref, base_dir=tmp_path, cache_dir=tmp_path).path
    folder = tmp_path / "twin"
    hf._gguf_twin(gguf, folder, False)
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(folder=folder))
    cache = Path(os.environ.get("QBENCH_CACHE_DIR", tmp_path / "cache"))
    out = tmp_path / "results"
    rc = main(["run", str(suite), "--data-dir", str(data_dir), "--out", str(out),
               "--cache-dir", str(cache), "--no-report"])
    records = {}
    for f in (out / "convert-test" / "cells").glob("*.json"):
        r = json.loads(f.read_text())
        records[r["id"].split("/", 1)[1]] = r
    bad = {k: (r["status"], r.get("error")) for k, r in records.items() if r["status"] != "ok"}
    assert rc == 0 and not bad, bad
    f16 = records["llama.cpp/F16/perplexity"]
    assert f16["artifact"]["recipe"]["tool"] == "convert_hf_to_gguf"
    ppl_gguf = f16["values"]["ppl"]["value"]
    ppl_hf = records["transformers/fp32/perplexity"]["values"]["ppl"]["value"]
    assert ppl_gguf == pytest.approx(ppl_hf, rel=0.005)
    assert records["llama.cpp/Q8_0/perplexity"]["values"]["ppl"]["value"] > 0.99 * ppl_gguf
    types = records["llama.cpp/F16/footprint"]["details"]
    assert "F16" in json.dumps(types)
