"""Build GGUF variants with llama.cpp's own quantizer (``llama_model_quantize``), cached by
content: the cache key is the input file's sha256 plus the recipe, so a changed source or a new
llama.cpp version makes new files and an unchanged one is never rebuilt.

The chain is source -> float base (F16 by default) -> each quant type, like llama.cpp's
published ladders. A quantized source (SmolLM2 ships as Q4_1) is dequantized into the base with
``allow_requantize``; the recipe records that, so reports can say the base is not the original.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbench.host.cores import physical_cores
from qbench.errors import QbenchError, SourceError
from qbench.host.cache import folder as cache_folder
from qbench.host.cache import note_built
from qbench.host.fsutil import atomic_write_text, file_lock, fsync_file, fsync_folder
from qbench.inputs.sources import check_gguf, sha256_file, split_shards
from qbench.quantize.gguf_types import FLOAT_TYPES, FTYPES, TENSOR_TYPES


@dataclass(frozen=True)
class Artifact:
    path: Path
    sha256: str
    recipe: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256,
                "size_bytes": self.path.stat().st_size, "recipe": self.recipe}


def inspect_gguf(path: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """:func:`tensor_summary` over every shard of the model (one file, or each shard of a split
    GGUF named by its first), memoised by the content sha256 (gguf's reader takes seconds on a
    large vocabulary); raises SourceError naming the file if one is corrupt or truncated."""
    shards = split_shards(path) or [path]
    for shard in shards:
        check_gguf(shard)
    memo = None
    if cache_dir is not None:
        memo = _summary_memo(cache_dir, sha256_file(path, cache_dir))
        if memo.exists():
            try:
                return json.loads(memo.read_text())
            except ValueError:
                pass
    parts = [_shard_summary(shard) for shard in shards]
    summary = parts[0] if len(parts) == 1 else _merge_shards(parts)
    summary |= {"shards": len(shards), "file_bytes": sum(s.stat().st_size for s in shards)}
    if memo is not None:
        atomic_write_text(memo, json.dumps(summary))
    return summary


def _summary_memo(cache_dir: Path, sha256: str) -> Path:
    """Where the summary of the file with content ``sha256`` is kept."""
    return cache_folder(cache_dir, "inspect") / f"{sha256}-v{SUMMARY_VERSION}.json"


def _shard_summary(path: Path) -> dict[str, Any]:
    """One file's tensor summary, checked against the file's length."""
    try:
        summary = tensor_summary(path)
    except (ValueError, IndexError, OSError, struct.error, KeyError) as exc:
        raise SourceError(f"{path} is corrupt or truncated: {type(exc).__name__}: {exc}"
                          ) from None
    if summary["data_end"] > path.stat().st_size:
        raise SourceError(f"{path} is truncated: tensor data ends at byte "
                          f"{summary['data_end']}, the file has {path.stat().st_size}")
    return summary


def _merge_shards(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for a split GGUF: tensors of all shards; metadata from the first."""
    hist: dict[str, dict[str, int]] = {}
    for part in parts:
        for name, entry in part["types"].items():
            total = hist.setdefault(name, {"tensors": 0, "params": 0, "bytes": 0})
            for k in total:
                total[k] += entry[k]
    n_params = sum(p["n_params"] for p in parts)
    n_bytes = sum(p["tensor_bytes"] for p in parts)
    return parts[0] | {
        "n_tensors": sum(p["n_tensors"] for p in parts), "n_params": n_params,
        "tensor_bytes": n_bytes, "bpw": 8.0 * n_bytes / n_params if n_params else None,
        "types": dict(sorted(hist.items(), key=lambda kv: -kv[1]["params"])),
        "data_end": parts[0]["data_end"],
        "roles": {k: next((p["roles"][k] for p in parts if (p.get("roles") or {}).get(k)),
                          None) for k in ("token_embd", "output")},
        "traffic": parts[0]["traffic"] | {k: sum(p["traffic"][k] for p in parts) for k in (
            "embed_bytes", "output_bytes", "expert_bytes")} | {
            "has_output": any(p["traffic"]["has_output"] for p in parts)}}


