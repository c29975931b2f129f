"""Preparing the next variant while this one's accuracy cells run (qbench.run.prefetch).

The executor's rule is checked with a scripted worker and a recording helper: when the helper
starts (never beside a hardware-bound cell), when it must have ended (before the next
variant's worker), where it does not run (a GPU cell, a process per cell), that Ctrl-C ends it,
and what the records say about it. The whole path runs for real on the toy plugin's backend:
the helper process fills the cache, and the measured values are those of a run without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qbench.results.schema import Outcome
from qbench.run import executors
from qbench.run.executors import LocalExecutor, WorkItem
from qbench.run.job import Job
from conftest import run_toy_suite

REPO = Path(__file__).resolve().parent.parent


def item(variant: str, metric: str, device: str = "cpu") -> WorkItem:
    cell_id = f"m/llama.cpp/{variant}/{metric}"
    cell = SimpleNamespace(model="m", model_sha256="ab", variant=variant, is_base=False,
                           metric=metric, id=cell_id)
    job = Job(cell={"id": cell_id, "key": cell_id, "metric": metric, "run": {"device": device}},
              base_dir=".", cache_dir=".")
    return WorkItem(cell, job, Path(f"/nonexistent/{variant}-{metric}.log"), 100.0, 0)


class Script:
    """A scripted worker (outcomes in order) and a recording helper, sharing one event log."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_start: bool = False) -> None:
        self.events: list[str] = []
        self.limits: list[int] = []
        script = self

        def run_cells(runs: list[Any], memory_limit_mb: int = 0):
            for i, run in enumerate(runs):
                script.events.append(f"done {run.job.cell_id.split('/', 2)[2]}")
                yield i, Outcome(status="ok", result={"timings": {}})

        class Helper:
            def __init__(self, job: Job, log_path: Path, **_: Any) -> None:
                if fail_start:
                    raise OSError("Resource temporarily unavailable")
                self.cell_id = job.cell_id
                script.limits.append(job.memory_limit_mb)
                script.events.append(f"start {job.cell_id.split('/')[2]}")

            def running(self) -> bool:
                return True

            def finish(self, timeout_s: float) -> dict:
                script.events.append(f"finish {self.cell_id.split('/')[2]}")
                return {"exit": 0, "prepare_s": 1.5, "waited_s": 0.0}

            def cancel(self) -> None:
                script.events.append(f"cancel {self.cell_id.split('/')[2]}")

        monkeypatch.setattr(executors, "run_cells", run_cells)
        monkeypatch.setattr(executors, "Prefetch", Helper)


def test_the_next_variant_is_prepared_after_the_timed_cells_and_ready_before_its_worker(
        monkeypatch):
    script = Script(monkeypatch)
    items = [item("A", m) for m in ("footprint", "speed", "perplexity", "mmlu")]
    items += [item("B", m) for m in ("footprint", "speed", "perplexity")]
    items += [item("C", m) for m in ("footprint", "perplexity")]
    outcomes = list(LocalExecutor().run(items))
    assert script.events == [
        "done A/footprint", "done A/speed", "start B",           # speed ran alone
        "done A/perplexity", "done A/mmlu", "finish B",          # B's helper ended first
        "done B/footprint", "done B/speed", "start C",
        "done B/perplexity", "finish C",
        "done C/footprint", "done C/perplexity"]                 # nothing after the last
    timings = {it.cell.id.split("/", 2)[2]: out.result["timings"] for it, out in outcomes}
    assert "alongside" not in timings["A/speed"] and "alongside" not in timings["A/footprint"]
    assert timings["A/perplexity"]["alongside"] == "preparing m/llama.cpp/B/footprint's variant ahead"
    assert "alongside" in timings["A/mmlu"] and "alongside" in timings["B/perplexity"]
    assert timings["B/footprint"]["prepared_ahead"]["exit"] == 0
    assert "prepared_ahead" not in timings["B/speed"] and "prepared_ahead" not in timings["A/footprint"]


def test_no_helper_beside_a_gpu_cell_nor_with_a_process_per_cell_nor_when_asked(monkeypatch):
    script = Script(monkeypatch)
    gpu = [item("A", m, "cuda") for m in ("footprint", "perplexity")]
    gpu += [item("B", m, "cuda") for m in ("footprint", "perplexity")]
    list(LocalExecutor().run(gpu))
    cpu = [item(v, m) for v in ("A", "B") for m in ("footprint", "perplexity")]
    list(LocalExecutor(batch=False).run(cpu))
    list(LocalExecutor(prepare_ahead=False).run(cpu))
    assert not any(e.startswith("start") for e in script.events)
    # a variant whose last cell is hardware-bound leaves nothing to overlap
    list(LocalExecutor().run([item("A", "footprint"), item("A", "speed"), item("B", "speed")]))
    assert not any(e.startswith("start") for e in script.events)


