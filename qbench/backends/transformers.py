"""Hugging Face transformers backend: fp32/bf16/fp16, bitsandbytes at load time, and
compressed-tensors (llm-compressor AWQ/GPTQ) checkpoints, behind the same narrow interface as the
llama.cpp backend so every metric runs unchanged.

- Scoring runs several sequences per forward pass, right-padded (causal attention never lets a
  real token see the padding after it, so positions and results equal the unpadded ones), and
  computes the LM head only at the positions a metric reads (``logits_to_keep``).
- Speed and greedy generation keep a real KV cache (``past_key_values``): a tg step is one token
  through the model with the cache, as llama-bench's tg.
- Tokenization is the model's own tokenizer with its own special-token rule (``add_special``
  adds BOS only where that tokenizer adds it).

Importing this module imports torch and transformers; the worker turns an ImportError into a
``skipped`` cell (MissingExtraError), so a GGUF-only install never needs them.
"""

from __future__ import annotations

import gc
import inspect
import json
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch  # noqa: E402  (only imported when a transformers cell runs)
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from qbench.host.cores import physical_cores
from qbench.errors import QbenchError
from qbench.quantize.hf import Unsupported, read_descriptor, version_of
from qbench.backends.base import LoadOptions

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NEEDS_GPU = re.compile(r"\b(cuda|gpu|accelerator|nvidia|triton|xpu)\b", re.I)


def gpu_available() -> bool:
    return bool(torch.cuda.is_available())


