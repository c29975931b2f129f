"""The backend registry: what each backend *is*, in one place, for every other part of qbench.

A backend is an implementation module (``load(path, LoadOptions) -> Backend``, see
:mod:`qbench.backends.base`) plus a :class:`BackendInfo` saying how suites name its variants,
how its files are made and measured, what its quant names promise, which libraries key its
cells, and how to explain its crashes. The planner, worker, executor, regression gate, sharder
and report read only this. Adding a backend is its own module(s) plus one registration: an
entry in ``BUILTIN`` below, or, from another package, an entry point in the group
``qbench.backends`` naming its ``BackendInfo``::

    [project.entry-points."qbench.backends"]
    my_engine = "my_package.engine:INFO"

Importing this package imports no inference library (a GGUF-only install never imports torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any

from qbench.errors import MissingExtraError, QbenchError
from qbench.host.buildflags import diagnose_llamacpp_crash
from qbench.quantize import gguf_types, hf_types

ENTRY_POINT_GROUP = "qbench.backends"


def _no_bits(quant: str) -> float | None:
    return None


def _other(quant: str) -> str:
    return "other"


def _no_libraries(quant: str) -> tuple[str, ...]:
    return ()


def _never(quant: str) -> bool:
    return False


@dataclass(frozen=True)
class BackendInfo:
    """What the planner, worker, gate and report need to know about a backend without
    importing it."""

    name: str
    module: str                                  # implements load(path, LoadOptions) -> Backend
    distribution: str                            # the pip distribution whose version keys cells
    extra: str                                   # qbench-llm[extra] (or a pip spec) installing it
    canonical_quant: Callable[[str], str | None]  # user spelling -> canonical, None if unknown
    unknown_quant: Callable[[str], str]          # error text for an unknown quant name
    float_quants: frozenset[str]                 # unquantized types a base may be
    # "module:function" making a variant's file: PrepareRequest -> (path, artifact description)
    prepare: str
    # "module:function" reading a file's footprint: (path, cache_dir) -> metric result;
    # None: the footprint metric does not apply to this backend's files
    footprint: str | None = None
    nominal_bits: Callable[[str], float | None] = _no_bits   # the bit width a name promises
    method_of: Callable[[str], str] = _other     # gguf | awq | gptq | bnb | float | other
    # other distributions whose version changes a variant's numbers (torch, llm-compressor, ...)
    libraries: Callable[[str], tuple[str, ...]] = _no_libraries
    calibrated: Callable[[str], bool] = _never   # building this quant runs a calibration pass
    imatrix: bool = False                        # an `imatrix` calibration text applies
    needs_imatrix: Callable[[str], bool] = _never   # this quant cannot be built without one
    # KV-cache types a variant may ask for (kv_cache = [...]) and the default; empty: the
    # backend has no such setting (such variants are refused by validate)
    kv_cache_types: frozenset[str] = frozenset()
    kv_cache_default: str = ""
    kv_cache_bytes: Mapping[str, float] = field(default_factory=dict)  # per element, by type
    # tensor types the output / token-embedding tensors may be given (output_tensor_type,
    # token_embedding_type in [[variants]]); empty: no such setting
    tensor_types: frozenset[str] = frozenset()
    # "module:function" checking a local model file before any cell runs: (path, cache_dir);
    # raises SourceError naming what is wrong (a GGUF's header). None: no early check
    check_model_file: str | None = None
    converts_hf_folder: bool = False             # a model folder is converted (converter keys)
    # (the crashed cell's log, the signal's name) -> a sentence on the likely cause, or None
    diagnose: Callable[[str, str], str | None] | None = None
    # peak RSS is stable enough run to run to gate on (a torch process's is not: bnb-nf4 on CPU
    # moved 1,167 -> 1,510 MiB, +29 %, on an identical rerun; measured again per repetition,
    # 1,163 -> 1,520 MiB, +31 %, with the repetitions within a run agreeing to 0.4 %)
    rss_gated: bool = True


def _hf_libraries(quant: str) -> tuple[str, ...]:
    """torch computes every transformers variant; bitsandbytes / llm-compressor make some."""
    return {"float": ("torch",), "bnb": ("torch", "bitsandbytes"),
            "awq": ("torch", "llmcompressor", "compressed-tensors"),
            "gptq": ("torch", "llmcompressor", "compressed-tensors")}[hf_types.kind(quant)]


BUILTIN: dict[str, BackendInfo] = {
    "llama.cpp": BackendInfo(
        name="llama.cpp",
        module="qbench.backends.llamacpp",
        distribution="llama-cpp-python",
        extra="gguf",
        canonical_quant=gguf_types.canonical,
        unknown_quant=gguf_types.unknown_message,
        float_quants=gguf_types.FLOAT_TYPES,
        prepare="qbench.quantize.gguf_prepare:prepare",
        footprint="qbench.quantize.gguf:footprint",
        nominal_bits=gguf_types.nominal_bits,
        method_of=gguf_types.method_of,
        imatrix=True,
        needs_imatrix=lambda quant: quant in gguf_types.NEEDS_IMATRIX,
        kv_cache_types=frozenset(gguf_types.KV_CACHE_TYPES),
        kv_cache_default=gguf_types.KV_DEFAULT,
        kv_cache_bytes=gguf_types.KV_BYTES_PER_ELEMENT,
        tensor_types=frozenset(gguf_types.TENSOR_TYPES),
        check_model_file="qbench.quantize.gguf:inspect_gguf",
        converts_hf_folder=True,
        diagnose=diagnose_llamacpp_crash,
    ),
    "transformers": BackendInfo(
        name="transformers",
        module="qbench.backends.transformers",
        distribution="transformers",
        extra="hf",
        canonical_quant=hf_types.canonical,
        unknown_quant=hf_types.unknown_message,
        float_quants=hf_types.FLOAT_TYPES,
        prepare="qbench.quantize.hf:prepare",
        footprint="qbench.quantize.hf:footprint",
        nominal_bits=hf_types.nominal_bits,
        method_of=hf_types.method_of,
        libraries=_hf_libraries,
        calibrated=lambda quant: hf_types.parse_int_quant(quant) is not None,
        rss_gated=False,
    ),
}


@cache
def _registered() -> dict[str, BackendInfo]:
    """Built-in backends, then those other installed packages register (sorted by name)."""
    from qbench.host.plugins import with_plugins

    return with_plugins(ENTRY_POINT_GROUP, BUILTIN, "backend", _plugin_info)


def _plugin_info(name: str, target: str) -> BackendInfo:
    from qbench.host.plugins import load_target

    info = load_target(target)
    if not isinstance(info, BackendInfo) or info.name != name:
        raise QbenchError(f"entry point {name} = {target!r} (group {ENTRY_POINT_GROUP}) "
                          f"must name a BackendInfo with name={name!r}")
    return info


def backend_names() -> tuple[str, ...]:
    return tuple(_registered())


def backend_info(name: str) -> BackendInfo:
    """The registered backend ``name`` (KeyError when none is)."""
    return _registered()[name]


def known_backend_info(name: str) -> BackendInfo | None:
    """The backend of a stored record, None when this install does not know it."""
    return _registered().get(name)


def backend_module(name: str) -> ModuleType:
    """Import a backend's implementation (and so its inference library); a missing library is
    a MissingExtraError naming what installs it."""
    info = backend_info(name)
    try:
        return importlib.import_module(info.module)
    except ImportError as exc:
        raise MissingExtraError(info.distribution, info.extra,
                                f"the {name} backend ({exc})") from None


def backend_function(name: str, which: str) -> Callable[..., Any] | None:
    """A backend's ``prepare`` or ``footprint`` function, imported on use."""
    from qbench.host.plugins import load_target

    target = getattr(backend_info(name), which)
    return load_target(target) if target else None


def nominal_bits(backend: str, quant: str) -> float | None:
    """The weight bit width a variant's name promises (F16 -> 16, Q4_K_M -> 4, awq-w4g64 -> 4,
    bnb-int8 -> 8): the one place qbench reads bits from a name. The measured bits per weight
    are the footprint metric's ``bpw``; this is the label (claims group by it, sharding
    weighs by it). None when the name promises nothing this install understands."""
    info = known_backend_info(backend)
    return info.nominal_bits(quant.split("@", 1)[0]) if info else None


def method_of(backend: str, quant: str) -> str:
    """gguf | awq | gptq | bnb | float (unquantized) | other."""
    info = known_backend_info(backend)
    q = quant.split("@", 1)[0]
    if info is None:
        return "other"
    if q in info.float_quants or (info.canonical_quant(q) or q) in info.float_quants:
        return "float"
    return info.method_of(q)


def kv_bytes_per_element(backend: str, kv_cache: str | None) -> float:
    """Bytes per K or V element of a variant's KV cache (2: an f16 cache, the default
    wherever the backend says nothing)."""
    info = known_backend_info(backend)
    if info is None:
        return 2.0
    return float(info.kv_cache_bytes.get(kv_cache or info.kv_cache_default, 2.0))
