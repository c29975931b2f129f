"""Suite files (TOML) -> frozen, validated dataclasses.

Everything a run needs is checked here, before any model is loaded: unknown keys, wrong types,
unknown quant names, duplicate ids, missing local files. Errors name the file and the key.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qbench.backends import backend_info, backend_names, known_backend_info
from qbench.errors import ConfigError, QbenchError, did_you_mean
from qbench.metrics import metric_module, metric_names, shared_pass
from qbench.options import from_table, positive
from qbench.suite.identity import quant_label

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class SuiteInfo:
    name: str
    description: str = ""
    notes: tuple[str, ...] = ()      # for the report's readers (what a number can and can't say)

    def validate(self, *, file: str, key: str) -> None:
        if not SAFE_NAME.match(self.name):
            raise ConfigError(
                f"expected 1-100 letters, digits, '.', '_' or '-' (it names a results folder), "
                f"got {self.name!r}", file=file, key=f"{key}.name")


@dataclass(frozen=True)
class Defaults:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0                 # 0: all physical cores
    timeout_s: float = 900.0         # per cell, quantization included
    memory_limit_mb: int = 0         # 0: no limit; else the cell's address-space/cgroup cap
    cache_dir: str = ""              # artifacts; else $QBENCH_CACHE_DIR, else ~/.cache/qbench
    data_dir: str = ""               # datasets; else --data-dir / $QBENCH_DATA_DIR

    def validate(self, *, file: str, key: str) -> None:
        positive(self.threads, file=file, key=f"{key}.threads", allow_zero=True)
        positive(self.timeout_s, file=file, key=f"{key}.timeout_s")
        positive(self.memory_limit_mb, file=file, key=f"{key}.memory_limit_mb", allow_zero=True)


@dataclass(frozen=True)
class ModelSpec:
    id: str
    source: str                      # path | package:PKG/FILE | hf:ORG/REPO[/FILE][@REV]
    base: str = "F16"                # the variant every other one is compared with
    base_backend: str = "llama.cpp"
    trust_remote_code: bool = False  # refused unless set: it runs code from the hub
    allow_pickle: bool = False       # refused unless set: .bin/.pt checkpoints run code on load

    @property
    def synthetic(self) -> bool:
        """A random-weight model of a real architecture (qbench.inputs.synthetic)."""
        return self.source.startswith("synthetic:")

    def validate(self, *, file: str, key: str) -> None:
        if not self.id or _CONTROL.search(self.id) or len(self.id) > 200:
            raise ConfigError(f"expected a printable id of 1-200 characters, got {self.id!r}",
                              file=file, key=f"{key}.id")
        if not self.source.strip():
            raise ConfigError("expected a model source, got an empty string",
                              file=file, key=f"{key}.source")


@dataclass(frozen=True)
class VariantGroup:
    """One [[variants]] table: a backend and the quant types to build with it."""

    backend: str
    quant: tuple[str, ...] | str
    models: tuple[str, ...] = ()     # restrict to these model ids; empty: every model
    source: str = ""                 # a pre-quantized file used as is (one quant only)
    label: str = ""                  # names a pre-quantized file (e.g. its maker) in ids/report
    # calibration text (dataset name or path) for an importance matrix; a list makes one
    # variant per entry, "none" one without (imatrix = ["none", "wikitext-2"]: the pair)
    imatrix: tuple[str, ...] | str = ""
    imatrix_chunks: int = 100        # llama-imatrix --chunks (x 512 tokens) of that text
    # KV-cache types (llama.cpp type_k/type_v): one variant per entry (kv_cache = ["f16",
    # "q8_0", "q4_0"]); quantizing V turns flash attention on
    kv_cache: tuple[str, ...] | str = ""
    # the output / token-embedding tensors' types (llama-quantize --output-tensor-type /
    # --token-embedding-type): one variant per entry, "default" = llama.cpp's choice for the type
    output_tensor_type: tuple[str, ...] | str = ""
    token_embedding_type: tuple[str, ...] | str = ""
    n_gpu_layers: int = -1           # -1: all layers when on a GPU
    batch: int = 2048                # llama.cpp n_batch (logical batch)
    ubatch: int = 512                # llama.cpp n_ubatch (physical batch)
    # transformers awq-*/gptq-* only: the calibration text and how much of it llm-compressor sees
    calibration: str = ""            # dataset name or text file; "": wikitext-2
    calibration_samples: int = 32
    calibration_seq_len: int = 256
    metrics: tuple[str, ...] = ()    # measure only these metrics on this group; empty: all


@dataclass(frozen=True)
class VariantSpec:
    """One variant of one backend, canonical quant name; identical across models."""

    backend: str
    quant: str
    source: str = ""
    imatrix: str = ""
    imatrix_chunks: int = 100
    n_gpu_layers: int = -1
    batch: int = 2048
    ubatch: int = 512
    models: tuple[str, ...] = ()
    calibration: str = ""
    calibration_samples: int = 32
    calibration_seq_len: int = 256
    metrics: tuple[str, ...] = ()    # empty: every metric of the suite
    kv_cache: str = ""               # "": the backend's default (llama.cpp: f16)
    tag: str = ""                    # the suite's label for a pre-quantized file
    output_tensor_type: str = ""     # "": the quantizer's choice for the type
    token_embedding_type: str = ""

    @property
    def name(self) -> str:
        """The variant as ids and the report name it: quant[@file or label][+imatrix=..]
        [+output=..][+token_embd=..][+kv=..] (see qbench.suite.identity)."""
        return quant_label(self.quant, self.source, tag=self.tag, imatrix=self.imatrix,
                           kv_cache=self.kv_cache, output=self.output_tensor_type,
                           token_embd=self.token_embedding_type)

    def measures(self, metric: str) -> bool:
        """Whether this variant gets ``metric`` (footprint and sanity always run)."""
        return not self.metrics or metric in self.metrics or metric_module(metric).INFO.implicit

    @property
    def calibrated(self) -> bool:
        """Whether building this variant runs a calibration pass (transformers AWQ/GPTQ)."""
        return not self.source and backend_info(self.backend).calibrated(self.quant)

    @property
    def label(self) -> str:
        """backend/quant[@whole source]...: for messages, where the whole path helps."""
        return f"{self.backend}/" + quant_label(self.quant, self.source, tag=self.tag,
                                                imatrix=self.imatrix, kv_cache=self.kv_cache,
                                                output=self.output_tensor_type,
                                                token_embd=self.token_embedding_type,
                                                whole_source=True)

    def params(self) -> dict[str, Any]:
        """What changes the variant's artifact or results (part of the cell key)."""
        params = {"backend": self.backend, "quant": self.quant, "source": self.source,
                  "imatrix": self.imatrix, "n_gpu_layers": self.n_gpu_layers,
                  "batch": self.batch, "ubatch": self.ubatch}
        if self.kv_cache:   # only where set: every other variant's key stays as it was
            params["kv_cache"] = self.kv_cache
        if self.output_tensor_type:        # likewise
            params["output_tensor_type"] = self.output_tensor_type
        if self.token_embedding_type:
            params["token_embedding_type"] = self.token_embedding_type
        if self.calibrated:  # only where it changes the artifact: other keys stay stable
            params |= {"calibration": self.calibration or "wikitext-2",
                       "calibration_samples": self.calibration_samples,
                       "calibration_seq_len": self.calibration_seq_len}
        return params


