"""Synthetic models (qbench.inputs.synthetic): the reference, the architecture's tensors and
metadata, deterministic values, the safetensors twin holding the same model, the cache, and the
checks that run before any byte is written.

Presets are checked against the parameter counts their model cards publish (cited in
benchmarks/README.md, "Synthetic models"); the generated files are checked on tiny configs of
each architecture, so the tests write kilobytes, not gigabytes.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from qbench.errors import SourceError
from qbench.inputs import synthetic as syn
from qbench.inputs.sources import locate, resolve

TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1000, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024}


def tiny_config(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / f"tiny-{len(list(tmp_path.glob('tiny-*')))}.json"
    path.write_text(json.dumps(TINY | changes))
    return path


def quiet(_: str) -> None:
    pass


# --- the reference ------------------------------------------------------------------------

def test_reference_parts_and_defaults():
    assert syn.parse_ref("synthetic:llama-3.1-8b") == syn.SyntheticRef(
        "llama-3.1-8b", 0, "gguf", "synthetic:llama-3.1-8b")
    ref = syn.parse_ref("synthetic:cfg/config.json?seed=7&format=safetensors")
    assert (ref.spec, ref.seed, ref.format) == ("cfg/config.json", 7, "safetensors")


@pytest.mark.parametrize("ref, match", [
    ("synthetic:", "expected synthetic:PRESET"),
    ("synthetic:llama-3.1-8b?seed=x", "seed must be an integer"),
    ("synthetic:llama-3.1-8b?format=onnx", "format must be one of gguf, safetensors"),
    ("synthetic:llama-3.1-8b?colour=red", "unknown option 'colour'"),
    ("synthetic:llama-9", "not a preset"),
    ("synthetic:missing/config.json", "config file not found"),
])
def test_bad_references_are_refused_before_any_work(tmp_path, ref, match):
    with pytest.raises(SourceError, match=match):
        locate(ref, base_dir=tmp_path)
    assert not list(tmp_path.iterdir())          # nothing generated, nothing written


def test_config_json_is_checked(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "gpt2", **{k: 1 for k in syn._REQUIRED[1:]}}))
    with pytest.raises(SourceError, match="model_type 'gpt2'.*supported: llama, mistral, qwen2"):
        syn.load_shape(str(bad), tmp_path)
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(SourceError, match="lacks intermediate_size, num_hidden_layers"):
        syn.load_shape(str(short), tmp_path)


# --- presets against the model cards -------------------------------------------------------

@pytest.mark.parametrize("preset, published_b, digits", [
    ("llama-3.2-1b", 1.23, 2),       # Llama 3.2 model card: "1B (1.23B)"
    ("qwen2.5-0.5b", 0.49, 2),       # Qwen2.5-0.5B card: "Number of Parameters: 0.49B"
    ("qwen2.5-7b", 7.61, 2),         # Qwen2.5-7B card: "Number of Parameters: 7.61B"
    ("mistral-7b", 7.25, 2),         # Mistral-7B-v0.3 on the hub: 7.25B params
    ("llama-3.1-8b", 8.030261248, 9),   # index.json total_size 16,060,522,496 B of bf16 / 2
])
def test_preset_parameter_counts_match_the_published_ones(preset, published_b, digits):
    """Within the published figure's last digit (Meta and Qwen truncate: 1.2358 B is "1.23B",
    7.6156 B "7.61B"; the hub rounds)."""
    shape = syn.load_shape(preset, Path("."))
    assert abs(syn.n_params(shape) / 1e9 - published_b) < 10 ** -digits


def test_tied_and_biased_architectures_have_their_own_tensors():
    names = {p: {t.gguf_name for t in syn.tensor_plan(syn.load_shape(p, Path(".")))}
             for p in ("llama-3.2-1b", "llama-3.1-8b", "qwen2.5-0.5b", "qwen2.5-7b")}
    assert "output.weight" not in names["llama-3.2-1b"]          # tied embeddings
    assert "output.weight" in names["llama-3.1-8b"]
    assert "rope_freqs.weight" in names["llama-3.1-8b"]          # Llama 3 RoPE scaling
    assert "blk.0.attn_q.bias" in names["qwen2.5-0.5b"]          # Qwen2's q/k/v biases
    assert "blk.0.attn_q.bias" not in names["llama-3.1-8b"]
    assert "output.weight" in names["qwen2.5-7b"] and "output.weight" not in names["qwen2.5-0.5b"]
    assert len(names["llama-3.1-8b"]) == 2 + 32 * 9 + 2          # as llama.cpp's 8B GGUFs


def test_llama3_rope_factors():
    f = syn._rope_freqs(syn.load_shape("llama-3.1-8b", Path(".")))
    assert f.shape == (64,) and f.dtype == np.float32
    assert f[0] == 1.0 and f[-1] == 8.0                  # fast dims kept, slow ones / factor
    assert np.all(np.diff(f) >= 0) and ((f > 1) & (f < 8)).sum() >= 3   # a smooth ramp


# --- values --------------------------------------------------------------------------------

def test_values_are_deterministic_and_independent_of_the_write_pieces(tmp_path, monkeypatch):
    shape = syn.load_shape(str(tiny_config(tmp_path)), tmp_path)
    t = next(t for t in syn.tensor_plan(shape) if t.gguf_name == "token_embd.weight")

    def values(seed: int, write_blocks: int) -> np.ndarray:
        monkeypatch.setattr(syn, "BLOCK", 1000)
        monkeypatch.setattr(syn, "WRITE_BLOCKS", write_blocks)
        chunks = list(syn.tensor_chunks(shape, seed, t, gguf_layout=True))
        return np.concatenate(chunks), len(chunks)

    a, pieces_a = values(0, 1)
    b, pieces_b = values(0, 7)
    assert pieces_a > pieces_b > 1
    with ThreadPoolExecutor(3) as pool:                      # computed ahead, in parallel
        threaded = np.concatenate(list(syn.tensor_chunks(shape, 0, t, gguf_layout=True,
                                                         pool=pool)))
    assert np.array_equal(a, threaded)
    assert a.dtype == np.float16 and a.size == t.elements
    assert np.array_equal(a, b)                               # same numbers, other pieces
    assert not np.array_equal(a, values(1, 7)[0])             # another seed, other numbers
    bound = 0.02 * math.sqrt(3)
    assert abs(float(a.std()) - 0.02) < 0.002 and float(np.abs(a).max()) <= bound * 1.001


# --- the GGUF ------------------------------------------------------------------------------

def _read(path: Path):
    import gguf
    return gguf.GGUFReader(path)


def test_gguf_has_the_architectures_names_shapes_and_metadata(tmp_path):
    shape = syn.load_shape(str(tiny_config(tmp_path, model_type="qwen2", vocab_size=2000,
                                           tie_word_embeddings=True)), tmp_path)
    path = tmp_path / "m.gguf"
    syn.write_gguf(shape, 0, path, say=quiet)
    r = _read(path)
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in r.tensors}
    assert tensors["token_embd.weight"] == ((128, 2000), "F16")     # GGUF order: ne0 first
    assert tensors["blk.1.attn_k.weight"] == ((128, 64), "F16")
    assert tensors["blk.1.attn_k.bias"] == ((64,), "F32")
    assert tensors["blk.0.ffn_down.weight"] == ((256, 128), "F16")
    assert "output.weight" not in tensors
    fields = r.fields

    def value(key: str):
        f = fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert value("general.architecture") == "qwen2"
    assert int(value("qwen2.block_count")) == 2
    assert int(value("qwen2.attention.head_count_kv")) == 2
    assert value("tokenizer.ggml.pre") == "qwen2"
    assert len(fields["tokenizer.ggml.tokens"].data) == 2000
    assert path.stat().st_size > syn.gguf_data_bytes(shape)


def test_a_sparse_gguf_has_the_same_header_and_no_data(tmp_path):
    shape = syn.load_shape(str(tiny_config(tmp_path, vocab_size=30000)), tmp_path)
    full, sparse = tmp_path / "full.gguf", tmp_path / "sparse.gguf"
    syn.write_gguf(shape, 0, full, say=quiet)
    syn.write_gguf(shape, 0, sparse, data=False, say=quiet)
    assert full.stat().st_size == sparse.stat().st_size
    head = full.stat().st_size - syn.gguf_data_bytes(shape)
    assert full.read_bytes()[:head] == sparse.read_bytes()[:head]
    assert sparse.stat().st_blocks * 512 < head + 2**20 < full.stat().st_blocks * 512


def test_llama_cpp_loads_and_runs_it(tmp_path):
    llama = pytest.importorskip("qbench.backends.llamacpp", reason="llama-cpp-python")
    from qbench.backends.base import LoadOptions
    shape = syn.load_shape(str(tiny_config(tmp_path, vocab_size=130000)), tmp_path)
    path = tmp_path / "m.gguf"
    syn.write_gguf(shape, 0, path, say=quiet)
    backend = llama.load(path, LoadOptions(device="cpu", threads=1))
    try:
        assert backend.n_vocab == 130000 and backend.add_bos
        logits = np.asarray(next(backend.last_logits([[backend.bos_id, 7, 300, 9]])))
        assert logits.shape == (130000,) and np.isfinite(logits).all() and logits.std() > 0.05
        assert backend.tokenize("a\nb", add_special=False)    # the byte-level vocabulary works
    finally:
        backend.close()


@pytest.mark.slow
@pytest.mark.parametrize("arch", [
    {},                                                      # llama: Q/K rows permuted
    {"model_type": "qwen2", "vocab_size": 3000, "tie_word_embeddings": True},   # biases, tied
])
def test_the_safetensors_twin_is_the_same_model(tmp_path, arch):
    """transformers on the twin and llama.cpp on the GGUF give the same next-token
    distribution: every tensor has the right name, shape and layout in both."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    llama = pytest.importorskip("qbench.backends.llamacpp", reason="llama-cpp-python")
    from qbench.backends.base import LoadOptions
    shape = syn.load_shape(str(tiny_config(tmp_path, **arch)), tmp_path)
    gguf_path, hf = tmp_path / "m.gguf", tmp_path / "hf"
    syn.write_gguf(shape, 3, gguf_path, say=quiet)
    syn.write_safetensors(shape, 3, hf, say=quiet)
    tokens = [5, 17, 300, 41, 99, 7]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        hf_logits = model(torch.tensor([tokens])).logits[0, -1].double().numpy()
    backend = llama.load(gguf_path, LoadOptions(device="cpu", threads=1))
    try:
        cpp_logits = np.asarray(next(backend.last_logits([tokens])), dtype=np.float64)
    finally:
        backend.close()

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    p, q = log_softmax(hf_logits), log_softmax(cpp_logits)
    kld = float((np.exp(p) * (p - q)).sum())
    assert kld < 1e-5 and hf_logits.argmax() == cpp_logits.argmax()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert len(tok) == shape.n_vocab


