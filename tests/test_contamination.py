"""Timed windows that know when other work disturbed them (issue 24 §2).

The classification and the re-measuring run on scripted counter snapshots: no test here
depends on how fast this machine is. One test runs a real busy process beside a real window and
checks that the window sees it (the only thing it asserts is that CPU time a hog burnt shows up
as other processes' CPU time, which holds however loaded the machine is; the window stays open
until the hog has burnt enough CPU, since under load it may get little of a core).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qbench.host import contamination as cm
from qbench.host.contamination import Snapshot, Thresholds, WindowMeter
from qbench.metrics import speed
from qbench.metrics.context import CellContext
from qbench.options import from_table


def snap(at: float, busy: float, own: float, steal: float = 0.0, load1: float | None = 0.5,
         freq: float | None = 2400.0) -> Snapshot:
    return Snapshot(at=at, wall=1000.0 + at, busy_s=busy, steal_s=steal, own_s=own,
                    load1=load1, freq_mhz=freq)


class Script:
    """A sampler returning scripted snapshots: each window is (seconds, own CPU, others' CPU,
    steal), laid end to end."""

    def __init__(self, windows: list[tuple[float, float, float, float]]) -> None:
        self.snaps: list[Snapshot] = []
        at = busy = own = steal = 0.0
        for seconds, own_s, other_s, steal_s in windows:
            self.snaps.append(snap(at, busy, own, steal))
            at, busy, own, steal = (at + seconds, busy + own_s + other_s, own + own_s,
                                    steal + steal_s)
            self.snaps.append(snap(at, busy, own, steal))
        self._it: Iterator[Snapshot] = iter(self.snaps)

    def __call__(self) -> Snapshot:
        return next(self._it)


def test_window_counts_what_others_used() -> None:
    w = cm.window(snap(0.0, 10.0, 4.0, steal=1.0), snap(2.0, 14.5, 7.0, steal=1.1, load1=1.7))
    assert w["seconds"] == 2.0
    assert w["other_cpu_s"] == pytest.approx(1.5)        # 4.5 busy - 3.0 own
    assert w["steal_s"] == pytest.approx(0.1)
    assert w["load1"] == 1.7 and w["freq_mhz"] == 2400.0
    assert (w["start"], w["end"]) == (1000.0, 1002.0)
    # counters read at different instants can make "others" slightly negative: never below 0
    assert cm.window(snap(0, 10, 4), snap(1, 10.98, 5.0))["other_cpu_s"] == 0.0


@pytest.mark.parametrize("seconds, other, steal, disturbed", [
    (1.0, 0.05, 0.0, False),     # 5 % of a core: background
    (1.0, 0.15, 0.0, True),      # 15 %: over the 10 % threshold
    (1.0, 0.0, 0.2, True),       # steal over its threshold
    (0.2, 0.025, 0.0, False),    # 12.5 % but under 3 clock ticks: rounding, not work
    (0.2, 0.04, 0.0, True),      # 20 % and over 3 ticks
    (10.0, 0.9, 0.0, False),     # 9 % over a long window
])
def test_a_window_is_disturbed_over_the_thresholds(seconds: float, other: float, steal: float,
                                                   disturbed: bool) -> None:
    meter = WindowMeter(Script([(seconds, seconds, other, steal)]))
    meter.begin()
    w = meter.end(test="tg", rep=0, depth=0)
    assert w["disturbed"] is disturbed
    assert (w["test"], w["rep"], w["depth"]) == ("tg", 0, 0)
    assert bool(cm.window_reasons(w)) is disturbed


def test_thresholds_are_parameters() -> None:
    w = {"seconds": 1.0, "other_cpu_s": 0.15, "steal_s": 0.0}
    assert cm.window_reasons(w, Thresholds(other_share=0.2)) == []
    assert "15 % of a core" in cm.window_reasons(w)[0]


def test_cv_above_one_is_unfit_whatever_the_windows() -> None:
    quiet = [{"seconds": 1.0, "other_cpu_s": 0.0, "steal_s": 0.0, "disturbed": False}] * 3
    assert cm.round_reasons([100.0, 101.0, 99.0], quiet) == []
    why = cm.round_reasons([1.0, 1.0, 200.0], quiet)
    assert len(why) == 1 and "coefficient of variation 1.7" in why[0]


def rounds_of(*plans: list[tuple[float, float, float, float]]):
    """A run_round that plays one scripted round per call: each window (seconds, own, other,
    steal); the samples are tokens/s of a 100-token test."""
    calls = iter(plans)

    def run_round() -> tuple[list[float], list[dict[str, Any]], Any]:
        plan = next(calls)
        meter = WindowMeter(Script(plan))
        samples, wins = [], []
        for rep, (seconds, *_) in enumerate(plan):
            meter.begin()
            wins.append(meter.end(test="tg", rep=rep, depth=0))
            samples.append(100 / seconds)
        return samples, wins, len(plan)
    return run_round


QUIET = [(1.0, 2.0, 0.01, 0.0)] * 3
HOGGED = [(2.0, 2.0, 1.9, 0.0)] * 3
ONE_BAD = [(1.0, 2.0, 0.01, 0.0), (1.5, 2.0, 0.8, 0.0), (1.0, 2.0, 0.01, 0.0)]


def test_a_fit_first_round_is_measured_once() -> None:
    pauses: list[int] = []
    fit = cm.measure_until_fit(rounds_of(QUIET), pause=pauses.append)
    assert fit.reliable and fit.rounds == 1 and pauses == [] and len(fit.windows) == 3
    assert all(w["kept"] and w["round"] == 1 for w in fit.windows)


def test_a_disturbed_round_is_measured_again_and_the_fit_one_kept() -> None:
    pauses: list[int] = []
    fit = cm.measure_until_fit(rounds_of(HOGGED, ONE_BAD, QUIET), pause=pauses.append)
    assert fit.reliable and fit.rounds == 3 and pauses == [1, 2]
    assert fit.samples == [100.0, 100.0, 100.0]
    assert [w["round"] for w in fit.windows if w["kept"]] == [3, 3, 3]
    assert len(fit.windows) == 9 and sum(w["disturbed"] for w in fit.windows) == 4


def test_still_disturbed_after_the_last_round_says_why() -> None:
    fit = cm.measure_until_fit(rounds_of(HOGGED, ONE_BAD, HOGGED), pause=lambda r: None)
    assert not fit.reliable and fit.rounds == 3
    # the least disturbed round is kept
    assert [w["round"] for w in fit.windows if w["kept"]] == [2, 2, 2]
    assert fit.samples == pytest.approx([100.0, 100 / 1.5, 100.0])
    assert fit.reasons == ["1 of 3 timed windows disturbed (other processes up to 53 % of a "
                           "core, steal up to 0 %; thresholds 10 % and 10 %), still after 3 "
                           "rounds"]


def test_rounds_are_bounded() -> None:
    played = []

    def always_bad() -> tuple[list[float], list[dict[str, Any]], Any]:
        played.append(1)
        return rounds_of(HOGGED)()

    fit = cm.measure_until_fit(always_bad, max_rounds=2, pause=lambda r: None)
    assert len(played) == 2 and fit.rounds == 2 and not fit.reliable
    with pytest.raises(ValueError, match="max_rounds"):
        cm.measure_until_fit(always_bad, max_rounds=0)


# -- the speed metric, on a fake backend and scripted windows --------------------------------
class Backend:
    n_vocab, bos_id, add_bos, n_batch, device = 100, 1, True, 64, "cpu"

    def __init__(self) -> None:
        self.decoded = 0

    def reset(self, n_ctx: int | None = None) -> None:
        pass

    def decode_tokens(self, tokens: list[int], n_batch: int) -> None:
        self.decoded += len(tokens)

    def close(self) -> None:
        pass


class ScriptedMeter:
    """WindowMeter's interface; window i of the cell is disturbed when i is in ``bad``."""

    def __init__(self, bad: set[int]) -> None:
        self.bad, self.i = bad, 0

    def begin(self) -> None:
        pass

    def end(self, **labels: Any) -> dict[str, Any]:
        other = 0.9 if self.i in self.bad else 0.0
        self.i += 1
        return labels | {"seconds": 1.0, "other_cpu_s": other, "steal_s": 0.0, "load1": 0.3,
                         "freq_mhz": None, "start": float(self.i), "end": self.i + 0.5,
                         "disturbed": other > 0}