@dataclass(frozen=True)
class ReportSpec:
    memory_budget_gib: float = 0.0   # 0: no budget; GiB (2^30 bytes)
    memory_budget_gb: float = 0.0    # the older name of the same setting (it always meant GiB)
    max_loss_pct: float = 1.0        # tolerated PPL increase vs base, in %
    context_tokens: int = 4096       # KV-cache size counted in the memory estimate

    @property
    def budget_gib(self) -> float | None:
        """The memory budget in GiB, None when none is set."""
        return self.memory_budget_gib or self.memory_budget_gb or None

    def validate(self, *, file: str, key: str) -> None:
        positive(self.memory_budget_gib, file=file, key=f"{key}.memory_budget_gib",
                 allow_zero=True)
        positive(self.memory_budget_gb, file=file, key=f"{key}.memory_budget_gb", allow_zero=True)
        if self.memory_budget_gib and self.memory_budget_gb:
            raise ConfigError("give the budget once: memory_budget_gib (memory_budget_gb is its "
                              "older name, also GiB)", file=file, key=f"{key}.memory_budget_gb")
        positive(self.max_loss_pct, file=file, key=f"{key}.max_loss_pct", allow_zero=True)
        positive(self.context_tokens, file=file, key=f"{key}.context_tokens")


STORED_VARIANT_KEYS = ("is_base", "inputs")   # what a record adds to a VariantSpec


