"""Synthetic models of real architectures: a model source that needs no download.

Speed and memory depend on a model's tensor shapes and types, never on its weights' values, so
``source = "synthetic:llama-3.1-8b"`` answers "how fast and how big is Llama-3.1-8B Q4_K_M at
8k context here?" before a 5 GB download. The reference is

    synthetic:PRESET[?seed=N][&format=gguf|safetensors]
    synthetic:path/to/config.json[?...]          (a Hugging Face config: llama, mistral, qwen2)

PRESET is a key of ``qbench/data/synthetic_presets.json`` (each real model's config.json and
tokenizer shape). What is generated has the architecture's exact tensor names, shapes, vocabulary
size and GGUF metadata, as llama.cpp's ``convert_hf_to_gguf.py`` writes them (tied embeddings,
Qwen2's q/k/v biases, Llama 3's ``rope_freqs``), with random weights deterministic from the seed:

- ``format=gguf`` (default): an F16 GGUF written with the ``gguf`` package's GGUFWriter, for the
  llama.cpp backend, which quantizes it to any type like any other F16 base;
- ``format=safetensors``: a Hugging Face folder (config.json, a byte-level BPE tokenizer of the
  same size, sharded ``*.safetensors``) for the transformers backend. Both hold the same numbers:
  each tensor's values come from a stream seeded by (seed, its Hugging Face name, block), and the
  GGUF's Q/K rows are permuted as the converter permutes them, so the two are one model.

Values: uniform in ±``initializer_range``·√3 (the config's init std, 0.02) drawn in blocks of
2^20 elements, each block from its own seeded generator, so the numbers never depend on how the
writer chunks them; norms are 1, biases small. The tokenizer has the real vocabulary size,
special-token ids, BPE merges count (llama.cpp keeps the merges in memory: their count moves RSS)
with synthetic token strings: enough for llama.cpp and transformers to load and run, meaningless
as text. So only hardware-bound metrics mean anything on it: the suite loader refuses
perplexity, KLD, MMLU, sanity and lm-eval on a synthetic source (qbench.suite.config).

Generated once per (preset or config, seed, format, generator version, library versions) into
the cache's ``synthetic`` folder, under a lock, written beside and renamed into place, with
progress lines on stderr; free disk and memory are checked first (an 8B F16 is 16 GB). Tensors
are streamed to disk in 32 MiB pieces: an 8B never sits in RAM.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from qbench.errors import SourceError
from qbench.host.cache import folder as cache_folder
from qbench.host.fsutil import atomic_write_text, file_lock

SCHEME = "synthetic:"
GENERATOR_VERSION = "1"
FORMATS = ("gguf", "safetensors")
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}   # HF -> GGUF arch
BLOCK = 1 << 20                  # elements per seeded generator block
MAX_WORKERS = 8                  # generation threads (the pieces are independent)
WRITE_BLOCKS = 16                # blocks per write: 16 Mi elements, 32 MiB of F16
SHARD_BYTES = 2 * 2**30          # safetensors shard size
MARGIN_BYTES = 256 * 2**20       # free disk kept beyond the file
GGUF_ALIGN = 32
# llama.cpp's token types (gguf.TokenType), as the converter writes them
NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6


def workers() -> int:
    """Threads generating values: the usable cores, at most MAX_WORKERS."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, n))


def _say(message: str) -> None:
    print(f"qbench: {message}", file=sys.stderr, flush=True)


# -- the reference ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticRef:
    spec: str          # preset name or config.json path, as written
    seed: int
    format: str
    origin: str        # the whole reference


def is_synthetic(ref: str) -> bool:
    return ref.startswith(SCHEME)


def parse_ref(ref: str) -> SyntheticRef:
    """``synthetic:SPEC[?seed=N&format=F]`` -> its parts; SourceError naming what is wrong."""
    body, _, query = ref[len(SCHEME):].partition("?")
    if not body:
        raise SourceError(f"expected synthetic:PRESET or synthetic:path/config.json, got {ref!r} "
                          f"(presets: {', '.join(preset_names())})")
    seed, fmt = 0, "gguf"
    try:
        options = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise SourceError(f"{ref!r}: expected ?seed=N&format=F after the name") from None
    for key, value in options:
        if key == "seed":
            if not value.isdigit() or int(value) >= 2**32:
                raise SourceError(f"{ref!r}: seed must be an integer 0-{2**32 - 1}, got {value!r}")
            seed = int(value)
        elif key == "format":
            if value not in FORMATS:
                raise SourceError(f"{ref!r}: format must be one of {', '.join(FORMATS)} (gguf for "
                                  f"llama.cpp, safetensors for transformers), got {value!r}")
            fmt = value
        else:
            raise SourceError(f"{ref!r}: unknown option {key!r} (expected seed=N, format=F)")
    return SyntheticRef(body, seed, fmt, ref)


