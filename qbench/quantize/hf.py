"""Transformers variants, cached by content like :mod:`qbench.quantize.gguf`.

The chain is source -> HF base folder -> variant:

- **base**: a local Hugging Face model folder or a hub snapshot (``hf:org/repo``) is used as is;
  a GGUF file gets its *HF twin*: transformers loads the GGUF, dequantizes it to float32, and the
  model is saved without its GGUF quantization config (a safetensors folder plus the tokenizer
  transformers builds from the GGUF vocabulary). So one GGUF yields both ladders offline.
- **fp32 / bf16 / fp16**: the base loaded in that dtype (nothing is written).
- **bnb-int8 / bnb-nf4 / bnb-fp4**: bitsandbytes at load time, never saved (bitsandbytes 0.50
  writes a corrupt 4-bit checkpoint after a forward pass on CPU, with no error).
- **awq-w{b}g{g} / gptq-w{b}g{g}**: llm-compressor ``oneshot`` on the fp32 base with a small named
  calibration set (default: 32 samples x 256 tokens from the end of wikitext-2's test text, far
  from the chunks perplexity and KLD score), saved in compressed-tensors format.
- a pre-quantized folder or hub checkpoint (``source = "hf:org/repo"``) is loaded as is.

What the backend loads is a small *variant descriptor* (``variant.json``): the model folder, the
dtype and the load-time quantization. Its identity hash (model folder sha256 + load settings, no
paths) is the artifact's sha256. Every built folder sits under ``cache_dir/artifacts/<recipe
hash>/model`` with a ``recipe.json`` holding the full recipe, calibration provenance included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from qbench.errors import MissingExtraError, QbenchError, SourceError
from qbench.host.cache import folder as cache_folder
from qbench.host.cache import note_built
from qbench.host.fsutil import atomic_write_text, file_lock
from qbench.inputs.sources import GGUF_MAGIC, sha256_file
from qbench.quantize import hf_types
from qbench.quantize.request import Prepared, PrepareRequest

DESCRIPTOR_FORMAT = "qbench-hf-variant/1"
DESCRIPTOR_NAME = "variant.json"

# calibration defaults (the suite may override them per [[variants]] group)
CALIBRATION_DATASET = "wikitext-2"
CALIBRATION_SAMPLES = 32
CALIBRATION_SEQ_LEN = 256


class Unsupported(MissingExtraError):
    """This cell cannot run here (an optional package missing, a CUDA-only kernel on a CPU): the
    worker records it as ``skipped`` with this message, not as a failure."""

    def __init__(self, message: str, package: str = "") -> None:
        QbenchError.__init__(self, message)
        self.package = package
        self.extra = "hf"


def require(module: str, distribution: str, why: str) -> None:
    """Raise MissingExtraError (-> the cell is skipped with the reason) unless ``module`` is
    installed. Found, not imported: llm-compressor takes ~20 s to import, and a cached artifact
    does not need it."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtraError(distribution, "hf", why)


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not-installed"


@dataclass(frozen=True)
class HfArtifact:
    path: Path             # the descriptor the backend loads
    sha256: str            # identity of (model folder content, load settings)
    model_dir: Path
    recipe: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "format": "hf",
                "model_dir": str(self.model_dir), "size_bytes": weights_bytes(self.model_dir),
                "recipe": self.recipe}


# -- folders --------------------------------------------------------------------------------
def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    return files or sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pt"))


def weights_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(model_dir))


def check_model_dir(path: Path, *, allow_pickle: bool = True) -> None:
    """A folder transformers can load: config.json and weights (SourceError otherwise)."""
    if not path.is_dir():
        raise SourceError(f"{path} is not a Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} has no config.json: not a Hugging Face model folder")
    if not weight_files(path):
        raise SourceError(f"{path} has no weights (*.safetensors, *.bin)")
    # transformers loads model.safetensors(.index.json) if present, else the pickle
    # (pytorch_model.bin...), whatever other *.safetensors files lie beside it
    safe = any((path / n).is_file()
               for n in ("model.safetensors", "model.safetensors.index.json"))
    pickles = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth") for p in path.glob(pat))
    if not allow_pickle and pickles and not safe:
        raise SourceError(f"{path} has pickle checkpoints ({', '.join(pickles[:3])}) and no "
                          "model.safetensors: transformers would load the pickle, which can run "
                          "code; set allow_pickle = true on the model to accept them")