def variant_from_dict(d: Mapping[str, Any], *, where: str) -> VariantSpec:
    """A variant spec rebuilt from its stored form (a job's or a record's ``variant``) as
    strictly as a job is read: a key this qbench does not know is an error, never dropped."""
    known = {f.name: f for f in dataclasses.fields(VariantSpec)}
    unknown = sorted(set(d) - set(known) - set(STORED_VARIANT_KEYS))
    if unknown:
        raise QbenchError(f"{where}: variant has keys this qbench does not know: "
                          f"{', '.join(unknown)} (written by another version?)")
    missing = [n for n in ("backend", "quant") if n not in d]
    if missing:
        raise QbenchError(f"{where}: variant lacks {', '.join(missing)}")
    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
    return VariantSpec(**args)


@dataclass(frozen=True)
class DecideSpec:
    """``qbench run --until-decided``: measure more only where a decision is still open.

    After the suite's own sample, the variants whose recommendation (ΔPPL interval straddles
    the tolerated loss, otherwise eligible, fits the budget) or whose claim verdict (a measured
    ΔPPL or MMLU interval straddles the claim's threshold) is still open get more perplexity
    chunks or MMLU questions, with their base, round by round (the sample times ``growth``),
    until each is decided or reaches its ceiling (``max_chunks``/``max_tokens``,
    ``max_questions``) or the dataset's end. The rounds are looks of a group-sequential plan:
    every look's interval is taken at level 1 - alpha/looks (Bonferroni spending over the
    planned looks), so the chance of a verdict on the wrong side of its threshold stays under
    ``alpha`` however many looks it took."""

    max_loss_pct: float = 0.0        # 0: the [report] section's
    memory_budget_gib: float = 0.0   # 0: the [report] section's; GiB (2^30 bytes)
    memory_budget_gb: float = 0.0    # the same setting under [report]'s older name (GiB too)
    max_chunks: int = 0              # per variant; 0: every chunk the text holds
    max_tokens: int = 0              # per variant, scored tokens; 0: no ceiling of its own
    max_questions: int = 0           # per variant, MMLU; 0: every question of the dataset
    growth: float = 2.0              # each round multiplies the sample
    alpha: float = 0.05              # the error rate the whole plan keeps

    @property
    def budget_gib(self) -> float | None:
        """The budget set here, in GiB; None: the [report] section's."""
        return self.memory_budget_gib or self.memory_budget_gb or None

    def validate(self, *, file: str, key: str) -> None:
        positive(self.max_loss_pct, file=file, key=f"{key}.max_loss_pct", allow_zero=True)
        for name in ("memory_budget_gib", "memory_budget_gb", "max_chunks", "max_tokens",
                     "max_questions"):
            positive(getattr(self, name), file=file, key=f"{key}.{name}", allow_zero=True)
        if self.memory_budget_gib and self.memory_budget_gb:
            raise ConfigError("give the budget once: memory_budget_gib (memory_budget_gb is the "
                              "same setting, also GiB)", file=file, key=f"{key}.memory_budget_gb")
        if not 1.1 <= self.growth <= 16:
            raise ConfigError(f"expected a growth between 1.1 and 16, got {self.growth}",
                              file=file, key=f"{key}.growth")
        if not 0 < self.alpha < 0.5:
            raise ConfigError(f"expected 0 < alpha < 0.5, got {self.alpha}", file=file,
                              key=f"{key}.alpha")