# -- the architecture ------------------------------------------------------------------------
@cache
def _presets() -> dict[str, Any]:
    text = resources.files("qbench").joinpath("data/synthetic_presets.json").read_text("utf-8")
    return json.loads(text)["presets"]


def preset_names() -> tuple[str, ...]:
    return tuple(sorted(_presets()))


@dataclass(frozen=True)
class Shape:
    """What a synthetic model is made from: a Hugging Face config and a tokenizer shape."""

    name: str
    config: dict[str, Any]
    tokenizer: dict[str, Any]

    @property
    def arch(self) -> str:
        return ARCHITECTURES[self.config["model_type"]]

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    @property
    def n_layer(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def n_embd(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def n_head(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def n_kv(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.n_head)

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.n_embd // self.n_head)

    @property
    def n_vocab(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def qkv_bias(self) -> bool:
        return self.config["model_type"] == "qwen2" or bool(self.config.get("attention_bias"))

    @property
    def o_bias(self) -> bool:
        return self.config["model_type"] != "qwen2" and bool(self.config.get("attention_bias"))


_REQUIRED = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "vocab_size")


def load_shape(spec: str, base_dir: Path) -> Shape:
    """The preset named ``spec``, else the Hugging Face config.json at that path (relative to
    ``base_dir``), checked: a supported architecture with every field the tensors need."""
    if spec in _presets():
        entry = _presets()[spec]
        return Shape(spec, dict(entry["config"]), dict(entry["tokenizer"]))
    path = Path(os.path.expanduser(spec))
    if not path.is_absolute():
        path = base_dir / path
    if path.suffix != ".json":
        raise SourceError(f"synthetic:{spec}: not a preset ({', '.join(preset_names())}) and not "
                          "a path to a Hugging Face config.json")
    if not path.is_file():
        raise SourceError(f"synthetic:{spec}: config file not found: {path}")
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"synthetic:{spec}: cannot read {path} as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise SourceError(f"synthetic:{spec}: {path} holds no JSON object")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise SourceError(f"synthetic:{spec}: {path} lacks {', '.join(missing)}: not a Hugging "
                          "Face causal-LM config.json")
    if config["model_type"] not in ARCHITECTURES:
        raise SourceError(f"synthetic:{spec}: model_type {config['model_type']!r} in {path} is not "
                          f"supported (supported: {', '.join(sorted(ARCHITECTURES))})")
    for key in ("mlp_bias",):
        if config.get(key):
            raise SourceError(f"synthetic:{spec}: {key} = true in {path} is not supported")
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if scaling and kind not in ("llama3", "linear", "yarn"):
        raise SourceError(f"synthetic:{spec}: rope_scaling type {kind!r} in {path} is not "
                          "supported (llama3, linear, yarn)")
    return Shape(path.stem if path.name != "config.json" else path.parent.name, config,
                 _default_tokenizer(config))


def _default_tokenizer(config: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer shape for a bare config.json: byte-level BPE (Llama 3 and Qwen2 style) for a
    vocabulary of 100k or more or a Qwen2 model, else SentencePiece (Llama 2 / Mistral)."""
    n_vocab = int(config["vocab_size"])
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if config["model_type"] == "qwen2" or n_vocab >= 100_000:
        pre = "qwen2" if config["model_type"] == "qwen2" else "llama-bpe"
        n_special = min(256, max(n_vocab // 512, 2))
        n_regular = n_vocab - n_special
        return {"model": "gpt2", "pre": pre, "n_regular": n_regular, "n_merges": n_regular - 256,
                "bos": bos if bos is not None else n_regular,
                "eos": eos if eos is not None else n_regular + 1,
                "add_bos": config["model_type"] != "qwen2"}
    return {"model": "llama", "n_control": 0, "bos": 1 if bos is None else bos,
            "eos": 2 if eos is None else eos, "unk": 0, "add_bos": True}


@dataclass(frozen=True)
class TensorSpec:
    gguf_name: str
    hf_name: str               # "" for tensors only the GGUF has (rope_freqs)
    shape: tuple[int, ...]     # numpy order (rows = outputs), as in the safetensors file
    kind: str                  # weight | norm | bias | rope_freqs
    permute_heads: int = 0     # llama's Q/K: rows regrouped per head in the GGUF

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def gguf_dtype(self) -> Any:
        return np.float16 if len(self.shape) == 2 else np.float32

    @property
    def gguf_bytes(self) -> int:
        return self.elements * np.dtype(self.gguf_dtype).itemsize


def tensor_plan(shape: Shape) -> list[TensorSpec]:
    """Every tensor of the architecture, in the GGUF's names and the checkpoint's shapes."""
    e, f, hd = shape.n_embd, int(shape.config["intermediate_size"]), shape.head_dim
    q, kv = shape.n_head * hd, shape.n_kv * hd
    permute = shape.arch == "llama"     # convert_hf_to_gguf's LlamaModel permutes Q and K
    out: list[TensorSpec] = []
    scaling = shape.get("rope_scaling") or {}
    if (scaling.get("rope_type") or scaling.get("type")) == "llama3":
        out.append(TensorSpec("rope_freqs.weight", "", (hd // 2,), "rope_freqs"))
    out.append(TensorSpec("token_embd.weight", "model.embed_tokens.weight", (shape.n_vocab, e),
                          "weight"))
    for i in range(shape.n_layer):
        b, h = f"blk.{i}", f"model.layers.{i}"
        out += [
            TensorSpec(f"{b}.attn_norm.weight", f"{h}.input_layernorm.weight", (e,), "norm"),
            TensorSpec(f"{b}.attn_q.weight", f"{h}.self_attn.q_proj.weight", (q, e), "weight",
                       shape.n_head if permute else 0),
            TensorSpec(f"{b}.attn_k.weight", f"{h}.self_attn.k_proj.weight", (kv, e), "weight",
                       shape.n_kv if permute else 0),
            TensorSpec(f"{b}.attn_v.weight", f"{h}.self_attn.v_proj.weight", (kv, e), "weight"),
            TensorSpec(f"{b}.attn_output.weight", f"{h}.self_attn.o_proj.weight", (e, q),
                       "weight"),
        ]
        if shape.qkv_bias:
            out += [TensorSpec(f"{b}.attn_q.bias", f"{h}.self_attn.q_proj.bias", (q,), "bias",
                               shape.n_head if permute else 0),
                    TensorSpec(f"{b}.attn_k.bias", f"{h}.self_attn.k_proj.bias", (kv,), "bias",
                               shape.n_kv if permute else 0),
                    TensorSpec(f"{b}.attn_v.bias", f"{h}.self_attn.v_proj.bias", (kv,), "bias")]
        if shape.o_bias:
            out.append(TensorSpec(f"{b}.attn_output.bias", f"{h}.self_attn.o_proj.bias", (e,),
                                  "bias"))
        out += [
            TensorSpec(f"{b}.ffn_norm.weight", f"{h}.post_attention_layernorm.weight", (e,),
                       "norm"),
            TensorSpec(f"{b}.ffn_gate.weight", f"{h}.mlp.gate_proj.weight", (f, e), "weight"),
            TensorSpec(f"{b}.ffn_up.weight", f"{h}.mlp.up_proj.weight", (f, e), "weight"),
            TensorSpec(f"{b}.ffn_down.weight", f"{h}.mlp.down_proj.weight", (e, f), "weight"),
        ]
    out.append(TensorSpec("output_norm.weight", "model.norm.weight", (e,), "norm"))
    if not shape.tied:
        out.append(TensorSpec("output.weight", "lm_head.weight", (shape.n_vocab, e), "weight"))
    return out


def n_params(shape: Shape) -> int:
    """Parameters as the model card counts them (the checkpoint's tensors; rope_freqs is a
    derived buffer, not a parameter)."""
    return sum(t.elements for t in tensor_plan(shape) if t.hf_name)


# -- values ----------------------------------------------------------------------------------
def _stream_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _blocks(seed: int, t: TensorSpec, scale: float, start: int, stop: int
            ) -> Iterator[np.ndarray]:
    """float32 values of blocks [start, stop) of tensor ``t``: block k from its own generator
    seeded by (seed, the tensor's name, k), uniform in [-scale, scale)."""
    n = t.elements
    for k in range(start, stop):
        count = min(BLOCK, n - k * BLOCK)
        rng = np.random.default_rng([seed, _stream_seed(t.hf_name), k])
        x = rng.random(count, dtype=np.float32)
        x *= np.float32(2 * scale)
        x -= np.float32(scale)
        yield x


def _scale(shape: Shape, t: TensorSpec) -> float:
    std = float(shape.get("initializer_range", 0.02))
    return std * math.sqrt(3.0) if t.kind == "weight" else std


def _rope_freqs(shape: Shape) -> np.ndarray:
    """Llama 3's per-frequency RoPE scaling factors (the ``rope_freqs`` tensor llama.cpp
    reads), from the config's rope_scaling: wavelengths shorter than the original context /
    high_freq_factor keep their frequency, longer than / low_freq_factor are divided by the
    factor, and those between are interpolated smoothly."""
    sc = shape.get("rope_scaling")
    base, dim = float(shape.get("rope_theta", 10000.0)), shape.head_dim
    factor, low, high = float(sc["factor"]), float(sc.get("low_freq_factor", 1.0)), \
        float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, out))
    return out.astype(np.float32)


def _permute_rows(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Regroup each head's rows from (two halves) to (interleaved pairs), as llama.cpp's
    converter does for llama's Q and K (its RoPE pairs adjacent dimensions)."""
    rows = x.shape[0]
    half = rows // n_heads // 2
    return x.reshape(n_heads, 2, half, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def tensor_pieces(shape: Shape, seed: int, t: TensorSpec, *, gguf_layout: bool
                  ) -> list[Callable[[], np.ndarray]]:
    """The tensor's values as an ordered list of independent pieces (each computes at most
    WRITE_BLOCKS blocks when called, so pieces can be computed in parallel): F16 for matrices,
    F32 for vectors; in the GGUF's layout (Q/K permuted) or the checkpoint's."""
    if t.kind == "rope_freqs":
        return [lambda: _rope_freqs(shape)]
    if t.kind == "norm":
        return [lambda: np.ones(t.shape, dtype=np.float32)]
    n_blocks = -(-t.elements // BLOCK)
    scale = _scale(shape, t)
    if t.permute_heads and gguf_layout:   # a whole Q/K matrix (at most 64 Mi elements)
        def whole() -> np.ndarray:
            x = np.concatenate(list(_blocks(seed, t, scale, 0, n_blocks))).reshape(t.shape)
            return _permute_rows(x, t.permute_heads).astype(t.gguf_dtype).ravel()
        return [whole]

    def piece(start: int) -> np.ndarray:
        parts = list(_blocks(seed, t, scale, start, min(start + WRITE_BLOCKS, n_blocks)))
        return np.concatenate(parts).astype(t.gguf_dtype) if len(parts) > 1 \
            else parts[0].astype(t.gguf_dtype)
    return [lambda start=start: piece(start) for start in range(0, n_blocks, WRITE_BLOCKS)]


def tensor_chunks(shape: Shape, seed: int, t: TensorSpec, *, gguf_layout: bool,
                  pool: ThreadPoolExecutor | None = None) -> Iterator[np.ndarray]:
    """The tensor's values in order, piece by piece (:func:`tensor_pieces`); with a thread pool,
    up to twice its workers pieces are computed ahead (numpy's generators and casts release the
    GIL), never more, so memory stays bounded."""
    pieces = tensor_pieces(shape, seed, t, gguf_layout=gguf_layout)
    if pool is None:
        for p in pieces:
            yield p()
        return
    window = 2 * pool._max_workers
    ahead: deque[Future[np.ndarray]] = deque()
    for p in pieces:
        ahead.append(pool.submit(p))
        if len(ahead) >= window:
            yield ahead.popleft().result()
    while ahead:
        yield ahead.popleft().result()


# -- the vocabulary --------------------------------------------------------------------------
def _byte_level_chars() -> list[str]:
    """GPT-2's byte-level alphabet: byte b -> one printable character (the printable Latin-1
    bytes stand for themselves, the others are shifted past U+0100), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _word(k: int, space: str) -> str:
    """A unique synthetic token string for id k (k >= 256): a base-26 spelling, every other one
    with the tokenizer's word-start marker."""
    prefix = space if k % 2 else ""
    letters = []
    while True:
        k, r = divmod(k, 26)
        letters.append(chr(ord("a") + r))
        if k == 0:
            break
    return prefix + "".join(reversed(letters))


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos: int
    eos: int
    pad: int | None
    unk: int | None
    add_bos: bool


def vocabulary(shape: Shape) -> Vocab:
    """Synthetic tokens of the real vocabulary's size and special ids (see the module doc)."""
    tk, n = shape.tokenizer, shape.n_vocab
    if tk["model"] == "gpt2":
        n_regular = int(tk["n_regular"])
        n_special = int(tk.get("n_special", n - n_regular))
        chars = _byte_level_chars()
        tokens = chars + [_word(k, "Ġ") for k in range(256, n_regular)]
        types = [NORMAL] * n_regular
        tokens += [f"<|special_{i}|>" for i in range(n_special)]
        types += [CONTROL] * n_special
        tokens += [f"[PAD{i}]" for i in range(n_regular + n_special, n)]
        types += [UNUSED] * (n - n_regular - n_special)
        span = n_regular - 256
        merges = [f"{tokens[256 + i % span]} {chars[33 + (i * 7) % 94]}"
                  for i in range(int(tk["n_merges"]))]
        return Vocab(tokens, types, None, merges, int(tk["bos"]), int(tk["eos"]),
                     tk.get("pad"), None, bool(tk.get("add_bos", False)))
    if tk["model"] == "llama":     # SentencePiece: unk, bos, eos, control tokens, bytes, pieces
        n_control = int(tk.get("n_control", 0))
        tokens = ["<unk>", "<s>", "</s>"] + [f"[control_{i}]" for i in range(n_control)]
        types = [UNKNOWN, CONTROL, CONTROL] + [CONTROL] * n_control
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [BYTE] * 256
        first = len(tokens)
        tokens += [_word(k, "▁") for k in range(first, n)]
        types += [NORMAL] * (n - first)
        scores = [0.0] * first + [-float(i) for i in range(n - first)]
        return Vocab(tokens, types, scores, None, int(tk["bos"]), int(tk["eos"]), None,
                     int(tk.get("unk", 0)), bool(tk.get("add_bos", True)))
    raise SourceError(f"synthetic {shape.name}: unknown tokenizer model {tk['model']!r}")


# -- the GGUF --------------------------------------------------------------------------------
class _Streamed:
    """What GGUFWriter.write_tensor_data takes (``nbytes``, ``tofile``), filled piece by piece
    from a generator, so a 1 GB embedding table is never whole in memory."""

    def __init__(self, nbytes: int, chunks: Iterator[np.ndarray],
                 progress: Callable[[int], None]) -> None:
        self.nbytes = nbytes
        self._chunks = chunks
        self._progress = progress

    def tofile(self, fh: Any) -> None:
        written = 0
        for chunk in self._chunks:
            chunk.tofile(fh)
            written += chunk.nbytes
            self._progress(chunk.nbytes)
        if written != self.nbytes:
            raise RuntimeError(f"wrote {written} bytes of a {self.nbytes}-byte tensor")


def _metadata(writer: Any, shape: Shape, seed: int, file_type: int | None = None) -> None:
    """The GGUF's key/values; ``file_type``: llama_ftype of a quantized file (default F16)."""
    import gguf

    c = shape.config
    writer.add_name(f"synthetic {shape.name}")
    writer.add_description(f"qbench synthetic model: the architecture of {shape.name} with random "
                           f"weights (seed {seed}); its outputs are meaningless: speed and "
                           "memory only")
    writer.add_context_length(int(c.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(int(c["intermediate_size"]))
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_kv)
    writer.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-5)))
    if c.get("head_dim"):
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    if shape.arch == "llama":
        writer.add_vocab_size(shape.n_vocab)
        writer.add_rope_dimension_count(shape.head_dim)
    scaling = c.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear"
                                     else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if "original_max_position_embeddings" in scaling:
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if file_type is None else file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    v = vocabulary(shape)
    writer.add_tokenizer_model(shape.tokenizer["model"])
    if shape.tokenizer.get("pre"):
        writer.add_tokenizer_pre(shape.tokenizer["pre"])
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.types)
    if v.scores is not None:
        writer.add_token_scores(v.scores)
    if v.merges is not None:
        writer.add_token_merges(v.merges)
    writer.add_bos_token_id(v.bos)
    writer.add_eos_token_id(v.eos)
    if v.pad is not None:
        writer.add_pad_token_id(int(v.pad))
    if v.unk is not None:
        writer.add_unk_token_id(v.unk)
    writer.add_add_bos_token(v.add_bos)


def gguf_data_bytes(shape: Shape) -> int:
    """Bytes of tensor data in the F16 GGUF (each tensor padded to the alignment)."""
    return sum(-(-t.gguf_bytes // GGUF_ALIGN) * GGUF_ALIGN for t in tensor_plan(shape))


class _Progress:
    """A progress line every 10 % of the bytes (and at the end), with the elapsed time."""

    def __init__(self, what: str, total: int, say: Callable[[str], None]) -> None:
        self.what, self.total, self.say = what, total, say
        self.done, self.next_pct, self.t0 = 0, 10, time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        pct = 100 * self.done // max(self.total, 1)
        if pct >= self.next_pct:
            self.say(f"{self.what}: {pct} % ({self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB, "
                     f"{time.monotonic() - self.t0:.0f} s)")
            self.next_pct = (pct // 10 + 1) * 10


def write_gguf(shape: Shape, seed: int, path: Path, *, data: bool = True,
               say: Callable[[str], None] = _say) -> int:
    """Write the F16 GGUF to ``path``; return its size. ``data=False`` writes the header and
    tensor table and leaves the data a hole (a sparse file: a 140 GB 70B takes no disk), which
    llama.cpp's quantizer reads in dry-run mode to size every type without the weights."""
    import gguf

    plan = tensor_plan(shape)
    writer = gguf.GGUFWriter(None, shape.arch)
    _metadata(writer, shape, seed)
    for t in plan:
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(t.gguf_dtype), t.gguf_bytes)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        if data:
            progress = _Progress(f"synthetic {shape.name} (seed {seed}): F16 GGUF",
                                 gguf_data_bytes(shape), say)
            with ThreadPoolExecutor(workers()) as pool:
                for t in plan:
                    writer.write_tensor_data(_Streamed(
                        t.gguf_bytes, tensor_chunks(shape, seed, t, gguf_layout=True, pool=pool),
                        progress))
            writer.write_padding(writer.fout[0], writer.fout[0].tell())
        else:
            fh = writer.fout[0]
            writer.write_padding(fh, fh.tell())
            fh.truncate(fh.tell() + gguf_data_bytes(shape))
        writer.flush()
    finally:
        writer.close()
    return path.stat().st_size


def write_typed_gguf(shape: Shape, seed: int, path: Path, *, what: str, file_type: int,
                     tensor: Callable[[TensorSpec], tuple[int, int, Iterator[np.ndarray]]],
                     say: Callable[[str], None] = _say) -> int:
    """Write a GGUF of ``shape`` whose every tensor ``tensor`` gives as (ggml type id, bytes,
    the bytes in pieces) - a quantized variant written directly
    (qbench.quantize.synthetic_blocks) - with this module's metadata and ``file_type`` (a
    llama_ftype). Returns its size."""
    import gguf

    plan = tensor_plan(shape)
    given = {t.gguf_name: tensor(t) for t in plan}
    writer = gguf.GGUFWriter(None, shape.arch)
    _metadata(writer, shape, seed, file_type=file_type)
    for t in plan:
        qtype, nbytes, _ = given[t.gguf_name]
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), nbytes,
                               raw_dtype=gguf.GGMLQuantizationType(qtype))
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        progress = _Progress(f"synthetic {shape.name} (seed {seed}): {what}",
                             sum(n for _, n, _ in given.values()), say)
        for t in plan:
            _, nbytes, pieces = given[t.gguf_name]
            writer.write_tensor_data(_Streamed(nbytes, pieces, progress))
        writer.write_padding(writer.fout[0], writer.fout[0].tell())
        writer.flush()
    finally:
        writer.close()
    return path.stat().st_size


# -- the safetensors twin --------------------------------------------------------------------
def write_safetensors(shape: Shape, seed: int, folder: Path,
                      say: Callable[[str], None] = _say) -> int:
    """A Hugging Face folder of the same model (config.json, tokenizer, F16 safetensors shards
    of at most SHARD_BYTES, with an index when there are several); one shard in memory at a
    time. Returns the bytes of weights written."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    plan = [t for t in tensor_plan(shape) if t.hf_name]
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in plan:
        nbytes = t.elements * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    total = sum(t.elements * 2 for t in plan)
    progress = _Progress(f"synthetic {shape.name} (seed {seed}): safetensors", total, say)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards):
        tensors = {}
        for t in shard:
            with ThreadPoolExecutor(workers()) as pool:
                x = np.concatenate(list(tensor_chunks(shape, seed, t, gguf_layout=False,
                                                      pool=pool)))
            tensors[t.hf_name] = x.astype(np.float16).reshape(t.shape)
            weight_map[t.hf_name] = name
            progress(tensors[t.hf_name].nbytes)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        atomic_write_text(folder / "model.safetensors.index.json", json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = dict(shape.config)
    config.setdefault("architectures", [{"llama": "LlamaForCausalLM", "mistral":
                                         "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
                                             config["model_type"]]])
    atomic_write_text(folder / "config.json", json.dumps(config, indent=1))
    _write_tokenizer(shape, folder)
    return total


def _write_tokenizer(shape: Shape, folder: Path) -> None:
    """A byte-level BPE tokenizer with the vocabulary's size and special ids (no merges: each
    byte is a token), saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    v = vocabulary(shape)
    chars = _byte_level_chars()
    tokens = list(v.tokens)
    if shape.tokenizer["model"] == "llama":     # SentencePiece's <0xXX> bytes -> byte-level
        first = tokens.index("<0x00>")
        tokens[first:first + 256] = chars
    special = [i for i, kind in enumerate(v.types) if kind in (CONTROL, UNKNOWN)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in special])
    bos = tokens[v.bos]
    if v.add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, v.bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=tokens[v.eos],
                                   pad_token=tokens[v.pad] if v.pad is not None else None,
                                   unk_token=tokens[v.unk] if v.unk is not None else None)
    fast.save_pretrained(str(folder))


