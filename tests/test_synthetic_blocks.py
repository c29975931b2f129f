"""A synthetic model's quantized variant written directly (qbench.quantize.synthetic_blocks) is
the file llama.cpp's quantizer would write, in what speed and memory depend on: the same size
to the byte, the same type for every tensor, the same metadata; and llama.cpp runs it. Really
quantizing is kept where it matters: an importance matrix, or a type that needs one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qbench.inputs import synthetic as syn
from qbench.quantize.synthetic_blocks import (direct_supported, dry_run_types, parse_dry_run,
                                              write_quantized_gguf)

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the quantizer and its dry run)")

TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1000, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024}

LOG = """\
[   1/ 147]                   output_norm.weight - [  2048,      1,      1,      1], type =    f32, size =    0.008 MiB
[   3/ 147]                    token_embd.weight - [  2048, 128256,      1,      1], type =    f16, size =   501.00 MiB ->   205.49 MiB (q6_K)
[   4/ 147] blk.0.attn_k.weight                  - [  2048,    512,      1,      1], type =    f16, size =     2.00 MiB ->     0.56 MiB (q4_K)
llama_model_quantize_impl: quant size  =   762.81 MiB (5.18 BPW)
"""


def test_the_dry_runs_lines_give_each_tensors_type() -> None:
    assert parse_dry_run(LOG) == {"output_norm.weight": "F32", "token_embd.weight": "Q6_K",
                                  "blk.0.attn_k.weight": "Q4_K"}


def test_types_that_need_an_importance_matrix_are_quantized_for_real() -> None:
    assert direct_supported("Q4_K_M") and direct_supported("Q8_0")
    assert not direct_supported("IQ2_XXS") and not direct_supported("Q2_K_S")
    assert not direct_supported("IQ4_XS")


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from gguf import GGUFReader
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape)) for t in r.tensors}


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "Q3_K_M"])
def test_the_direct_file_is_the_quantizers_in_size_types_and_metadata(tmp_path: Path,
                                                                       quant: str) -> None:
    from gguf import GGUFReader

    from qbench.quantize.gguf import _quantize
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    shape = syn.load_shape(str(cfg), tmp_path)
    f16 = tmp_path / "f16.gguf"
    syn.write_gguf(shape, 0, f16, say=lambda m: None)
    real, direct = tmp_path / "real.gguf", tmp_path / "direct.gguf"
    _quantize(f16, real, quant, 1, None)
    write_quantized_gguf(shape, 0, quant, dry_run_types(f16, quant), direct,
                             say=lambda m: None)
    assert direct.stat().st_size == real.stat().st_size
    assert _tensors(direct) == _tensors(real)
    assert len({t for t, _ in _tensors(direct).values()}) > 1      # a mix, not one type
    fields = {k: v.parts[-1].tolist() for k, v in GGUFReader(real).fields.items()
              if k.startswith("general.file_type")}
    assert fields == {k: v.parts[-1].tolist() for k, v in GGUFReader(direct).fields.items()
                      if k.startswith("general.file_type")}


def test_llama_cpp_runs_the_direct_file(tmp_path: Path) -> None:
    from qbench.backends import llamacpp
    from qbench.backends.base import LoadOptions
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    shape = syn.load_shape(str(cfg), tmp_path)
    f16 = tmp_path / "f16.gguf"
    syn.write_gguf(shape, 0, f16, say=lambda m: None)
    direct = tmp_path / "direct.gguf"
    write_quantized_gguf(shape, 0, "Q4_K_M", dry_run_types(f16, "Q4_K_M"), direct,
                             say=lambda m: None)
    backend = llamacpp.load(direct, LoadOptions(device="cpu", threads=1))
    try:
        logits = np.asarray(next(backend.last_logits([[backend.bos_id, 7, 300, 9]])))
        assert logits.shape == (1000,) and np.isfinite(logits).all() and logits.std() > 0
    finally:
        backend.close()


def test_a_synthetic_variant_is_prepared_directly_unless_it_needs_an_imatrix(
        tmp_path: Path) -> None:
    from qbench.quantize.gguf_prepare import direct_synthetic, prepare
    from qbench.quantize.request import PrepareRequest
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    ref = f"synthetic:{cfg}"
    f16 = syn.ensure(ref, base_dir=tmp_path, cache_dir=tmp_path / "cache", say=lambda m: None)
    model = {"id": "tiny", "source": ref, "base": "F16"}

    def req(**variant: object) -> PrepareRequest:
        return PrepareRequest({"backend": "llama.cpp"} | variant, model, f16, "0" * 64,
                              tmp_path, None, tmp_path / "cache", 1)

    path, described = prepare(req(quant="Q4_K_M"))
    assert described["recipe"]["tool"].startswith("synthetic blocks")
    assert _tensors(path)["blk.0.attn_q.weight"][0] == "Q4_K"
    assert not direct_synthetic(req(quant="Q4_K_M", imatrix="wikitext-2"))
    assert not direct_synthetic(req(quant="IQ2_XXS"))
    assert not direct_synthetic(req(quant="F16"))            # the source itself
    real = dict(model, source="path:/models/tiny.gguf")
    assert not direct_synthetic(PrepareRequest({"quant": "Q4_K_M"}, real, f16, "0" * 64,
                                               tmp_path, None, tmp_path / "cache", 1))