@dataclass(frozen=True)
class Suite:
    path: Path
    suite: SuiteInfo
    defaults: Defaults
    models: tuple[ModelSpec, ...]
    variants: tuple[VariantSpec, ...]
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> that metric's Options
    report: ReportSpec = field(default_factory=ReportSpec)
    decide: DecideSpec = field(default_factory=DecideSpec)

    @property
    def name(self) -> str:
        return self.suite.name

    def measures(self, model: ModelSpec, variant: VariantSpec, metric: str) -> bool:
        """Whether the cell (model, variant, metric) is planned: the variant measures the metric,
        unless it is one a synthetic model's random weights make meaningless (an implicit one,
        sanity, is left out for it; one asked for is refused when the suite is read)."""
        return variant.measures(metric) and not (model.synthetic
                                                 and metric in SYNTHETIC_REFUSED)

    def variants_for(self, model: ModelSpec) -> tuple[VariantSpec, ...]:
        return tuple(v for v in self.variants if not v.models or model.id in v.models)

    def base_variant(self, model: ModelSpec, backend: str | None = None) -> VariantSpec | None:
        """The reference for ``model``'s variants of ``backend``: the model's base when it is of
        that backend, else that backend's first unquantized variant (so a transformers variant
        is compared with transformers fp32, on the same tokenizer and engine)."""
        backend = backend or model.base_backend
        # the plain build: not a pre-quantized file, no imatrix, the default KV cache and
        # tensor types
        variants = [v for v in self.variants_for(model) if v.backend == backend
                    and not v.source and not v.imatrix and not v.kv_cache
                    and not v.output_tensor_type and not v.token_embedding_type]
        if backend == model.base_backend:
            return next((v for v in variants if v.quant == model.base), None)
        floats = backend_info(backend).float_quants
        return next((v for v in variants if v.quant in floats), None)


_TOP_KEYS = ("suite", "defaults", "models", "variants", "metrics", "report", "decide")
# what each metric a synthetic model cannot have would measure (its weights are random)
SYNTHETIC_REFUSED = {
    "perplexity": "how well it predicts text", "kld": "how far a quant's predictions move",
    "mmlu": "what it knows", "sanity": "whether its output is degenerate",
    "lm_eval": "task accuracy",
}


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; raise ConfigError naming the file and key on any problem."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("suite file not found", file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read suite file: {exc.strerror}", file=file) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=file) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=file) from None
    return parse_suite(data, path)


def parse_suite(data: dict[str, Any], path: Path) -> Suite:
    file = str(path)
    for k in data:
        if k not in _TOP_KEYS:
            raise ConfigError(f"unknown section '{k}'{did_you_mean(k, _TOP_KEYS)}; expected "
                              f"one of: {', '.join(_TOP_KEYS)}", file=file, key=k)
    if "suite" not in data:
        raise ConfigError("missing [suite] section (with at least name = \"...\")", file=file,
                          key="suite")
    info = from_table(SuiteInfo, data["suite"], file=file, key="suite")
    defaults = from_table(Defaults, data.get("defaults", {}), file=file, key="defaults")
    models = _parse_models(data.get("models"), file)
    variants = _parse_variants(data.get("variants"), models, file)
    metrics = _parse_metrics(data.get("metrics", {}), file)
    report = from_table(ReportSpec, data.get("report", {}), file=file, key="report")
    decide = from_table(DecideSpec, data.get("decide", {}), file=file, key="decide")
    suite = Suite(path=path, suite=info, defaults=defaults, models=models, variants=variants,
                  metrics=metrics, report=report, decide=decide)
    _check_bases(suite, file)
    return suite


def _array_of_tables(value: Any, file: str, key: str) -> list[dict[str, Any]]:
    if value is None:
        raise ConfigError(f"missing [[{key}]]: a suite needs at least one", file=file, key=key)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"expected an array of tables ([[{key}]]), got {value!r}", file=file,
                          key=key)
    if not value:
        raise ConfigError(f"empty: a suite needs at least one entry in [[{key}]]", file=file,
                          key=key)
    return value


def _registered_backend(name: str, *, file: str, key: str) -> Any:
    """The backend's registry entry, or a ConfigError naming the known ones."""
    info = known_backend_info(name)
    if info is None:
        raise ConfigError(f"unknown backend '{name}'{did_you_mean(name, backend_names())}; "
                          f"available: {', '.join(backend_names())}", file=file, key=key)
    return info


