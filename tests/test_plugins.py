"""A backend and a metric added from outside qbench, through entry points alone.

tests/plugins/qbench_toyplugin is a throwaway package (a byte-bigram "model" whose logit table
is quantized to 8 or 4 bits, and a cross-entropy metric). It is pip-installed into a temporary
folder, and a suite using both runs through every stage a user runs: validate -> run (plan,
worker, store) -> report -> export -> compare. Nothing under qbench/ names it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QBENCH = [sys.executable, "-m", "qbench.cli"]

SUITE = """
[suite]
name = "toy"

[defaults]
threads = 1

[[models]]
id = "toy-model"
source = "corpus.txt"
base = "f32"
base_backend = "toy"

[[variants]]
backend = "toy"
quant = ["f32", "q8", "q4"]

[metrics.toy_xent]
prefixes = 30

[metrics.perplexity]
dataset = "corpus.txt"
ctx = 64
chunks = 8

[metrics.sanity]
max_tokens = 8
"""


@pytest.fixture(scope="module")
def plugin_site(toy_plugin_site: Path) -> Path:
    """The plugin, pip-installed once per session (tests/conftest.py)."""
    return toy_plugin_site


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("toy")
    words = ("the quick brown fox jumps over the lazy dog while a small cat sleeps in the "
             "warm sun and the river runs past the old mill ").split()
    text = " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(6000))
    (work / "corpus.txt").write_text(text)
    (work / "suite.toml").write_text(SUITE)
    return work


def _qbench(args: list[str], work: Path, site: Path | None, *, python: bool = False,
            **env: str) -> subprocess.CompletedProcess[str]:
    """``qbench ARGS`` (``python``: ``python ARGS``) with the plugin on the path."""
    environ = dict(os.environ, **env)
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(site) if site else "", environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable if python else QBENCH[0],
                           *([] if python else QBENCH[1:]), *args], cwd=work,
                          capture_output=True, text=True, env=environ, timeout=600)


def _records(folder: Path) -> dict[str, dict]:
    recs = [json.loads(p.read_text()) for p in folder.rglob("cells/*.json")]
    return {r["id"]: r for r in recs}


def test_nothing_under_qbench_names_the_plugin() -> None:
    hits = [p for p in (REPO / "qbench").rglob("*") if p.is_file() and p.suffix in
            (".py", ".html", ".json", ".toml") and "toy" in p.read_text(errors="ignore")]
    assert hits == []


def test_plugin_backend_and_metric_run_end_to_end(plugin_site: Path, workdir: Path) -> None:
    cache = workdir / "cache-a"
    # without the plugin, the suite is refused before anything runs, naming what is unknown
    bare = _qbench(["validate", "suite.toml"], workdir, None)
    assert bare.returncode == 1 and "unknown backend 'toy'" in bare.stderr + bare.stdout

    ok = _qbench(["validate", "suite.toml"], workdir, plugin_site)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    run = _qbench(["run", "suite.toml", "--out", "results-a", "--report-dir", "reports",
                   "--cache-dir", str(cache)], workdir, plugin_site)
    assert run.returncode == 0, run.stdout + run.stderr
    recs = _records(workdir / "results-a")
    for quant in ("f32", "q8", "q4"):
        for metric in ("toy_xent", "perplexity", "sanity", "footprint"):
            rec = recs[f"toy-model/toy/{quant}/{metric}"]
            assert rec["status"] == "ok", (rec["id"], rec["error"], rec.get("stderr_tail"))
    xent = {q: recs[f"toy-model/toy/{q}/toy_xent"]["values"]["xent"]["value"]
           for q in ("f32", "q8", "q4")}
    ppl = {q: recs[f"toy-model/toy/{q}/perplexity"]["values"]["ppl"]["value"]
           for q in ("f32", "q8", "q4")}
    # the built-in perplexity metric ran on the plugin's backend: coarser tables score worse
    assert ppl["f32"] < ppl["q4"] and ppl["q8"] < ppl["q4"]
    assert len(set(xent.values())) == 3
    # the footprint came from the plugin's own reader, the cell key from its library version
    assert recs["toy-model/toy/q4/footprint"]["values"]["bpw"]["value"] == 4.0
    assert all(r["metric_version"] == "1" for r in recs.values() if r["metric"] == "toy_xent")

    # the report shows the plugin metric's column, its figure against bits per weight and its
    # paired change vs the base (all declared in its Value; nothing under qbench/ names it)
    page = (workdir / "reports" / "toy.html").read_text()
    assert "toy cross-entropy (nats)" in page and f"{xent['q4']:.4g}" in page
    assert "Mean cross-entropy of each next byte" in page      # its methodology
    assert 'id="fig-bpw-toy_xent"' in page and "Toy cross-entropy vs bits per weight" in page
    assert 'id="fig-delta-toy_xent"' in page and "paired t on per-byte xent" in page

    per_byte = _qbench(["-c", "import qbench.results.frame as f, sys; "
                        "df = f.load_details('results-a', 'toy_xent'); "
                        "print(len(df), sorted(set(df['quant'])), sorted(set(df['value'])))"],
                       workdir, plugin_site, python=True)
    assert per_byte.returncode == 0, per_byte.stderr
    assert per_byte.stdout.split(" ", 1)[1].strip() == "['f32', 'q4', 'q8'] ['xent']"
    assert int(per_byte.stdout.split()[0]) >= 3 * 2

    export = _qbench(["export", "results-a"], workdir, plugin_site)
    rows = [json.loads(line) for line in export.stdout.splitlines()]
    assert {r["quant"] for r in rows if r["metric"] == "toy_xent"} == {"f32", "q8", "q4"}

    # compare: the same results pass; a drifted build regresses on the plugin metric's gate
    same = _qbench(["compare", "results-a/toy", "results-a/toy"], workdir, plugin_site)
    assert same.returncode == 0, same.stdout + same.stderr
    drifted = _qbench(["run", "suite.toml", "--out", "results-b", "--no-report",
                       "--cache-dir", str(workdir / "cache-b")], workdir, plugin_site,
                      TOY_DRIFT="3.0")
    assert drifted.returncode == 0, drifted.stdout + drifted.stderr
    cmp = _qbench(["compare", "results-a/toy", "results-b/toy", "--json"], workdir,
                  plugin_site)
    assert cmp.returncode == 2, cmp.stdout + cmp.stderr
    changes = json.loads(cmp.stdout)["changes"]
    regressed = {(c["metric"], c["value"], c["cell"].split("/")[-2]) for c in changes
                 if c["regression"]}
    assert ("toy_xent", "xent", "q4") in regressed          # the plugin metric's own gate
    [xq4] = [c for c in changes if c["value"] == "xent" and c["cell"].endswith("/q4/toy_xent")]
    assert xq4["test"].startswith("paired t on per-byte xent")   # paired, by its declaration
    assert ("perplexity", "ppl", "q4") in regressed
    assert not any(q == "f32" for _, _, q in regressed)      # the base did not drift

    # results of a plugin metric still report where the plugin is not installed
    again = _qbench(["report", "results-a", "--out", "reports-bare"], workdir, None)
    assert again.returncode == 0, again.stdout + again.stderr
