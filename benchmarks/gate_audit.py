"""The regression gate on the audit's candidates: each an edited copy of a stored baseline.

    .venv/bin/python benchmarks/gate_audit.py [--baseline results/baselines/smoke]
        [--suite suites/smoke.toml]

For each candidate (the issue "One judge" lists them: a renamed suite or model, NaN KLD, zero
tokens/s, values removed, another dataset, per-chunk data gone, threads halved, an identical
rerun, a real +2 % PPL regression) it runs ``qbench compare BASELINE CANDIDATE --json`` and
prints a Markdown table of the exit code and the line that explains it, plus the gate's
"detects" column for the baseline's own gated values (what it would catch with 80 % power).
Nothing here is timed; it reads and edits JSON records only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qbench.cli import main as qbench
from qbench.results.store import load_results

Records = list[dict[str, Any]]
MODEL = "smollm2-135m"


def _cell(recs: Records, quant: str, metric: str, backend: str = "llama.cpp") -> dict[str, Any]:
    return next(r for r in recs if r["variant"]["quant"] == quant and r["metric"] == metric
                and r["variant"]["backend"] == backend)


def renamed_suite(recs: Records) -> None:
    for r in recs:
        r["suite"] = "smoke2"


def renamed_model(recs: Records) -> None:
    for r in recs:
        r["model"]["id"] = "smollm2-renamed"


def nan_kld(recs: Records) -> None:
    r = _cell(recs, "Q4_K_M", "kld")
    r["values"]["kld_mean"]["value"] = math.nan
    r["details"]["per_chunk_kld"] = [math.nan] * len(r["details"]["per_chunk_kld"])


def zero_speed(recs: Records) -> None:
    r = _cell(recs, "Q4_K_M", "speed")
    for name in ("pp_tokens_per_s", "tg_tokens_per_s"):
        r["values"][name].update(value=0.0, samples=[0.0] * 3, sd=0.0)


def values_removed(recs: Records) -> None:
    for metric, name in (("perplexity", "ppl"), ("mmlu", "acc"), ("kld", "kld_mean")):
        del _cell(recs, "Q8_0", metric)["values"][name]


def other_dataset(recs: Records) -> None:
    r = _cell(recs, "Q4_K_M", "perplexity")
    d = r["details"]
    d["dataset_sha256"] = "0" * 64
    d["per_chunk_ppl"] = [p * 1.2 for p in d["per_chunk_ppl"][::-1]]
    d["per_chunk_nll_sum"] = [s + n * math.log(1.2) for s, n in
                              zip(d["per_chunk_nll_sum"][::-1], d["per_chunk_tokens"])]
    r["values"]["ppl"]["value"] *= 1.2


def no_chunks(recs: Records) -> None:
    r = _cell(recs, "Q4_K_M", "perplexity")
    for k in ("per_chunk_ppl", "per_chunk_nll_sum"):
        r["details"].pop(k, None)
    r["values"]["ppl"]["value"] *= 1.1


def threads_halved(recs: Records) -> None:
    for r in recs:
        r.setdefault("run", {})["threads"] = 1
        if r["metric"] == "speed":
            for name in ("pp_tokens_per_s", "tg_tokens_per_s"):
                v = r["values"][name]
                v["value"] /= 2
                v["samples"] = [x / 2 for x in v.get("samples") or ()]


def identical(recs: Records) -> None:
    pass


def ppl_plus_two(recs: Records) -> None:
    r = _cell(recs, "Q8_0", "perplexity")
    d = r["details"]
    d["per_chunk_ppl"] = [p * 1.02 for p in d["per_chunk_ppl"]]
    d["per_chunk_nll_sum"] = [s + n * math.log(1.02) for s, n in
                              zip(d["per_chunk_nll_sum"], d["per_chunk_tokens"])]
    r["values"]["ppl"]["value"] *= 1.02


CANDIDATES: list[tuple[str, Callable[[Records], None]]] = [
    ("suite renamed (smoke2)", renamed_suite), ("model id renamed", renamed_model),
    ("KLD mean and per-chunk KLD NaN", nan_kld), ("every tokens/s of a speed cell 0", zero_speed),
    ("ppl, acc, kld_mean removed", values_removed),
    ("another dataset's chunks, PPL x 1.2", other_dataset),
    ("per-chunk details gone, PPL x 1.1", no_chunks),
    ("threads 2 -> 1, tokens/s halved", threads_halved),
    ("identical rerun", identical), ("+2 % PPL on Q8_0 (every chunk)", ppl_plus_two),
]


def _write(root: Path, recs: Records) -> Path:
    for r in recs:
        path = root / r["suite"] / "cells" / f"{r['key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    return root / recs[0]["suite"]


def _explain(res: dict[str, Any]) -> str:
    reasons = res.get("not_comparable_reasons") or []
    regs = [f"{c['cell'].split('/', 1)[1]} {c['value']}: REGRESSION {c['change']:+.3g} "
            f"{c['unit']} [{c['ci_low']:+.3g}, {c['ci_high']:+.3g}]"
            + (f" ({c['config']})" if c.get("config") else "")
            for c in res["changes"] if c["regression"]]
    missing = res.get("missing") or []
    parts = regs[:2] + ([f"{len(missing)} ok cells missing"] if missing else []) + reasons[:2]
    return "; ".join(parts) or f"no regression ({sum(c['gated'] for c in res['changes'])} values)"


def run(baseline: Path, suite: Path | None) -> None:
    stored = load_results([baseline])
    print("| candidate | exit | the gate's line |\n| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, edit) in enumerate(CANDIDATES):
            recs = copy.deepcopy(stored)
            edit(recs)
            cand = _write(Path(tmp) / str(i), recs)
            out = io.StringIO()
            args = ["compare", str(baseline), str(cand), "--json"]
            if suite and edit is not renamed_suite:
                args += ["--suite", str(suite)]
            with contextlib.redirect_stdout(out):
                rc = qbench(args)
            res = json.loads(out.getvalue())
            print(f"| {name} | {rc} | {_explain(res).replace('|', '/')} |")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            qbench(["compare", str(baseline), str(_write(Path(tmp) / "same", stored)), "--json"])
        res = json.loads(out.getvalue())
    print("\n| value | detects (80 % power) | how |\n| --- | --- | --- |")
    for c in res["changes"]:
        if c["gated"] and c["detectable"] is not None:
            sign = "-" if c["higher_is_better"] else "+"
            print(f"| {c['cell'].split('/', 2)[2]} {c['value']} | {sign}{c['detectable']:.2g} "
                  f"{c['unit']} | {c['detectable_how']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="results/baselines/smoke", type=Path)
    ap.add_argument("--suite", default="suites/smoke.toml", type=Path)
    args = ap.parse_args(argv)
    run(args.baseline, args.suite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