def _parse_models(value: Any, file: str) -> tuple[ModelSpec, ...]:
    models: list[ModelSpec] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(_array_of_tables(value, file, "models")):
        key = f"models[{i}]"
        model = from_table(ModelSpec, table, file=file, key=key)
        info = _registered_backend(model.base_backend, file=file, key=f"{key}.base_backend")
        base = info.canonical_quant(model.base)
        if base is None:
            raise ConfigError(info.unknown_quant(model.base), file=file, key=f"{key}.base")
        if base not in info.float_quants:   # run would refuse to build variants from it
            raise ConfigError(
                f"the base is what every variant is built from and compared with, so it must be "
                f"an unquantized {model.base_backend} type "
                f"({', '.join(sorted(info.float_quants))}), got {base}. For a model whose only "
                f"file is quantized, keep a float base (qbench dequantizes the file to it and "
                f"labels it \"dequantized from ...\" in the report) and measure the file itself "
                f"as a variant: [[variants]] quant = \"{base}\", source = \"{model.source}\"",
                file=file, key=f"{key}.base")
        if model.id in seen:
            raise ConfigError(f"duplicate model id {model.id!r} (also models[{seen[model.id]}])",
                              file=file, key=f"{key}.id")
        seen[model.id] = i
        models.append(ModelSpec(**{**model.__dict__, "base": base}))
    return tuple(models)


def _parse_variants(value: Any, models: tuple[ModelSpec, ...], file: str
                    ) -> tuple[VariantSpec, ...]:
    model_ids = {m.id for m in models}
    out: list[VariantSpec] = []
    seen: dict[tuple[str, ...], str] = {}
    for i, table in enumerate(_array_of_tables(value, file, "variants")):
        key = f"variants[{i}]"
        group = from_table(VariantGroup, table, file=file, key=key)
        info = _registered_backend(group.backend, file=file, key=f"{key}.backend")
        quants = (group.quant,) if isinstance(group.quant, str) else group.quant
        if not quants:
            raise ConfigError("empty quant list", file=file, key=f"{key}.quant")
        if group.source and len(quants) != 1:
            raise ConfigError("a pre-quantized 'source' is one file: give exactly one quant "
                              "(the type it holds)", file=file, key=f"{key}.quant")
        for mid in group.models:
            if mid not in model_ids:
                raise ConfigError(f"no model with id {mid!r}{did_you_mean(mid, model_ids)}",
                                  file=file, key=f"{key}.models")
        imatrices = _imatrix_options(group, info, "imatrix_chunks" in table, file=file, key=key)
        kv_types = _kv_options(group, info, file=file, key=key)
        outputs = _tensor_type_options(group, info, "output_tensor_type", file=file, key=key)
        embeddings = _tensor_type_options(group, info, "token_embedding_type", file=file,
                                          key=key)
        if group.label and not group.source:
            raise ConfigError("'label' names a pre-quantized file: set 'source' too",
                              file=file, key=f"{key}.label")
        if group.label and not SAFE_NAME.match(group.label):
            raise ConfigError(f"expected 1-100 letters, digits, '.', '_' or '-', got "
                              f"{group.label!r}", file=file, key=f"{key}.label")
        start = len(out)
        for j, q in enumerate(quants):
            qkey = f"{key}.quant[{j}]" if not isinstance(group.quant, str) else f"{key}.quant"
            canon = info.canonical_quant(q)
            if canon is None:
                raise ConfigError(info.unknown_quant(q), file=file, key=qkey)
            for imatrix in imatrices:
                if not group.source and info.needs_imatrix(canon) and not imatrix:
                    raise ConfigError(f"{canon} needs an importance matrix: set "
                                      f"imatrix = \"wikitext-2\" (or a text file) in {key}",
                                      file=file, key=qkey)
                _check_tensor_types_need_imatrix(outputs, "output_tensor_type", imatrix,
                                                 file=file, key=key)
                _check_tensor_types_need_imatrix(embeddings, "token_embedding_type", imatrix,
                                                 file=file, key=key)
                for kv, out_type, embd_type in itertools.product(kv_types, outputs, embeddings):
                    spec = VariantSpec(backend=group.backend, quant=canon, source=group.source,
                                       imatrix=imatrix, imatrix_chunks=group.imatrix_chunks,
                                       n_gpu_layers=group.n_gpu_layers,
                                       batch=group.batch, ubatch=group.ubatch,
                                       models=group.models, calibration=group.calibration,
                                       calibration_samples=group.calibration_samples,
                                       calibration_seq_len=group.calibration_seq_len,
                                       metrics=group.metrics, kv_cache=kv, tag=group.label,
                                       output_tensor_type=out_type,
                                       token_embedding_type=embd_type)
                    _check_unique(spec, group, models, seen, file=file, key=qkey)
                    out.append(spec)
        _check_calibration(group, table, out[start:], file=file, key=key)
    return tuple(out)


