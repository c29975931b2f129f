"""llama.cpp backend through llama-cpp-python's low-level C API.

The high-level ``Llama`` class hides batching and keeps all logits; metrics here need llama.cpp's
own evaluation pattern (several sequences per decode, logits only where scored, cache cleared
per chunk) to match ``llama-perplexity`` and ``llama-bench`` number for number.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qbench.host.cores import physical_cores
from qbench.errors import QbenchError
from qbench.backends.base import LoadOptions
from qbench.quantize.gguf_types import KV_CACHE_TYPES, KV_DEFAULT

import llama_cpp  # noqa: E402  (this module is only imported when a llama.cpp cell runs)

_BACKEND_READY = False


def gpu_available() -> bool:
    """Can this llama.cpp build offload, and is there a device to offload to?"""
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


class LlamaCppBackend:
    name = "llama.cpp"

    def __init__(self, path: Path, opts: LoadOptions) -> None:
        global _BACKEND_READY
        if not _BACKEND_READY:
            llama_cpp.llama_backend_init()
            _BACKEND_READY = True
        self.path = path
        self.opts = opts
        if opts.device == "cuda" and not gpu_available():
            raise QbenchError("device = 'cuda' but this llama-cpp-python build cannot offload to "
                              "a GPU (rebuild with CMAKE_ARGS='-DGGML_CUDA=on')")
        on_gpu = opts.device == "cuda" or (opts.device == "auto" and gpu_available())
        self.device = "cuda" if on_gpu else "cpu"
        self.n_gpu_layers = (opts.n_gpu_layers if opts.n_gpu_layers >= 0 else 10**6) if on_gpu else 0
        self.threads = opts.threads or physical_cores()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = self.n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise QbenchError(f"llama.cpp could not load {path} (see the cell log)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.bos_id = bos if bos >= 0 else None
        self.n_batch = opts.n_batch
        self.n_ubatch = opts.n_ubatch
        # KV-cache type (type_k = type_v); a quantized V cache needs flash attention
        self.kv_cache = opts.kv_cache or KV_DEFAULT
        if self.kv_cache not in KV_CACHE_TYPES:
            raise QbenchError(f"unknown KV-cache type {self.kv_cache!r}")
        self.flash_attn = self.kv_cache not in ("f16", "f32", "bf16")
        self.ctx: Any = None
        self._ctx_shape = (0, 0)
        self._pos = 0

    # -- contexts -------------------------------------------------------------------------
    def _ensure_context(self, n_ctx_seq: int, n_seq: int = 1) -> None:
        """A context with at least ``n_ctx_seq`` positions for each of ``n_seq`` sequences."""
        have_ctx, have_seq = self._ctx_shape
        if self.ctx is not None and have_ctx >= n_ctx_seq and have_seq >= n_seq:
            self.reset()
            return
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        n_ctx_seq = max(n_ctx_seq, have_ctx)
        n_seq = max(n_seq, have_seq)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx_seq * n_seq
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(self.n_ubatch, self.n_batch)
        cparams.n_seq_max = n_seq
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        if self.kv_cache != KV_DEFAULT:
            cparams.type_k = cparams.type_v = KV_CACHE_TYPES[self.kv_cache]
        if self.flash_attn:
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise QbenchError(f"llama.cpp could not create a context of {n_ctx_seq} x {n_seq} "
                              "tokens (out of memory?)")
        self._ctx_shape = (n_ctx_seq, n_seq)
        self._pos = 0

    def reset(self, n_ctx: int | None = None) -> None:
        if n_ctx is not None and (self.ctx is None or self._ctx_shape[0] < n_ctx):
            self._ensure_context(n_ctx, 1)
            return
        if self.ctx is not None:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self._pos = 0

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, False)
        if n < 0:
            raise QbenchError(f"llama_tokenize needs {-n} tokens, more than {n_max}")
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = llama_cpp.llama_token_to_piece(self.vocab, int(t), buf, 256, 0, False)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # -- evaluation -----------------------------------------------------------------------
    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> int:
        """Decode (token, pos, seq, wants_logits) entries in one llama_decode; return outputs."""
        batch = llama_cpp.llama_batch_init(len(entries), 0, 1)
        try:
            n_out = 0
            for i, (tok, pos, seq, want) in enumerate(entries):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = want
                n_out += want
            batch.n_tokens = len(entries)
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                raise QbenchError(f"llama_decode failed with code {rc} ({len(entries)} tokens)")
        finally:
            llama_cpp.llama_batch_free(batch)
        return n_out

    def _outputs(self, n_out: int, *, copy: bool = True) -> np.ndarray:
        """The logits of the last decode; without ``copy`` a read-only view of llama.cpp's
        buffer, overwritten by the next decode."""
        ptr = llama_cpp.llama_get_logits(self.ctx)
        view = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
        if copy:
            return view.copy()
        view.flags.writeable = False
        return view

    def chunk_logits(self, chunks: Sequence[Sequence[int]], first: int) -> Iterator[np.ndarray]:
        if not chunks:
            return
        n_ctx = max(len(c) for c in chunks)
        n_seq = max(1, self.n_batch // n_ctx)   # as llama-perplexity: n_batch / n_ctx sequences
        self._ensure_context(n_ctx, n_seq)
        for g in range(0, len(chunks), n_seq):
            group = chunks[g:g + n_seq]
            self.reset()
            if n_ctx <= self.n_batch:
                entries = [(int(t), p, s, first <= p < len(c) - 1)
                           for s, c in enumerate(group) for p, t in enumerate(c)]
                out = self._outputs(self._decode(entries), copy=False)  # consumed before
                offset = 0                                               # the next decode
                for c in group:
                    n = max(len(c) - 1 - first, 0)
                    yield out[offset:offset + n]
                    offset += n
            else:  # one chunk longer than a batch: decode it piecewise, gather its logits
                for c in group:
                    self.reset()
                    parts = []
                    for b in range(0, len(c), self.n_batch):
                        entries = [(int(c[p]), p, 0, first <= p < len(c) - 1)
                                   for p in range(b, min(b + self.n_batch, len(c)))]
                        n_out = self._decode(entries)
                        if n_out:
                            parts.append(self._outputs(n_out))
                    yield np.concatenate(parts) if parts else np.empty((0, self.n_vocab),
                                                                       np.float32)

    def prefix_last_logits(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]
                           ) -> Iterator[np.ndarray]:
        """The logits after ``prefix + suffix`` for each suffix, the prefix decoded once: its
        KV cache stays, each suffix is decoded after it and then removed from the cache."""
        if not suffixes:
            return
        n = len(prefix)
        self.reset(n + max(len(s) for s in suffixes))
        self.reset()
        self.decode_tokens(prefix, self.n_batch)
        mem = llama_cpp.llama_get_memory(self.ctx)
        for suffix in suffixes:
            for b in range(0, len(suffix), self.n_batch):
                piece = suffix[b:b + self.n_batch]
                last = b + len(piece) == len(suffix)
                self._decode([(int(t), n + b + k, 0, last and k == len(piece) - 1)
                              for k, t in enumerate(piece)])
            yield self._outputs(1)[0]
            if not llama_cpp.llama_memory_seq_rm(mem, 0, n, -1):
                raise RuntimeError("this model's memory cannot drop a partial sequence "
                                   "(recurrent state): no prefix reuse")
        self._pos = n

    @property
    def supports_prefix_cache(self) -> bool:
        """Recurrent and hybrid models keep a state that cannot be rolled back to a prefix."""
        return not (llama_cpp.llama_model_is_recurrent(self.model)
                    or llama_cpp.llama_model_is_hybrid(self.model))

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> Iterator[np.ndarray]:
        if not prompts:
            return
        longest = max(len(p) for p in prompts)
        if longest > self.n_batch:
            for p in prompts:
                self.reset(longest)
                self.decode_tokens(p[:-1], self.n_batch)
                n = self._decode([(int(p[-1]), len(p) - 1, 0, True)])
                yield self._outputs(n)[0]
            return
        n_seq = max(1, min(16, self.n_batch // longest))
        self._ensure_context(longest, n_seq)
        i = 0
        while i < len(prompts):
            self.reset()
            entries: list[tuple[int, int, int, bool]] = []
            seq = 0
            while i < len(prompts) and seq < n_seq and len(entries) + len(prompts[i]) <= self.n_batch:
                p = prompts[i]
                entries += [(int(t), pos, seq, pos == len(p) - 1) for pos, t in enumerate(p)]
                seq += 1
                i += 1
            out = self._outputs(self._decode(entries))
            yield from out

    def decode_tokens(self, tokens: Sequence[int], n_batch: int) -> None:
        if self.ctx is None:
            self._ensure_context(self._pos + len(tokens))
        for b in range(0, len(tokens), n_batch):
            piece = tokens[b:b + n_batch]
            self._decode([(int(t), self._pos + k, 0, k == len(piece) - 1)
                          for k, t in enumerate(piece)])
            self._pos += len(piece)
        llama_cpp.llama_synchronize(self.ctx)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        self.reset(len(prompt) + max_new_tokens + 1)
        self.decode_tokens(prompt, self.n_batch)
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1),
                                           shape=(self.n_vocab,))
            tok = int(np.argmax(logits))
            if self.is_eog(tok):
                break
            out.append(tok)
            self.decode_tokens([tok], 1)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name, "library": "llama-cpp-python",
            "library_version": llama_cpp.__version__, "device": self.device,
            "n_gpu_layers": self.n_gpu_layers, "threads": self.threads,
            "n_batch": self.n_batch, "n_ubatch": self.n_ubatch,
            "kv_cache": {"type_k": self.kv_cache, "type_v": self.kv_cache,
                         "flash_attn": "enabled" if self.flash_attn else "llama.cpp default"},
            "n_params": int(llama_cpp.llama_model_n_params(self.model)),
            "model_size_bytes": int(llama_cpp.llama_model_size(self.model)),
            "system_info": system_info(),
            "gpu_offload_supported": gpu_available(),
        }

    def end_cell(self) -> None:
        """Free the context: the next cell creates the one it needs, as after a fresh load
        (contexts only grow here, and a larger one would change its memory and speed)."""
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        self._ctx_shape = (0, 0)
        self._pos = 0

    def size_context(self, n_ctx: int) -> None:
        """An empty context of exactly ``n_ctx`` positions (one sequence), for a speed test:
        llama-bench sizes its context per test (depth + prompt + gen of that test). With one
        context per depth for both tests (1,089 positions at depth 512), tg at depth 512 read
        0.86x llama-bench's in every round here; sized per test, the rounds straddle 1
        (0.91-1.12, benchmarks/README.md)."""
        if self.ctx is not None and self._ctx_shape == (n_ctx, 1):
            self.reset()
            return
        self.end_cell()
        self._ensure_context(n_ctx, 1)

    def close(self) -> None:
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


def load(path: Path, opts: LoadOptions) -> LlamaCppBackend:
    # into the cell log first: a crash report then shows the build (AMX or not)
    print(f"llama.cpp system info: {system_info()}", file=sys.stderr, flush=True)
    return LlamaCppBackend(path, opts)