def safetensors_summary(model_dir: Path) -> dict[str, Any]:
    """Tensor dtypes by count, elements and bytes, from the safetensors headers (no torch)."""
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U32": 4, "U16": 2}
    hist: dict[str, dict[str, int]] = {}
    n_tensors = packed = packed_elements = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n_tensors += 1
            count = 1
            for d in info["shape"]:
                count *= d
            dt = info["dtype"]
            entry = hist.setdefault(dt, {"tensors": 0, "elements": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["elements"] += count
            start, end = info["data_offsets"]
            entry["bytes"] += end - start if end >= start else count * sizes.get(dt, 0)
            if name.endswith(("weight_packed", "qweight")):
                packed += 1
                packed_elements += count
    return {"n_tensors": n_tensors, "dtypes": hist, "packed_tensors": packed,
            "packed_elements": packed_elements,
            "weights_bytes": weights_bytes(model_dir)}


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{model_dir / 'config.json'} is unreadable: {exc}") from None


def inspect_artifact(path: Path) -> dict[str, Any]:
    """What a transformers variant holds, read from files (for the footprint metric): the
    descriptor's load settings, the folder's tensor dtypes and bytes, its quantization config."""
    desc = read_descriptor(path) if path.is_file() else {"model_dir": str(path), "load": {}}
    model_dir = Path(desc["model_dir"])
    cfg = _config(model_dir)
    summary = safetensors_summary(model_dir)
    return {"descriptor": desc, "model_dir": str(model_dir),
            "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
            "config_dtype": cfg.get("torch_dtype") or cfg.get("dtype"),
            "quantization_config": cfg.get("quantization_config"), **summary}


_QUANT_META = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "scales",
               "qzeros", "g_idx", "SCB", "absmax", "quant_map", "quant_state")
_LOADED_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0,
                 # bitsandbytes: int8 + an fp32 scale per row (~0); 4-bit: half a byte + an fp32
                 # absmax per 64-weight block
                 "bnb-int8": 1.0, "bnb-4bit": 0.5 + 4 / 64}


def _is_decoder_linear(name: str, shape: list[int]) -> bool:
    return (len(shape) == 2 and name.endswith(".weight") and ".layers." in f".{name}"
            and "embed" not in name and "norm" not in name)