def _imatrix_options(group: VariantGroup, info: Any, chunks_given: bool, *, file: str,
                     key: str) -> tuple[str, ...]:
    """The group's imatrix settings, one per variant ("" = none); ``imatrix_chunks`` only
    beside an imatrix, within llama-imatrix's sane range."""
    given = (group.imatrix,) if isinstance(group.imatrix, str) else group.imatrix
    if not given:
        raise ConfigError("empty imatrix list (use \"none\" for a variant without one)",
                          file=file, key=f"{key}.imatrix")
    out = tuple("" if v.strip().lower() in ("", "none") else v for v in given)
    if any(out) and not info.imatrix:
        raise ConfigError(f"the {group.backend} backend takes no importance matrix",
                          file=file, key=f"{key}.imatrix")
    if any(out) and group.source:
        raise ConfigError("an importance matrix is used when qbench builds a variant; a "
                          "pre-quantized 'source' was made by someone else (its GGUF metadata "
                          "says whether with an imatrix)", file=file, key=f"{key}.imatrix")
    if len(set(out)) != len(out):
        raise ConfigError("the imatrix list names a setting twice", file=file,
                          key=f"{key}.imatrix")
    if chunks_given and not any(out):
        raise ConfigError("'imatrix_chunks' sets how much calibration text llama-imatrix "
                          "reads: set imatrix = \"wikitext-2\" (or a text file) too",
                          file=file, key=f"{key}.imatrix_chunks")
    from qbench.quantize.imatrix import IMATRIX_CTX, MAX_IMATRIX_CHUNKS
    if not 1 <= group.imatrix_chunks <= MAX_IMATRIX_CHUNKS:
        raise ConfigError(f"expected 1-{MAX_IMATRIX_CHUNKS:,} chunks of {IMATRIX_CTX} tokens, "
                          f"got {group.imatrix_chunks}", file=file, key=f"{key}.imatrix_chunks")
    return out


def _kv_options(group: VariantGroup, info: Any, *, file: str, key: str) -> tuple[str, ...]:
    """The group's KV-cache types, one per variant ("" = the backend's default)."""
    given = (group.kv_cache,) if isinstance(group.kv_cache, str) else group.kv_cache
    if not given:
        raise ConfigError("empty kv_cache list", file=file, key=f"{key}.kv_cache")
    if given == ("",):
        return ("",)
    if not info.kv_cache_types:
        raise ConfigError(f"the {group.backend} backend has no KV-cache type setting in qbench "
                          "(transformers' quantized cache applies to generation only, through "
                          "optimum-quanto or HQQ, and is not measured here): remove kv_cache",
                          file=file, key=f"{key}.kv_cache")
    out = []
    for v in given:
        low = v.strip().lower()
        if low not in info.kv_cache_types:
            raise ConfigError(f"unknown KV-cache type '{v}'"
                              f"{did_you_mean(low, sorted(info.kv_cache_types))}; expected one "
                              f"of {', '.join(sorted(info.kv_cache_types))}",
                              file=file, key=f"{key}.kv_cache")
        out.append("" if low == info.kv_cache_default else low)   # the default is the plain
    if len(set(out)) != len(out):
        raise ConfigError("the kv_cache list names a type twice", file=file,
                          key=f"{key}.kv_cache")
    return tuple(out)


