"""The memory model's repack rule (qbench.quantize.cpu_repack) is llama.cpp's: the bytes it
predicts for a file are the bytes the installed llama.cpp says it put in its repack buffer, on
whichever CPU runs the test (AVX2 here; AVX-512 machines repack Q2_K too); and the recommendation
counts that copy and the runtime for a llama.cpp variant on the CPU, not elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qbench.quantize.cpu_repack import (features_from_cpu_flags, repacked_bytes,
                                        repacked_types)
from qbench.report.memory_model import runtime_mb
from qbench.report.recommend import _memory

AVX2 = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
        "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
AVX512 = AVX2.replace("BMI2 = 1", "BMI2 = 1 | AVX512 = 1")
ARM_DOT = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | OPENMP = 1 | REPACK = 1 | "
MIX = {"Q4_K": {"tensors": 96, "params": 0, "bytes": 400},
       "Q6_K": {"tensors": 17, "params": 0, "bytes": 300},
       "Q2_K": {"tensors": 4, "params": 0, "bytes": 50}, "F32": {"tensors": 3, "params": 0,
                                                                  "bytes": 1}}


def test_the_rule_follows_the_builds_features() -> None:
    assert repacked_types(AVX2) == {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    assert repacked_types(AVX512) == {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K"}
    assert "Q6_K" in repacked_types(ARM_DOT) and "Q8_0" in repacked_types(ARM_DOT)
    assert repacked_types(AVX2.replace("REPACK = 1", "REPACK = 0")) == frozenset()
    assert repacked_types("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 0 | REPACK = 1 |") == frozenset()
    assert repacked_types("CPU : RISCV_V = 1 | REPACK = 1 |") is None     # not covered: unknown
    assert repacked_types(AVX2.replace("REPACK = 1 | ", "")) is None       # an older build
    assert repacked_types("") is None and repacked_types(None) is None


def test_bytes_leave_out_a_repacked_token_embedding() -> None:
    assert repacked_bytes(MIX, {"token_embd": "Q6_K"}, 120, AVX2) == 400
    assert repacked_bytes(MIX, {"token_embd": "Q4_K"}, 120, AVX2) == 280
    assert repacked_bytes(MIX, {"token_embd": "Q4_K"}, 120, AVX512) == 330
    assert repacked_bytes(MIX, {"token_embd": "Q4_K"}, None, AVX2) is None   # not known
    assert repacked_bytes(MIX, {}, None, "CPU : RISCV_V = 1 | REPACK = 1 |") is None


def test_an_unloaded_variant_takes_the_cpus_flags() -> None:
    assert repacked_types(features_from_cpu_flags(["avx", "avx2", "fma"])) == repacked_types(AVX2)
    assert "Q2_K" in repacked_types(features_from_cpu_flags(["avx2", "avx512f"]))
    assert features_from_cpu_flags(["neon", "sve"]) is None


SHAPE = {"block_count": 16, "embedding_length": 2048, "attention.head_count": 32,
         "attention.head_count_kv": 8, "feed_forward_length": 8192, "vocab_size": 128256}


def _row(**kw: object) -> dict:
    return {"backend": "llama.cpp", "device": "cpu", "model_shape": SHAPE, "size_mb": 800.0,
            "tensor_types": MIX | {"Q4_K": {"tensors": 96, "params": 0, "bytes": 2 ** 30}},
            "roles": {"token_embd": "Q6_K"}, "embed_bytes": 100, "system_info": AVX2, **kw}


def test_the_estimate_adds_the_repacked_copy_and_the_runtime_on_the_cpu_only() -> None:
    cpu = _memory(_row(), 4096)
    assert cpu["repack_mb"] == pytest.approx(1024.0)
    # worker 55 + libraries 11 + 345 B x 128,256 tokens + 512 x (3 x 8192 + 4 x 2048) x 4 B
    assert cpu["runtime_mb"] == pytest.approx(66 + 42.2 + 64.0, abs=0.1)
    assert cpu["estimate_mb"] == pytest.approx(800 + 1024 + 128 + cpu["runtime_mb"])
    # needed and ranked without the repacked tensors' mapped copy (clean page cache); ranked
    # without the runtime either
    assert cpu["need_mb"] == pytest.approx(cpu["estimate_mb"] - 1024)
    assert cpu["rank_mb"] == pytest.approx(800 + 128)
    gpu = _memory(_row(device="cuda"), 4096)
    assert gpu["repack_mb"] == 0 and gpu["runtime_mb"] is None
    assert gpu["estimate_mb"] == pytest.approx(800 + 128)
    hf = _memory(_row(backend="transformers", device="cpu"), 4096)
    assert hf["repack_mb"] == 0 and hf["runtime_mb"] is None
    # a footprint-only variant on a machine with a GPU: where it will run is not known
    unknown = _memory(_row(device=None, machine_gpus=True), 4096)
    assert unknown["repack_mb"] is None and "not known" in unknown["repack_how"]
    # an older record without the vocabulary: no runtime term rather than a wrong one
    old = _memory(_row(model_shape={k: v for k, v in SHAPE.items() if k != "vocab_size"}), 4096)
    assert old["runtime_mb"] is None and old["estimate_mb"] == pytest.approx(800 + 1024 + 128)


def test_the_runtime_grows_with_the_ubatch_and_the_vocabulary() -> None:
    base = runtime_mb(_row(), SHAPE)
    assert runtime_mb(_row(n_ubatch=1024), SHAPE) > base
    assert runtime_mb(_row(), SHAPE | {"vocab_size": 32000}) < base


TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1000, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024}

_CHILD = """
import json, sys
from pathlib import Path
from qbench.backends import llama_log
lines = llama_log.capture()
from qbench.backends.base import LoadOptions
from qbench.backends.llamacpp import load, system_info
b = load(Path(sys.argv[1]), LoadOptions(device="cpu", threads=1))
b.close()
print(json.dumps({"buffers": llama_log.buffer_sizes("".join(lines)), "info": system_info()}))
"""


# SmolLM2's widths (576 = 2.25 x 256): K-quants fall back on most tensors (Q2_K to Q4_0, which
# AVX2 repacks; Q4_K to Q5_0, which it does not)
NARROW = TINY | {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                 "num_key_value_heads": 3}


@pytest.mark.parametrize("config,quant", [(TINY, "Q4_K_M"), (TINY, "Q4_0"), (TINY, "Q2_K"),
                                          (TINY, "Q8_0"), (NARROW, "Q2_K"),
                                          (NARROW, "Q4_K_M")])
def test_the_rule_matches_what_llama_cpp_repacks(tmp_path: Path, config: dict,
                                                 quant: str) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (loads the file)")
    from qbench.inputs import synthetic as syn
    from qbench.quantize.gguf import footprint
    from qbench.quantize.synthetic_blocks import dry_run_types, write_quantized_gguf

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(config))
    shape = syn.load_shape(str(cfg), tmp_path)
    f16, out = tmp_path / "f16.gguf", tmp_path / f"{quant}.gguf"
    syn.write_gguf(shape, 0, f16, say=lambda m: None)
    write_quantized_gguf(shape, 0, quant, dry_run_types(f16, quant), out, say=lambda m: None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    fp = footprint(out)["details"]
    predicted = repacked_bytes(fp["tensor_types"], fp["roles"], fp["embed_bytes"], got["info"])
    logged = got["buffers"].get("CPU_REPACK model", 0.0)
    assert predicted is not None
    if config is NARROW and quant == "Q2_K" and "AVX2 = 1" in got["info"]:
        assert logged > 0      # the fallback type (Q4_0 in this llama.cpp) is repacked
    # llama.cpp logs MiB to two decimals; its buffer is padded to its alignment per tensor
    assert predicted / 2 ** 20 == pytest.approx(logged, abs=0.01 + 32 * 64 / 2 ** 20), (
        quant, fp["tensor_types"], got)