# --- the cache and the checks before generating ----------------------------------------------

def test_generated_once_then_cached_and_keyed_by_seed(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    calls = []
    real = syn.write_gguf

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(syn, "write_gguf", counting)
    ref = f"synthetic:{cfg.name}"
    said: list[str] = []
    first = syn.ensure(ref, base_dir=tmp_path, cache_dir=tmp_path / "c", say=said.append)
    again = syn.ensure(ref, base_dir=tmp_path, cache_dir=tmp_path / "c", say=said.append)
    other = syn.ensure(ref + "?seed=1", base_dir=tmp_path, cache_dir=tmp_path / "c", say=quiet)
    assert first == again != other and calls == [0, 1]
    assert any("generating synthetic" in m for m in said) and any(" % (" in m for m in said)
    assert first.read_bytes() != other.read_bytes()
    resolved = resolve(ref, base_dir=tmp_path, cache_dir=tmp_path / "c")
    assert (resolved.path, resolved.kind) == (first, "synthetic")


def test_identity_changes_with_what_changes_the_bytes(tmp_path):
    cfg = tiny_config(tmp_path)
    ids = {syn.identity(f"synthetic:{cfg.name}{q}", tmp_path)
           for q in ("", "?seed=1", "?format=safetensors")}
    assert len(ids) == 3
    base = syn.identity(f"synthetic:{cfg.name}", tmp_path)
    cfg.write_text(json.dumps(TINY | {"num_hidden_layers": 3}))
    assert syn.identity(f"synthetic:{cfg.name}", tmp_path) != base
    assert not (tmp_path / "synthetic").exists()     # identity never generates


def test_no_room_is_a_clear_error_before_writing(tmp_path):
    shape = syn.load_shape("llama-3.1-8b", tmp_path)
    with pytest.raises(SourceError, match=r"needs 16\.3 GB free in .* and 2\.0 GB are"):
        syn.check_room(shape, "gguf", tmp_path, free_bytes=lambda p: 2 * 10**9,
                       available_memory=lambda: 64 * 2**30)
    with pytest.raises(SourceError, match="GiB of free memory"):
        syn.check_room(shape, "gguf", tmp_path, free_bytes=lambda p: 10**12,
                       available_memory=lambda: 2**20)
    syn.check_room(shape, "gguf", tmp_path, free_bytes=lambda p: 10**12,
                   available_memory=lambda: 64 * 2**30)
    assert list(tmp_path.iterdir()) == []


# --- in a suite: only hardware-bound metrics --------------------------------------------------

MIXED = """
    [suite]
    name = "sizes"
    [[models]]
    id = "real"
    source = "real.gguf"
    [[models]]
    id = "synth"
    source = "synthetic:llama-3.2-1b"
    [[variants]]
    backend = "llama.cpp"
    quant = ["F16", "Q8_0"]
    models = ["real"]
    [[variants]]
    backend = "llama.cpp"
    quant = ["Q8_0", "Q4_K_M"]
    models = ["synth"]
    {synth_metrics}
    [metrics.perplexity]
    dataset = "{text}"
    ctx = 64
    chunks = 1
    [metrics.speed]
    prompt_tokens = 8
    gen_tokens = 4
    repetitions = 1
    """


def _mixed(write_suite, tmp_path: Path, synth_metrics: str) -> Path:
    (tmp_path / "real.gguf").write_bytes(b"GGUF")
    (tmp_path / "text.txt").write_text("some text " * 100)
    return write_suite(MIXED.format(synth_metrics=synth_metrics, text=tmp_path / "text.txt"))


@pytest.mark.parametrize("synth_metrics, refused", [
    ("", "perplexity"),                          # every metric of the suite, perplexity too
    ('metrics = ["speed", "sanity"]', "sanity"),     # sanity asked for by name
])
def test_quality_metrics_on_a_synthetic_model_are_refused_with_the_reason(
        write_suite, tmp_path, synth_metrics, refused):
    from qbench.errors import ConfigError
    from qbench.suite.config import load_suite
    with pytest.raises(ConfigError, match=rf"{refused} on model 'synth'.*random weights") as exc:
        load_suite(_mixed(write_suite, tmp_path, synth_metrics))
    assert exc.value.key == "models[1].source"


def test_a_synthetic_model_gets_speed_and_footprint_and_no_generation_at_plan_time(
        write_suite, tmp_path):
    from qbench.suite.config import load_suite
    from qbench.suite.plan import PlanContext, expand
    suite = load_suite(_mixed(write_suite, tmp_path, 'metrics = ["speed"]'))
    ctx = PlanContext(base_dir=tmp_path, data_dir=None, cache_dir=tmp_path / "cache")
    cells = expand(suite, ctx)
    synth = sorted(c.id for c in cells if c.model.id == "synth")
    assert synth == ["synth/llama.cpp/Q4_K_M/footprint", "synth/llama.cpp/Q4_K_M/speed",
                     "synth/llama.cpp/Q8_0/footprint", "synth/llama.cpp/Q8_0/speed"]
    real = {c.metric for c in cells if c.model.id == "real"}
    assert {"sanity", "perplexity", "speed", "footprint"} <= real     # the real model keeps all
    assert not (tmp_path / "cache" / "synthetic").exists()
    keys = {c.id: c.key for c in cells}
    reseeded = write_suite(MIXED.format(synth_metrics='metrics = ["speed"]',
                                        text=tmp_path / "text.txt").replace(
        "synthetic:llama-3.2-1b", "synthetic:llama-3.2-1b?seed=5"), name="seeded.toml")
    keys2 = {c.id: c.key for c in expand(load_suite(reseeded), ctx)}
    assert keys2["synth/llama.cpp/Q8_0/speed"] != keys["synth/llama.cpp/Q8_0/speed"]
    assert keys2["real/llama.cpp/Q8_0/speed"] == keys["real/llama.cpp/Q8_0/speed"]
