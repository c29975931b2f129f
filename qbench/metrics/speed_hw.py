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
