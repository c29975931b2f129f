"""Bytes a decoder reads from memory per generated token: the speed metric's roofline inputs.

One tg step runs every layer once on one token, so it reads every weight once, except:

- the token-embedding table: a lookup reads one row, not the table; but when the output
  projection is *tied* to it (no separate ``output.weight``, as in SmolLM2) the logits matmul
  reads the whole table, so it counts in full;
- mixture-of-experts tensors (``*_exps``): only ``expert_used_count`` of ``expert_count``
  experts are read per token.

plus the KV cache of every earlier position: ``2 x n_layer x n_kv_heads x head_dim x positions x
bytes per element`` (K and V; f16 = 2 bytes, llama.cpp's default cache type). During a tgN run
at depth d, step i attends to d + i + 1 positions, so the mean is d + (N + 1) / 2.

GGUF: tensor bytes, shape, the embedding/output/expert tensors and the key/value head widths
from :func:`qbench.quantize.gguf.inspect_gguf`'s summary (one pass of gguf's reader, memoised). transformers: the loaded model's own parameters and buffers
(a bitsandbytes model is smaller in memory than its file), else the file size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KV_BYTES_F16 = 2


def kv_bytes_per_position(n_layer: int, n_kv_heads: int, head_dim_k: int,
                          head_dim_v: int | None = None,
                          bytes_per_element: float = KV_BYTES_F16) -> int:
    """K and V bytes one cached position takes over all layers."""
    head_dim_v = head_dim_k if head_dim_v is None else head_dim_v
    return int(n_layer * n_kv_heads * (head_dim_k + head_dim_v) * bytes_per_element)


def kv_bytes(per_position: int, depth: float) -> float:
    """KV bytes read by one step attending to ``depth`` positions:
    2 x n_layer x n_kv_heads x head_dim x depth x bytes per element."""
    return per_position * depth


def mean_tg_positions(depth: int, gen_tokens: int) -> float:
    """Mean positions attended by the steps of a tgN run starting at ``depth``."""
    return depth + (gen_tokens + 1) / 2


# -- GGUF ------------------------------------------------------------------------------------
def gguf_traffic(path: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Bytes read per token (weights) and KV bytes per cached position of a GGUF file, from
    the summary :func:`qbench.quantize.gguf.inspect_gguf` keeps (its ``traffic`` facts come from
    the same pass of gguf's reader as the type mix)."""
    from qbench.quantize.gguf import inspect_gguf

    summary = inspect_gguf(path, cache_dir)
    return traffic_from_gguf(summary, summary["traffic"])


