"""The narrow interface every backend implements; metrics see only this, never a library.

Like lm-eval's model API, it takes token batches and returns scores: metrics never know whether
llama.cpp or transformers computed them, so each metric is written once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class LoadOptions:
    """How to load a variant: from the suite's defaults and the variant's settings."""

    device: str = "auto"       # auto | cpu | cuda
    threads: int = 0           # 0: physical cores
    n_ctx: int = 2048
    n_batch: int = 2048
    n_ubatch: int = 512
    n_gpu_layers: int = -1     # -1: all (only when on a GPU)
    seed: int = 0
    kv_cache: str = ""         # KV-cache type ("": the backend's default; llama.cpp: f16)
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A loaded model variant."""

    name: str
    n_vocab: int
    add_bos: bool              # does the tokenizer put BOS first? (llama.cpp: add_bos_token)
    bos_id: int | None

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS where the model's tokenizer does."""

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def chunk_logits(self, chunks: Sequence[Sequence[int]], first: int
                     ) -> Iterator[np.ndarray]:
        """For each chunk, evaluated alone from an empty cache, yield the float32 logits at
        positions ``first .. len(chunk)-2`` (shape ``(len(chunk)-1-first, n_vocab)``): the
        predictions of tokens ``first+1 .. len(chunk)-1``. Backends may batch chunks. A yielded
        array may be a read-only view of the engine's buffer, valid until the next one is
        requested: copy it to keep it (this saves a copy of n_vocab floats per token)."""

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> Iterator[np.ndarray]:
        """For each prompt (fresh cache), yield the float32 logits after its last token."""

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt`` (stops early at end-of-generation tokens)."""

    def reset(self) -> None:
        """Empty the KV cache (speed runs call it before each repetition)."""

    def decode_tokens(self, tokens: Sequence[int], n_batch: int) -> None:
        """Evaluate ``tokens`` appended to the cache, ``n_batch`` at a time, and synchronise."""

    def describe(self) -> dict[str, Any]:
        """Facts a result must record: device, offloaded layers, threads, batch sizes, build."""

    def close(self) -> None: ...

    # Optional (looked up with getattr, so a backend without it still works):
    # ``end_cell() -> None``: the worker runs a variant's cells on one loaded backend and calls
    # it between them. Drop what a cell built (a llama.cpp context sized for that cell, a KV
    # cache, cached GPU blocks), keep the weights, so the next cell starts as on a fresh load
    # (same numbers, and its memory is its own).

