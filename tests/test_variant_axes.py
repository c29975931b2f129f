"""The axes of a GGUF variant people really run: with or without an importance matrix, the
KV-cache type, and pre-quantized files from different makers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qbench.errors import ConfigError
from qbench.quantize import gguf, gguf_types
from qbench.quantize.imatrix import IMATRIX_CHUNKS, IMATRIX_CTX, calibration_slice
from qbench.suite.config import load_suite
from qbench.suite.plan import PlanContext, expand

HEAD = """
[suite]
name = "axes"
[[models]]
id = "m"
source = "m.gguf"
base = "F16"
[[variants]]
backend = "llama.cpp"
quant = ["F16"]
"""
TAIL = "\n[metrics.perplexity]\nctx = 64\n[metrics.kld]\n"


def _suite(write_suite, tmp_path: Path, groups: str):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    (tmp_path / "calib.txt").write_text("calibration text\n" * 10)
    return load_suite(write_suite(HEAD + groups + TAIL))


def _ids(suite, tmp_path: Path) -> list[str]:
    cells = expand(suite, PlanContext(base_dir=tmp_path, data_dir=None,
                                      cache_dir=tmp_path / "cache", env={}))
    return sorted({c.id.rsplit("/", 1)[0] for c in cells})


def test_imatrix_pair_makes_two_variants_with_their_own_ids_and_keys(write_suite, tmp_path):
    suite = _suite(write_suite, tmp_path, '[[variants]]\nbackend = "llama.cpp"\n'
                   'quant = ["Q4_K_M"]\nimatrix = ["none", "calib.txt"]\n')
    ids = _ids(suite, tmp_path)
    assert ids == ["m/llama.cpp/F16", "m/llama.cpp/Q4_K_M", "m/llama.cpp/Q4_K_M+imatrix=calib"]
    cells = expand(suite, PlanContext(base_dir=tmp_path, data_dir=None,
                                      cache_dir=tmp_path / "cache", env={}))
    by_id = {c.id: c for c in cells}
    plain, imat = by_id["m/llama.cpp/Q4_K_M/kld"], by_id["m/llama.cpp/Q4_K_M+imatrix=calib/kld"]
    assert plain.key != imat.key
    assert "imatrix" in imat.inputs and "imatrix" not in plain.inputs


def test_kv_cache_axis_keeps_the_plain_variant_as_base(write_suite, tmp_path):
    # the quantized caches first: the base must still be the plain F16 (f16 cache)
    suite = _suite(write_suite, tmp_path, '[[variants]]\nbackend = "llama.cpp"\n'
                   'quant = ["Q8_0"]\nkv_cache = ["q4_0", "q8_0", "F16"]\n')
    ids = _ids(suite, tmp_path)
    assert ids == ["m/llama.cpp/F16", "m/llama.cpp/Q8_0", "m/llama.cpp/Q8_0+kv=q4_0",
                   "m/llama.cpp/Q8_0+kv=q8_0"]
    model = suite.models[0]
    assert suite.base_variant(model).quant == "F16" and suite.base_variant(model).kv_cache == ""
    params = {v.name: v.params() for v in suite.variants}
    assert params["Q8_0+kv=q8_0"]["kv_cache"] == "q8_0"
    assert "kv_cache" not in params["Q8_0"]       # a plain variant's key is what it was


def test_kv_cache_on_f16_weights_is_not_the_base(write_suite, tmp_path):
    suite = load_suite(write_suite(HEAD.replace('quant = ["F16"]',
                                                'quant = ["F16"]\nkv_cache = ["q8_0", "f16"]')
                                   + TAIL))
    assert suite.base_variant(suite.models[0]).kv_cache == ""


@pytest.mark.parametrize("group, key, words", [
    ('backend = "transformers"\nquant = ["fp32"]\nkv_cache = ["q8_0"]', "kv_cache",
     "no KV-cache type setting"),
    ('backend = "llama.cpp"\nquant = ["Q8_0"]\nkv_cache = ["q3_k"]', "kv_cache",
     "unknown KV-cache type 'q3_k'"),
    ('backend = "llama.cpp"\nquant = ["Q8_0"]\nkv_cache = ["f16", "F16"]', "kv_cache",
     "names a type twice"),
    ('backend = "transformers"\nquant = ["fp32"]\nimatrix = "calib.txt"', "imatrix",
     "takes no importance matrix"),
    ('backend = "llama.cpp"\nquant = ["IQ2_XS"]\nimatrix = ["none", "calib.txt"]', "quant[0]",
     "IQ2_XS needs an importance matrix"),
    ('backend = "llama.cpp"\nquant = "Q4_1"\nsource = "m.gguf"\nimatrix = "calib.txt"',
     "imatrix", "pre-quantized 'source' was made by someone else"),
    ('backend = "llama.cpp"\nquant = ["Q8_0"]\nlabel = "maker"', "label", "set 'source' too"),
    ('backend = "llama.cpp"\nquant = ["Q4_K_M"]\nimatrix_chunks = 32', "imatrix_chunks",
     "set imatrix = "),
    ('backend = "llama.cpp"\nquant = ["Q4_K_M"]\nimatrix = "calib.txt"\nimatrix_chunks = 0',
     "imatrix_chunks", "expected 1-10,000 chunks of 512 tokens, got 0"),
])
def test_bad_axes_are_refused_by_validate(write_suite, tmp_path, group, key, words):
    with pytest.raises(ConfigError) as err:
        _suite(write_suite, tmp_path, "[[variants]]\n" + group + "\n")
    assert err.value.key.endswith(key) and words in str(err.value)


def test_two_makers_files_of_one_type_are_two_labelled_variants(write_suite, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "q.gguf").write_bytes(b"GGUF" + b"\1" * 64)
    (tmp_path / "b" / "q.gguf").write_bytes(b"GGUF" + b"\2" * 64)
    suite = _suite(write_suite, tmp_path,
                   '[[variants]]\nbackend = "llama.cpp"\nquant = "Q4_K_M"\nsource = "a/q.gguf"\n'
                   'label = "maker-a"\n[[variants]]\nbackend = "llama.cpp"\nquant = "Q4_K_M"\n'
                   'source = "b/q.gguf"\nlabel = "maker-b"\n')
    assert _ids(suite, tmp_path) == ["m/llama.cpp/F16", "m/llama.cpp/Q4_K_M@maker-a",
                                     "m/llama.cpp/Q4_K_M@maker-b"]


def test_imatrix_chunks_change_the_recipe_in_the_key_and_the_default_changes_nothing(
        write_suite, tmp_path):
    group = '[[variants]]\nbackend = "llama.cpp"\nquant = ["Q4_K_M"]\nimatrix = "calib.txt"\n'

    def kld_cell(extra: str):
        suite = _suite(write_suite, tmp_path, group + extra)
        cells = expand(suite, PlanContext(base_dir=tmp_path, data_dir=None,
                                          cache_dir=tmp_path / "cache", env={}))
        return next(c for c in cells if c.id == "m/llama.cpp/Q4_K_M+imatrix=calib/kld")

    plain, default, fewer = kld_cell(""), kld_cell("imatrix_chunks = 100\n"), kld_cell(
        "imatrix_chunks = 32\n")
    assert plain.key == default.key and plain.inputs["imatrix"]["chunks"] == IMATRIX_CHUNKS
    assert fewer.key != plain.key and fewer.inputs["imatrix"]["chunks"] == 32
    assert fewer.variant.imatrix_chunks == 32


def test_fewer_imatrix_chunks_read_a_shorter_tail():
    text = "".join(f"line {i} of the text\n" for i in range(200_000))
    full, _ = calibration_slice(text)
    piece, region = calibration_slice(text, 10)
    assert text.endswith(piece) and len(piece) <= 10 * IMATRIX_CTX * 6 < len(full)
    assert region["start_char"] == len(text) - len(piece)


def test_imatrix_calibration_is_cut_from_the_end():
    text = "".join(f"line {i} of the text\n" for i in range(200_000))
    piece, region = calibration_slice(text)
    assert text.endswith(piece) and len(piece) < len(text)
    assert len(piece) <= IMATRIX_CHUNKS * IMATRIX_CTX * 6
    assert piece.startswith("line ")                      # cut at a line start
    assert region["start_char"] == len(text) - len(piece)
    assert "the end" in region["region"]
    short = "a short text\n"
    assert calibration_slice(short)[0] == short           # all of a short text


def test_kv_cache_types_match_ggml():
    """The static table (validate must not import llama.cpp) against llama.cpp's own gguf
    package's ggml_type enum, and its bytes per element against the block sizes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, value in gguf_types.KV_CACHE_TYPES.items():
        kind = GGMLQuantizationType[name.upper()]
        assert kind.value == value, name
        block, type_bytes = GGML_QUANT_SIZES[kind]
        assert gguf_types.KV_BYTES_PER_ELEMENT[name] == pytest.approx(type_bytes / block), name