def _tensor_type_options(group: VariantGroup, info: Any, attr: str, *, file: str,
                         key: str) -> tuple[str, ...]:
    """The group's output / token-embedding tensor types, one variant per entry ("" =
    "default": the quantizer's own choice for the quant type)."""
    raw = getattr(group, attr)
    given = (raw,) if isinstance(raw, str) else raw
    if not given:
        raise ConfigError(f"empty {attr} list (use \"default\" for llama.cpp's choice)",
                          file=file, key=f"{key}.{attr}")
    if given == ("",):
        return ("",)
    if not info.tensor_types:
        raise ConfigError(f"the {group.backend} backend has no {attr} setting (it is "
                          "llama-quantize's: a llama.cpp variant's)", file=file,
                          key=f"{key}.{attr}")
    if group.source:
        raise ConfigError(f"{attr} applies when qbench builds a variant; a pre-quantized "
                          "'source' is measured as it is (the report shows its tensor types)",
                          file=file, key=f"{key}.{attr}")
    from qbench.quantize.gguf_types import canonical_tensor_type
    out = []
    for v in given:
        if v.strip().lower() in ("", "default"):
            out.append("")
            continue
        canon = canonical_tensor_type(v)
        if canon is None or canon not in info.tensor_types:
            raise ConfigError(f"unknown tensor type '{v}'"
                              f"{did_you_mean(v.upper(), sorted(info.tensor_types))}; expected "
                              f"\"default\" or one of {', '.join(sorted(info.tensor_types))}",
                              file=file, key=f"{key}.{attr}")
        out.append(canon)
    if len(set(out)) != len(out):
        raise ConfigError(f"the {attr} list names a type twice", file=file,
                          key=f"{key}.{attr}")
    return tuple(out)


def _check_tensor_types_need_imatrix(types: tuple[str, ...], attr: str, imatrix: str, *,
                                     file: str, key: str) -> None:
    """llama-quantize refuses IQ1/IQ2 tensors without an importance matrix."""
    from qbench.quantize.gguf_types import TENSOR_TYPES_NEED_IMATRIX
    for t in types:
        if t in TENSOR_TYPES_NEED_IMATRIX and not imatrix:
            raise ConfigError(f"{t} needs an importance matrix: set imatrix = \"wikitext-2\" "
                              f"(or a text file) in {key}", file=file, key=f"{key}.{attr}")


def _check_unique(spec: VariantSpec, group: VariantGroup, models: tuple[ModelSpec, ...],
                  seen: dict[tuple[str, ...], str], *, file: str, key: str) -> None:
    """Per model, overlapping groups ([[variants]] for all models and one restricted with
    models = [...]) must not give a model the same variant twice."""
    for mid in dict.fromkeys(group.models or tuple(m.id for m in models)):
        ident = (mid, spec.backend, spec.quant, spec.source, spec.imatrix, spec.kv_cache,
                 spec.output_tensor_type, spec.token_embedding_type)
        if ident in seen:
            which = f" for model {mid!r}" if len(models) > 1 else ""
            raise ConfigError(f"duplicate variant {spec.backend}/{spec.name}{which} "
                              f"(also {seen[ident]})", file=file, key=key)
        seen[ident] = key


_CALIBRATION_KEYS = ("calibration", "calibration_samples", "calibration_seq_len")


def _check_calibration(group: VariantGroup, table: dict[str, Any],
                       specs: list[VariantSpec], *, file: str, key: str) -> None:
    """Calibration keys only on a group with a calibration pass, with sane sizes."""
    given = [k for k in _CALIBRATION_KEYS if k in table]
    if given and not any(s.calibrated for s in specs):
        raise ConfigError(f"'{given[0]}' applies only to transformers awq-*/gptq-* variants "
                          f"(built with a calibration pass), not "
                          f"{', '.join(s.label for s in specs)}"
                          + (f"; {group.backend} types take an imatrix = \"...\" instead"
                             if backend_info(group.backend).imatrix else ""),
                          file=file, key=f"{key}.{given[0]}")
    if group.calibration_samples < 1:
        raise ConfigError(f"expected at least 1 sample, got {group.calibration_samples}",
                          file=file, key=f"{key}.calibration_samples")
    if group.calibration_seq_len < 16:
        raise ConfigError(f"expected at least 16 tokens per sample, got "
                          f"{group.calibration_seq_len}", file=file,
                          key=f"{key}.calibration_seq_len")


