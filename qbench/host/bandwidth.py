"""This machine's memory read bandwidth, measured once per machine: the speed roofline.

CPU kernel, STREAM-like but read-only: a float64 buffer far larger than the last-level cache
(``max(8 x LLC, 2 GiB)``, capped at a quarter of the available RAM) is written once (so every
page is really backed: untouched pages all map the kernel's zero page and would read from
cache), then read in passes. Each pass splits the buffer into one contiguous slice per usable
core and sums every slice with ``np.add.reduce(slice.reshape(-1, 4096), axis=0)`` in a thread
(numpy releases the GIL in reductions): a column-wise add into a 32 KiB accumulator that stays
in L1, so the loop is one vector load + add per 8 bytes, with no stores to memory.

Why a read and not STREAM's copy/triad: a decode step reads the weights and writes next to
nothing, and a copy's stores cost write-allocate traffic the decode never pays. Why not
``np.sum``: numpy's pairwise summation is compute-bound at ~5-7 GB/s per core even on data in
L2 (measured on the 2-core AMD EPYC VM this was written on), so it would report the adder,
not the memory. GB/s is the median of the passes (after one warm-up pass), in 1e9 bytes/s;
every pass is kept. The load average at the time is stored: a busy machine measures low
(on the 2-core VM this was written on: 5.7 GB/s at load 5.8, 17.6 GB/s at load 1.3), and never
high, so a record measured while the load exceeded the cores is provisional: it is measured
again once it is :data:`REMEASURE_BUSY_AFTER_S` old, and the higher of the two is kept.

GPU (torch with CUDA only, else skipped with the reason): per device, a buffer of
``max(8 x L2, 1 GiB)`` (capped at a quarter of free memory): ``dst.copy_(src)`` timed with CUDA
events (read + written bytes / time, as CUDA's bandwidthTest counts a device-to-device copy),
and ``src.sum()`` (read bytes / time). The read figure is the roofline for a GPU cell, for the
same reason as on the CPU.

The record is cached as ``<cache>/host/bandwidth-<hardware_id>.json``. :func:`ensure_measured`
measures in a process *outside* the caller's process tree, so a speed cell's recorded peak RSS
(which the regression gate compares) never includes the 2 GiB buffer.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

GB = 1e9
GiB = 2**30
MIN_BUFFER = 2 * GiB
LLC_FACTOR = 8
ROW = 4096                        # float64 columns per accumulator row: 32 KiB, stays in L1
CPU_CACHE_ROOT = Path("/sys/devices/system/cpu/cpu0/cache")
SCHEMA = 1
CPU_METHOD = ("read: np.add.reduce(slice.reshape(-1, 4096), axis=0) over float64, one "
              "contiguous slice per thread; GB/s = buffer bytes / pass time, median of passes")


# -- the last-level cache --------------------------------------------------------------------
def parse_size(text: str) -> int:
    """sysfs cache sizes: "32768K", "32M", "512K", "1024"."""
    text = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMGB") or 0) * mult


def llc(cache_root: Path | None = None) -> tuple[int | None, int | None]:
    """(bytes, level) of cpu0's highest-level data or unified cache; (None, None) if unknown."""
    root = CPU_CACHE_ROOT if cache_root is None else cache_root
    best: tuple[int, int] | None = None
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or size <= 0:
            continue
        if best is None or (level, size) > best:
            best = (level, size)
    return (best[1], best[0]) if best else (None, None)