# -- cache -----------------------------------------------------------------------------------
def _library_versions(fmt: str) -> dict[str, str]:
    from qbench.host.envinfo import library_version

    names = ["gguf", "numpy"] if fmt == "gguf" else \
        ["numpy", "safetensors", "tokenizers", "transformers"]
    return {n: library_version(n) for n in names}


def recipe(ref: SyntheticRef, shape: Shape) -> dict[str, Any]:
    """Everything that decides the generated bytes: it keys the cache and the cell keys."""
    return {"generator": GENERATOR_VERSION, "format": ref.format, "seed": ref.seed,
            "name": shape.name, "config": shape.config, "tokenizer": shape.tokenizer,
            "libraries": _library_versions(ref.format)}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def identity(ref: str, base_dir: Path) -> str:
    """The content identity of a synthetic source without generating it (planning): a hash of
    its recipe, so a changed config, seed, generator or library makes new cells."""
    parsed = parse_ref(ref)
    return "synthetic-" + _digest(recipe(parsed, load_shape(parsed.spec, base_dir)))


def locate(ref: str, base_dir: Path) -> None:
    """Check a synthetic reference without generating anything (SourceError when wrong)."""
    parsed = parse_ref(ref)
    load_shape(parsed.spec, base_dir)


def _entry(cache_dir: Path, ref: SyntheticRef, shape: Shape, rec: dict[str, Any]) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in shape.name)[:60]
    return cache_folder(cache_dir, "synthetic") / \
        f"{safe}-{ref.format}-s{ref.seed}-{_digest(rec)[:16]}"


