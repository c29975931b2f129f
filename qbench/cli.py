"""Command line: parse, call, map errors to exit codes (0 ok, 1 user error, 2 cells failed)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qbench.version import __version__
from qbench.errors import QbenchError
from qbench.host.cache import KINDS as CACHE_KINDS
from qbench.options import finite_float

EXIT_OK, EXIT_USER, EXIT_CELLS_FAILED, EXIT_BUG = 0, 1, 2, 3
LOG_WIDTH = 1000   # console width when stderr is not a terminal: long lines stay whole


def _suite_context(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Load the suite and work out where data, cache and results live; check data exists."""
    from qbench.suite.config import load_suite
    from qbench.inputs.datasets import data_dir_from
    from qbench.suite.plan import PlanContext
    from qbench.host.cache import default_cache_dir
    from qbench.results.store import Store

    suite = load_suite(args.suite)
    ctx = PlanContext(base_dir=suite.path.resolve().parent,
                      data_dir=data_dir_from(getattr(args, "data_dir", None),
                                             suite.defaults.data_dir),
                      cache_dir=default_cache_dir(suite.defaults.cache_dir,
                                                  getattr(args, "cache_dir", None)))
    store = Store(Path(getattr(args, "out", None) or "results"), suite.name)
    return suite, ctx, store


def _check_inputs(suite: Any, ctx: Any) -> None:
    """Everything checkable without loading a model: model files, GGUF headers, datasets."""
    from qbench.suite.config import ConfigError
    from qbench.inputs.datasets import locate_text
    from qbench.errors import DatasetError, SourceError
    from qbench.backends import backend_function
    from qbench.inputs.sources import locate, pin_hint, unpinned_hub_ref

    file = str(suite.path)
    for i, model in enumerate(suite.models):
        try:
            if unpinned_hub_ref(model.source):
                if getattr(model, "trust_remote_code", False):
                    raise ConfigError(f"trust_remote_code = true runs the Python code the hub "
                                      f"holds when the cell runs, and {model.source!r} is not "
                                      f"pinned to a commit: pin it ({pin_hint(model.source)})",
                                      file=file, key=f"models[{i}].source")
                print(f"qbench: warning: {file}: models[{i}].source {model.source!r} is not "
                      "pinned to a commit: a re-upload would be measured under the same cell "
                      f"key, mixed with earlier results; pin it as {pin_hint(model.source)}",
                      file=sys.stderr)
            local = locate(model.source, base_dir=ctx.base_dir)
            check = backend_function(model.base_backend, "check_model_file")
            if local is not None and local.path.is_file() and check is not None:
                check(local.path, ctx.cache_dir)
        except SourceError as exc:
            raise ConfigError(exc.detail, file=file, key=f"models[{i}].source") from None
    for name, opts in suite.metrics.items():
        dataset = getattr(opts, "dataset", None)
        if dataset and name != "mmlu":   # MMLU's files are checked by expand() (mmlu_data.locate)
            try:
                locate_text(dataset, ctx.data_dir, ctx.base_dir)
            except DatasetError as exc:
                raise ConfigError(exc.detail, file=file, key=f"metrics.{name}.dataset") from None
    for variant in suite.variants:
        for attr in ("imatrix", "calibration"):
            text = getattr(variant, attr)
            if text:
                try:
                    locate_text(text, ctx.data_dir, ctx.base_dir)
                except DatasetError as exc:
                    raise ConfigError(exc.detail, file=file,
                                      key=f"variants ({variant.label}).{attr}") from None


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from qbench.suite.plan import expand

    suite, ctx, _ = _suite_context(args)
    _check_inputs(suite, ctx)
    cells = expand(suite, ctx)
    console.print(f"[green]ok[/green]: {args.suite}: suite '{suite.name}', {len(suite.models)} "
                  f"model(s), {len(suite.variants)} variant(s), metrics "
                  f"{', '.join(suite.metrics)}: {len(cells)} cells")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    from qbench.suite.plan import expand
    from qbench.run.runner import cell_rows

    from qbench.suite.shard import shard_selector

    select = shard_selector(args.shard)
    suite, ctx, store = _suite_context(args)
    _check_inputs(suite, ctx)
    cells = expand(suite, ctx, only=tuple(args.only or ()))
    rows = cell_rows(select(cells) if select else cells, store)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return EXIT_OK
    table = Table(title=f"{suite.name}: {len(rows)} cells")
    for col in ("cell", "key", "status"):
        table.add_column(col)
    for r in rows:
        style = {"ok": "green", "todo": "", "skipped": "yellow"}.get(r["status"], "red")
        table.add_row(escape(r["id"]) + (" (base)" if r["base"] else ""), r["key"][:12],
                      f"[{style}]{r['status']}[/{style}]" if style else r["status"])
    console.print(table)
    done = sum(r["status"] == "ok" for r in rows)
    console.print(f"{done} of {len(rows)} done")
    return EXIT_OK


