"""One worker process per variant, isolation per cell (issue 14 §1).

The cells run through real `qbench run` processes on the toy plugin's backend
(tests/plugins/qbench_toyplugin: a numpy bigram "model" that loads in milliseconds), so they
measure for real without an inference library; QBENCH_FAULT (qbench/run/faults.py) makes one
cell of a batch crash, fail or hang at its start. Memory windows are checked deterministically:
with a scripted RSS source for the sampler, and with the kernel's high-water mark for a cell that
allocates a lot followed by one that does not.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import psutil
import pytest

from qbench.run import peak
from qbench.run.batching import run_order
from qbench.run.control import ParentEnd, WorkerEnd
from qbench.run.sampler import _Sampler
from qbench.suite.config import load_suite
from qbench.suite.plan import PlanContext, expand
from conftest import run_toy_suite

REPO = Path(__file__).resolve().parent.parent
PATIENCE_S = 300          # only reached when something is broken
HANG_BOUND_S = 60         # the per-cell timeout of the hang test: every other cell's hang bound

SUITE = """
[suite]
name = "batch"

[defaults]
threads = 1
timeout_s = {timeout}

[[models]]
id = "toy-model"
source = "corpus.txt"
base = "f32"
base_backend = "toy"

[[variants]]
backend = "toy"
quant = {quants}

[metrics.footprint]
enabled = false
{metrics}
"""

THREE_CELLS = """
[metrics.sanity]
max_tokens = 8

[metrics.toy_xent]
prefixes = 10

[metrics.perplexity]
dataset = "corpus.txt"
ctx = 64
chunks = 4
"""


@pytest.fixture(scope="module")
def toy_site(toy_plugin_site: Path) -> Path:
    """The toy plugin, pip-installed once per session (tests/conftest.py)."""
    return toy_plugin_site


def run_suite(work: Path, site: Path, *, quants: list[str], metrics: str = THREE_CELLS,
              timeout: float = PATIENCE_S, fault: str = "") -> tuple[int, dict[str, dict]]:
    """`qbench run` on a toy suite in ``work``: (exit code, records by cell id)."""
    proc, recs = run_toy_suite(
        work, site, SUITE.format(timeout=timeout, quants=json.dumps(quants), metrics=metrics),
        env={"QBENCH_FAULT": fault}, timeout=PATIENCE_S * 3)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, recs


def log_of(work: Path, record: dict) -> str:
    return (work / "results" / "batch" / "logs" / f"{record['key']}.log").read_text()


def pid(record: dict) -> int:
    return record["timings"]["worker_pid"]


# --- whole runs -------------------------------------------------------------------------------


def test_a_crash_or_an_unexpected_error_ends_only_its_cell(toy_site, tmp_path):
    """f32: the middle cell segfaults; q8: it raises; q4: nothing goes wrong."""
    work = tmp_path / "w"
    code, recs = run_suite(work, toy_site, quants=["f32", "q8", "q4"],
                           fault="toy-model/toy/f32/toy_xent=segfault;"
                                 "toy-model/toy/q8/toy_xent=error")
    assert code == 2
    cell = {(r["variant"]["quant"], r["metric"]): r for r in recs.values()}
    assert len(cell) == 9

    first, crashed, third = (cell["f32", m] for m in ("sanity", "toy_xent", "perplexity"))
    assert first["status"] == "ok" and third["status"] == "ok"
    assert (crashed["status"], crashed["signal"]) == ("crashed", "SIGSEGV")
    assert crashed["error"].startswith("the cell process died of SIGSEGV")
    # its own log: its header, the fault, the stack, and nothing of the cell before it
    assert "Segmentation fault" in crashed["stderr_tail"]
    assert "injecting fault 'segfault' into toy-model/toy/f32/toy_xent" in crashed["stderr_tail"]
    crash_log = log_of(work, crashed)
    assert crash_log.startswith("qbench cell toy-model/toy/f32/toy_xent")
    assert "toy-model/toy/f32/sanity" not in crash_log
    assert "qbench cell toy-model/toy/f32/sanity" in log_of(work, first)
    assert "toy_xent" not in log_of(work, first)
    # the first cell and the crashed one shared a worker; the third ran in a fresh one
    assert pid(first) == pid(crashed) != pid(third)
    assert [r["timings"]["process_cell"] for r in (first, crashed, third)] == [1, 2, 1]
    assert third["memory"]["note"] is None          # first of its process: measured as ever

    failed = cell["q8", "toy_xent"]
    assert (failed["status"], failed["error"]) == ("failed", "RuntimeError: injected error")
    assert pid(cell["q8", "sanity"]) == pid(failed) != pid(cell["q8", "perplexity"])
    assert cell["q8", "perplexity"]["status"] == "ok"

    # q4: one worker, one load, in the cell that first needed the model
    q4 = [cell["q4", m] for m in ("sanity", "toy_xent", "perplexity")]
    assert {r["status"] for r in q4} == {"ok"}
    assert len({pid(r) for r in q4}) == 1
    assert len({pid(r) for r in recs.values()}) == 5     # f32 x2, q8 x2, q4 x1
    assert ["load_s" in r["timings"] for r in q4] == [True, False, False]
    assert [r["timings"]["process_cell"] for r in q4] == [1, 2, 3]
    assert q4[0]["memory"]["note"] is None
    for r in q4[1:]:
        assert "the variant's weights among them" in r["memory"]["note"]
    # the run record lists every cell once
    (manifest,) = (work / "results" / "batch" / "runs").glob("*.json")
    assert sorted(c["id"] for c in json.loads(manifest.read_text())["cells"]) == sorted(recs)


def test_a_hanging_cell_times_out_alone(toy_site, tmp_path):
    code, recs = run_suite(tmp_path / "w", toy_site, quants=["f32"], timeout=HANG_BOUND_S,
                           fault="toy-model/toy/f32/toy_xent=hang")
    assert code == 2
    first, hung, third = (recs[f"toy-model/toy/f32/{m}"]
                          for m in ("sanity", "toy_xent", "perplexity"))
    assert first["status"] == "ok" and third["status"] == "ok"
    assert (hung["status"], hung["signal"]) == ("timeout", "SIGKILL")
    assert hung["error"] == f"timed out after {HANG_BOUND_S} s; its process tree was killed"
    assert "injecting fault 'hang'" in hung["stderr_tail"]
    assert pid(first) == pid(hung) != pid(third)


@pytest.mark.skipif(not peak.reset_peak_rss(), reason="this system refuses to reset the peak RSS "
                    "(/proc/self/clear_refs)")
def test_memory_is_measured_per_cell(toy_site, tmp_path):
    """A cell that allocates 256 MiB, then one that allocates nothing, in the same worker: the
    second's peak is its own (the kernel's mark was reset), not the first's."""
    metrics = ("[metrics.sanity]\nenabled = false\n[metrics.toy_hog]\nmb = 256\n"
               "[metrics.toy_xent]\nprefixes = 10\n")
    code, recs = run_suite(tmp_path / "w", toy_site, quants=["f32"], metrics=metrics)
    assert code == 0, recs
    hog, after = recs["toy-model/toy/f32/toy_hog"], recs["toy-model/toy/f32/toy_xent"]
    assert pid(hog) == pid(after)
    assert [hog["timings"]["process_cell"], after["timings"]["process_cell"]] == [1, 2]
    assert hog["memory"]["peak_rss_mb"] >= 256
    assert after["memory"]["peak_rss_mb"] < hog["memory"]["peak_rss_mb"] - 200
    assert after["memory"]["note"].startswith("cell 2 of its worker process")