def _target(entry: Path, shape: Shape, ref: SyntheticRef) -> Path:
    return entry / (f"{shape.name}-synthetic-s{ref.seed}-F16.gguf" if ref.format == "gguf"
                    else "hf")


def expected_bytes(shape: Shape, fmt: str) -> int:
    """Disk the generated model takes (the GGUF's data, or the F16 shards), without metadata."""
    if fmt == "gguf":
        return gguf_data_bytes(shape)
    return sum(t.elements * 2 for t in tensor_plan(shape) if t.hf_name)


def peak_memory_bytes(shape: Shape) -> int:
    """RAM generation needs at most: the pieces computed ahead (two per worker: float32 blocks,
    their F16 copy) or a whole Q/K matrix (float32 + its permuted copy + F16), plus the
    tokenizer's strings; the safetensors twin adds one shard (:func:`check_room`)."""
    plan = tensor_plan(shape)
    whole = max((t.elements * 10 for t in plan if t.permute_heads), default=0)
    ahead = 2 * workers() * WRITE_BLOCKS * BLOCK * 6
    return max(whole, ahead) + 256 * 2**20


def memory_available() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; psutil where /proc is
    not there)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import psutil
    return int(psutil.virtual_memory().available)


def check_room(shape: Shape, fmt: str, folder: Path, *,
               free_bytes: Callable[[Path], int] | None = None,
               available_memory: Callable[[], int] | None = None) -> None:
    """SourceError before any work when ``folder``'s disk or the machine's memory cannot hold
    the generation (an 8B F16 needs 16 GB of disk)."""
    need = expected_bytes(shape, fmt) + (SHARD_BYTES if fmt == "safetensors" else 0) \
        + MARGIN_BYTES
    folder.mkdir(parents=True, exist_ok=True)
    free = (free_bytes or (lambda p: shutil.disk_usage(p).free))(folder)
    if free < need:
        raise SourceError(f"synthetic {shape.name}: generating its F16 "
                          f"{'GGUF' if fmt == 'gguf' else 'safetensors folder'} needs "
                          f"{need / 1e9:.1f} GB free in {folder}, and {free / 1e9:.1f} GB are; "
                          "free some space, or set QBENCH_CACHE_DIR to a larger disk")
    mem_need = peak_memory_bytes(shape) + (SHARD_BYTES if fmt == "safetensors" else 0)
    available = (available_memory or memory_available)()
    if available < mem_need:
        raise SourceError(f"synthetic {shape.name}: generating it needs about "
                          f"{mem_need / 2**30:.1f} GiB of free memory, and "
                          f"{available / 2**30:.1f} GiB are available")


