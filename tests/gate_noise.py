"""Realistic noise for testing the regression gate on stored records (a test helper).

Every draw is *uncentred*: each chunk, question or repetition gets its own independent draw, so
a sample's mean and spread vary from seed to seed as they do between real runs - a test that
forces them (standardised draws) cannot see a miss. The spreads come from the records
themselves:

- per-chunk PPL: the sd over chunks of ln(PPL_variant / PPL_base) of a stored variant (how much
  a real change of the weights moves chunks differently);
- per-chunk KLD: the median over neighbouring variants of the sd over chunks of ln(KLD_next /
  KLD_this); per-chunk same-top: the same for the difference of same-top fractions;
- MMLU: each question flips independently; the flip rate is the stored discordance between a
  variant and its base;
- speed and memory: every repetition redrawn from a lognormal with the stored coefficient of
  variation of that value.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
from typing import Any

from qbench.results.compare import cell_id

Records = list[dict[str, Any]]


def cell(records: Records, model: str, backend: str, quant: str, metric: str
         ) -> dict[str, Any]:
    [rec] = [r for r in records if cell_id(r) == f"{model}/{backend}/{quant}/{metric}"]
    return rec


def _base(records: Records, rec: dict[str, Any]) -> dict[str, Any] | None:
    for r in records:
        if (r["metric"] == rec["metric"] and r["variant"].get("is_base")
                and r["model"]["id"] == rec["model"]["id"]
                and r["variant"]["backend"] == rec["variant"]["backend"]):
            return r
    return None


def ppl_spread(records: Records, rec: dict[str, Any]) -> float | None:
    """sd over chunks of ln(PPL_rec / PPL_base), None for the base itself."""
    base = _base(records, rec)
    if base is None or base is rec:
        return None
    b, o = base["details"]["per_chunk_ppl"], rec["details"]["per_chunk_ppl"]
    return statistics.stdev(math.log(y / x) for x, y in zip(b, o))


def smallest_step_spread(records: Records) -> float:
    """The per-chunk spread of the smallest real change in the records: the least sd over the
    non-base perplexity cells of ln(PPL / PPL_base)."""
    return min(s for r in records if r["metric"] == "perplexity" and r["status"] == "ok"
               for s in [ppl_spread(records, r)] if s)


def kld_spreads(records: Records, model: str, ladder: tuple[str, ...],
                backend: str = "llama.cpp") -> tuple[float, float]:
    """(sd of per-chunk ln KLD ratio, sd of per-chunk same-top difference) between
    neighbouring variants, medians over the ladder."""
    kl, st = [], []
    for a, b in zip(ladder, ladder[1:]):
        da = cell(records, model, backend, a, "kld")["details"]
        db = cell(records, model, backend, b, "kld")["details"]
        kl.append(statistics.stdev(math.log(y / x) for x, y in zip(da["per_chunk_kld"],
                                                                   db["per_chunk_kld"])))
        st.append(statistics.stdev(y - x for x, y in zip(da["per_chunk_same_top"],
                                                         db["per_chunk_same_top"])))
    return statistics.median(kl), statistics.median(st)


def flip_rate(records: Records, rec: dict[str, Any]) -> float:
    """Share of questions answered differently from the base (at least one question's worth)."""
    base = _base(records, rec)
    n = len(rec["details"]["correct"])
    if base is None or base is rec:
        return 1.0 / n
    flips = sum(a != b for a, b in zip(base["details"]["correct"], rec["details"]["correct"]))
    return max(flips, 1) / n


# ------------------------------------------------------------------------------- moves

def move_ppl(rec: dict[str, Any], effect: float, spread: float, rng: random.Random) -> None:
    """Each chunk's PPL times exp(N(ln(1 + effect), spread)), independently."""
    d = rec["details"]
    lns = [rng.gauss(math.log1p(effect), spread) for _ in d["per_chunk_ppl"]]
    d["per_chunk_ppl"] = [p * math.exp(x) for p, x in zip(d["per_chunk_ppl"], lns)]
    d["per_chunk_nll_sum"] = [s + n * x for s, n, x in zip(d["per_chunk_nll_sum"],
                                                            d["per_chunk_tokens"], lns)]
    mean_nll = sum(d["per_chunk_nll_sum"]) / sum(d["per_chunk_tokens"])
    rec["values"]["ppl"]["value"] = math.exp(mean_nll)
    if "mean_nll" in rec["values"]:
        rec["values"]["mean_nll"]["value"] = mean_nll


def move_kld(rec: dict[str, Any], effect: float, spread: float, same_sd: float,
             rng: random.Random) -> None:
    """Each chunk's KLD times exp(N(ln(1 + effect), spread)); its same-top fraction plus
    N(0, same_sd)."""
    d = rec["details"]
    d["per_chunk_kld"] = [k * math.exp(rng.gauss(math.log1p(effect), spread))
                          for k in d["per_chunk_kld"]]
    rec["values"]["kld_mean"]["value"] = statistics.fmean(d["per_chunk_kld"])
    d["per_chunk_same_top"] = [min(1.0, max(0.0, x + rng.gauss(0.0, same_sd)))
                               for x in d["per_chunk_same_top"]]
    rec["values"]["same_top_pct"]["value"] = 100 * statistics.fmean(d["per_chunk_same_top"])


def move_mmlu(rec: dict[str, Any], lose: float, gain: float, rng: random.Random) -> None:
    """Each right answer turns wrong with probability ``lose``, each wrong one right with
    ``gain`` (independently)."""
    d = rec["details"]
    d["correct"] = [(0 if rng.random() < lose else 1) if c else (1 if rng.random() < gain else 0)
                    for c in d["correct"]]
    rec["values"]["acc"]["value"] = sum(d["correct"]) / len(d["correct"])


def move_repetitions(rec: dict[str, Any], effect: float, rng: random.Random) -> None:
    """Every repeated value's samples redrawn: lognormal around value x (1 + effect), with its
    stored coefficient of variation (effect: a relative change, e.g. -0.3 for 30 % slower)."""
    for v in rec["values"].values():
        samples = v.get("samples")
        if not samples or len(samples) < 2 or not v.get("value"):
            continue
        cv = statistics.stdev(samples) / statistics.fmean(samples)
        mean = v["value"] * (1 + effect)
        new = [mean * math.exp(rng.gauss(-cv * cv / 2, cv)) for _ in samples]
        v.update(value=statistics.fmean(new), samples=new, sd=statistics.stdev(new))


def null_run(records: Records, model: str, ladder: tuple[str, ...],
             rng: random.Random) -> Records:
    """A rerun in which nothing truly changed but everything moved by realistic noise (a
    library upgrade that re-rounds every kernel): every quality value redrawn at the
    smallest real step's spread, every timing redrawn at its own spread."""
    out = copy.deepcopy(records)
    s_ppl = smallest_step_spread(records)
    s_kld, s_same = kld_spreads(records, model, ladder)
    for rec in out:
        if rec["status"] != "ok":
            continue
        if rec["metric"] == "perplexity" and rec["details"].get("per_chunk_ppl"):
            move_ppl(rec, 0.0, s_ppl, rng)
        elif rec["metric"] == "kld" and rec["details"].get("per_chunk_kld"):
            move_kld(rec, 0.0, s_kld, s_same, rng)
        elif rec["metric"] == "mmlu" and rec["details"].get("correct"):
            p = flip_rate(records, next(r for r in records if r["key"] == rec["key"]))
            acc = min(max(rec["values"]["acc"]["value"], 0.05), 0.95)
            move_mmlu(rec, p / (2 * acc), p / (2 * (1 - acc)), rng)   # no net change expected
        elif rec["metric"] == "speed":
            move_repetitions(rec, 0.0, rng)
    return out
