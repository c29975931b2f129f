"""The speed metric's hardware views: depth naming, the bandwidth roofline, energy per token.

Kept apart from :mod:`qbench.metrics.speed` so that module stays llama-bench's method; every
function here is either pure or fails soft (a roofline or energy problem never fails a speed
cell: it is recorded in the details with the reason).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qbench.errors import ConfigError
from qbench.metrics.context import value


def suffix(depth: int) -> str:
    """Value-name suffix of a depth: "" at 0 (today's names stay valid), "@d512" else."""
    return "" if depth == 0 else f"@d{depth}"


def validate_depths(depths: Sequence[int], *, file: str, key: str) -> None:
    if not depths:
        raise ConfigError("expected at least one depth (0 = an empty KV cache, as today)",
                          file=file, key=key)
    for i, d in enumerate(depths):
        if d < 0:
            raise ConfigError(f"expected a depth >= 0, got {d!r}", file=file, key=f"{key}[{i}]")
    if len(set(depths)) != len(depths):
        raise ConfigError(f"depths repeat: {list(depths)!r}", file=file, key=key)


def n_ctx_for(depth: int, prompt_tokens: int, gen_tokens: int) -> int:
    """The context one speed test runs in: the filled depth plus the test's own tokens (a pp
    test passes gen_tokens=0, a tg test prompt_tokens=0), as llama-bench sizes it
    (n_prompt + n_gen + n_depth), plus one position of slack."""
    return depth + prompt_tokens + gen_tokens + 1


# -- roofline ------------------------------------------------------------------------------
def roofline_setup(ctx: Any, backend: Any, *, measure: Callable[..., dict[str, Any]] | None
                   = None) -> dict[str, Any]:
    """What tg values are compared with: the variant's bytes per token and this machine's
    measured bandwidth (CPU, or the GPU the backend runs on). Never raises."""
    from qbench.host import bandwidth
    from qbench.metrics.roofline import model_traffic

    out: dict[str, Any] = {}
    try:
        out["traffic"] = model_traffic(Path(ctx.artifact_path), ctx.artifact or {}, backend,
                                       ctx.cache_dir)
    except Exception as exc:  # noqa: BLE001
        return {"available": False, "reason": f"bytes per token unknown: "
                                              f"{type(exc).__name__}: {exc}"}
    try:
        rec = (measure or bandwidth.ensure_measured)(ctx.cache_dir)
    except Exception as exc:  # noqa: BLE001
        rec = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    out["measured"] = rec
    device = str(getattr(backend, "device", "cpu"))
    ref: dict[str, Any] = {"device": device}
    if "gbs" not in rec:
        ref |= {"gbs": None, "reason": rec.get("reason", "not measured")}
    elif device.startswith("cuda"):
        gpu = rec.get("gpu") or {}
        devs = gpu.get("devices") or []
        if devs:
            ref |= {"gbs": devs[0]["gbs"], "llc_bytes": devs[0].get("l2_bytes"),
                    "what": f"GPU 0 ({devs[0].get('name')}) read bandwidth"}
            if getattr(backend, "n_gpu_layers", 10**6) < (
                    out["traffic"].get("shape") or {}).get("n_layer", 0):
                ref["note"] = ("partly offloaded: the layers on the CPU read at the CPU's "
                               "bandwidth, so % of the GPU's understates the GPU's use")
        else:
            ref |= {"gbs": None, "reason": gpu.get("reason", "no GPU bandwidth measured")}
    else:
        ref |= {"gbs": rec["gbs"], "llc_bytes": rec.get("llc_bytes"),
                "what": "CPU memory read bandwidth"}
    out["reference"] = ref
    out["available"] = True
    return out


def bandwidth_values(roof: dict[str, Any], tg: dict[str, Any], depth: int, gen_tokens: int
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values, details) of one depth's tg run: effective GB/s and % of the measured."""
    from qbench.host.bandwidth import effective_bandwidth
    from qbench.metrics.roofline import kv_bytes, mean_tg_positions

    if not roof.get("available"):
        return {}, {}
    traffic, ref = roof["traffic"], roof["reference"]
    per_pos = traffic.get("kv_bytes_per_position")
    positions = mean_tg_positions(depth, gen_tokens)
    kv = kv_bytes(per_pos, positions) if per_pos else 0.0
    eff = effective_bandwidth(traffic["weight_bytes_per_token"], kv, tg["value"],
                              ref.get("gbs"), ref.get("llc_bytes"))
    scale = eff["bytes_per_token"] / 1e9            # GB/s per token/s
    err = tg.get("stderr")
    sfx = suffix(depth)
    values = {f"tg_effective_gbs{sfx}": value(
        eff["gbs"], None if err is None else err * scale, tg.get("n"), "GB/s")}
    if eff["pct_of_measured"] is not None:
        pscale = 100.0 * scale / ref["gbs"]
        values[f"tg_bandwidth_pct{sfx}"] = value(
            eff["pct_of_measured"], None if err is None else err * pscale, tg.get("n"), "%")
    details = eff | {"depth": depth, "mean_positions_attended": positions,
                     "kv_bytes_per_position": per_pos}
    return values, details


# -- energy --------------------------------------------------------------------------------
class EnergyTally:
    """Joules over the timed parts only: :meth:`begin` right before a timed call, :meth:`end`
    right after it (the counters are read outside the timed interval)."""

    def __init__(self, meter: Any, reason: str | None = None) -> None:
        self.meter = meter
        self.reason = reason
        self.runs: dict[str, dict[str, Any]] = {}

    @property
    def available(self) -> bool:
        return self.meter is not None and self.meter.available

    def begin(self) -> None:
        if self.available:
            self.meter.start()

    def end(self, name: str, tokens: int) -> None:
        if not self.available:
            return
        res = self.meter.stop()
        run = self.runs.setdefault(name, {"joules": 0.0, "tokens": 0, "seconds": 0.0,
                                          "by_source": {}})
        run["joules"] += res["joules"]
        run["tokens"] += tokens
        run["seconds"] += res["seconds"]
        for src, j in res["sources"].items():
            run["by_source"][src] = run["by_source"].get(src, 0.0) + j

    def values(self, name: str, label: str, depth: int) -> dict[str, Any]:
        run = self.runs.get(name)
        if not run or not run["tokens"]:
            return {}
        return {f"{label}_joules_per_token{suffix(depth)}": value(
            run["joules"] / run["tokens"], None, run["tokens"], "J/token",
            joules=run["joules"], seconds=run["seconds"])}

    def details(self) -> dict[str, Any]:
        if self.meter is None:
            return {"available": False, "reason": self.reason or "energy counters not read"}
        if not self.meter.available:
            return {"available": False, "reason": "; ".join(self.meter.reasons)
                    or "no energy counter"}
        from qbench.host.energy import SCOPE
        return {"available": True, "sources": [c.source for c in self.meter.counters],
                "not_read": list(self.meter.reasons), "scope": SCOPE,
                "runs": self.runs,
                "note": "timed repetitions only (the warm-up and the depth fills are not "
                        "counted); counters update every ~1 ms (RAPL) to tens of ms (NVML), "
                        "so runs shorter than ~1 s are coarse"}

    def close(self) -> None:
        if self.meter is not None:
            self.meter.close()


def open_energy() -> EnergyTally:
    """A tally on every readable counter here; never raises."""
    from qbench.host.energy import EnergyMeter
    try:
        return EnergyTally(EnergyMeter())
    except Exception as exc:  # noqa: BLE001 - never fail a speed cell over a counter
        return EnergyTally(None, f"{type(exc).__name__}: {exc}")


# -- memory per repetition -----------------------------------------------------------------
class RepetitionRound:
    """One round of one test's repetitions: peak RSS (and VRAM) of each repetition."""

    def __init__(self, name: str, vram: Any) -> None:
        self.name = name
        self.vram = vram
        self.rss_mb: list[float | None] = []
        self.vram_mb: list[float | None] = []
        self._reset_ok = False

    def begin(self) -> None:
        """Right before a repetition: a new RSS high-water mark (the cell's own peak is kept)."""
        from qbench.host import procmem
        self._reset_ok = procmem.reset_within_window()

    def end(self) -> None:
        """Right after a repetition (outside its timed part)."""
        from qbench.host import procmem
        kib = procmem.hwm_kib() if self._reset_ok else None
        self.rss_mb.append(None if kib is None else round(kib / 1024.0, 1))
        if self.vram is not None:
            used = self.vram.used_mb()
            self.vram_mb.append(None if used is None else round(used, 1))


class RepetitionMemory:
    """Peak RSS per timed repetition (the kernel's high-water mark, reset before each; see
    qbench.host.procmem) and, on a GPU, the process's VRAM after each from NVML. Repetition i
    of the cell peaks at the largest of its tests' repetition i (pp, tg, each depth), so the
    cell has ``repetitions`` samples of one quantity: stored like the other values, with the
    median as ``value`` (one slow page-in does not move it) and the samples' sd."""

    def __init__(self, *, on_gpu: bool, probe: Callable[[], Any] | None = None) -> None:
        self.kept: list[RepetitionRound] = []
        self.vram: Any = None
        self.vram_reason: str | None = None if on_gpu else "not on a GPU"
        if on_gpu:
            try:
                from qbench.host.procmem import VramProbe
                self.vram = (probe or VramProbe)()
            except Exception as exc:  # noqa: BLE001 - never fail a speed cell over NVML
                self.vram, self.vram_reason = None, f"{type(exc).__name__}: {exc}"
            if self.vram is not None and not self.vram.available:
                self.vram_reason, self.vram = self.vram.reason, None

    def round(self, name: str) -> RepetitionRound:
        return RepetitionRound(name, self.vram)

    def keep(self, rnd: RepetitionRound) -> None:
        """The round the speed figures come from (qbench.host.contamination's kept round)."""
        self.kept.append(rnd)

    def _per_rep(self, attr: str) -> list[float]:
        columns = [getattr(r, attr) for r in self.kept]
        n = max((len(c) for c in columns), default=0)
        out = []
        for i in range(n):
            seen = [c[i] for c in columns if i < len(c) and c[i] is not None]
            if seen:
                out.append(max(seen))
        return out

    @staticmethod
    def _value(samples: list[float]) -> dict[str, Any]:
        import numpy as np
        arr = np.asarray(samples, dtype=float)
        return value(float(np.median(arr)), None, len(arr), "MiB",
                     sd=float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                     samples=[round(float(s), 1) for s in arr])

    def values(self) -> dict[str, Any]:
        out = {}
        if rss := self._per_rep("rss_mb"):
            out["peak_rss_mb"] = self._value(rss)
        if self.vram is not None and (vram := self._per_rep("vram_mb")):
            out["peak_vram_mb"] = self._value(vram)
        return out

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"per_test": [{"test": r.name, "rss_mb": r.rss_mb}
                                            | ({"vram_mb": r.vram_mb} if r.vram_mb else {})
                                            for r in self.kept]}
        if not self._per_rep("rss_mb"):
            out["rss_reason"] = ("the kernel refused to reset the RSS high-water mark "
                                 "(/proc/self/clear_refs): no per-repetition peak")
        reason = self.vram_reason or (getattr(self.vram, "reason", None)
                                      if not self._per_rep("vram_mb") else None)
        if reason:
            out["vram_reason"] = reason
        return out

    def close(self) -> None:
        if self.vram is not None:
            self.vram.close()