def _complete(entry: Path, target: Path, rec: dict[str, Any]) -> bool:
    """A finished generation: its recipe.json (written last) matches, and the data is there."""
    try:
        stored = json.loads((entry / "recipe.json").read_text())
    except (OSError, ValueError):
        return False
    if stored.get("recipe") != json.loads(json.dumps(rec)):
        return False
    if target.is_file():
        return target.stat().st_size == stored.get("size_bytes")
    return target.is_dir() and (target / "config.json").is_file()


def ensure(ref: str, *, base_dir: Path, cache_dir: Path,
           say: Callable[[str], None] = _say) -> Path:
    """The generated model of ``ref`` (the GGUF file or the Hugging Face folder), made now if
    the cache lacks it. Concurrent callers wait for one generation."""
    parsed = parse_ref(ref)
    shape = load_shape(parsed.spec, base_dir)
    rec = recipe(parsed, shape)
    entry = _entry(cache_dir, parsed, shape, rec)
    target = _target(entry, shape, parsed)
    if _complete(entry, target, rec):
        return target
    with file_lock(entry.parent / f".{entry.name}.lock"):
        if _complete(entry, target, rec):
            return target
        check_room(shape, parsed.format, entry.parent)
        if entry.exists():
            shutil.rmtree(entry)   # a generation that died half way
        entry.mkdir(parents=True)
        from qbench.host.cache import note_built
        note_built("synthetic", entry.name)
        size = expected_bytes(shape, parsed.format)
        say(f"generating synthetic {shape.name} (seed {parsed.seed}, {parsed.format}, "
            f"{n_params(shape) / 1e9:.2f} B parameters, {size / 1e9:.2f} GB) into {entry} "
            "(once; random weights: speed and memory only)")
        t0 = time.monotonic()
        tmp = entry / f".{target.name}.tmp"
        if parsed.format == "gguf":
            written = write_gguf(shape, parsed.seed, tmp, say=say)
        else:
            write_safetensors(shape, parsed.seed, tmp, say=say)
            written = sum(f.stat().st_size for f in tmp.iterdir())
        os.replace(tmp, target)
        atomic_write_text(entry / "recipe.json", json.dumps(
            {"recipe": rec, "size_bytes": written if parsed.format == "gguf" else None,
             "n_params": n_params(shape), "seconds": round(time.monotonic() - t0, 1)}, indent=1))
        say(f"synthetic {shape.name}: {written / 1e9:.2f} GB in {time.monotonic() - t0:.0f} s")
    return target