# --- the parts -------------------------------------------------------------------------------


def test_sampler_opens_a_window_per_cell(tmp_path):
    """The sampler reads the worker's boundaries itself and acknowledges each "begin" only
    after opening the cell's window: a scripted RSS source (high during cell 0, low during cell
    1) gives each cell its own peak. Every step waits on an event, never on a delay."""
    channel = ParentEnd()
    events_fd, ack_fd = channel.child_fds()
    worker = WorkerEnd(events_fd, ack_fd)
    level = {"rss": 100}
    sampled = threading.Event()

    def rss(procs: list[psutil.Process]) -> int:
        sampled.set()
        return level["rss"]

    sampler = _Sampler(os.getpid(), interval=0.01, channel=channel, rss=rss)
    sampler.start()
    try:
        worker.begin(0)                       # returns once the window is open
        assert sampler.events.get(timeout=PATIENCE_S).kind == "begin"
        level["rss"] = 900
        sampled.clear()
        assert sampled.wait(PATIENCE_S)       # a sample saw cell 0's peak
        worker.end(0)
        end0 = sampler.events.get(timeout=PATIENCE_S)
        level["rss"] = 200
        worker.begin(1)
        assert sampler.events.get(timeout=PATIENCE_S).kind == "begin"
        sampled.clear()
        assert sampled.wait(PATIENCE_S)
        worker.end(1)
        end1 = sampler.events.get(timeout=PATIENCE_S)
        os.close(events_fd)                   # the worker's exit: end of file
        os.close(ack_fd)
        assert sampler.events.get(timeout=PATIENCE_S).kind == "eof"
    finally:
        sampler.stop()
        channel.close()
    assert (end0.kind, end0.index, end1.kind, end1.index) == ("end", 0, "end", 1)
    assert end0.window.peak_rss == 900
    assert end1.window.peak_rss == 200 and end1.window.first_rss == 200


