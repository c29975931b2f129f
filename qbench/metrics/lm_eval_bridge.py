"""``[metrics.lm_eval]``: any lm-evaluation-harness task on a transformers variant.

The bridge to everything qbench does not implement natively. The variant's model, already
loaded by the transformers backend (bitsandbytes, compressed-tensors and all), is wrapped in
lm-eval's ``HFLM`` and handed to ``lm_eval.simple_evaluate``: the task's own prompts, metrics
and standard errors, unchanged. Offline use takes local task configs: ``include_path`` names a
folder of lm-eval YAML tasks (e.g. ``dataset_path: json`` with local ``data_files``).

GGUF variants are skipped with the reason: lm-eval's ``gguf`` model cannot score
log-likelihoods against current llama.cpp servers (lm-evaluation-harness issues #4158, #2525);
qbench's native ``mmlu`` metric covers them.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbench.errors import ConfigError, MissingExtraError, NotApplicable, QbenchError, did_you_mean
from qbench.options import positive
from qbench.metrics import MetricInfo
from qbench.metrics.context import CellContext, value

INFO = MetricInfo(
    name="lm_eval", version="1", primary="score", higher_is_better=True,
    cost=lambda options: 5.0,
    methodology=(
        "Tasks run by EleutherAI's lm-evaluation-harness (lm_eval.simple_evaluate) on the "
        "variant's loaded transformers model, wrapped in lm-eval's HFLM: each task's own prompt "
        "format, metrics and standard errors. Stored as TASK:METRIC; `score` is the first "
        "task's first metric. Seeds fixed; local task configs (include_path) for offline runs."),
)

_SKIP_GGUF = ("lm-eval tasks run on transformers variants (lm-eval's HF model around the "
              "loaded model); lm-eval's gguf model cannot score log-likelihoods against current "
              "llama.cpp servers (lm-evaluation-harness #4158, #2525). Use [metrics.mmlu] for "
              "GGUF variants, or restrict this metric with metrics = [...] on the variant group.")


@dataclass(frozen=True)
class Options:
    tasks: tuple[str, ...] = ()
    include_path: str = ""       # folder of lm-eval task YAMLs (relative to the suite file)
    num_fewshot: int = -1        # -1: the task's default
    limit: int = 0               # documents per task; 0: all
    batch_size: int = 8
    seed: int = 0

    def validate(self, *, file: str, key: str) -> None:
        if not self.tasks or not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise ConfigError(f"expected a non-empty list of lm-eval task names, got "
                              f"{list(self.tasks)!r}", file=file, key=f"{key}.tasks")
        if self.num_fewshot < -1:
            raise ConfigError(f"expected -1 (task default) or a count, got {self.num_fewshot}",
                              file=file, key=f"{key}.num_fewshot")
        positive(self.limit, file=file, key=f"{key}.limit", allow_zero=True)
        positive(self.batch_size, file=file, key=f"{key}.batch_size")


def _include_dir(options: Options, base_dir: Path) -> Path | None:
    if not options.include_path:
        return None
    path = Path(options.include_path).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_dir():
        raise ConfigError(f"lm-eval task folder not found: {path}", key="metrics.lm_eval."
                          "include_path")
    return path


def key_extras(options: Options, plan_ctx: Any) -> dict[str, Any]:
    """The task configs' content and lm-eval's version are part of the cell key."""
    from qbench.host.envinfo import library_version
    from qbench.inputs.sources import sha256_file

    out: dict[str, Any] = {"lm_eval": library_version("lm-eval")}
    folder = _include_dir(options, plan_ctx.base_dir)
    if folder is not None:
        out["include_sha256"] = sha256_file(folder, plan_ctx.cache_dir)
    return out


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def parse_results(res: dict[str, Any], tasks: tuple[str, ...]) -> dict[str, Any]:
    """lm-eval's ``results`` as qbench values: ``TASK:METRIC`` (``[filter]`` unless 'none'),
    each with its standard error where lm-eval gives one and the evaluated sample count."""
    values: dict[str, Any] = {}
    n_samples = res.get("n-samples", {})
    for task, metrics in res.get("results", {}).items():
        n = (n_samples.get(task) or {}).get("effective")
        for k, v in metrics.items():
            if "," not in k or "_stderr," in k or _number(v) is None:
                continue
            name, _, filt = k.partition(",")
            label = f"{task}:{name}" + ("" if filt in ("", "none") else f"[{filt}]")
            values[label] = value(_number(v), _number(metrics.get(f"{name}_stderr,{filt}")), n)
    first = next((k for t in tasks for k in values if k.startswith(f"{t}:")), None)
    if first is not None:
        values["score"] = dict(values[first], source=first)
    return values


def _task_configs(res: dict[str, Any]) -> dict[str, Any]:
    keep = ("task", "dataset_path", "dataset_name", "test_split", "num_fewshot", "output_type",
            "metric_list", "doc_to_choice")
    return {t: {k: c.get(k) for k in keep if k in c}
            for t, c in (res.get("configs") or {}).items()}


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    if ctx.artifact_path.suffix == ".gguf":
        raise NotApplicable(_SKIP_GGUF)
    if importlib.util.find_spec("lm_eval") is None:
        raise MissingExtraError("lm-eval", "hf", "[metrics.lm_eval]")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = _include_dir(options, ctx.base_dir)
    manager = TaskManager(include_path=str(folder) if folder else None)
    known = set(manager.all_tasks)
    for task in options.tasks:
        if task not in known:
            where = f" (nor in {folder})" if folder else ""
            raise QbenchError(f"lm-eval has no task '{task}'{where}"
                              f"{did_you_mean(task, known)}")
    backend = ctx.backend
    if not hasattr(backend, "model") or not hasattr(backend, "tokenizer"):
        raise NotApplicable(_SKIP_GGUF)
    lm = HFLM(pretrained=backend.model, tokenizer=backend.tokenizer,
              batch_size=options.batch_size)
    t0 = time.perf_counter()
    res = simple_evaluate(
        model=lm, tasks=list(options.tasks),
        num_fewshot=None if options.num_fewshot < 0 else options.num_fewshot,
        limit=options.limit or None, task_manager=manager, log_samples=False,
        random_seed=options.seed, numpy_random_seed=options.seed,
        torch_random_seed=options.seed, fewshot_random_seed=options.seed,
        bootstrap_iters=1000)
    elapsed = time.perf_counter() - t0
    if not res or not res.get("results"):
        raise QbenchError(f"lm-eval returned no results for {', '.join(options.tasks)}")
    values = parse_results(res, options.tasks)
    docs = sum((v.get("effective") or 0) for v in (res.get("n-samples") or {}).values())
    values["docs_per_s"] = value(docs / elapsed if elapsed > 0 else None, None, docs, "docs/s")
    from qbench.host.envinfo import library_version
    return {"values": values, "details": {
        "lm_eval_version": library_version("lm-eval"), "tasks": list(options.tasks),
        "include_path": str(folder) if folder else None, "limit": options.limit or None,
        "num_fewshot": None if options.num_fewshot < 0 else options.num_fewshot,
        "versions": res.get("versions"), "n_samples": res.get("n-samples"),
        "configs": _task_configs(res), "elapsed_s": round(elapsed, 2)}}