def run_speed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: set[int],
              **options: Any) -> tuple[dict[str, Any], Backend]:
    backend = Backend()
    monkeypatch.setattr(speed, "_meter", lambda: ScriptedMeter(bad))
    monkeypatch.setattr(cm.time, "sleep", lambda s: None)      # the pause between rounds
    ctx = CellContext(cell_id="m/fake/x/speed", model_id="m", artifact_path=tmp_path / "m",
                      artifact={}, base_dir=tmp_path, data_dir=None, cache_dir=tmp_path,
                      is_base=True, _load=lambda: backend)
    opts = from_table(speed.Options, {"prompt_tokens": 16, "gen_tokens": 4, "repetitions": 3,
                                      "roofline": False, **options}, file="t", key="speed")
    try:
        return speed.run(ctx, opts), backend
    finally:
        ctx.close()


def test_speed_result_carries_its_fitness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    out, backend = run_speed(tmp_path, monkeypatch, bad=set())
    fitness = out["fitness"]
    assert fitness["reliable"] is True and fitness["reasons"] == [] and fitness["rounds"] == 1
    assert [(w["test"], w["rep"]) for w in fitness["windows"]] == [
        ("pp", 0), ("pp", 1), ("pp", 2), ("tg", 0), ("tg", 1), ("tg", 2)]
    assert {"other_cpu_s", "load1", "steal_s", "freq_mhz"} <= set(fitness["windows"][0])
    # warm-ups (16 + 1 tokens) and one round of each: nothing measured again
    assert backend.decoded == 16 + 3 * 16 + 1 + 3 * 4


