"""What a llama.cpp variant holds in memory on a CPU, predicted before anything runs: the part
of the recommendation's estimate beyond the weights and the KV cache.

Peak RSS of a llama.cpp process on a CPU is (benchmarks/README.md, memory_fit.py, stages of
RSS after load / context / prompt, RssAnon vs RssFile):

- the mapped file's tensors (the weights, counted by the caller);
- the **repacked copy** (qbench.quantize.cpu_repack): the tensors llama.cpp copies into its
  repack buffer, while their mapped pages stay resident (up to 3.1 GiB for an 8B Q4_K_M on
  AVX2); clean page cache the kernel may drop under pressure, but peak RSS holds it;
- the KV cache at the context (counted by the caller: qbench.report.recommend.kv_cache_mb);
- the **runtime**: the worker process before it loads anything (Python, numpy, qbench:
  ``WORKER_MB``, the footprint cells' peak RSS), llama.cpp's libraries and its vocabulary
  (``LIBRARY_MB`` + ``VOCAB_BYTES_PER_TOKEN`` x tokens: token texts, scores and merges held
  in C++), and the compute buffer a prompt touches: one ubatch of activations,
  n_ubatch x (3 x feed-forward width + 4 x embedding width) x 4 bytes (the gate, up and
  their product, and the residual stream, norm, Q and attention output of each token, f32).
  llama.cpp reserves a compute buffer for its worst case (every token's logits: 258 MiB for a
  128k vocabulary at ubatch 512); a prompt that asks for one token's logits touches a quarter
  of it, and RSS counts what is touched.

The runtime's two fitted constants (libraries, bytes per token) come from two shapes measured
here (SmolLM2-135M speed cells: 49k vocabulary; the Llama-3.2-1B shape: 128k; 2026-12-07); the
Llama-3.1-8B shape, not used to fit them, is predicted within +0.2 % at 4k/8k, f16/q8_0 KV, Q8_0
and Q4_K_M (benchmarks/README.md, "memory_fit.py"). What a variant *needs* leaves the repacked
tensors' mapped copy out (qbench.report.recommend): under a memory limit between the two, decode
runs at full speed. On a GPU, and for the transformers backend, the runtime is not modelled
(None): the measured peak holds it.
"""

from __future__ import annotations

from typing import Any

from qbench.quantize.cpu_repack import features_from_cpu_flags, repacked_bytes

MIB = 2 ** 20
WORKER_MB = 55.0                # qbench's worker before loading: footprint cells' peak RSS
LIBRARY_MB = 11.0               # llama.cpp's libraries beyond the worker (fitted)
VOCAB_BYTES_PER_TOKEN = 345.0   # llama.cpp's vocabulary per token (fitted)
DEFAULT_UBATCH = 512            # qbench.backends.base.LoadOptions.n_ubatch


def on_cpu(row: dict[str, Any]) -> bool | None:
    """Did (or will) this llama.cpp variant run on the CPU? None when nothing says: no cell
    loaded it and its record's machine has a GPU."""
    if row.get("backend") != "llama.cpp":
        return False
    if row.get("device"):
        return row["device"] == "cpu"
    return None if row.get("machine_gpus") else True


def repack_mb(row: dict[str, Any]) -> tuple[float | None, str]:
    """The repacked copy held beside the mapped file (MiB) and where the rule's CPU features
    came from; 0 off the CPU, None when not known."""
    cpu = on_cpu(row)
    if cpu is False:
        return 0.0, "not on the CPU"
    if cpu is None:
        return None, "device not known"
    info = row.get("system_info")
    how = "llama.cpp's system info"
    if not info and row.get("cpu_flags"):
        info, how = features_from_cpu_flags(row["cpu_flags"]), "the CPU's flags"
    n = repacked_bytes(row.get("tensor_types") or {}, row.get("roles") or {},
                       row.get("embed_bytes"), info)
    if n is None:
        return None, f"repack not known ({how}: {info or 'none recorded'})"
    return n / MIB, how


def runtime_mb(row: dict[str, Any], shape: dict[str, Any]) -> float | None:
    """Worker + llama.cpp's libraries and vocabulary + one ubatch of activations (MiB); None
    off the CPU or when the shape lacks the vocabulary or the feed-forward width (a record
    written before qbench read them)."""
    if on_cpu(row) is not True:
        return None
    vocab, ff, embd = (shape.get(k) for k in (
        "vocab_size", "feed_forward_length", "embedding_length"))
    if not (vocab and ff and embd):
        return None
    ubatch = min(row.get("n_ubatch") or DEFAULT_UBATCH, row.get("n_batch") or 10 ** 9)
    activations = ubatch * (3 * ff + 4 * embd) * 4
    return WORKER_MB + LIBRARY_MB + (VOCAB_BYTES_PER_TOKEN * vocab + activations) / MIB
