"""Expand a suite into cells (model x variant x metric), each with a stable content key.

The key changes when anything that could change the number changes: the content of every file
a cell reads (the model; a pre-quantized variant file; all shards of a split GGUF; a model
folder's config, tokenizer and weights; the imatrix and calibration texts; the dataset), the
variant's parameters (and, for metrics compared with the base, the base's), the metric's options
and version, the backend library's version, and how cells run: threads and device. Speed cells
also carry the machine's hardware fingerprint; accuracy cells are shared across machines. A
finished cell with the same key is never recomputed. Hashing is memoised per file by
:func:`qbench.inputs.sources.sha256_file` and done once per input per plan, never per cell.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from qbench.host import envinfo
from qbench.backends import backend_info
from qbench.suite.identity import cell_id
from qbench.suite.config import Defaults, ModelSpec, Suite, VariantSpec
from qbench.inputs.datasets import locate_text
from qbench.errors import ConfigError, DatasetError, QbenchError, SourceError
from qbench.host.envinfo import library_version
from qbench.metrics import metric_info, metric_module, metric_names, shared_pass
from qbench.metrics.depth import point_suffix
from qbench.inputs.sources import SYNTHETIC, locate, parse_hf, sha256_file

# device nodes of GPU drivers: 'auto' may pick a GPU here even when NVML is not installed
_GPU_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


@dataclass(frozen=True)
class PlanContext:
    """Where relative paths, data and artifacts live for this run."""

    base_dir: Path
    data_dir: Path | None
    cache_dir: Path
    env: dict[str, Any] | None = None   # envinfo.collect() of this machine when None


@dataclass(frozen=True)
class RunSettings:
    """How this machine runs the suite's cells: part of every key (hardware: speed only)."""

    threads: int        # what the backends use: the suite's threads, 0 -> physical cores
    device: str         # cpu | cuda | auto-gpu ('auto' where a GPU could be picked)
    hardware_id: str    # envinfo.hardware_id: CPU model, flags and cores, GPUs and driver

    def key_part(self, metric: str) -> dict[str, Any]:
        part: dict[str, Any] = {"threads": self.threads, "device": self.device}
        # numbers that are the machine's as much as the model's (speed) are measured anew on
        # other hardware; accuracy metrics' numbers are shared across machines
        if metric_info(metric).hardware_bound:
            part["hardware"] = self.hardware_id
        return part


def gpu_visible(env: dict[str, Any]) -> bool:
    """Could device = 'auto' pick a GPU on this machine? NVML's list, else a GPU driver's device
    node, and any Mac (llama.cpp offloads to Metal by default)."""
    return (bool(env.get("gpus")) or sys.platform == "darwin"
            or any(os.path.exists(node) for node in _GPU_NODES))


def resolved_device(setting: str, env: dict[str, Any]) -> str:
    """The device as far as it decides numbers: 'auto' is 'cpu' on a machine without a GPU (the
    same cells as device = 'cpu'), 'auto-gpu' elsewhere (never shared with a CPU machine)."""
    if setting != "auto":
        return setting
    return "auto-gpu" if gpu_visible(env) else "cpu"


def run_settings(defaults: Defaults, env: dict[str, Any]) -> RunSettings:
    """Threads as the backends resolve them (0: physical cores), device, hardware id."""
    cores = env.get("cpu_cores_physical") or env.get("cpu_cores_logical") or 1
    return RunSettings(threads=defaults.threads or int(cores),
                       device=resolved_device(defaults.device, env),
                       hardware_id=envinfo.hardware_id(env))


@dataclass(frozen=True)
class Cell:
    suite: str
    model: ModelSpec
    variant: VariantSpec
    metric: str
    options: Any
    is_base: bool
    model_sha256: str
    key: str
    # content of the variant's other input files (part of the key), and how it runs
    inputs: dict[str, Any] = field(default_factory=dict, compare=False)
    run: dict[str, Any] = field(default_factory=dict, compare=False)
    # the variant this one is compared with (None: no base for its backend), and the metrics
    # this cell serves in its own pass (see qbench.metrics.shared_pass): attached once by expand
    base_variant: VariantSpec | None = field(default=None, compare=False)
    companions: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    # which of the metric's listed contexts ('ctx=8192'; '' the main one: qbench.metrics.depth)
    point: str = ""
    # the key without the sample size (MetricInfo.sample_option): cells of one family differ
    # only in how many chunks or questions they score ("" when the metric has no such option)
    family: str = field(default="", compare=False)

    @property
    def id(self) -> str:
        return cell_id(self.model.id, self.variant.backend, self.variant.name,
                       self.metric + point_suffix(self.point))

    def describe(self) -> dict[str, Any]:
        """The JSON-able spec stored with every result."""
        return {
            "id": self.id, "key": self.key, "suite": self.suite, "metric": self.metric,
            "model": dataclasses.asdict(self.model) | {"sha256": self.model_sha256},
            "variant": dataclasses.asdict(self.variant) | {"is_base": self.is_base,
                                                           "inputs": self.inputs},
            "options": dataclasses.asdict(self.options),
            "metric_version": metric_module(self.metric).INFO.version,
            "run": self.run,
        } | ({"family": self.family} if self.family else {})