def footprint(path: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """The footprint metric's record for a transformers variant (its ``run`` returns this for an
    artifact of format "hf"): weights on disk, parameters and bits per weight as stored, and for
    load-time variants (bf16/fp16 from an fp32 folder, bitsandbytes) an estimate of the weights'
    bytes once loaded on the CPU (the backend records the measured value in ``describe()``)."""
    info = inspect_artifact(path)
    desc = info["descriptor"]
    load = desc.get("load", {})
    model_dir = Path(info["model_dir"])
    qc = info.get("quantization_config") or {}
    bits = 4
    for group in (qc.get("config_groups") or {}).values():
        bits = int((group.get("weights") or {}).get("num_bits") or bits)
    n_params = stored_bytes = linear = other = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in t["shape"]:
                count *= d
            start, end = t["data_offsets"]
            stored_bytes += end - start
            if name.endswith(("weight_packed", "qweight")):
                n_params += count * 32 // bits
            elif not name.endswith(_QUANT_META):
                n_params += count
                if _is_decoder_linear(name, t["shape"]):
                    linear += count
                else:
                    other += count
    size = info["weights_bytes"]
    values: dict[str, Any] = {
        "file_size_mb": {"value": size / 2**20, "unit": "MiB"},
        "bpw": {"value": 8.0 * stored_bytes / n_params if n_params else None,
                "unit": "bits/weight"},
        "n_params": {"value": float(n_params)},
        "fp16_estimate_mb": {"value": 2 * n_params / 2**20, "unit": "MiB"},
    }
    estimate = None
    if "bitsandbytes" in load:
        per = _LOADED_BYTES["bnb-int8" if load["bitsandbytes"].get("load_in_8bit")
                            else "bnb-4bit"]
        estimate = linear * per + other * 4.0
    elif load.get("dtype") in ("bfloat16", "float16"):
        estimate = n_params * _LOADED_BYTES[load["dtype"]]
    if estimate is not None:
        values["loaded_weights_estimate_mb"] = {"value": estimate / 2**20, "unit": "MiB"}
        values["bpw_loaded_estimate"] = {"value": 8.0 * estimate / n_params if n_params else None,
                                         "unit": "bits/weight"}
    return {"values": values,
            "details": {"format": "hf", "tensor_types": info["dtypes"],
                        "architecture": info["architecture"],
                        "config_dtype": info["config_dtype"],
                        "quantization_config": qc or None, "load": load,
                        "quant": desc.get("quant"), "n_tensors": info["n_tensors"],
                        "packed_tensors": info["packed_tensors"], "file_size_bytes": size,
                        "decoder_linear_params": linear,
                        "estimate_rule": ("bitsandbytes int8 = 1 byte/weight, nf4/fp4 = 0.5 + "
                                          "4/64 bytes/weight for decoder linears, the rest fp32 "
                                          "(CPU compute dtype)") if "bitsandbytes" in load
                        else None}}


# -- descriptors ----------------------------------------------------------------------------
def write_descriptor(cache_dir: Path, *, quant: str, model_dir: Path, model_sha: str,
                     load: dict[str, Any], recipe: dict[str, Any]) -> HfArtifact:
    """The variant descriptor for ``model_dir`` loaded with ``load`` (rewritten only when it
    changed)."""
    identity = {"format": DESCRIPTOR_FORMAT, "quant": quant, "model_sha256": model_sha,
                "load": load}
    sha = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    path = cache_folder(cache_dir, "artifacts") / f"hf-{sha[:32]}" / DESCRIPTOR_NAME
    text = json.dumps(identity | {"model_dir": str(model_dir), "identity_sha256": sha,
                                  "recipe": recipe}, indent=1, sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return HfArtifact(path, sha, model_dir, recipe)


def read_descriptor(path: Path) -> dict[str, Any]:
    try:
        desc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise QbenchError(f"{path}: not a readable qbench variant descriptor ({exc})") from None
    if desc.get("format") != DESCRIPTOR_FORMAT:
        raise QbenchError(f"{path}: expected a {DESCRIPTOR_FORMAT} descriptor, got "
                          f"{desc.get('format')!r}")
    return desc


def _without_paths(value: Any) -> Any:
    """The recipe as keyed: where a file was read from ("origin") is provenance, not identity
    (its content's sha256 is in the recipe), so moving the data dir rebuilds nothing."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k != "origin"}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return value


def _cached_dir(cache_dir: Path, recipe: dict[str, Any],
                build: Callable[[Path], dict[str, Any] | None]
                ) -> tuple[Path, str, dict[str, Any]]:
    """The folder built by ``build`` for ``recipe``, built once under a lock and renamed into
    place whole (a killed build leaves only a temporary folder, removed next time). What
    ``build`` returns (provenance known only once built) is merged into the stored recipe."""
    digest = hashlib.sha256(json.dumps(_without_paths(recipe), sort_keys=True).encode()
                            ).hexdigest()[:32]
    folder = cache_folder(cache_dir, "artifacts") / digest
    final = folder / "model"
    meta = folder / "recipe.json"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_folder(cache_dir, "artifacts") / f"{digest}.lock"):
        if final.is_dir() and meta.is_file():
            stored = json.loads(meta.read_text())
            return final, stored["output_sha256"], stored
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [final, *folder.glob(".model.*.tmp")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder / f".model.{os.getpid()}.tmp"
        t0 = time.perf_counter()
        note_built("artifacts", digest)      # the attempt: a failed build leaves its heap too
        try:
            extra = build(tmp) or {}
            check_model_dir(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        out_sha = sha256_file(final, cache_dir)
        stored = recipe | extra | {"output_sha256": out_sha,
                                   "build_s": round(time.perf_counter() - t0, 2)}
        atomic_write_text(meta, json.dumps(stored, indent=1, sort_keys=True))
        return final, out_sha, stored


# -- the base -------------------------------------------------------------------------------
def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def _lib_versions() -> dict[str, str]:
    return {"transformers": version_of("transformers"), "torch": version_of("torch")}


def hf_base(model_file: Path, model_sha: str, cache_dir: Path, *, allow_pickle: bool = False,
            trust_remote_code: bool = False) -> tuple[Path, str, dict[str, Any]]:
    """(folder, sha256, recipe) of the float HF model for a model source."""
    if model_file.is_dir():
        check_model_dir(model_file, allow_pickle=allow_pickle)
        return model_file, model_sha, {"tool": "none (Hugging Face folder used as is)",
                                       "input_sha256": model_sha}
    if _is_gguf(model_file):
        from qbench.quantize.gguf import dominant_type
        recipe = {"tool": "transformers GGUF loader (dequantized to float32)",
                  "input_sha256": model_sha, "input_format": "gguf",
                  "input_type": dominant_type(model_file, cache_dir), "output_dtype": "float32",
                  "tokenizer_decoder": "byte-level only (convertible to GGUF)",
                  **_lib_versions()}
        folder, sha, stored = _cached_dir(
            cache_dir, recipe, lambda out: _gguf_twin(model_file, out, trust_remote_code))
        return folder, sha, stored
    raise SourceError(f"{model_file} is neither a GGUF file nor a Hugging Face model folder; "
                      "for a hub model use source = \"hf:ORG/REPO\" (the whole repository)")


@contextlib.contextmanager
def _memoised_gguf_reading() -> Iterator[None]:
    """transformers parses the GGUF three times (config, tokenizer, tensors: ~25 s each for a
    49k-token vocabulary in gguf's pure-Python reader) and rebuilds gguf's tensor-name map once
    per module (~400 times). Both are pure functions of their arguments: memoise them for the
    duration of one conversion (the ``gguf`` module attributes transformers imports at call
    time), which takes SmolLM2's twin from minutes to well under one."""
    import gguf as gguf_mod

    original_reader, original_map = gguf_mod.GGUFReader, gguf_mod.get_tensor_name_map
    readers: dict[Any, Any] = {}
    maps: dict[Any, Any] = {}

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    def name_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in maps:
            maps[(arch, n_blocks)] = original_map(arch, n_blocks)
        return maps[(arch, n_blocks)]

    gguf_mod.GGUFReader, gguf_mod.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf_mod.GGUFReader, gguf_mod.get_tensor_name_map = original_reader, original_map


def _gguf_twin(gguf: Path, out: Path, trust_remote_code: bool) -> None:
    """Load ``gguf`` with transformers (dequantizing it) and save it as a float32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name, "trust_remote_code": trust_remote_code}
    with _memoised_gguf_reading():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = loaded.config
    # the GGUF quantizer marks the model quantized; a model rebuilt from the config without it
    # saves as a plain float checkpoint
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    if loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _plain_byte_level_decoder(out / "tokenizer.json")


def _plain_byte_level_decoder(path: Path) -> None:
    """transformers builds a GGUF's byte-level BPE tokenizer with a composite decoder
    (ByteFallback, Fuse, Replace "\u2581", ByteLevel). For byte-level vocabularies the first
    three are no-ops, but llama.cpp's convert_hf_to_gguf takes such a decoder for a Llama
    SentencePiece-style vocabulary and writes a GGUF whose tokenizer aborts llama.cpp. Keep the
    ByteLevel decoder alone, as in the original checkpoint: the same text, a convertible twin."""
    if not path.is_file():
        return
    tok = json.loads(path.read_text(encoding="utf-8"))
    dec, pre = tok.get("decoder") or {}, tok.get("pre_tokenizer") or {}
    if (tok.get("model", {}).get("type") != "BPE" or pre.get("type") != "ByteLevel"
            or dec.get("type") != "Sequence"):
        return
    byte_level = [d for d in dec.get("decoders", []) if d.get("type") == "ByteLevel"]
    if len(byte_level) != 1:
        return
    tok["decoder"] = byte_level[0]
    atomic_write_text(path, json.dumps(tok, ensure_ascii=False))


# -- calibration ----------------------------------------------------------------------------
CALIBRATION_SELECTION = ("the last samples x seq_len tokens of the text (tokenized once, "
                         "without special tokens), cut into samples; BOS first where the "
                         "tokenizer adds one")


def calibration_spec(variant: Mapping[str, Any], req: PrepareRequest
                     ) -> tuple[Any, dict[str, Any]]:
    """The calibration text and what identifies the calibration set (part of the artifact key):
    the text's name and sha256, the sample count and length, the selection rule. Reading the
    text is cheap; tokenizing it happens only when the artifact is built."""
    from qbench.inputs.datasets import load_text

    name = variant.get("calibration") or CALIBRATION_DATASET
    samples = int(variant.get("calibration_samples") or CALIBRATION_SAMPLES)
    seq_len = int(variant.get("calibration_seq_len") or CALIBRATION_SEQ_LEN)
    if samples < 1 or seq_len < 2:
        raise QbenchError(f"calibration needs at least 1 sample of 2 tokens, got {samples} x "
                          f"{seq_len}")
    text = load_text(name, req.data_dir, req.base_dir)
    return text, {"dataset": name, "origin": text.origin, "text_sha256": text.sha256,
                  "samples": samples, "seq_len": seq_len, "tokens": samples * seq_len,
                  "selection": CALIBRATION_SELECTION}


def calibration_tokens(text: Any, spec: dict[str, Any], tokenizer: Any
                       ) -> tuple[list[list[int]], dict[str, Any]]:
    """The calibration sequences of ``spec`` and the provenance known once tokenized.

    Cut from the *end* of the text, so calibration and the perplexity/KLD chunks (from the
    start) do not overlap unless those chunks cover the whole text."""
    samples, seq_len = spec["samples"], spec["seq_len"]
    ids = tokenizer(text.text, add_special_tokens=False)["input_ids"]
    need = samples * seq_len
    if len(ids) < need:
        raise QbenchError(f"calibration text '{spec['dataset']}' has {len(ids)} tokens, fewer "
                          f"than {samples} samples x {seq_len} tokens")
    start = len(ids) - need
    seqs = [ids[start + i * seq_len:start + (i + 1) * seq_len] for i in range(samples)]
    bos = _bos_added(tokenizer)
    if bos is not None:
        seqs = [[bos] + s[1:] for s in seqs]
    digest = hashlib.sha256(json.dumps(seqs).encode()).hexdigest()
    return seqs, {"region": f"tokens {start}..{len(ids) - 1} of {len(ids)} (the end of the "
                            "text)", "bos_first": bos is not None, "tokens_sha256": digest}


def _bos_added(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts one first by itself, else None."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and with_special[:1] == [bos] and without[:1] != [bos]:
        return int(bos)
    return None


# -- llm-compressor -------------------------------------------------------------------------
@contextlib.contextmanager
def _no_pinned_memory_without_accelerator() -> Iterator[None]:
    """llm-compressor's AWQ pins its cached activations for fast host-to-device copies; with no
    accelerator torch refuses ("Cannot access accelerator device"). Pinning is only an
    optimisation, so make it a no-op for the duration of a CPU-only quantization."""
    import torch
    from llmcompressor.pipelines import cache as ll_cache

    if torch.accelerator.is_available():
        yield
        return
    original = ll_cache.IntermediatesCache.pin_memory
    ll_cache.IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        ll_cache.IntermediatesCache.pin_memory = original


def int_quant_recipe(iq: hf_types.IntQuant) -> dict[str, Any]:
    """The weight scheme: AWQ asymmetric (zero point, as AutoAWQ's default), GPTQ symmetric (as
    llm-compressor's W4A16 / AutoGPTQ's default); the tied/untied lm_head is left in float."""
    return {"method": iq.method, "num_bits": iq.bits, "type": "int",
            "symmetric": iq.method == "gptq",
            "strategy": "channel" if iq.group_size < 0 else "group",
            "group_size": None if iq.group_size < 0 else iq.group_size,
            "targets": ["Linear"], "ignore": ["lm_head"],
            **({"actorder": "static", "dampening_frac": 0.01, "block_size": 128}
               if iq.method == "gptq" else {"duo_scaling": True, "n_grid": 20})}


def _quantize_int(base_dir: Path, out: Path, iq: hf_types.IntQuant, scheme: dict[str, Any],
                  calib_text: Any, calib_spec: dict[str, Any], threads: int,
                  trust_remote_code: bool) -> dict[str, Any]:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    calib_ids, facts = calibration_tokens(calib_text, calib_spec, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    weights = QuantizationArgs(num_bits=scheme["num_bits"], type="int",
                               symmetric=scheme["symmetric"], strategy=scheme["strategy"],
                               group_size=scheme["group_size"],
                               **({"actorder": scheme["actorder"]} if iq.method == "gptq" else {}))
    groups = {"group_0": QuantizationScheme(targets=scheme["targets"], weights=weights)}
    if iq.method == "gptq":
        recipe: list[Any] = [GPTQModifier(config_groups=groups, ignore=scheme["ignore"],
                                          dampening_frac=scheme["dampening_frac"],
                                          block_size=scheme["block_size"])]
    else:
        from llmcompressor.modifiers.transform.awq import AWQModifier
        recipe = [AWQModifier(duo_scaling=scheme["duo_scaling"], n_grid=scheme["n_grid"]),
                  QuantizationModifier(config_groups=groups, ignore=scheme["ignore"])]
    n, seq_len = len(calib_ids), len(calib_ids[0])
    dataset = Dataset.from_dict({"input_ids": calib_ids, "attention_mask": [[1] * seq_len] * n})
    with _no_pinned_memory_without_accelerator():
        oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=n,
                max_seq_length=seq_len, shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return {"calibration": calib_spec | facts}


def check_group_size(model_dir: Path, iq: hf_types.IntQuant) -> None:
    """Groups must tile every quantized layer's input width (SmolLM2-135M: 576 and 1536, so
    g64/g32, not g128); say so before minutes of calibration, not after."""
    if iq.group_size < 0:
        return
    cfg = _config(model_dir)
    cfg = cfg.get("text_config", cfg)
    widths = {}
    for key in ("hidden_size", "intermediate_size"):
        if isinstance(cfg.get(key), int):
            widths[key] = cfg[key]
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        widths["num_attention_heads x head_dim"] = heads * head_dim
    bad = {k: w for k, w in widths.items() if w % iq.group_size}
    if bad:
        fits = [g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths.values())]
        raise QbenchError(
            f"{iq.name}: group size {iq.group_size} does not divide the input width of every "
            f"layer ({', '.join(f'{k} = {w}' for k, w in bad.items())}); "
            + (f"use group size {fits[0]} ({iq.method}-w{iq.bits}g{fits[0]})" if fits
               else "use per-channel (g'c')"))


def build_int_quant(base_dir: Path, base_sha: str, quant: str, req: PrepareRequest,
                    trust_remote_code: bool = False) -> tuple[Path, str, dict[str, Any]]:
    """The compressed-tensors folder of ``awq-…`` / ``gptq-…`` made from the fp32 base."""
    require("llmcompressor", "llmcompressor", f"building {quant} (llm-compressor oneshot)")
    require("compressed_tensors", "compressed-tensors", f"building {quant}")
    require("datasets", "datasets", f"building {quant} (llm-compressor's calibration input)")
    iq = hf_types.parse_int_quant(quant)
    assert iq is not None
    check_group_size(base_dir, iq)
    calib_text, calibration = calibration_spec(req.variant, req)
    scheme = int_quant_recipe(iq)
    recipe = {"tool": "llm-compressor oneshot", "quant": quant, "input_sha256": base_sha,
              "modifiers": (["GPTQModifier"] if iq.method == "gptq"
                            else ["AWQModifier", "QuantizationModifier"]),
              "scheme": scheme, "calibration": calibration, "format": "compressed-tensors",
              "llmcompressor": version_of("llmcompressor"),
              "compressed_tensors": version_of("compressed-tensors"), **_lib_versions()}
    return _cached_dir(req.cache_dir, recipe, lambda out: _quantize_int(
        base_dir, out, iq, scheme, calib_text, calibration, req.threads, trust_remote_code))


# -- load settings --------------------------------------------------------------------------
def bnb_load(quant: str) -> dict[str, Any]:
    """BitsAndBytesConfig keyword arguments for a bnb variant (compute dtype chosen at load)."""
    if quant == "bnb-int8":
        return {"load_in_8bit": True, "llm_int8_threshold": 6.0}
    return {"load_in_4bit": True, "bnb_4bit_quant_type": quant.split("-")[1],
            "bnb_4bit_use_double_quant": False}


def load_settings(quant: str) -> dict[str, Any]:
    k = hf_types.kind(quant)
    if k == "float":
        return {"dtype": hf_types.TORCH_DTYPES[quant]}
    if k == "bnb":
        return {"dtype": "auto-compute", "bitsandbytes": bnb_load(quant)}
    return {"dtype": "float32"}   # compressed-tensors: decompressed to float32 for compute


# -- the worker's entry point ---------------------------------------------------------------
def prepare(req: PrepareRequest) -> Prepared:
    """The variant descriptor to load and the artifact description (the transformers
    backend's BackendInfo.prepare)."""
    from qbench.inputs.sources import resolve

    variant, model_file, model_sha, cache_dir = (req.variant, req.model_file, req.model_sha,
                                                 req.cache_dir)
    model = req.model
    trust = bool(model.get("trust_remote_code", False))
    pickle_ok = bool(model.get("allow_pickle", False))
    quant = variant["quant"]
    if variant.get("source"):   # a pre-quantized folder or hub checkpoint, loaded as is
        res = resolve(variant["source"], base_dir=req.base_dir, cache_dir=cache_dir)
        check_model_dir(res.path, allow_pickle=pickle_ok)
        sha = sha256_file(res.path, cache_dir)
        recipe = {"tool": "none (pre-quantized source)", "source": variant["source"],
                  "revision": res.revision, "quantization_config":
                  _config(res.path).get("quantization_config")}
        art = write_descriptor(cache_dir, quant=quant, model_dir=res.path, model_sha=sha,
                               load={"dtype": "auto", "pre_quantized": True,
                                     "trust_remote_code": trust}, recipe=recipe)
        return art.path, art.describe()
    base_dir, base_sha, base_recipe = hf_base(model_file, model_sha, cache_dir,
                                              allow_pickle=pickle_ok, trust_remote_code=trust)
    kind = hf_types.kind(quant)
    load = load_settings(quant) | {"trust_remote_code": trust}
    if kind in ("awq", "gptq"):
        folder, sha, recipe = build_int_quant(base_dir, base_sha, quant, req, trust)
        recipe = recipe | {"base_recipe": base_recipe}
    else:
        if kind == "bnb":
            require("bitsandbytes", "bitsandbytes", f"the {quant} variant (load-time "
                    "bitsandbytes quantization)")
        folder, sha = base_dir, base_sha
        recipe = {"tool": ("bitsandbytes at load time (not saved)" if kind == "bnb"
                           else "transformers from_pretrained(dtype=...) at load time"),
                  "quant": quant, "input_sha256": base_sha, "load": load,
                  "base_recipe": base_recipe,
                  **({"bitsandbytes": version_of("bitsandbytes")} if kind == "bnb" else {}),
                  **_lib_versions()}
    art = write_descriptor(cache_dir, quant=quant, model_dir=folder, model_sha=sha, load=load,
                           recipe=recipe)
    return art.path, art.describe()