def available_ram() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def buffer_bytes(llc_bytes: int | None, available: int) -> int:
    """max(8 x LLC, 2 GiB), capped at a quarter of the available RAM."""
    want = max(LLC_FACTOR * (llc_bytes or 0), MIN_BUFFER)
    return max(0, min(want, available // 4))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- CPU -------------------------------------------------------------------------------------
def cpu_read_bandwidth(nbytes: int, *, passes: int = 5, threads: int | None = None,
                       clock: Callable[[], int] = time.perf_counter_ns) -> dict[str, Any]:
    """Read bandwidth over a buffer of ~``nbytes`` (rounded down to whole rows per thread)."""
    import numpy as np

    threads = max(1, threads or usable_cores())
    rows = nbytes // (8 * ROW * threads) * threads
    if rows < threads:
        raise ValueError(f"buffer of {nbytes} bytes is too small for {threads} thread(s)")
    buf = np.ones((rows, ROW))                       # written: every page backed
    slices = np.array_split(buf, threads)            # contiguous row blocks
    read = rows * ROW * 8

    def one(block: Any) -> None:
        np.add.reduce(block, axis=0)

    samples: list[float] = []
    with ThreadPoolExecutor(threads) as pool:
        for i in range(passes + 1):
            t0 = clock()
            list(pool.map(one, slices))
            dt = clock() - t0
            if i:                                    # pass 0 warms up
                samples.append(read / (dt / 1e9) / GB)
    del buf, slices
    return {"gbs": statistics.median(samples), "passes": [round(s, 3) for s in samples],
            "buffer_bytes": read, "threads": threads, "method": CPU_METHOD}


# -- GPU -------------------------------------------------------------------------------------
def gpu_bandwidth(*, passes: int = 5, torch: Any = None) -> dict[str, Any]:
    """Per CUDA device: copy and read GB/s with torch; {"available": False, "reason"} without."""
    if torch is None:
        try:
            import torch
        except ImportError:
            return {"available": False, "reason": "torch is not installed"}
    try:
        if not torch.cuda.is_available():
            return {"available": False,
                    "reason": "no CUDA GPU (torch.cuda.is_available() is False)"}
        devices = [_one_gpu(torch, i, passes) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # noqa: BLE001 - a broken driver must not fail the CPU record
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {"available": True, "devices": devices}


def _one_gpu(torch: Any, index: int, passes: int) -> dict[str, Any]:
    dev = torch.device("cuda", index)
    props = torch.cuda.get_device_properties(index)
    l2 = int(getattr(props, "L2_cache_size", 0) or 0)
    free, _total = torch.cuda.mem_get_info(index)
    nbytes = min(max(LLC_FACTOR * l2, GiB), free // 4) // 4 * 4
    copy, read = _gpu_passes(torch, dev, index, nbytes, passes)
    torch.cuda.empty_cache()                 # the buffers died with _gpu_passes' frame
    return {"index": index, "name": props.name, "l2_bytes": l2, "buffer_bytes": nbytes,
            "gbs": statistics.median(read), "read_passes": [round(x, 2) for x in read],
            "copy_gbs": statistics.median(copy), "copy_passes": [round(x, 2) for x in copy],
            "method": "read: src.sum() over float32 (bytes / time); copy: dst.copy_(src) "
                      "(read + written bytes / time); CUDA events; median of passes"}


def _gpu_passes(torch: Any, dev: Any, index: int, nbytes: int, passes: int
                ) -> tuple[list[float], list[float]]:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    kernels = ((lambda: dst.copy_(src), 2 * nbytes), (lambda: src.sum(), nbytes))
    out: tuple[list[float], list[float]] = ([], [])
    with torch.cuda.device(index):
        for i in range(passes + 1):
            for (kernel, moved), samples in zip(kernels, out):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                kernel()
                end.record()
                end.synchronize()
                if i:                                # pass 0 warms up
                    samples.append(moved / (start.elapsed_time(end) / 1e3) / GB)
    return out


# -- the record ------------------------------------------------------------------------------
def measure(*, nbytes: int | None = None, passes: int = 5, threads: int | None = None,
            gpu: bool = True, cache_root: Path | None = None) -> dict[str, Any]:
    """Measure now (seconds and ~2 GiB of RAM): the record :func:`measured_bandwidth` caches."""
    llc_bytes, llc_level = llc(cache_root)
    avail = available_ram()
    size = buffer_bytes(llc_bytes, avail) if nbytes is None else nbytes
    load = os.getloadavg()
    cpu = cpu_read_bandwidth(size, passes=passes, threads=threads)
    notes = []
    if llc_bytes and cpu["buffer_bytes"] < LLC_FACTOR * llc_bytes:
        notes.append(f"buffer {cpu['buffer_bytes']} B < {LLC_FACTOR} x LLC ({llc_bytes} B): "
                     "part of what was read may have come from cache")
    return {"schema": SCHEMA, "available": True, **cpu,
            "llc_bytes": llc_bytes, "llc_level": llc_level,
            "available_ram_bytes": avail, "load_avg": [round(x, 2) for x in load],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "cpus": usable_cores(), "host": platform.node(),
            "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gpu": gpu_bandwidth(passes=passes) if gpu else
            {"available": False, "reason": "not asked (--no-gpu)"},
            "notes": notes, "pid": os.getpid(), "ppid": os.getppid()}


REMEASURE_BUSY_AFTER_S = 600.0


def busy(rec: dict[str, Any]) -> bool:
    """Whether ``rec`` was measured while more runnable work than cores was queued (the 1-min
    load average above the usable cores): its figure may be low."""
    load, cpus = rec.get("load_avg") or [0.0], rec.get("cpus") or usable_cores()
    return bool(load) and float(load[0]) > float(cpus)


def _stale(rec: dict[str, Any], now: float | None = None) -> bool:
    """A busy record whose last measurement is old enough to be tried again."""
    if not busy(rec):
        return False
    try:
        when = _dt.datetime.fromisoformat(rec.get("when_checked") or rec["when"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return True
    return (time.time() if now is None else now) - when >= REMEASURE_BUSY_AFTER_S


def _better(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Of two measurements of one machine, the higher: load only ever lowers the figure."""
    if old is None or float(new["gbs"]) >= float(old["gbs"]):
        return new
    kept = dict(old)
    kept["notes"] = [*old.get("notes", []), f"measured again {new.get('when')} at load "
                     f"{(new.get('load_avg') or ['?'])[0]}: {new['gbs']:.2f} GB/s, lower; "
                     "this higher figure kept"]
    kept["when_checked"] = new.get("when")
    return kept


def this_hardware_id() -> str:
    from qbench.host.envinfo import collect, hardware_id
    return hardware_id(collect())


def cache_path(cache_dir: Path, hw_id: str) -> Path:
    from qbench.host.cache import folder

    return folder(Path(cache_dir), "host") / f"bandwidth-{hw_id}.json"


def _load(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("schema") == SCHEMA and \
        isinstance(rec.get("gbs"), (int, float)) else None


def measured_bandwidth(cache_dir: Path, *, refresh: bool = False, hw_id: str | None = None,
                       measure_fn: Callable[[], dict[str, Any]] | None = None
                       ) -> dict[str, Any]:
    """This machine's record: from the cache, else measured here (in this process) and cached.
    Keys: gbs, passes, buffer_bytes, llc_bytes, method, when, threads, load_avg, gpu, ..."""
    from qbench.host.fsutil import atomic_write_text, file_lock

    hw_id = hw_id or this_hardware_id()
    path = cache_path(cache_dir, hw_id)
    if not refresh and (rec := _load(path)) is not None and not _stale(rec):
        return rec | {"cached": True}
    with file_lock(path.with_suffix(".lock")):       # one measurement per machine at a time
        old = _load(path)
        if not refresh and old is not None and not _stale(old):
            return old | {"cached": True}
        new = (measure_fn or measure)() | {"hardware_id": hw_id}
        if busy(new):
            new["notes"] = [*new.get("notes", []), "measured while the machine was busy "
                            f"(load {new['load_avg'][0]} on {new.get('cpus')} cores): may read "
                            "low; measured again later, the higher figure kept"]
        rec = new if refresh else _better(old, new)
        atomic_write_text(path, json.dumps(rec, indent=1))
    return rec | {"cached": rec is not new}


def ensure_measured(cache_dir: Path, *, hw_id: str | None = None, timeout_s: float = 600,
                    extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """The cached record, measuring it first, if need be, in a process that is *not* a
    descendant of this one (a launcher starts it in its own session and exits at once, so it
    is re-parented away): the caller's process-tree memory sampling never sees its buffer.
    Returns {"available": False, "reason"} if the measurement failed."""
    hw_id = hw_id or this_hardware_id()
    path = cache_path(cache_dir, hw_id)
    if (stored := _load(path)) is not None and not _stale(stored):
        return stored | {"cached": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_suffix(".log")
    cmd = [sys.executable, "-m", "qbench.host.bandwidth", "--cache-dir", str(cache_dir),
           "--hardware-id", hw_id, *extra_args]
    launcher = ("import os, subprocess, sys\n"
                "log = open(sys.argv[1], 'ab')\n"
                "p = subprocess.Popen([*sys.argv[2:], '--launcher-pid', str(os.getpid())], "
                "stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)\n"
                "print(p.pid, flush=True)\n")
    try:
        out = subprocess.run([sys.executable, "-c", launcher, str(log), *cmd],
                             capture_output=True, text=True, timeout=60, check=True)
        pid = int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"available": False, "reason": f"could not start the measurement: {exc}"}
    _wait_for(pid, path, timeout_s, before=stored)
    if (rec := _load(path)) is not None:
        return rec
    tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
    return {"available": False, "reason": f"bandwidth measurement failed (log {log}): {tail}"}


def _wait_for(pid: int, path: Path, timeout_s: float,
              before: dict[str, Any] | None = None) -> None:
    """Until a record other than ``before`` is there, or the measuring process has ended (a
    zombie counts as ended: its new parent may reap it late), or the timeout."""
    import psutil
    deadline = time.monotonic() + timeout_s
    try:
        proc = psutil.Process(pid)
        while time.monotonic() < deadline:
            if (rec := _load(path)) is not None and rec != before \
                    or proc.status() == psutil.STATUS_ZOMBIE:
                return
            time.sleep(0.05)
    except psutil.NoSuchProcess:
        return


def effective_bandwidth(weight_bytes_per_token: float, kv_bytes_per_token: float,
                        tg_tokens_per_s: float, measured_gbs: float | None,
                        llc_bytes: int | None = None) -> dict[str, Any]:
    """GB/s a tg run moved (bytes read per token x tokens/s) and its % of the measured
    bandwidth. ``cache_caveat`` is True when the weights read per token fit in the last-level
    cache (then they can be served from cache, and the figure may exceed memory's), None when
    the cache size is unknown."""
    per_token = float(weight_bytes_per_token) + float(kv_bytes_per_token or 0)
    gbs = per_token * float(tg_tokens_per_s) / GB
    pct = 100.0 * gbs / measured_gbs if measured_gbs else None
    caveat = None if not llc_bytes else weight_bytes_per_token < llc_bytes
    sentence = None
    if caveat:
        sentence = (f"the weights read per token ({weight_bytes_per_token / 2**20:.1f} MiB) fit "
                    f"in the last-level cache ({llc_bytes / 2**20:.0f} MiB): they can be served "
                    "from cache, so this is not a memory-bandwidth figure and may exceed the "
                    "measured memory bandwidth")
    return {"gbs": gbs, "pct_of_measured": pct, "bytes_per_token": per_token,
            "weight_bytes_per_token": float(weight_bytes_per_token),
            "kv_bytes_per_token": float(kv_bytes_per_token or 0),
            "measured_gbs": measured_gbs, "llc_bytes": llc_bytes,
            "cache_caveat": caveat, "caveat": sentence,
            "above_measured": pct is not None and pct > 100.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qbench.host.bandwidth",
                                description="Measure and cache this machine's memory bandwidth.")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: qbench's cache dir")
    p.add_argument("--refresh", action="store_true", help="measure again even if cached")
    p.add_argument("--hardware-id", default=None)
    p.add_argument("--buffer-mib", type=int, default=None, help="override the buffer rule")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--launcher-pid", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.launcher_pid:                   # let the launcher exit first: then we are re-parented
        t0 = time.monotonic()
        while os.getppid() == a.launcher_pid and time.monotonic() - t0 < 10:
            time.sleep(0.01)
    cache_dir = a.cache_dir or _default_cache_dir()
    rec = measured_bandwidth(
        cache_dir, refresh=a.refresh, hw_id=a.hardware_id,
        measure_fn=lambda: measure(nbytes=None if a.buffer_mib is None else a.buffer_mib * 2**20,
                                   passes=a.passes, gpu=not a.no_gpu))
    print(json.dumps(rec, indent=1))
    return 0


def _default_cache_dir() -> Path:
    env = os.environ.get("QBENCH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "qbench"


if __name__ == "__main__":
    raise SystemExit(main())