def _open_decisions(suite: Any) -> Any:
    """The report's rules for --until-decided (qbench.report.open_decisions) at the suite's
    [decide] tolerance and budget (else its [report] section's)."""
    from qbench.report.open_decisions import open_decisions

    tol = suite.decide.max_loss_pct or suite.report.max_loss_pct
    budget = suite.decide.budget_gib or suite.report.budget_gib

    def open_variants(records: list[dict[str, Any]], level: float) -> dict[Any, Any]:
        return open_decisions([r for r in records if r["suite"] == suite.name], level,
                              tol=tol, budget_gib=budget, kv_ctx=suite.report.context_tokens)

    return open_variants


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from qbench.results.store import load_results
    from qbench.run.runner import run_suite
    from qbench.suite.shard import shard_selector

    select = shard_selector(args.shard)            # a bad --shard fails before anything runs
    executor = None
    if args.executor == "ray":
        from qbench.run.ray_executor import RayExecutor
        executor = RayExecutor(address=args.ray_address, num_gpus_per_cell=args.gpus_per_cell)
    elif args.no_prepare_ahead:
        from qbench.run.executors import LocalExecutor
        executor = LocalExecutor(prepare_ahead=False)
    suite, ctx, store = _suite_context(args)
    _check_inputs(suite, ctx)
    with store.lock():
        summary = run_suite(suite, ctx, store, only=tuple(args.only or ()),
                            rerun_failed=args.rerun_failed, console=console,
                            executor=executor, select=select)
        decided = None
        if args.until_decided and not summary.any_failed:
            from qbench.run.decide import run_until_decided
            decided = run_until_decided(suite, ctx, store, console=console, executor=executor,
                                        open_variants=_open_decisions(suite))
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.counts.items())) or "nothing run"
    console.print(f"[bold]done[/bold] in {summary.wall_s:.1f} s: {counts}; "
                  f"{summary.cached} cached. Results: {escape(str(store.dir))}")
    report = None
    if not args.no_report:   # the report (plotly, jinja2) is imported only when one is made
        from qbench.report.build import build_site
        from qbench.results.runs import suite_notes
        pages = build_site(load_results([store.dir]), Path(args.report_dir),
                           notes=suite_notes([store.dir]),
                           budget_gb=suite.report.budget_gib,
                           max_loss_pct=suite.report.max_loss_pct,
                           kv_ctx=suite.report.context_tokens)
        report = pages[1] if len(pages) > 1 else pages[0]
        console.print(f"report: {report}")
    code = EXIT_CELLS_FAILED if summary.any_failed or (decided and decided.failed) else EXIT_OK
    if summary.missing_dependencies and not summary.any_failed:
        code = EXIT_USER          # nothing could run here: an install, not a measurement, is due
    if args.summary_json or args.summary_md:
        from qbench.run import summary as run_summary
        run_summary.write(run_summary.build(summary, store, report=report, exit_code=code),
                          json_path=args.summary_json, md_path=args.summary_md)
    if summary.any_failed:
        failed = summary.failed_ids + summary.recorded_failures
        console.print(f"[red]{len(failed)} cell(s) failed[/red]"
                      + (f" ({len(summary.recorded_failures)} in earlier runs; --rerun-failed "
                         "retries them)" if summary.recorded_failures else "")
                      + ": " + escape(", ".join(failed[:10])))
    return code