def libraries(variant: VariantSpec) -> dict[str, str]:
    """Versions of the libraries that compute this variant's numbers (part of every key): the
    backend's own and those its registry entry names for this quant."""
    info = backend_info(variant.backend)
    names = [info.distribution, *info.libraries(variant.quant)]
    return {name: library_version(name) for name in names}


def input_identity(ref: str, ctx: PlanContext) -> str:
    """Content sha256 of a local model input (a file, every shard of a split GGUF, a model
    folder's files); for a hub reference, the reference itself with its @revision (planning
    never downloads: pin a revision, or an unpinned ref's cells follow the branch by name); for
    a synthetic model, its recipe's hash (planning never generates)."""
    if ref.startswith(SYNTHETIC):
        from qbench.inputs.synthetic import identity
        return identity(ref, ctx.base_dir)
    local = locate(ref, base_dir=ctx.base_dir)
    if local is None:
        return f"ref:{ref}"
    return sha256_file(local.path, ctx.cache_dir)


def model_identity(model: ModelSpec, ctx: PlanContext) -> str:
    """sha256 of the model's local file(s), or its hub reference (see input_identity)."""
    return input_identity(model.source, ctx)


def converter_identity(model: ModelSpec, ctx: PlanContext) -> str | None:
    """For a model given as a Hugging Face folder (local, or a whole hub repository): the
    converter that makes its GGUF base (its version changes every llama.cpp variant's file)."""
    if model.source.startswith("hf:"):
        folder = not parse_hf(model.source)[1]
    else:
        local = locate(model.source, base_dir=ctx.base_dir)
        folder = local is not None and local.path.is_dir()
    if not folder:
        return None
    from qbench.quantize.convert import converter_version  # noqa: PLC0415 - on use only
    return converter_version()


def text_identity(name: str, ctx: PlanContext) -> str:
    """sha256 of a text file or named dataset's local file; its hub origin when it has none."""
    origin = locate_text(name, ctx.data_dir, ctx.base_dir)
    return origin if origin.startswith("hf:") else sha256_file(Path(origin), ctx.cache_dir)


def variant_inputs(variant: VariantSpec, ctx: PlanContext, file: str = "") -> dict[str, Any]:
    """Content of the files a variant is made from besides the model: a pre-quantized source,
    the imatrix's calibration text (with the imatrix recipe), AWQ/GPTQ calibration text. A
    missing file is a ConfigError naming the variant's key in ``file``."""
    def identity(attr: str, find: Any, ref: str) -> str:
        try:
            return find(ref, ctx)
        except (SourceError, DatasetError) as exc:
            raise ConfigError(exc.detail, file=file or None,
                              key=f"variants ({variant.label}).{attr}") from None

    inputs: dict[str, Any] = {}
    if variant.source:
        inputs["source_sha256"] = identity("source", input_identity, variant.source)
    elif variant.imatrix and backend_info(variant.backend).imatrix:
        from qbench.quantize.imatrix import imatrix_recipe
        inputs["imatrix"] = {"text": identity("imatrix", text_identity, variant.imatrix),
                             **imatrix_recipe(variant.imatrix_chunks)}
    if variant.calibrated:
        inputs["calibration_text"] = identity("calibration", text_identity,
                                              variant.calibration or "wikitext-2")
    return inputs