def torch_max_allocated_mb() -> float | None:
    """Peak memory torch allocated on the current CUDA device in this process (None on CPU)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TransformersBackend:
    name = "transformers"

    def __init__(self, path: Path, opts: LoadOptions) -> None:
        self.opts = opts
        self.path = Path(path)
        if self.path.is_file():
            self.descriptor = read_descriptor(self.path)
        else:   # a model folder given directly: loaded in its own dtype
            self.descriptor = {"quant": "", "model_dir": str(self.path), "load": {"dtype": "auto"}}
        self.model_dir = Path(self.descriptor["model_dir"])
        self.quant = self.descriptor.get("quant", "")
        load = dict(self.descriptor.get("load", {}))
        if opts.device == "cuda" and not gpu_available():
            raise QbenchError("device = 'cuda' but torch sees no CUDA device "
                              f"(torch {torch.__version__}, built for CUDA "
                              f"{torch.version.cuda or 'none: a CPU build'})")
        on_gpu = opts.device == "cuda" or (opts.device == "auto" and gpu_available())
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.threads = opts.threads or physical_cores()
        torch.set_num_threads(self.threads)
        self.n_batch = max(1, int(opts.n_batch))
        self.padding_side = str(opts.extra.get("padding_side", "right"))
        # LLM.int8 picks its fp16 outlier columns from every row of a forward pass, so a
        # sequence's logits would depend on what else (padding included) shares its batch:
        # bnb-int8 scores one sequence per forward pass
        self.max_seqs = 1 if load.get("bitsandbytes", {}).get("load_in_8bit") else 16
        # no reset of torch's peak counter here: a KLD cell loads its base as a second backend,
        # and the cell's peak is over both (the cell process starts fresh anyway)

        trust = bool(load.get("trust_remote_code", False))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=trust)
        self.tokenizer.model_max_length = 1 << 40   # whole texts are tokenized at once
        self.model = self._load_model(load, trust)
        self.model.eval()
        self.n_vocab = int(self.model.config.get_text_config().vocab_size)
        self.bos_id = self.tokenizer.bos_token_id
        self.add_bos = self._adds_bos()
        self.pad_id = next((t for t in (self.tokenizer.pad_token_id,
                                        self.tokenizer.eos_token_id, 0) if t is not None), 0)
        self._eog = self._eog_ids()
        self._keep_arg = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._byte_decoder = self._make_byte_decoder()
        self._cache: Any = None
        self._pos = 0
        self._last: torch.Tensor | None = None
        self.loaded_facts = self._weight_facts()

    # -- loading --------------------------------------------------------------------------
    def _compute_dtype(self) -> torch.dtype:
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    def _load_model(self, load: dict[str, Any], trust: bool) -> Any:
        kwargs: dict[str, Any] = {"trust_remote_code": trust, "device_map": {"": self.device}}
        dtype = load.get("dtype", "auto")
        if dtype == "auto-compute":
            self.compute_dtype = self._compute_dtype()
            kwargs["dtype"] = self.compute_dtype
        else:
            kwargs["dtype"] = _DTYPES.get(dtype, "auto")
            self.compute_dtype = _DTYPES.get(dtype)
        what = f"the {self.quant or 'model'} variant"
        if "bitsandbytes" in load:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                raise Unsupported(f"{what} needs the Python package 'bitsandbytes' "
                                  f"({_first_line(exc)}; pip install 'qbench-llm[hf]')",
                                  "bitsandbytes") from None
            warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
            bnb = dict(load["bitsandbytes"])
            if bnb.get("load_in_4bit"):
                bnb["bnb_4bit_compute_dtype"] = self.compute_dtype
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(**bnb)
        try:
            return AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs)
        except (ImportError, RuntimeError, ValueError, OSError, NotImplementedError) as exc:
            if self.device.type == "cpu" and _NEEDS_GPU.search(str(exc)):
                raise Unsupported(f"{what} needs a CUDA GPU (its kernels do not run on the "
                                  f"CPU): {_first_line(exc)}") from None
            if isinstance(exc, ImportError):
                raise Unsupported(f"{what} needs a package that is not installed: "
                                  f"{_first_line(exc)}") from None
            raise

    def _adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        return with_special[:1] == [self.bos_id] and without[:1] != [self.bos_id]

    def _eog_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config,
                    self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if eos is None:
                continue
            ids.update([int(eos)] if isinstance(eos, int) else (int(e) for e in eos))
        return ids

    def _make_byte_decoder(self) -> dict[str, int] | None:
        """For byte-level BPE vocabularies, the char -> byte map (GPT-2's bytes_to_unicode), so a
        token's bytes come out exactly as llama.cpp's token_to_piece gives them."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        if decoder is None or "ByteLevel" not in type(decoder).__name__ + repr(decoder):
            return None
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
            list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        return {chr(c): b for b, c in zip(bs, cs)}

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _token_bytes(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(int(token))
        if piece is None:
            return b""
        if self._byte_decoder is not None and int(token) not in self.tokenizer.all_special_ids:
            try:
                return bytes(self._byte_decoder[ch] for ch in piece)
            except KeyError:
                pass
        if int(token) in self.tokenizer.all_special_ids:
            return piece.encode("utf-8")
        return self.tokenizer.decode([int(token)], clean_up_tokenization_spaces=False
                                     ).encode("utf-8")

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self._token_bytes(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return int(token) in self._eog

    # -- evaluation -----------------------------------------------------------------------
    def _batch(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor | None, list[int]]:
        """(input_ids, attention_mask, position_ids or None, offsets): padded to the longest;
        ``offsets[i]`` is where sequence i starts (non-zero only with left padding)."""
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        offsets = []
        for i, s in enumerate(seqs):
            off = longest - len(s) if self.padding_side == "left" else 0
            ids[i, off:off + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, off:off + len(s)] = 1
            offsets.append(off)
        positions = None
        if self.padding_side == "left" and any(offsets):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids, mask, positions, offsets

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None,
                 keep: int | torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": ids.to(self.device),
                                  "attention_mask": mask.to(self.device), "use_cache": False}
        if positions is not None:
            kwargs["position_ids"] = positions.to(self.device)
        if self._keep_arg:
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs).logits
        if not self._keep_arg:   # the model computed every position: cut what was asked for
            if isinstance(keep, torch.Tensor):
                logits = logits[:, keep.to(logits.device)]
            elif keep:
                logits = logits[:, -keep:]
        return logits

    def chunk_logits(self, chunks: Sequence[Sequence[int]], first: int) -> Iterator[np.ndarray]:
        if not chunks:
            return
        if self.padding_side == "left":   # logits_to_keep counts from the right: rows differ
            saved, self.padding_side = self.padding_side, "right"
            try:
                yield from self.chunk_logits(chunks, first)
            finally:
                self.padding_side = saved
            return
        n_ctx = max(len(c) for c in chunks)
        n_seq = max(1, min(self.max_seqs, self.n_batch // max(n_ctx, 1)))  # llama-perplexity
        for g in range(0, len(chunks), n_seq):
            group = chunks[g:g + n_seq]
            longest = max(len(c) for c in group)
            keep = longest - first
            if keep <= 0:
                for _ in group:
                    yield np.empty((0, self.n_vocab), np.float32)
                continue
            ids, mask, _, _ = self._batch(group)
            with torch.inference_mode():
                logits = self._forward(ids, mask, None, keep)   # positions first..longest-1
                rows = logits.float().cpu().numpy()
            for i, c in enumerate(group):
                n = max(len(c) - 1 - first, 0)
                yield np.ascontiguousarray(rows[i, :n])

    def _groups(self, seqs: Sequence[Sequence[int]]) -> Iterator[list[Sequence[int]]]:
        """Consecutive sequences batched together: at most ``max_seqs`` of them and
        (count x longest) <= ``n_batch`` tokens."""
        i = 0
        while i < len(seqs):
            group = [seqs[i]]
            longest = len(seqs[i])
            i += 1
            while (i < len(seqs) and len(group) < self.max_seqs
                   and (len(group) + 1) * max(longest, len(seqs[i])) <= self.n_batch):
                longest = max(longest, len(seqs[i]))
                group.append(seqs[i])
                i += 1
            yield group

    def prefix_last_logits(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]
                           ) -> Iterator[np.ndarray]:
        """The logits after ``prefix + suffix`` for each suffix, in the order given: the
        prefix's KV cache is computed once, then copied for each batch of suffixes
        (right-padded, masked). The suffixes are batched longest first, so that a batch's
        members are of like length and little of it is padding."""
        import copy

        if not suffixes:
            return
        n = len(prefix)
        order = sorted(range(len(suffixes)), key=lambda i: (-len(suffixes[i]), i))
        rows_by_index: dict[int, np.ndarray] = {}
        with torch.inference_mode():
            kw: dict[str, Any] = {"logits_to_keep": 1} if self._keep_arg else {}
            out = self.model(input_ids=torch.tensor([list(prefix)], device=self.device),
                             use_cache=True, **kw)   # only the KV cache is wanted
            base = out.past_key_values
            done = 0
            for group in self._groups([suffixes[i] for i in order]):
                longest = max(len(s) for s in group)
                cache = copy.deepcopy(base)
                if len(group) > 1:
                    cache.batch_repeat_interleave(len(group))
                pad = self.pad_id if self.pad_id is not None else 0
                ids = torch.tensor([list(s) + [pad] * (longest - len(s)) for s in group],
                                   device=self.device)
                mask = torch.tensor([[1] * (n + len(s)) + [0] * (longest - len(s))
                                     for s in group], device=self.device)
                positions = torch.arange(n, n + longest, device=self.device).expand(
                    len(group), -1)
                last = [len(s) - 1 for s in group]
                wanted = sorted(set(last))
                kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                          "position_ids": positions, "past_key_values": cache,
                                          "use_cache": True}
                if self._keep_arg:
                    kwargs["logits_to_keep"] = torch.tensor(wanted, device=self.device)
                logits = self.model(**kwargs).logits
                if not self._keep_arg:
                    logits = logits[:, wanted]
                rows = logits.float().cpu().numpy()
                for r, pos in enumerate(last):
                    rows_by_index[order[done + r]] = np.ascontiguousarray(
                        rows[r, wanted.index(pos)])
                done += len(group)
        for i in range(len(suffixes)):
            yield rows_by_index.pop(i)

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> Iterator[np.ndarray]:
        if not prompts:
            return
        for group in self._groups(prompts):
            ids, mask, positions, offsets = self._batch(group)
            last = [off + len(p) - 1 for off, p in zip(offsets, group)]
            wanted = sorted(set(last))
            with torch.inference_mode():
                logits = self._forward(ids, mask, positions,
                                       torch.tensor(wanted, dtype=torch.long))
                rows = logits.float().cpu().numpy()
            for r, pos in enumerate(last):
                yield np.ascontiguousarray(rows[r, wanted.index(pos)])

    # -- generation / speed ---------------------------------------------------------------
    def reset(self, n_ctx: int | None = None) -> None:
        self._cache = None
        self._pos = 0
        self._last = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def decode_tokens(self, tokens: Sequence[int], n_batch: int) -> None:
        step = max(1, int(n_batch))
        with torch.inference_mode():
            for b in range(0, len(tokens), step):
                piece = torch.as_tensor([list(tokens[b:b + step])], dtype=torch.long,
                                        device=self.device)
                kwargs: dict[str, Any] = {"input_ids": piece, "past_key_values": self._cache,
                                          "use_cache": True}
                if self._keep_arg:
                    kwargs["logits_to_keep"] = 1
                out = self.model(**kwargs)
                self._cache = out.past_key_values
                self._last = out.logits[0, -1]
                self._pos += piece.shape[1]
        self._sync()

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        self.reset()
        self.decode_tokens(prompt, self.n_batch)
        out: list[int] = []
        for _ in range(max_new_tokens):
            assert self._last is not None
            tok = int(torch.argmax(self._last.float()).item())
            if self.is_eog(tok):
                break
            out.append(tok)
            self.decode_tokens([tok], 1)
        return out

    # -- facts ----------------------------------------------------------------------------
    def _weight_facts(self) -> dict[str, Any]:
        """What the loaded weights really are: parameter/buffer dtypes with elements and bytes,
        the classes of the linear layers, torch's own memory footprint."""
        hist: dict[str, dict[str, int]] = {}
        seen: set[int] = set()
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            entry = hist.setdefault(str(tensor.dtype).replace("torch.", ""),
                                    {"tensors": 0, "elements": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["elements"] += tensor.numel()
            entry["bytes"] += tensor.numel() * tensor.element_size()
        linear = Counter(type(m).__name__ for m in self.model.modules()
                         if "Linear" in type(m).__name__)
        return {"weight_dtypes": hist, "linear_layers": dict(linear),
                "memory_footprint_bytes": int(self.model.get_memory_footprint())}

    def describe(self) -> dict[str, Any]:
        qc = getattr(self.model.config, "quantization_config", None)
        if qc is not None and not isinstance(qc, dict):
            qc = qc.to_dict() if hasattr(qc, "to_dict") else str(qc)
        info: dict[str, Any] = {
            "backend": self.name, "library": "transformers",
            "library_version": transformers.__version__, "torch_version": torch.__version__,
            "device": self.device.type, "threads": torch.get_num_threads(),
            "n_batch": self.n_batch, "padding_side": self.padding_side,
            "max_seqs_per_forward": self.max_seqs,
            "quant": self.quant, "load": self.descriptor.get("load"),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "compute_dtype": (str(self.compute_dtype).replace("torch.", "")
                              if self.compute_dtype is not None else None),
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
            "quantization_config": json.loads(json.dumps(qc, default=str)) if qc else None,
            "n_params": int(sum(p.numel() for p in self.model.parameters())),
            "add_bos": self.add_bos, "bos_id": self.bos_id,
            "bitsandbytes_version": version_of("bitsandbytes"),
            "compressed_tensors_version": version_of("compressed-tensors"),
            "weights_at_load": self.loaded_facts, "weights_now": self._weight_facts(),
            "cuda_available": torch.cuda.is_available(),
        }
        if self.device.type == "cuda":
            info["gpu_name"] = torch.cuda.get_device_name(self.device)
            info["torch_max_allocated_mb"] = torch_max_allocated_mb()
        return info

    def end_cell(self) -> None:
        """Drop the KV cache and torch's cached GPU blocks (the next cell's VRAM is its own)."""
        self.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        self._cache = None
        self._last = None
        if getattr(self, "model", None) is not None:
            self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load(path: Path, opts: LoadOptions) -> TransformersBackend:
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"device {opts.device}, threads {opts.threads or physical_cores()}",
          file=sys.stderr, flush=True)
    return TransformersBackend(path, opts)