def traffic_from_gguf(summary: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """Pure: weights read per token and KV per position from a summary and tensor facts."""
    total = int(summary["tensor_bytes"])
    notes: list[str] = []
    tied = not facts.get("has_output")
    embed = int(facts.get("embed_bytes") or 0)
    weights = total if tied else total - embed
    notes.append("output projection tied to the token embedding: the table is read in full "
                 "per token" if tied else
                 "token-embedding table excluded (a lookup reads one row)")
    n_exp, n_used = facts.get("expert_count"), facts.get("expert_used_count")
    exp_bytes = int(facts.get("expert_bytes") or 0)
    if exp_bytes and n_exp and n_used:
        weights -= exp_bytes - exp_bytes * n_used / n_exp
        notes.append(f"mixture of experts: {n_used} of {n_exp} experts' tensors counted")
    shape = summary.get("shape") or {}
    n_layer, n_head = shape.get("block_count"), shape.get("attention.head_count")
    n_embd = shape.get("embedding_length")
    n_kv = facts.get("head_count_kv") or shape.get("attention.head_count_kv") or n_head
    per_pos = None
    if isinstance(n_kv, list):                 # per-layer head counts (OpenELM, hybrids)
        n_kv_total, n_kv = sum(n_kv), None
    else:
        n_kv_total = None
    k_len = facts.get("key_length") or (n_embd // n_head if n_embd and n_head else None)
    v_len = facts.get("value_length") or k_len
    if n_layer and k_len and (n_kv or n_kv_total):
        if n_kv_total is not None:
            per_pos = int(n_kv_total * (k_len + v_len) * KV_BYTES_F16)
        else:
            per_pos = kv_bytes_per_position(n_layer, n_kv, k_len, v_len)
    else:
        notes.append("KV cache size unknown (no layer/head counts in the GGUF metadata): "
                     "counted as 0")
    return {"source": "gguf", "tensor_bytes": total, "embed_bytes": embed, "tied_output": tied,
            "weight_bytes_per_token": int(weights), "kv_bytes_per_position": per_pos,
            "kv_bytes_per_element": KV_BYTES_F16,
            "shape": {"n_layer": n_layer, "n_kv_heads": n_kv if n_kv_total is None else n_kv_total,
                      "head_dim_k": k_len, "head_dim_v": v_len},
            "notes": notes}


# -- transformers ----------------------------------------------------------------------------
def torch_model_traffic(model: Any, kv_element_size: int | None = None) -> dict[str, Any]:
    """Weights read per token and KV per position of a loaded transformers model."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    notes = []
    emb_in = model.get_input_embeddings().weight
    emb_out = model.get_output_embeddings()
    tied = emb_out is not None and getattr(emb_out, "weight", None) is not None and \
        emb_out.weight.data_ptr() == emb_in.data_ptr()
    embed = emb_in.numel() * emb_in.element_size()
    weights = total if tied else total - embed
    notes.append("output projection tied to the token embedding: the table is read in full "
                 "per token" if tied else
                 "token-embedding table excluded (a lookup reads one row)")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    n_layer = getattr(cfg, "num_hidden_layers", None)
    n_head = getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or (
        cfg.hidden_size // n_head if getattr(cfg, "hidden_size", None) and n_head else None)
    elem = kv_element_size or getattr(getattr(model, "dtype", None), "itemsize", None) or 4
    per_pos = kv_bytes_per_position(n_layer, n_kv, head_dim, bytes_per_element=elem) \
        if n_layer and n_kv and head_dim else None
    if per_pos is None:
        notes.append("KV cache size unknown (no layer/head counts in the config): counted as 0")
    return {"source": "torch", "tensor_bytes": int(total), "embed_bytes": int(embed),
            "tied_output": tied, "weight_bytes_per_token": int(weights),
            "kv_bytes_per_position": per_pos, "kv_bytes_per_element": elem,
            "shape": {"n_layer": n_layer, "n_kv_heads": n_kv, "head_dim_k": head_dim,
                      "head_dim_v": head_dim},
            "notes": notes}


def file_traffic(size_bytes: int) -> dict[str, Any]:
    return {"source": "file size", "tensor_bytes": int(size_bytes), "embed_bytes": None,
            "tied_output": None, "weight_bytes_per_token": int(size_bytes),
            "kv_bytes_per_position": None, "kv_bytes_per_element": None, "shape": {},
            "notes": ["weights read per token = the file size (tensor layout unknown); KV "
                      "cache counted as 0"]}


def model_traffic(artifact_path: Path, artifact: dict[str, Any], backend: Any,
                  cache_dir: Path | None) -> dict[str, Any]:
    """The roofline inputs of a cell's variant, from the best source available."""
    path = Path(artifact_path)
    notes: list[str] = []
    out: dict[str, Any] | None = None
    if path.suffix == ".gguf" and path.is_file():
        try:
            out = gguf_traffic(path, cache_dir)
        except Exception as exc:  # noqa: BLE001 - fall back, say why
            notes.append(f"GGUF not readable for the roofline ({type(exc).__name__}: {exc})")
    model = getattr(backend, "model", None)
    if out is None and model is not None and hasattr(model, "parameters"):
        try:
            dtype = getattr(backend, "compute_dtype", None) or getattr(model, "dtype", None)
            out = torch_model_traffic(model, getattr(dtype, "itemsize", None))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"model not introspectable ({type(exc).__name__}: {exc})")
    if out is None:
        size = artifact.get("size_bytes")
        if size is None:
            size = path.stat().st_size if path.is_file() else 0
        out = file_traffic(int(size))
    out["notes"][:0] = notes
    return out