def _key(parts: dict[str, Any]) -> str:
    """The cell key: a hash of everything that could change the cell's numbers (the one place
    it is computed; see the module docstring for what goes in)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _in_run_order(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """Registry order: cheap checks (footprint, sanity) before the long measurements."""
    return [(name, metrics[name]) for name in metric_names() if name in metrics]


def _base_part(suite: Suite, model: ModelSpec, variant: VariantSpec, needs_base: bool,
               inputs: Any) -> Any:
    """What of the base goes into a key: for a metric compared with it, everything that makes
    its numbers (parameters and input files); else its label."""
    base = suite.base_variant(model, variant.backend)
    if base is None:
        return None
    if not needs_base:
        return base.label
    return {"params": base.params(), "inputs": inputs(base)}


def _attach_companions(cells: list[Cell], suite: Suite) -> list[Cell]:
    """Each cell with the metrics it serves in its own pass (a perplexity cell: the KLD cell of
    its model and variant at the same context, by key). Done on the whole plan, before --only
    or --shard narrow it, so a perplexity cell serves its KLD cell even when that one runs
    elsewhere."""
    kld = {(c.model.id, c.variant, c.point): c for c in cells if c.metric == "kld"}
    out = []
    for c in cells:
        mate = kld.get((c.model.id, c.variant, c.point))
        serves = shared_pass.companions(c.metric, c.options,
                                        mate.options if mate else None,
                                        mate.key if mate else None)
        out.append(dataclasses.replace(c, companions=serves) if serves else c)
    return out


def metric_points(options: Any) -> list[tuple[str, Any]]:
    """(point, options) of each cell a metric's options make: one per listed context for a
    metric whose options list several (``Options.points``), else the options themselves."""
    points = getattr(options, "points", None)
    return points() if callable(points) else [("", options)]


def grid(suite: Suite) -> Iterator[tuple[ModelSpec, VariantSpec, str, Any, str]]:
    """(model, variant, metric, options, point) of every cell of ``suite``, in run order: per
    model, its base variants first, metrics in registry order, each metric's contexts in the
    order listed. The one walk over a suite that :func:`expand` (the plan) and
    :func:`cell_ids` (the gate's expected cells) share."""
    for model in suite.models:
        bases = {suite.base_variant(model, v.backend) for v in suite.variants_for(model)}
        for variant in sorted(suite.variants_for(model), key=lambda v: v not in bases):
            for metric, options in _in_run_order(suite.metrics):
                if suite.measures(model, variant, metric):
                    for point, opts in metric_points(options):
                        yield model, variant, metric, opts, point


def cell_ids(suite: Suite) -> list[str]:
    """Every cell id ``suite`` plans, without touching models or data."""
    return [cell_id(m.id, v.backend, v.name, metric + point_suffix(point))
            for m, v, metric, _, point in grid(suite)]


def expand(suite: Suite, ctx: PlanContext, *, only: tuple[str, ...] = ()) -> list[Cell]:
    """All cells of ``suite`` in run order: per model, its base variant first."""
    cells: list[Cell] = []
    extras_memo: dict[str, dict[str, Any]] = {}
    inputs_memo: dict[VariantSpec, dict[str, Any]] = {}

    def inputs(v: VariantSpec) -> dict[str, Any]:
        if v not in inputs_memo:  # a variant shared by models is hashed once
            inputs_memo[v] = variant_inputs(v, ctx, str(suite.path))
        return inputs_memo[v]

    settings = run_settings(suite.defaults, ctx.env if ctx.env is not None else envinfo.collect())
    models: dict[str, tuple[str, str | None]] = {}
    libs_memo: dict[VariantSpec, dict[str, str]] = {}
    for model, variant, metric, options, point in grid(suite):
        if model.id not in models:   # each model's files are hashed once
            models[model.id] = (model_identity(model, ctx), converter_identity(model, ctx))
        sha, converter = models[model.id]
        if variant not in libs_memo:
            libs_memo[variant] = libraries(variant)
        module = metric_module(metric)
        if metric not in extras_memo:   # the dataset's hash: the same at every context
            key_extras = getattr(module, "key_extras", None)
            extras_memo[metric] = key_extras(options, ctx) if key_extras else {}
        run = settings.key_part(metric)
        base = suite.base_variant(model, variant.backend)
        parts = {
            "model": {"id": model.id, "sha256": sha} | (
                {"converter": converter}
                if converter and backend_info(variant.backend).converts_hf_folder else {}),
            "variant": variant.params(), "inputs": inputs(variant),
            "base": _base_part(suite, model, variant, module.INFO.needs_base, inputs),
            "metric": metric, "metric_version": module.INFO.version,
            "options": dataclasses.asdict(options), "extras": extras_memo[metric],
            "library": libs_memo[variant], "run": run,
        }
        key = _key(parts)
        sample = module.INFO.sample_option
        family = (_key(parts | {"options": {k: v for k, v in parts["options"].items()
                                            if k != sample}, "family": True})
                  if sample else "")
        is_base = any(variant == suite.base_variant(model, v.backend)
                      for v in suite.variants_for(model))
        cells.append(Cell(suite.name, model, variant, metric, options, is_base, sha, key,
                          inputs(variant), run, base_variant=base, point=point,
                          family=family))
    cells = _attach_companions(cells, suite)
    if only:
        cells = [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in only)]
        if not cells:
            raise QbenchError(f"--only {' '.join(only)} matches no cell of suite "
                              f"'{suite.name}' (cell ids look like model/backend/quant/metric)")
    return cells