def test_speed_measures_a_disturbed_test_again(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # the pp round's second window is disturbed, its second round is quiet; tg is quiet
    out, backend = run_speed(tmp_path, monkeypatch, bad={1})
    fitness = out["fitness"]
    assert fitness["reliable"] is True and fitness["rounds"] == 2
    assert backend.decoded == 16 + 6 * 16 + 1 + 3 * 4
    assert len(fitness["windows"]) == 9
    assert [w["round"] for w in fitness["windows"] if w["test"] == "pp" and w["kept"]] == [2] * 3
    assert out["values"]["pp_tokens_per_s"]["n"] == 3


def test_speed_says_unreliable_after_its_rounds(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # every tg window of every round disturbed (windows 3.. are tg's)
    out, _ = run_speed(tmp_path, monkeypatch, bad=set(range(3, 100)), max_rounds=2)
    fitness = out["fitness"]
    assert fitness["reliable"] is False and fitness["rounds"] == 2
    assert len(fitness["reasons"]) == 1 and fitness["reasons"][0].startswith(
        "tg: 3 of 3 timed windows disturbed")
    assert fitness["reasons"][0].endswith("still after 2 rounds")
    assert out["values"]["tg_tokens_per_s"]["n"] == 3      # the figures are still stored


def test_max_rounds_is_validated() -> None:
    from qbench.errors import ConfigError
    with pytest.raises(ConfigError, match="max_rounds"):
        from_table(speed.Options, {"max_rounds": 0}, file="s.toml", key="metrics.speed")


# -- a real busy process, a real window ---------------------------------------------------------
HOG = """
import sys, time
print("spinning", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


def hog_cpu(pid: int) -> float:
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def wait_until_burnt(pid: int, since: float, cpu_s: float, limit_s: float = 60.0) -> float:
    """Sleep until the hog has burnt ``cpu_s`` of CPU since ``since`` (on a loaded machine it
    gets less than a core, so a fixed window may see almost nothing); its CPU time then."""
    end = time.monotonic() + limit_s
    while (burnt := hog_cpu(pid) - since) < cpu_s and time.monotonic() < end:
        time.sleep(0.05)
    return burnt


def start_hog() -> subprocess.Popen[str]:
    hog = subprocess.Popen([sys.executable, "-c", HOG, "60"], stdout=subprocess.PIPE, text=True)
    assert hog.stdout is not None and hog.stdout.readline().strip() == "spinning"
    return hog


def test_a_busy_process_beside_the_window_disturbs_it() -> None:
    import psutil
    hog = start_hog()
    try:
        # the meter of a process that is not the hog's parent: the test's own process tree
        # minus the hog is what a speed cell sees when another program spins
        meter = WindowMeter(lambda: cm.snapshot(NotMyChildren(psutil.Process(), hog.pid)))
        before = hog_cpu(hog.pid)
        meter.begin()
        wait_until_burnt(hog.pid, before, 0.3)       # this process does (almost) nothing
        w = meter.end(test="tg", rep=0)
        burnt = hog_cpu(hog.pid) - before
    finally:
        hog.kill()
        hog.wait()
    # whatever else ran on the machine, the hog's CPU time in the window counts as others'
    # (/proc/stat counts in 10 ms ticks: a few ticks of slack)
    assert burnt > 0.2, f"the hog ran only {burnt:.2f} s in 60 s"
    assert w["other_cpu_s"] >= burnt - 0.05
    assert w["disturbed"]


def test_the_process_tree_own_cpu_includes_its_children() -> None:
    import psutil
    me = psutil.Process()
    hog = start_hog()
    try:
        t0, before = cm._own_cpu_s(me), hog_cpu(hog.pid)
        wait_until_burnt(hog.pid, before, 0.2)
        own, burnt = cm._own_cpu_s(me) - t0, hog_cpu(hog.pid) - before
    finally:
        hog.kill()
        hog.wait()
    # a child's work is this tree's, not others' (read a moment apart: a few 10 ms ticks of
    # slack; without the children, own would be ~0)
    assert burnt > 0.05 and own >= burnt - 0.03


class NotMyChildren:
    """psutil.Process of this process, with one child left out of its tree."""

    def __init__(self, proc: Any, hidden: int) -> None:
        self.proc, self.hidden = proc, hidden

    def cpu_times(self) -> Any:
        return self.proc.cpu_times()

    def children(self, recursive: bool = False) -> list[Any]:
        return [c for c in self.proc.children(recursive=recursive) if c.pid != self.hidden]