def test_run_order_puts_loading_cells_after_the_footprint_and_the_base_users_last(tmp_path,
                                                                                 data_dir):
    suite_file = tmp_path / "suite.toml"
    suite_file.write_text("""
[suite]
name = "order"
[[models]]
id = "m"
source = "hf:example/m-GGUF/m-f16.gguf"
base = "F16"
[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0"]
[metrics.perplexity]
dataset = "wikitext-2"
[metrics.kld]
[metrics.mmlu]
[metrics.speed]
""")
    suite = load_suite(suite_file)
    cells = expand(suite, PlanContext(base_dir=tmp_path, data_dir=data_dir,
                                      cache_dir=tmp_path / "cache"))
    ordered = run_order(cells)
    assert sorted(c.key for c in ordered) == sorted(c.key for c in cells)
    per_variant = [(c.variant.quant, c.metric) for c in ordered]
    expected = ["footprint", "speed", "sanity", "mmlu", "perplexity", "kld"]
    assert per_variant == [("F16", m) for m in expected] + [("Q8_0", m) for m in expected]
    # only consecutive cells of one variant move: a narrowed plan keeps its variant order
    assert [c.variant.quant for c in run_order(cells[::-1])] == ["Q8_0"] * 6 + ["F16"] * 6


def test_a_crash_is_diagnosed_with_the_banner_an_earlier_cell_logged(tmp_path, monkeypatch):
    """llama.cpp prints its build (system info) when it loads, into the log of the cell that
    loaded it; a later cell of the same worker that crashes is still explained (AMX here)."""
    from qbench.host import buildflags
    from qbench.run.child import CellRun, MemoryWindow, _outcome
    from qbench.run.job import Job
    monkeypatch.setattr(buildflags, "has_amx", lambda: True)
    job = Job(cell={"id": "m/llama.cpp/Q4_K_M/sanity", "key": "k",
                    "variant": {"backend": "llama.cpp"}}, base_dir=".", cache_dir=".")
    logs = [tmp_path / "speed.log", tmp_path / "sanity.log"]
    logs[0].write_text("qbench cell m/llama.cpp/Q4_K_M/speed key j\n"
                       "llama.cpp system info: CPU : AVX2 = 1 | AMX_INT8 = 1 |\n")
    logs[1].write_text("qbench cell m/llama.cpp/Q4_K_M/sanity key k\n"
                       "Fatal Python error: Segmentation fault\n")
    runs = [CellRun(job, logs[0], 60), CellRun(job, logs[1], 60)]

    def crash(position: int) -> str:
        out = _outcome(runs, position, tmp_path / "no-result.json", window=MemoryWindow(),
                       wall=1.0, memory_limit_mb=0, pid=1, returncode=-11)
        assert (out.status, out.signal) == ("crashed", "SIGSEGV")
        return out.error

    assert crash(1).endswith(buildflags.AMX_HINT)
    assert crash(1).startswith("the cell process died of SIGSEGV")
    logs[0].write_text("qbench cell m/llama.cpp/Q4_K_M/speed key j\n")   # no banner anywhere
    assert crash(1) == "the cell process died of SIGSEGV"


def test_stopping_mid_batch_ends_the_worker(tmp_path, monkeypatch):
    """The consumer stops (Ctrl-C in the runner, a closed generator) while the worker goes on
    to its next cell: the worker's process tree is ended before control returns."""
    from qbench.run.child import CellRun, run_cells
    from qbench.run.job import Job
    monkeypatch.setenv("QBENCH_FAULT", "*/sanity=hang")

    def job(metric: str) -> Job:
        return Job(cell={"id": f"m/llama.cpp/F16/{metric}", "key": metric, "metric": metric,
                         "model": {"id": "m", "source": str(tmp_path / "missing.gguf")},
                         "variant": {"backend": "llama.cpp", "quant": "F16", "is_base": True},
                         "options": {}}, base_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))

    runs = [CellRun(job(m), tmp_path / f"{m}.log", PATIENCE_S) for m in ("speed", "sanity")]
    cells = run_cells(runs)
    index, first = next(cells)        # a failure qbench understands: the worker goes on
    assert index == 0 and first.status == "failed"
    assert first.error.startswith("model file not found")
    worker = psutil.Process(first.result["timings"]["worker_pid"])
    cells.close()
    assert not worker.is_running()