def positive_float(text: str) -> float:
    """A finite number >= 0 for a command-line option."""
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return x


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from qbench.report.build import build_site
    from qbench.report.recommend import DEFAULT_KV_CTX
    from qbench.results.store import load_results

    records = load_results([Path(p) for p in args.results])
    if args.evidence_pack:
        return _evidence_pack(args, records, console)
    report = None
    if args.suite:   # the suite's [report] settings; the options given here win
        from qbench.suite.config import load_suite
        report = load_suite(args.suite).report
    budget = args.memory_budget_gib if args.memory_budget_gib is not None else (
        report.budget_gib if report else None)
    loss = args.max_loss_pct if args.max_loss_pct is not None else (
        report.max_loss_pct if report else None)
    ctx = args.context_tokens or (report.context_tokens if report else DEFAULT_KV_CTX)
    from qbench.results.runs import suite_notes
    pages = build_site(records, Path(args.out), budget_gb=budget, max_loss_pct=loss,
                       kv_ctx=ctx, notes=suite_notes(Path(p) for p in args.results))
    for p in pages:
        console.print(f"wrote {p}")
    return EXIT_OK


def _evidence_pack(args: argparse.Namespace, records: list[dict[str, Any]],
                   console: Console) -> int:
    """qbench report --evidence-pack TYPE: the Markdown llama.cpp's CONTRIBUTING asks for."""
    from qbench.host.fsutil import atomic_write_text
    from qbench.report.build import safe_name
    from qbench.report.evidence import evidence_pack

    try:
        text = evidence_pack(records, args.evidence_pack, suite_file=args.suite or "SUITE.toml")
    except ValueError as exc:
        raise QbenchError(f"--evidence-pack {args.evidence_pack}: {exc}") from None
    suites = sorted({r["suite"] for r in records})
    name = f"{safe_name('-'.join(suites))}-evidence-{safe_name(args.evidence_pack)}.md"
    path = Path(args.out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")
    console.print(f"wrote {path}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from qbench.results.gate import run_compare

    return run_compare(args, console)


def cmd_merge(args: argparse.Namespace, console: Console) -> int:
    from qbench.results.merge import merge_results

    summary = merge_results([Path(p) for p in args.sources], Path(args.out),
                            on_conflict=args.on_conflict)
    for line in summary.lines():
        console.print(line)
    return EXIT_OK


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from qbench.results.export import flat_rows, to_csv, to_jsonl
    from qbench.results.store import load_results

    to_file = bool(args.output and args.output != "-")
    if args.format == "parquet" and not to_file:
        raise QbenchError("Parquet is a binary format: give the file to write with -o FILE")
    rows = flat_rows(load_results([Path(p) for p in args.results]))
    if args.format == "parquet":
        from qbench.results.frame import to_parquet_bytes   # pandas: only for Parquet
        data = to_parquet_bytes(rows)
    else:
        data = (to_csv(rows) if args.format == "csv" else to_jsonl(rows)).encode("utf-8")
    if to_file:
        from qbench.host.fsutil import atomic_write_bytes
        atomic_write_bytes(Path(args.output), data)
        console.print(f"wrote {len(rows)} rows to {args.output}")
    else:
        sys.stdout.write(data.decode("utf-8"))
    return EXIT_OK


def cmd_ls(args: argparse.Namespace, console: Console) -> int:
    from qbench.results.store import Store
    from qbench.results.schema import FAILED

    root = Path(args.out)
    if not root.is_dir():
        console.print(f"no results under {root}")
        return EXIT_OK
    table = Table(title=f"results in {root}")
    for col in ("suite", "cells", "ok", "failed", "skipped", "last run"):
        table.add_column(col)
    for suite_dir in sorted(p for p in root.iterdir() if (p / "cells").is_dir()):
        recs = Store(root, suite_dir.name).records()
        runs = sorted((suite_dir / "runs").glob("*.json"))
        table.add_row(suite_dir.name, str(len(recs)), str(sum(r["status"] == "ok" for r in recs)),
                      str(sum(r["status"] in FAILED for r in recs)),
                      str(sum(r["status"] == "skipped" for r in recs)),
                      runs[-1].stem if runs else "–")
    console.print(table)
    return EXIT_OK


def cmd_cache(args: argparse.Namespace, console: Console) -> int:
    from qbench.host.cache import KINDS, clear, usage
    from qbench.host.cache import default_cache_dir

    cache_dir = default_cache_dir(cli=args.cache_dir)
    if args.action == "clear":
        freed = clear(cache_dir, args.kind)
        console.print(f"removed {args.kind} from {cache_dir}: {freed / 2**20:.1f} MiB freed")
        return EXIT_OK
    table = Table(title=f"qbench cache: {cache_dir}")
    for col in ("kind", "MiB", "what"):
        table.add_column(col)
    for kind, size in usage(cache_dir).items():
        table.add_row(kind, f"{size / 2**20:.1f}", KINDS[kind])
    console.print(table)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    from qbench.inputs.datasets import data_dir_from
    from qbench.run.doctor import run_checks

    checks = run_checks(data_dir_from(args.data_dir))
    table = Table(title="qbench doctor")
    for col in ("check", "", "detail"):
        table.add_column(col)
    for c in checks:
        mark = "[green]ok[/green]" if c.ok else ("[red]FAIL[/red]" if c.blocking
                                                  else "[yellow]warn[/yellow]")
        table.add_row(c.name, mark, c.detail)
    console.print(table)
    blocked = [c for c in checks if not c.ok and c.blocking]
    if blocked:
        console.print("[red]the default suite cannot run here[/red]: "
                      + "; ".join(c.name for c in blocked))
        return EXIT_USER
    console.print("[green]ready[/green]: qbench run suites/smoke.toml")
    return EXIT_OK


def make_console() -> Console:
    """Rich on stderr. When that is not a terminal (a CI log, a pipe, a file) nothing is wrapped
    or folded: each cell id, status and error stays whole on one line, to read and to grep.
    An explicit $COLUMNS still wins."""
    if sys.stderr.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=True)
    return Console(stderr=True, width=LOG_WIDTH, soft_wrap=True)


DESCRIPTION = """\
qbench measures what quantization costs an LLM. For every variant of a model (GGUF Q8_0 .. Q2_K,
imatrix or not; AWQ, GPTQ, bitsandbytes) it measures perplexity, KL divergence against the base,
MMLU accuracy, speed and memory, stores one result file per cell (model x variant x metric),
and renders an HTML report that recommends a variant for your memory budget and tolerated loss.
Runs resume where they stopped; a crashing or hanging cell is recorded, not fatal."""

EPILOG = """\
a first session:
  qbench doctor                                  can this machine run the default suite?
  qbench run suites/smoke.toml                   measure (results/smoke/, reports/index.html)
  qbench export results/smoke --format parquet -o smoke.parquet
  python -c 'import qbench; print(qbench.load("results/smoke"))'     # pandas DataFrame

exit codes: 0 ok, 1 user error (bad suite, missing file or extra), 2 some cells failed
(compare: a regression), 3 a bug in qbench (please report the traceback), 4 (compare) not
comparable: nothing compared, a value missing or NaN, another dataset, an unreliable timing."""

# per subcommand: what it does for the user (--help's description) and one example (epilog)
COMMAND_DOCS: dict[str, tuple[str, str]] = {
    "validate": ("Check a suite file without loading any model: keys and values, model "
                 "files and GGUF headers, datasets. Fast; run it before a long run.",
                 "qbench validate suites/smoke.toml"),
    "plan": ("List the cells (model/backend/quant/metric) a run would measure and which are "
             "already stored, without running anything.",
             "qbench plan suites/smoke.toml --only 'smollm2-135m/llama.cpp/*'"),
    "run": ("Measure every cell of the suite not already stored (a variant's cells share one "
            "worker process and one model load; a cell that crashes or hangs ends alone), "
            "storing each result the moment it is known (kill it at any time; run again to "
            "resume), then write the HTML report. Exit 2 if any cell failed. "
            "--summary-md \"$GITHUB_STEP_SUMMARY\" puts a table of the run on a CI job's page; "
            "--summary-json FILE gives the same for scripts.",
            "qbench run suites/smoke.toml --only '*/llama.cpp/Q8_0/*' --summary-md summary.md"),
    "report": ("Render stored results as a self-contained HTML report (opens offline): every "
               "variant's numbers, size-vs-quality plots, advice checks and a recommendation.",
               "qbench report results/smoke --out reports --suite suites/smoke.toml "
               "--memory-budget-gib 0.2"),
    "compare": ("Compare two result sets cell by cell (e.g. tonight's run against a "
                "baseline) with one judge for every value a metric declares gated: paired by "
                "chunk (PPL, KLD, same-top: t on the per-chunk differences) or question (MMLU: "
                "exact McNemar on the flips), Welch t over repetitions (speed, memory; only on "
                "the same hardware). A value regresses when its whole interval is worse than "
                "its tolerance; the intervals are simultaneous (Bonferroni over the gated "
                "values, family-wise false-alarm rate --alpha). A cell ok in the baseline and "
                "failed, skipped or missing in the candidate is a regression too (--suite: "
                "unless the suite no longer asks for it). Exit 0: compared, no regression; "
                "2: regression; 4: not comparable (nothing compared, a value missing, NaN or "
                "zero, another dataset or question set, an unreliable timing, other hardware), "
                "with the reason; 1: unreadable input.",
                "qbench compare results/baselines/smoke results/smoke --suite "
                "suites/smoke.toml --out diff.html"),
    "merge": ("Merge result folders (e.g. the shards of a CI matrix run with --shard i/n) "
              "into one results root. Sources are read as untrusted: links, malformed records "
              "and run manifests are skipped and listed; two ok records of one cell that "
              "disagree are listed and nothing is written unless --on-conflict says which wins.",
              "qbench merge shard-1/ shard-2/ --out results"),
    "export": ("Write stored results as a flat table, one row per metric value (failed cells: "
               "one row with status and error). Parquet needs the pandas extra; in Python, "
               "qbench.load() gives the same table as a DataFrame.",
               "qbench export results/smoke --format parquet -o smoke.parquet"),
    "cache": ("Show or clear qbench's cache: quantized artifacts, KLD base log-probs, "
              "imatrix files, GGUF inspections, Hugging Face downloads.",
              "qbench cache clear kld"),
    "doctor": ("Check this machine for the default suite: backends installed, CPU flags "
               "(AMX), GPUs, datasets.", "qbench doctor --data-dir ~/qbench-data"),
    "ls": ("List the suites stored under a results root with their cell counts by status "
           "and their last run.", "qbench ls --out results"),
}


def _document(sub: Any) -> None:
    """Give every subcommand its description and example (kept in one table, above); a
    description set where the subcommand is defined wins."""
    for name, sp in sub.choices.items():
        if name in COMMAND_DOCS:
            description, example = COMMAND_DOCS[name]
            sp.description = textwrap.fill(sp.description or description, 88)
            sp.epilog = sp.epilog or f"example:\n  {example}"
            sp.formatter_class = argparse.RawDescriptionHelpFormatter


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; 2 means "cells failed" here, so usage errors exit 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USER, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qbench", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"qbench {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def suite_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("suite", help="suite file (TOML)")
        sp.add_argument("--data-dir", help="datasets folder (else $QBENCH_DATA_DIR)")
        sp.add_argument("--cache-dir", help="artifact cache (else $QBENCH_CACHE_DIR, "
                        "~/.cache/qbench)")
        sp.add_argument("--out", default="results", help="results root (default ./results)")
        return sp

    suite_cmd("validate", "check a suite file without loading any model")
    sp = suite_cmd("plan", "list the cells and which are done")
    sp.add_argument("--only", action="append", help="glob on cell ids model/backend/quant/metric")
    sp.add_argument("--shard", metavar="I/N", help="only the cells of shard I of N")
    sp.add_argument("--json", action="store_true")
    sp = suite_cmd("run", "measure every cell not already done")
    sp.add_argument("--only", action="append", help="glob on cell ids model/backend/quant/metric")
    sp.add_argument("--shard", metavar="I/N",
                    help="run only shard I of N (1-based; the same split on every machine, "
                    "balanced by estimated cost): for CI matrices, then `qbench merge`")
    sp.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="local: one cell at a time here; ray: cells as Ray tasks "
                    "(pip install 'qbench-llm[ray]')")
    sp.add_argument("--ray-address", default=None,
                    help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray instance)")
    sp.add_argument("--gpus-per-cell", type=finite_float, default=0,
                    help="GPUs a GPU cell asks Ray for (default 1; 0.5: two cells share one)")
    sp.add_argument("--no-prepare-ahead", action="store_true",
                    help="local CPU runs: do not make the next variant's file while this "
                    "variant's accuracy cells run (one thing at a time, as before)")
    sp.add_argument("--rerun-failed", action="store_true", help="rerun failed/crashed cells")
    sp.add_argument("--until-decided", action="store_true",
                    help="after the suite's sample, measure more - look by look, for exactly "
                    "the variants whose recommendation or claim verdict is still open, and "
                    "their base: perplexity chunks for a ΔPPL decision, MMLU questions for an "
                    "MMLU one - until each is decided or reaches [decide] max_chunks / "
                    "max_tokens / max_questions or the dataset's end (a group-sequential plan: "
                    "alpha per metric spent over the looks)")
    sp.add_argument("--report-dir", default="reports", help="where the HTML goes")
    sp.add_argument("--no-report", action="store_true")
    sp.add_argument("--summary-json", metavar="FILE",
                    help="write what this run did as JSON: counts, failures, and each cell run "
                    "with its status, headline value and time")
    sp.add_argument("--summary-md", metavar="FILE",
                    help="append the same as a Markdown table (give \"$GITHUB_STEP_SUMMARY\" "
                    "in GitHub Actions)")

    sp = sub.add_parser("report", help="render stored results as static HTML")
    sp.add_argument("results", nargs="+", help="results folders (a suite's or the root)")
    sp.add_argument("--out", default="reports")
    sp.add_argument("--suite", metavar="SUITE.toml", default=None,
                    help="take the recommendation's settings from this suite's [report] "
                    "section (the options below override it)")
    sp.add_argument("--memory-budget-gib", "--memory-budget-gb", dest="memory_budget_gib",
                    type=positive_float, default=None,
                    help="recommend the best variant that fits this many GiB (2^30 bytes)")
    sp.add_argument("--max-loss-pct", type=positive_float, default=None,
                    help="tolerated ΔPPL vs base, %% at the upper end of its 95 %% interval "
                    "(default 1)")
    sp.add_argument("--context-tokens", type=int, default=None,
                    help="context the memory estimate counts the KV cache for (default 4096)")
    sp.add_argument("--evidence-pack", metavar="TYPE", default=None,
                    help="write, instead of the HTML, a Markdown section for one llama.cpp "
                    "quant type in the shape llama.cpp's CONTRIBUTING asks for: PPL and KLD "
                    "against the base, Q8_0 and the types nearest in size, CPU pp/tg, and the "
                    "commands to reproduce it (OUT/<suite>-evidence-TYPE.md)")
    sp = sub.add_parser("compare", help="differences between two result sets; exit 2 on a "
                        "regression (the CI gate)")
    sp.add_argument("baseline", help="results folder or file (e.g. results/baselines/smoke)")
    sp.add_argument("candidate", help="results folder")
    sp.add_argument("--suite", metavar="SUITE.toml", help="the suite as it is now: a baseline "
                    "cell it no longer asks for may be absent (default: every cell ok in the "
                    "baseline is expected)")
    sp.add_argument("--only", action="append", metavar="GLOB",
                    help="compare only cells whose id model/backend/quant/metric matches "
                    "(repeatable, as qbench run --only)")
    tol = sp.add_argument_group("tolerances (how much worse the whole interval must be; "
                                "defaults: each metric's declared tolerance)")
    tol.add_argument("--tolerance", action="append", metavar="METRIC.VALUE=X",
                     help="tolerated worsening of one value in its unit (%% or points), "
                     "e.g. perplexity.ppl=0.5 (repeatable)")
    for flag, dest, what in (
            ("--ppl-tol-pct", "tol_ppl_pct", "perplexity.ppl: PPL increase, %%"),
            ("--kld-tol-pct", "tol_kld_pct", "kld.kld_mean: mean KLD increase, %%"),
            ("--mmlu-tol-points", "tol_mmlu_points", "mmlu.acc: net loss, points"),
            ("--same-top-tol-points", "tol_same_top_points", "kld.same_top_pct, points"),
            ("--speed-tol-pct", "tol_speed_pct", "speed: tokens/s drop, %%"),
            ("--memory-tol-pct", "tol_memory_pct", "speed: peak memory rise, %%")):
        tol.add_argument(flag, dest=dest, type=float, default=None,
                         metavar=flag.rsplit("-", 1)[-1].upper(), help=what)
    tol.add_argument("--alpha", type=float, default=None,
                     help="family-wise false-alarm rate of the whole gate (default 0.05; "
                     "Bonferroni over the gated values compared)")
    sp.add_argument("--allow-other-hardware", action="store_true",
                    help="speed and memory measured on other hardware are listed as not "
                    "compared instead of making the comparison fail as not comparable (exit 3)")
    sp.add_argument("--out", default=None, help="also write an HTML diff page here")
    sp.add_argument("--json", action="store_true", help="print the comparison as JSON")
    sp = sub.add_parser("merge", help="merge result folders (e.g. the shards of a CI matrix) "
                        "into one results root")
    sp.add_argument("sources", nargs="+", help="results folders: a results root, a suite "
                    "folder, or a folder holding several")
    sp.add_argument("--out", default="results", help="results root to merge into "
                    "(default ./results)")
    sp.add_argument("--on-conflict", choices=("refuse", "newest", "keep"), default="refuse",
                    help="two ok records of one cell that disagree (values or artifact): "
                    "refuse (default: list them, write nothing), newest (the later start "
                    "wins) or keep (the destination's, else the first source's record)")
    sp = sub.add_parser("export", help="flat table of results (JSONL, CSV or Parquet)")
    sp.add_argument("results", nargs="+", help="results folders (a suite's or the root) or "
                    "cell files")
    sp.add_argument("--format", choices=("jsonl", "csv", "parquet"), default="jsonl",
                    help="parquet: typed columns, read back by qbench.load (pip install "
                    "'qbench-llm[pandas]')")
    sp.add_argument("-o", "--output", help="file (default: stdout; required for parquet)")
    sp = sub.add_parser("cache", help="show or clear qbench's cache (artifacts, KLD bases...)")
    sp.add_argument("action", choices=("info", "clear"))
    sp.add_argument("kind", nargs="?", default="all",
                    choices=("all", *CACHE_KINDS))
    sp.add_argument("--cache-dir")
    sp = sub.add_parser("doctor", help="check this machine: backends, CPU flags (AMX), GPUs, data")
    sp.add_argument("--data-dir")
    sp = sub.add_parser("ls", help="list stored suites and their cells")
    sp.add_argument("--out", default="results")
    _document(sub)
    return p


COMMANDS = {"validate": cmd_validate, "plan": cmd_plan, "run": cmd_run, "report": cmd_report,
            "export": cmd_export, "ls": cmd_ls, "cache": cmd_cache, "compare": cmd_compare,
            "doctor": cmd_doctor, "merge": cmd_merge}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    console = make_console()
    try:
        return COMMANDS[args.command](args, console)
    except QbenchError as exc:
        print(f"qbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:   # Ctrl-C; SIGTERM/SIGHUP during a run (Terminated)
        print(f"qbench: interrupted{f' ({exc})' if str(exc) else ''}; finished cells are "
              "saved", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))
    except OSError as exc:
        import errno
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"qbench: error: cannot write{where}: {exc.strerror} (disk full or file size "
                  "limit); results already stored are intact", file=sys.stderr)
            return EXIT_USER
        return _bug(exc)
    except Exception as exc:  # noqa: BLE001 - anything else is qbench's fault: say so
        return _bug(exc)


def _bug(exc: BaseException) -> int:
    """An unexpected exception: the traceback for a bug report, and exit 3 so scripts and CI
    can tell a qbench bug from a user error (1) or failed cells (2)."""
    import traceback
    traceback.print_exception(exc, file=sys.stderr)
    print(f"qbench: internal error ({type(exc).__name__}): this is a bug in qbench; please "
          "report it with the traceback above", file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