def plain_reader(path: Path) -> Any:
    """gguf's GGUFReader over a plain ndarray view of its memory map. The reader slices its
    array once per part of every field: for a 49k-token vocabulary that is ~250k slices, and
    slicing an ``np.memmap`` runs memmap's ``__array_finalize__`` each time, which took half of
    a 4.7-5.3 s read here (1.8-2.0 s with the view; the same fields and tensors). The view
    shares the mapping (nothing is copied) and the file is only read."""
    import numpy as np
    from gguf.gguf_reader import GGUFReader   # not gguf.GGUFReader: hf's conversion swaps it

    class PlainGGUFReader(GGUFReader):
        @property
        def data(self) -> Any:
            return self._plain

        @data.setter
        def data(self, value: Any) -> None:
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainGGUFReader(str(path))


def tensor_summary(path: Path) -> dict[str, Any]:
    """What the file really holds: tensor types by count, parameters and bytes; bits per weight
    over all tensors (as llama-quantize prints); the file's declared ftype."""
    reader = plain_reader(path)
    hist: dict[str, dict[str, int]] = {}
    n_params = n_bytes = 0
    for t in reader.tensors:
        name = t.tensor_type.name
        entry = hist.setdefault(name, {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += int(t.n_elements)
        entry["bytes"] += int(t.n_bytes)
        n_params += int(t.n_elements)
        n_bytes += int(t.n_bytes)
    ftype_field = reader.fields.get("general.file_type")
    ftype_id = int(ftype_field.parts[ftype_field.data[0]][0]) if ftype_field else None
    ftype_name = next((k for k, v in FTYPES.items() if v == ftype_id), None)
    arch = _field_str(reader, "general.architecture")
    return {
        "n_tensors": len(reader.tensors), "n_params": n_params, "tensor_bytes": n_bytes,
        "bpw": 8.0 * n_bytes / n_params if n_params else None,
        "types": dict(sorted(hist.items(), key=lambda kv: -kv[1]["params"])),
        "file_type": ftype_name, "architecture": arch,
        "data_end": max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0),
        "shape": {k: _field_int(reader, f"{arch}.{k}") for k in (
            "block_count", "embedding_length", "attention.head_count",
            "attention.head_count_kv", "context_length", "feed_forward_length")} | {
            "vocab_size": _array_len(reader, "tokenizer.ggml.tokens")} if arch else {},
        "provenance": provenance_fields(reader),
        "traffic": traffic_facts(reader, arch),
        "roles": role_types(reader),
    }


def role_types(reader: Any) -> dict[str, str | None]:
    """The types the file holds for the tensors people choose (llama-quantize's
    --token-embedding-type / --output-tensor-type): what was asked may not be what a row width
    allows. ``output`` None: the model ties its output to the token embedding."""
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return {"token_embd": next((types[n] for n in _EMBED_NAMES if n in types), None),
            "output": next((types[n] for n in _OUTPUT_NAMES if n in types), None)}


_EMBED_NAMES = ("token_embd.weight",)
_OUTPUT_NAMES = ("output.weight",)


def traffic_facts(reader: Any, arch: str | None) -> dict[str, Any]:
    """What the speed roofline needs beyond the type mix (qbench.metrics.roofline), taken in
    the same pass of gguf's reader (a pass costs seconds on a large vocabulary): embedding /
    output / expert tensors' bytes, expert counts, key/value widths."""
    embed = output = experts = 0
    has_output = False
    for t in reader.tensors:
        if t.name in _EMBED_NAMES:
            embed += int(t.n_bytes)
        elif t.name in _OUTPUT_NAMES:
            output += int(t.n_bytes)
            has_output = True
        elif "_exps" in t.name:
            experts += int(t.n_bytes)

    def f(key: str) -> Any:
        fld = reader.fields.get(f"{arch}.{key}") if arch else None
        return None if fld is None else fld.contents()

    return {"embed_bytes": embed, "output_bytes": output, "has_output": has_output,
            "expert_bytes": experts, "expert_count": f("expert_count"),
            "expert_used_count": f("expert_used_count"),
            "key_length": f("attention.key_length"), "value_length": f("attention.value_length"),
            "head_count_kv": f("attention.head_count_kv")}


# which metadata tells who made a file and how: general.* (name, author, quantized_by, source
# URLs, quantization_version, ...) and the imatrix llama-quantize records (file, dataset,
# entries, chunks). Large arrays (tokenizer, tensors) are not provenance.
PROVENANCE_PREFIXES = ("general.", "quantize.")
SUMMARY_VERSION = 5     # memoised summaries of an older shape are recomputed (5: the
                        # feed-forward width and vocabulary in the shape)


def provenance_fields(reader: Any) -> dict[str, Any]:
    """Scalar general.* and quantize.* metadata of a GGUF: 'same name, different file' shows
    here (who quantized it, with which imatrix dataset, entries and chunks)."""
    from gguf import GGUFValueType

    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if not key.startswith(PROVENANCE_PREFIXES) or not f.types:
            continue
        try:
            if f.types[0] == GGUFValueType.ARRAY:
                if len(f.data) <= 8 and len(f.types) > 1 and f.types[1] == GGUFValueType.STRING:
                    out[key] = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
                continue
            raw = f.parts[f.data[0]]
            out[key] = (bytes(raw).decode("utf-8", "replace")
                        if f.types[0] == GGUFValueType.STRING else raw.tolist()[0])
        except (IndexError, ValueError, TypeError):
            continue
    return dict(sorted(out.items()))


def _field_str(reader: Any, key: str) -> str | None:
    f = reader.fields.get(key)
    return bytes(f.parts[f.data[0]]).decode("utf-8", "replace") if f else None


def _field_int(reader: Any, key: str) -> int | None:
    f = reader.fields.get(key)
    return int(f.parts[f.data[0]][0]) if f else None


def _array_len(reader: Any, key: str) -> int | None:
    """The number of items of an array field (the vocabulary: tokenizer.ggml.tokens)."""
    f = reader.fields.get(key)
    return len(f.data) if f else None


def dominant_type(path: Path, cache_dir: Path | None = None) -> str:
    """The tensor type holding most parameters (Q4_1 for SmolLM2's shipped file)."""
    types = inspect_gguf(path, cache_dir)["types"]
    return next(iter(types)) if types else "?"


def _quantize(inp: Path, out: Path, ftype: str, threads: int, imatrix: Path | None,
              tensors: dict[str, str] | None = None) -> None:
    """One llama_model_quantize call (or llama-quantize with an imatrix: the C API takes the
    imatrix only as a C++ object). ``tensors``: the output / token-embedding tensors' types
    (``output_tensor_type``, ``token_embedding_type``), as llama-quantize's flags of those
    names set them."""
    tensors = {k: v for k, v in (tensors or {}).items() if v}
    if imatrix is not None:
        from qbench.quantize.llama_tools import find_tool
        tool = find_tool("llama-quantize")
        flags = [x for k, v in sorted(tensors.items())
                 for x in (f"--{k.replace('_', '-')}", v.lower())]
        cmd = [tool, "--imatrix", str(imatrix), *flags, str(inp), str(out), ftype,
               str(threads or physical_cores())]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise QbenchError(f"llama-quantize {ftype} failed (exit {proc.returncode}): "
                              f"{proc.stderr[-800:]}")
        return
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    params.allow_requantize = True
    for name, tensor_type in tensors.items():   # output_tensor_type, token_embedding_type
        setattr(params, name, TENSOR_TYPES[tensor_type])
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise QbenchError(f"llama_model_quantize {inp.name} -> {ftype} failed (code {rc}); "
                          "see the cell log for llama.cpp's message")


def _verified(final: Path, meta: Path, cache_dir: Path) -> str | None:
    """The sha256 of the cached file ``final`` if it is still the file its ``recipe.json``
    describes (size, where recorded, and sha256), else None, with the reason on stderr. The
    hash comes from the per-file memo, keyed by size, mtime, inode and ctime: an unchanged file
    costs a stat, a file changed in any way is hashed again."""
    try:
        stored = json.loads(meta.read_text())
        want_sha, want_size = stored["output_sha256"], stored.get("output_size")
    except (OSError, ValueError, KeyError, TypeError):
        why = "its recipe.json is unreadable"
    else:
        size = final.stat().st_size
        if want_size is not None and size != want_size:
            why = f"it is {size} bytes, its recipe says {want_size}"
        elif (got := sha256_file(final, cache_dir)) != want_sha:
            why = f"its sha256 is {got[:16]}..., its recipe says {str(want_sha)[:16]}..."
        else:
            return got
    print(f"qbench: the cached {final} is not the file that was built ({why}); building it "
          "again", file=sys.stderr, flush=True)
    return None


def _cached(cache_dir: Path, recipe: dict[str, Any], build: Any) -> Artifact:
    """Return the artifact for ``recipe``, building it once under a lock (atomic rename). A
    cached file is reused only when it still matches the size and sha256 recorded when it was
    built; a file that does not (truncated, rewritten, bit rot the stamp shows) is rebuilt."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:32]
    folder = cache_folder(cache_dir, "artifacts") / digest
    final = folder / "model.gguf"
    with file_lock(cache_folder(cache_dir, "artifacts") / f"{digest}.lock"):
        meta = folder / "recipe.json"
        if final.exists() and meta.exists():
            sha = _verified(final, meta, cache_dir)
            if sha is not None:
                return Artifact(final, sha, recipe)
            meta.unlink()
            final.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".model.*.tmp.gguf"):  # a build killed earlier (lock held)
            stale.unlink(missing_ok=True)
        tmp = folder / f".model.{os.getpid()}.tmp.gguf"
        t0 = time.perf_counter()
        note_built("artifacts", digest)      # the attempt: a failed build leaves its heap too
        try:
            build(tmp)
            summary = inspect_gguf(tmp)      # a broken build never lands in the cache
            fsync_file(tmp)                  # its blocks on disk before its name is final
            os.replace(tmp, final)
            fsync_folder(folder)
        finally:
            if tmp.exists():
                tmp.unlink()
        out_sha = sha256_file(final, cache_dir)
        # kept: the footprint and the roofline would otherwise read the new file again
        atomic_write_text(_summary_memo(cache_dir, out_sha), json.dumps(summary))
        atomic_write_text(meta, json.dumps(
            recipe | {"output_sha256": out_sha, "output_size": final.stat().st_size,
                      "build_s": round(time.perf_counter() - t0, 2)},
            indent=1))
        return Artifact(final, out_sha, recipe)


def build_variant(source: Path, source_sha: str, quant: str, base_quant: str, *,
                  cache_dir: Path, threads: int, imatrix_path: Path | None = None,
                  imatrix_sha: str = "", output_tensor_type: str = "",
                  token_embedding_type: str = "") -> Artifact:
    """The GGUF file of ``quant``, made from ``source`` via the float ``base_quant``; with
    ``output_tensor_type`` / ``token_embedding_type`` those tensors get that ggml type
    (llama-quantize's flags of those names)."""
    import llama_cpp

    lib = {"llama_cpp_python": llama_cpp.__version__}
    if base_quant not in FLOAT_TYPES:
        raise QbenchError(f"the base must be a float type ({', '.join(sorted(FLOAT_TYPES))}), "
                          f"got {base_quant}")
    tensors = {"output_tensor_type": output_tensor_type,
               "token_embedding_type": token_embedding_type}
    for name, t in tensors.items():
        if t and t not in TENSOR_TYPES:
            raise QbenchError(f"{name}: unknown ggml tensor type {t!r}")
    tensors = {k: v for k, v in tensors.items() if v}
    base = _float_base(source, source_sha, base_quant, cache_dir, threads, lib)
    if quant == base_quant and not tensors:
        return base
    # tensor types only where set, so every other file keeps its recipe (and cache entry)
    recipe = {"tool": "llama_model_quantize", "input_sha256": base.sha256,
              "input_type": base_quant, "output_type": quant, "base_recipe": base.recipe,
              "imatrix_sha256": imatrix_sha or None, **lib, **tensors}
    if imatrix_path is not None:
        recipe["tool"] = "llama-quantize --imatrix"
        if os.environ.get("QBENCH_LLAMA_CPP_BIN"):
            # prebuilt tools, not qbench's recipe: the binary that runs is the provenance (and
            # another binary makes another file)
            from qbench.quantize.llama_tools import tool_version
            recipe["llama_quantize"] = tool_version(("llama-quantize",))["binaries"]
    return _cached(cache_dir, recipe,
                   lambda out: _quantize(base.path, out, quant, threads, imatrix_path, tensors))


def build_synthetic_variant(f16: Path, f16_sha: str, ref: str, quant: str, *, base_dir: Path,
                            cache_dir: Path, output_tensor_type: str = "",
                            token_embedding_type: str = "") -> Artifact:
    """``quant`` of a synthetic model written directly (qbench.quantize.synthetic_blocks): the
    types llama.cpp's quantizer picks for ``f16`` in its dry run, valid random blocks, no
    weight quantized - the real quantizer's file size and tensor mix in seconds."""
    import llama_cpp

    from qbench.inputs.synthetic import load_shape, parse_ref
    from qbench.quantize.synthetic_blocks import GENERATOR, dry_run_types, write_quantized_gguf

    tensors = {k: v for k, v in {"output_tensor_type": output_tensor_type,
                                 "token_embedding_type": token_embedding_type}.items() if v}
    parsed = parse_ref(ref)
    shape = load_shape(parsed.spec, base_dir)
    recipe = {"tool": "synthetic blocks at llama_model_quantize's dry-run types",
              "generator": GENERATOR, "input_sha256": f16_sha, "input_type": "F16",
              "output_type": quant, "llama_cpp_python": llama_cpp.__version__, **tensors}

    def build(out: Path) -> None:
        types = dry_run_types(f16, quant, tensors)
        write_quantized_gguf(shape, parsed.seed, quant, types, out)

    return _cached(cache_dir, recipe, build)


def _float_base(source: Path, source_sha: str, base_quant: str, cache_dir: Path, threads: int,
                lib: dict[str, str]) -> Artifact:
    """The float GGUF every variant is quantized from: a Hugging Face folder converted by
    llama.cpp's converter, the source itself when it already is that type, else the source
    requantized to it (recorded)."""
    from qbench.quantize.convert import convert, converter_version, is_hf_folder

    if is_hf_folder(source):
        recipe = {"tool": "convert_hf_to_gguf", "converter": converter_version(),
                  "input_sha256": source_sha, "input_type": "hf-folder",
                  "output_type": base_quant, "requantized": False}
        return _cached(cache_dir, recipe,
                       lambda out: convert(source, out, base_quant, cache_dir))
    source_type = dominant_type(source, cache_dir)
    base_recipe = {"tool": "llama_model_quantize", "input_sha256": source_sha,
                   "input_type": source_type, "output_type": base_quant,
                   "requantized": source_type not in FLOAT_TYPES,
                   **lib}
    if source_type == base_quant:
        return Artifact(source, source_sha, {"tool": "none (source used as is)",
                                             "input_sha256": source_sha,
                                             "output_type": base_quant})
    return _cached(cache_dir, base_recipe,
                   lambda out: _quantize(source, out, base_quant, threads, None))



# -- the llama.cpp backend's footprint (BackendInfo.footprint) ------------------------------
def footprint(path: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """The footprint metric's record for a GGUF: size, parameters, bits per weight and the
    real tensor-type mix, from llama.cpp's own reader. A split GGUF is all of its shards (the
    first shard alone is a fraction of what a user downloads and loads)."""
    summary = inspect_gguf(path, cache_dir)
    size = summary.get("file_bytes") or path.stat().st_size
    n_params = summary["n_params"]
    mib = 2 ** 20
    return {
        "values": {
            "file_size_mb": {"value": float(size / mib), "unit": "MiB"},
            "bpw": {"value": float(summary["bpw"]), "unit": "bits/weight"},
            "n_params": {"value": float(n_params)},
            "fp16_estimate_mb": {"value": float(2 * n_params / mib), "unit": "MiB"},
        },
        "details": {"tensor_types": summary["types"], "file_type": summary["file_type"],
                    "architecture": summary["architecture"], "shape": summary["shape"],
                    "n_tensors": summary["n_tensors"], "file_size_bytes": size,
                    "tensor_bytes": summary["tensor_bytes"],
                    "roles": summary.get("roles") or {},
                    "embed_bytes": (summary.get("traffic") or {}).get("embed_bytes"),
                    "provenance": summary.get("provenance", {})},
    }