def test_session_keeps_what_a_variant_needs_between_cells():
    """Prepared once (a user error remembered), loaded once, lent but never closed by a cell,
    reset between cells (a backend whose reset fails is reloaded), closed at the end."""
    from qbench.errors import SourceError
    from qbench.run.session import Borrowed, Session

    class Fake:
        def __init__(self, name: str, fail_end: bool = False) -> None:
            self.name, self.fail_end, self.ends, self.closed = name, fail_end, 0, False

        def end_cell(self) -> None:
            self.ends += 1
            if self.fail_end:
                raise RuntimeError("reset failed")

        def close(self) -> None:
            self.closed = True

    session = Session("v")
    calls: list[str] = []

    def prepare() -> str:
        calls.append("prepare")
        raise SourceError("model file not found: m.gguf")

    for _ in range(2):
        with pytest.raises(SourceError, match="model file not found"):
            session.once("variant", prepare)
    assert calls == ["prepare"]

    loads: list[Fake] = []

    def load(name: str, **kw: bool):
        return lambda: loads.append(Fake(name, **kw)) or loads[-1]

    variant = session.loaded("variant", load("variant"))
    assert session.loaded("variant", load("variant")) is variant and len(loads) == 1
    base = Borrowed(session.loaded("base", load("base", fail_end=True)))
    base.close()                              # a metric "closing" the base it borrowed
    assert base.name == "base" and not loads[1].closed
    assert session.held() == ["base", "variant"]
    session.end_cell()
    assert variant.ends == 1 and loads[1].closed and session.held() == ["variant"]
    session.close()
    assert variant.closed and session.held() == []


def test_a_cell_that_built_the_variants_file_hands_the_next_cells_a_fresh_process(
        tmp_path, monkeypatch):
    """An AWQ build left ~700 MiB of heap that the next cell (speed) counted as its own: a cell
    during which this process built a file or an importance matrix ends its worker; one that
    found the file cached does not, nor does a build another process made meanwhile (the next
    variant prepared ahead: its heap is not in this process)."""
    from qbench.host import cache as host_cache
    from qbench.host.cache import folder
    from qbench.run import worker
    from qbench.run.job import Job

    cache = tmp_path / "cache"
    job = Job(cell={"id": "m/transformers/awq-w4g64/footprint", "key": "k",
                    "metric": "footprint", "variant": {"backend": "transformers"}},
              base_dir=str(tmp_path), cache_dir=str(cache))
    builds: list[tuple[str, str]] = []
    elsewhere: list[Path] = []

    def execute(_job: Job) -> dict:
        for kind, name in builds:
            host_cache.note_built(kind, name)
        for path in elsewhere:
            path.mkdir(parents=True, exist_ok=True)
        return {"status": "ok", "values": {}}

    monkeypatch.setattr(worker, "execute", execute)
    monkeypatch.setattr(host_cache, "_built_here", [])
    builds[:] = [("artifacts", "0123abcd")]
    result, fit = worker.measure(job)
    assert result["status"] == "ok" and fit is False          # built here: next cells elsewhere
    builds[:] = []
    assert worker.measure(job, position=1)[1] is True          # cached now: the worker goes on
    builds[:] = [("imatrix", "4567ef")]
    assert worker.measure(job, position=1)[1] is False         # an importance matrix too
    builds[:] = []
    elsewhere[:] = [folder(cache, "artifacts") / "89ab"]
    assert worker.measure(job, position=1)[1] is True          # another process's build


def test_the_build_functions_record_a_miss_and_not_a_hit(tmp_path, monkeypatch):
    """What the worker's check reads: the GGUF cache records the build it made, once."""
    from qbench.host import cache as host_cache
    from qbench.quantize import gguf

    monkeypatch.setattr(host_cache, "_built_here", [])
    monkeypatch.setattr(gguf, "inspect_gguf", lambda path: {"tensors": []})

    def build(tmp: Path) -> None:
        tmp.write_bytes(b"GGUF fake")

    recipe = {"output_type": "Q4_0", "input_sha256": "ab"}
    first = gguf._cached(tmp_path, recipe, build)
    again = gguf._cached(tmp_path, recipe, build)
    assert first.path == again.path and first.path.read_bytes() == b"GGUF fake"
    assert len(host_cache.built_here()) == 1
    assert host_cache.built_here()[0].startswith("artifacts/")

    def broken(tmp: Path) -> None:      # a failed build leaves its heap behind all the same
        raise RuntimeError("llama_model_quantize failed")

    with pytest.raises(RuntimeError):
        gguf._cached(tmp_path, recipe | {"output_type": "Q2_K"}, broken)
    assert len(host_cache.built_here()) == 2