def test_provenance_of_a_published_file(smollm2_ref, tmp_path):
    """The wheel's SmolLM2 Q4_1 says who made it in its own metadata."""
    from qbench.inputs.sources import resolve
    from qbench.quantize.gguf import inspect_gguf

    path = resolve(smollm2_ref, base_dir=tmp_path, cache_dir=tmp_path / "c").path
    prov = inspect_gguf(path, tmp_path / "c")["provenance"]
    assert prov["general.organization"] == "HuggingFaceTB"
    assert prov["general.quantization_version"] == 2
    assert not any(k.startswith("tokenizer.") for k in prov)
    # the memo holds it too (a second read comes from the cache)
    memo = next((tmp_path / "c" / "inspect").glob(f"*-v{gguf.SUMMARY_VERSION}.json"))
    assert json.loads(memo.read_text())["provenance"] == prov


def test_build_imatrix_runs_the_tool_once_and_records_where_its_text_came_from(tmp_path,
                                                                               monkeypatch):
    """The whole build path with a stand-in llama-imatrix (a script that checks its arguments
    and writes the -o file): the matrix lands in the cache with its provenance and log, and a
    second request finds it there without running the tool."""
    import stat

    from qbench.quantize import gguf, imatrix
    from qbench.quantize.request import PrepareRequest

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    tool = bin_dir / "llama-imatrix"
    tool.write_text("#!/bin/sh\n"
                    f"echo \"$@\" >> {calls}\n"
                    "echo 'computing over chunks'\n"
                    "while [ $# -gt 0 ]; do\n"
                    "  case $1 in -o) shift; printf 'IMAT' > \"$1\" ;; esac; shift\n"
                    "done\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("QBENCH_LLAMA_CPP_BIN", str(bin_dir))
    monkeypatch.setattr(imatrix, "tool_version", lambda: {"build": "fake", "llama_cpp_python": "x"})
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF")
    monkeypatch.setattr(imatrix, "build_variant",
                        lambda *a, **k: gguf.Artifact(base, "basesha", {}))
    text = "".join(f"line {i} of the calibration text\n" for i in range(50_000))
    (tmp_path / "calib.txt").write_text(text)
    req = PrepareRequest(variant={"quant": "Q4_K_M", "imatrix": "calib.txt",
                                  "imatrix_chunks": 4},
                         model={"id": "m", "base": "F16"}, model_file=base, model_sha="m",
                         base_dir=tmp_path, data_dir=None, cache_dir=tmp_path / "cache",
                         threads=1)
    path, sha = imatrix.build_imatrix(req)
    assert path.read_bytes() == b"IMAT" and path.name == "imatrix.dat"
    args = calls.read_text().split()
    assert args[args.index("--chunks") + 1] == "4" and args[args.index("-c") + 1] == "512"
    prov = imatrix.provenance(path)
    assert prov["chunks"] == 4 and prov["imatrix_sha256"] == sha and prov["base_sha256"] == "basesha"
    assert "the end" in prov["region"]
    assert "computing over chunks" in (path.parent / "llama-imatrix.log").read_text()
    assert imatrix.build_imatrix(req) == (path, sha)
    assert len(calls.read_text().splitlines()) == 1          # cached: the tool ran once
