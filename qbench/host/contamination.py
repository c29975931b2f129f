"""Whether a timed window was disturbed by other work on the machine, and measuring again.

The machine lock (qbench.host.machine_lock) keeps qbench's own cells apart; anything else
running on the machine (a compiler, a test suite, another user's job, a noisy VM neighbour) is
seen only here. Over each timed window this reads, before and after, the whole machine's busy
CPU time, this process tree's CPU time, the hypervisor's steal time, the 1-minute load average
and the CPU clock where the system exposes it. What the rest of the machine used is the
difference: other_cpu_s = machine busy - own.

A window is **disturbed** when other processes used more than ``other_share`` of one core over
it, or steal took more than ``steal_share`` of one core. Why 10 % of one core: a speed cell
normally runs a thread per core, and ggml's threads meet at a barrier after every operation,
so one descheduled thread stalls them all: at niceness 0 a helper beside a perplexity pass
made it 2.4x slower (qbench/run/prefetch.py). 10 % of a core taken thus costs a 2-core
measurement about 5 % or more, the size of the regressions the gate must see; below it sit the
machine's own background (kernel threads, qbench's own memory sampler in the parent, about 1 %
of a core). Both /proc/stat and process times count in clock ticks (10 ms), so a window where
others used under ``min_cpu_s`` (3 ticks) is never called disturbed: that is rounding, not
work. A set of repetitions whose coefficient of variation exceeds ``max_cv`` (1: the sd larger
than the mean) is unfit whatever the windows say.

:func:`measure_until_fit` measures a test again (up to ``max_rounds`` rounds, pausing between
them for a transient disturbance to pass) until a round is fit, keeps the best round, and
says why when none was fit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil


@dataclass(frozen=True)
class Snapshot:
    """The counters at one moment (all CPU times in core-seconds)."""

    at: float                 # time.monotonic()
    wall: float               # time.time(), to line windows up across processes
    busy_s: float             # every CPU's non-idle time: user+nice+system+irq+softirq
    steal_s: float            # time the hypervisor ran something else on our CPUs
    own_s: float              # this process tree's CPU time
    load1: float | None       # 1-minute load average
    freq_mhz: float | None    # current CPU clock (mean over CPUs) where readable


@dataclass(frozen=True)
class Thresholds:
    other_share: float = 0.10   # of one core, over the window
    steal_share: float = 0.10   # of one core, over the window
    min_cpu_s: float = 0.03     # clock-tick rounding: never disturbed below this
    max_cv: float = 1.0         # sd / mean of the repetitions


THRESHOLDS = Thresholds()


def _own_cpu_s(proc: psutil.Process) -> float:
    """CPU time of this process (all threads), its finished children and its live ones."""
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        try:
            c = child.cpu_times()
        except psutil.Error:          # ended between listing and reading
            continue
        total += c.user + c.system
    return total


def _freq_mhz() -> float | None:
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, AttributeError, RuntimeError):
        return None
    return None if freq is None or not freq.current else float(freq.current)


def snapshot(proc: psutil.Process | None = None) -> Snapshot:
    """The counters now (the real sampler; tests pass fakes to :class:`WindowMeter`)."""
    cpu = psutil.cpu_times()
    busy = cpu.user + cpu.nice + cpu.system + getattr(cpu, "irq", 0.0) + getattr(
        cpu, "softirq", 0.0)
    try:
        load1: float | None = os.getloadavg()[0]
    except OSError:
        load1 = None
    return Snapshot(at=time.monotonic(), wall=time.time(), busy_s=busy,
                    steal_s=getattr(cpu, "steal", 0.0), own_s=_own_cpu_s(proc or psutil.Process()),
                    load1=load1, freq_mhz=_freq_mhz())


def window(start: Snapshot, end: Snapshot) -> dict[str, Any]:
    """What happened on the machine between two snapshots."""
    seconds = max(end.at - start.at, 0.0)
    other = max((end.busy_s - start.busy_s) - (end.own_s - start.own_s), 0.0)
    freqs = [f for f in (start.freq_mhz, end.freq_mhz) if f is not None]
    return {"seconds": round(seconds, 6), "other_cpu_s": round(other, 3),
            "steal_s": round(max(end.steal_s - start.steal_s, 0.0), 3),
            "load1": None if end.load1 is None else round(end.load1, 2),
            "freq_mhz": round(sum(freqs) / len(freqs), 1) if freqs else None,
            "start": round(start.wall, 6), "end": round(end.wall, 6)}


def window_reasons(w: dict[str, Any], th: Thresholds = THRESHOLDS) -> list[str]:
    """Why one window is disturbed ([] when it is not)."""
    seconds = w["seconds"]
    out = []
    for key, share, what in (("other_cpu_s", th.other_share, "other processes"),
                             ("steal_s", th.steal_share, "steal")):
        used = w[key]
        if used > th.min_cpu_s and used > share * seconds:
            out.append(f"{what} used {100 * used / seconds:.0f} % of a core "
                       f"(threshold {100 * share:.0f} %)")
    return out


def coefficient_of_variation(samples: Sequence[float]) -> float | None:
    if len(samples) < 2:
        return None
    mean = sum(samples) / len(samples)
    if mean == 0:
        return None
    sd = (sum((s - mean) ** 2 for s in samples) / (len(samples) - 1)) ** 0.5
    return sd / abs(mean)


def round_reasons(samples: Sequence[float], windows: Sequence[dict[str, Any]],
                  th: Thresholds = THRESHOLDS) -> list[str]:
    """Why one round of repetitions is unfit ([] when it is fit)."""
    out = []
    bad = [w for w in windows if w.get("disturbed")]
    if bad:
        other = max(100 * w["other_cpu_s"] / w["seconds"] for w in bad if w["seconds"] > 0)
        steal = max(100 * w["steal_s"] / w["seconds"] for w in bad if w["seconds"] > 0)
        out.append(f"{len(bad)} of {len(windows)} timed windows disturbed (other processes up "
                   f"to {other:.0f} % of a core, steal up to {steal:.0f} %; thresholds "
                   f"{100 * th.other_share:.0f} % and {100 * th.steal_share:.0f} %)")
    cv = coefficient_of_variation(samples)
    if cv is not None and cv > th.max_cv:
        out.append(f"coefficient of variation {cv:.2f} > {th.max_cv:g}")
    return out


class WindowMeter:
    """Reads the counters around each timed call: ``begin()`` right before, ``end()`` right
    after (both outside the timed interval)."""

    def __init__(self, sample: Callable[[], Snapshot] | None = None,
                 thresholds: Thresholds = THRESHOLDS) -> None:
        proc = psutil.Process()
        self.sample = sample or (lambda: snapshot(proc))
        self.thresholds = thresholds
        self._start: Snapshot | None = None

    def begin(self) -> None:
        self._start = self.sample()

    def end(self, **labels: Any) -> dict[str, Any]:
        """The window since :meth:`begin`, with ``labels`` (test, rep, depth) and whether it
        was disturbed."""
        end = self.sample()
        if self._start is None:
            raise RuntimeError("WindowMeter.end() without begin()")
        w = labels | window(self._start, end)
        w["disturbed"] = bool(window_reasons(w, self.thresholds))
        self._start = None
        return w


@dataclass
class TestFit:
    """The outcome of :func:`measure_until_fit` for one test."""

    samples: list[float]                  # the kept round's
    windows: list[dict[str, Any]]         # every round's, each marked with round and kept
    rounds: int
    reasons: list[str] = field(default_factory=list)   # [] when the kept round is fit
    extra: Any = None                     # what the kept round returned besides

    @property
    def reliable(self) -> bool:
        return not self.reasons


def measure_until_fit(run_round: Callable[[], tuple[list[float], list[dict[str, Any]], Any]],
                      *, max_rounds: int = 3, thresholds: Thresholds = THRESHOLDS,
                      pause: Callable[[int], None] | None = None) -> TestFit:
    """Run ``run_round`` (one round of repetitions: samples, their windows, anything else)
    until a round is fit or ``max_rounds`` were run. Keeps the fit round, else the one with
    the fewest disturbed windows (then the least CPU taken by others)."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    pause = pause or (lambda r: time.sleep(float(r)))
    rounds: list[tuple[list[float], list[dict[str, Any]], Any, list[str]]] = []
    for r in range(1, max_rounds + 1):
        samples, windows, extra = run_round()
        for w in windows:
            w["round"] = r
        reasons = round_reasons(samples, windows, thresholds)
        rounds.append((samples, windows, extra, reasons))
        if not reasons:
            break
        if r < max_rounds:
            pause(r)

    def badness(item: tuple[list[float], list[dict[str, Any]], Any, list[str]]
                ) -> tuple[int, int, float]:
        _, ws, _, why = item
        return (len(why), sum(bool(w.get("disturbed")) for w in ws),
                sum(w["other_cpu_s"] + w["steal_s"] for w in ws))

    kept = min(range(len(rounds)), key=lambda i: (badness(rounds[i]), -i))
    windows = []
    for i, (_, ws, _, _) in enumerate(rounds):
        for w in ws:
            w["kept"] = i == kept
        windows.extend(ws)
    samples, _, extra, reasons = rounds[kept]
    if reasons:
        reasons = [f"{why}, still after {len(rounds)} round{'s' * (len(rounds) > 1)}"
                   for why in reasons]
    return TestFit(samples=samples, windows=windows, rounds=len(rounds), reasons=reasons,
                   extra=extra)