def _parse_metrics(value: Any, file: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"expected [metrics.NAME] tables, got {value!r}", file=file,
                          key="metrics")
    metrics: dict[str, Any] = {}
    for name, table in value.items():
        if name not in metric_names():
            raise ConfigError(f"unknown metric '{name}'{did_you_mean(name, metric_names())}; "
                              f"available: {', '.join(metric_names())}", file=file,
                              key=f"metrics.{name}")
        module = metric_module(name)
        metrics[name] = from_table(module.Options, table, file=file, key=f"metrics.{name}")
    for name in metric_names():  # implicit metrics (footprint, sanity) run unless disabled
        module = metric_module(name)
        if module.INFO.implicit and name not in metrics:
            metrics[name] = module.Options()
    metrics = shared_pass.align_options(metrics)   # KLD scores perplexity's tokens by default
    for name, opts in list(metrics.items()):
        if getattr(opts, "enabled", True) is False:
            del metrics[name]
    explicit = [n for n in metrics if not metric_module(n).INFO.implicit]
    if not explicit:
        raise ConfigError("no metric to measure: add at least one [metrics.NAME] table "
                          f"(available: {', '.join(metric_names())})", file=file, key="metrics")
    return metrics


def _check_variant_metrics(suite: Suite, file: str) -> None:
    """A group's ``metrics`` names metrics of this suite, and a base measures everything the
    variants compared with it measure (ΔPPL, KLD and the MMLU paired test need the base's)."""
    for variant in suite.variants:
        for name in variant.metrics:
            if name not in suite.metrics:
                raise ConfigError(f"'{name}' is not a metric of this suite"
                                  f"{did_you_mean(name, suite.metrics)}; it has: "
                                  f"{', '.join(suite.metrics)}", file=file,
                                  key=f"variants ({variant.label}).metrics")
    for i, model in enumerate(suite.models):
        for variant in suite.variants_for(model):
            base = suite.base_variant(model, variant.backend)
            if base is None or base is variant:
                continue
            missing = [m for m in suite.metrics if variant.measures(m) and not base.measures(m)]
            if missing:
                raise ConfigError(f"{variant.label} measures {', '.join(missing)} but its base "
                                  f"{base.label} does not: add them to the base's metrics",
                                  file=file, key=f"variants ({base.label}).metrics")


def _check_synthetic(suite: Suite, file: str) -> None:
    """Refuse a quality metric asked of a synthetic model: its weights are random, so only the
    hardware-bound metrics (speed, its memory, footprint) mean anything."""
    for i, model in enumerate(suite.models):
        if not model.synthetic:
            continue
        for variant in suite.variants_for(model):
            for name in suite.metrics:
                implicit = metric_module(name).INFO.implicit
                asked = name in variant.metrics or (not variant.metrics and not implicit)
                if name in SYNTHETIC_REFUSED and asked:
                    raise ConfigError(
                        f"{name} on model {model.id!r} ({model.source}): a synthetic model has "
                        f"random weights, so {SYNTHETIC_REFUSED[name]} means nothing; only speed, "
                        "memory and footprint run on it. Give its [[variants]] models = "
                        f"[\"{model.id}\"] and metrics = [\"speed\"] (and the groups that measure "
                        "quality models = [...] naming the real models)", file=file,
                        key=f"models[{i}].source")


def _check_bases(suite: Suite, file: str) -> None:
    _check_synthetic(suite, file)
    _check_variant_metrics(suite, file)
    needs_base = [n for n in suite.metrics if metric_module(n).INFO.needs_base]
    for i, model in enumerate(suite.models):
        if not suite.variants_for(model):
            raise ConfigError(f"no variant applies to model {model.id!r}: empty matrix",
                              file=file, key=f"models[{i}]")
        if not needs_base or model.synthetic:   # nothing is compared with a synthetic base
            continue
        if suite.base_variant(model) is None:
            raise ConfigError(
                f"base '{model.base_backend}/{model.base}' is not among this model's variants, "
                f"and {', '.join(needs_base)} compares every variant with it", file=file,
                key=f"models[{i}].base")
        for backend in sorted({v.backend for v in suite.variants_for(model)}):
            if suite.base_variant(model, backend) is None:
                floats = ", ".join(sorted(backend_info(backend).float_quants))
                raise ConfigError(
                    f"{', '.join(needs_base)} compares {backend} variants with an unquantized "
                    f"{backend} variant ({floats}); add one for model {model.id!r}", file=file,
                    key="variants")
