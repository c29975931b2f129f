"""The tensors people choose: output_tensor_type and token_embedding_type as variant axes
(llama-quantize --output-tensor-type / --token-embedding-type)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbench.errors import ConfigError
from qbench.quantize import gguf, gguf_types
from qbench.suite.config import load_suite
from qbench.suite.plan import PlanContext, expand

HEAD = """
[suite]
name = "tensors"
[[models]]
id = "m"
source = "m.gguf"
base = "F16"
[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q4_K_M"]
"""
TAIL = "\n[metrics.perplexity]\nctx = 64\n[metrics.kld]\n"


def _cells(write_suite, tmp_path: Path, groups: str) -> dict:
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    suite = load_suite(write_suite(HEAD + groups + TAIL))
    cells = expand(suite, PlanContext(base_dir=tmp_path, data_dir=None,
                                      cache_dir=tmp_path / "cache", env={}))
    return {c.id: c for c in cells}


def test_output_and_embedding_types_make_their_own_variants(write_suite, tmp_path) -> None:
    plain = _cells(write_suite, tmp_path, "")
    cells = _cells(write_suite, tmp_path,
                   '[[variants]]\nbackend = "llama.cpp"\nquant = "Q4_K_M"\n'
                   'output_tensor_type = ["q5_0", "Q8_0"]\ntoken_embedding_type = ["default", "f16"]\n')
    names = sorted({i.rsplit("/", 1)[0].split("/", 2)[2] for i in cells})
    assert names == ["F16", "Q4_K_M", "Q4_K_M+output=Q5_0", "Q4_K_M+output=Q5_0+token_embd=F16",
                     "Q4_K_M+output=Q8_0", "Q4_K_M+output=Q8_0+token_embd=F16"]
    # the plain variants keep their keys (and stay the base)
    assert plain and all(cells[i].key == c.key for i, c in plain.items())
    one = cells["m/llama.cpp/Q4_K_M+output=Q5_0+token_embd=F16/kld"]
    assert one.variant.params()["output_tensor_type"] == "Q5_0"
    assert one.variant.params()["token_embedding_type"] == "F16"
    assert "output_tensor_type" not in cells["m/llama.cpp/Q4_K_M/kld"].variant.params()
    assert one.base_variant is not None and one.base_variant.quant == "F16"
    assert not one.base_variant.output_tensor_type


@pytest.mark.parametrize("group,key,words", [
    ('backend = "llama.cpp"\nquant = "Q4_K_M"\noutput_tensor_type = "Q4_K_Z"\n',
     "variants[1].output_tensor_type", "unknown tensor type 'Q4_K_Z'"),
    ('backend = "llama.cpp"\nquant = "Q4_K_M"\ntoken_embedding_type = ["q8_0", "Q8_0"]\n',
     "variants[1].token_embedding_type", "names a type twice"),
    ('backend = "llama.cpp"\nquant = "Q4_K_M"\noutput_tensor_type = "IQ2_XS"\n',
     "variants[1].output_tensor_type", "needs an importance matrix"),
    ('backend = "llama.cpp"\nquant = "Q4_K_M"\nsource = "m.gguf"\noutput_tensor_type = "Q8_0"\n',
     "variants[1].output_tensor_type", "pre-quantized"),
    ('backend = "transformers"\nquant = "fp32"\ntoken_embedding_type = "Q8_0"\n',
     "variants[1].token_embedding_type", "no token_embedding_type setting"),
])
def test_bad_tensor_types_are_refused_naming_the_key(write_suite, tmp_path, group, key,
                                                     words) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ConfigError) as err:
        load_suite(write_suite(HEAD + "[[variants]]\n" + group + TAIL))
    assert f": {key}: " in str(err.value) and words in str(err.value)


def test_tensor_types_match_ggml() -> None:
    """The static table against llama.cpp's gguf package's ggml_type enum."""
    from gguf import GGMLQuantizationType

    for name, value in gguf_types.TENSOR_TYPES.items():
        assert GGMLQuantizationType[name].value == value, name


def test_imatrix_builds_pass_the_types_as_llama_quantizes_flags(tmp_path, monkeypatch) -> None:
    seen = {}

    def run(cmd, **kw):
        seen["cmd"] = cmd

        class P:
            returncode = 0
            stderr = ""
        return P()

    monkeypatch.setattr(gguf.subprocess, "run", run)
    monkeypatch.setattr("qbench.quantize.llama_tools.find_tool", lambda name: "llama-quantize")
    gguf._quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q4_K_M", 2,
                   tmp_path / "m.imatrix", {"output_tensor_type": "Q5_0",
                                            "token_embedding_type": ""})
    cmd = seen["cmd"]
    assert cmd[cmd.index("--output-tensor-type") + 1] == "q5_0"
    assert "--token-embedding-type" not in cmd
    assert cmd.index("--output-tensor-type") < cmd.index(str(tmp_path / "in.gguf"))


@pytest.mark.slow
def test_the_output_type_reaches_the_file_smollm2(smollm2_ref, tmp_path) -> None:
    """Built by llama.cpp's quantizer: SmolLM2 ties its output to the token embedding, which
    Q4_K_M leaves at Q8_0 (576 is no multiple of 256); --output-tensor-type q5_0 makes it
    Q5_0, and the footprint reads back what the file holds."""
    from qbench.inputs.sources import resolve

    src = resolve(smollm2_ref, base_dir=tmp_path, cache_dir=tmp_path / "c").path
    sha = "smollm2-test"
    plain = gguf.build_variant(src, sha, "Q4_K_M", "F16", cache_dir=tmp_path / "c", threads=2)
    q5 = gguf.build_variant(src, sha, "Q4_K_M", "F16", cache_dir=tmp_path / "c", threads=2,
                            output_tensor_type="Q5_0")
    assert plain.sha256 != q5.sha256
    assert q5.recipe["output_tensor_type"] == "Q5_0"
    assert "output_tensor_type" not in plain.recipe
    roles_plain = gguf.footprint(plain.path, tmp_path / "c")["details"]["roles"]
    roles_q5 = gguf.footprint(q5.path, tmp_path / "c")["details"]["roles"]
    assert roles_plain == {"token_embd": "Q8_0", "output": None}
    assert roles_q5 == {"token_embd": "Q5_0", "output": None}
    assert q5.path.stat().st_size < plain.path.stat().st_size