def test_a_helper_that_cannot_start_costs_nothing_and_gets_the_memory_cap(monkeypatch):
    items = [item(v, m) for v in ("A", "B") for m in ("footprint", "perplexity")]
    script = Script(monkeypatch, fail_start=True)
    out = list(LocalExecutor().run(items))
    assert [o.status for _, o in out] == ["ok"] * 4             # every cell ran and reported
    assert not any(e.startswith(("start", "finish")) for e in script.events)
    capped = [WorkItem(i.cell, i.job, i.log_path, i.timeout_s, 2048) for i in items]
    script = Script(monkeypatch)
    list(LocalExecutor().run(capped))
    assert script.limits == [2048]           # the helper's build is capped like the worker's


def test_stopping_the_run_ends_the_helper(monkeypatch):
    script = Script(monkeypatch)
    items = [item("A", m) for m in ("footprint", "perplexity", "mmlu")] + [item("B", "footprint")]
    run = LocalExecutor().run(items)
    next(run)                     # A/footprint: the helper for B starts after it
    run.close()                   # Ctrl-C in the runner
    assert script.events[-2:] == ["start B", "cancel B"]


SUITE = """
[suite]
name = "ahead"

[defaults]
threads = 1
device = "cpu"

[[models]]
id = "toy-model"
source = "corpus.txt"
base = "f32"
base_backend = "toy"

[[variants]]
backend = "toy"
quant = ["f32", "q8", "q4"]

[metrics.footprint]
[metrics.toy_xent]
prefixes = 10
[metrics.perplexity]
dataset = "corpus.txt"
ctx = 64
chunks = 4
"""


def run_toy(work: Path, site: Path, *extra: str) -> tuple[dict[str, dict], list[dict]]:
    """`qbench run` on the toy suite: (records by cell id, the prepares the backend saw)."""
    trace = work / "prepares.jsonl"
    proc, recs = run_toy_suite(work, site, SUITE, *extra, env={"TOY_PREPARE_TRACE": str(trace)},
                               timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recs, [json.loads(line) for line in trace.read_text().splitlines()]


def test_a_real_run_prepares_ahead_in_a_helper_and_measures_the_same(toy_plugin_site, tmp_path):
    recs, prepares = run_toy(tmp_path / "ahead", toy_plugin_site)
    plain, _ = run_toy(tmp_path / "plain", toy_plugin_site, "--no-prepare-ahead")
    assert set(recs) == set(plain) and len(recs) == 12      # 4 metrics (sanity on) x 3
    assert all(r["status"] == "ok" for r in recs.values())
    for cid, rec in recs.items():               # the helper changes when, never what
        measured = {k: v for k, v in rec["values"].items() if not k.endswith("_per_s")}
        assert measured and measured == {k: v for k, v in plain[cid]["values"].items()
                                         if not k.endswith("_per_s")}, cid
    workers = {r["timings"]["worker_pid"] for r in recs.values()}
    by_quant: dict[str, set[int]] = {}
    for p in prepares:
        by_quant.setdefault(p["quant"], set()).add(p["pid"])
    # q8 and q4 were each prepared once by a process that ran no cell: the helper
    for quant in ("q8", "q4"):
        assert by_quant[quant] - workers, (quant, by_quant, workers)
    assert not by_quant["f32"] - workers            # the first variant has nobody before it
    helpers = [p for p in prepares if p["pid"] not in workers]
    assert {p["nice"] for p in helpers} == {19}
    assert {p["nice"] for p in prepares if p["pid"] in workers} == {os.nice(0)}
    if Path("/proc/self/autogroup").exists():     # the helper's session weighs little too
        assert all(p["autogroup"].endswith("nice 19") for p in helpers), helpers
    first = {r["variant"]["quant"]: r for r in recs.values() if r["metric"] == "footprint"}
    ahead = first["q8"]["timings"]["prepared_ahead"]
    assert ahead["exit"] == 0 and ahead["prepare_s"] >= 0 and ahead["waited_s"] >= 0
    assert "prepared_ahead" not in first["f32"]["timings"]
    logs = {p.stem for p in (tmp_path / "ahead" / "results").rglob("prepare-ahead/*.log")}
    assert logs == {first["q8"]["key"], first["q4"]["key"]}     # the helpers' own logs
