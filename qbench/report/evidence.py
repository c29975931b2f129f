"""An evidence pack: the Markdown a llama.cpp pull request adding or changing a quant type is
asked for (CONTRIBUTING.md, "to add a new quantization type"), from stored results.

CONTRIBUTING asks for perplexity against FP16/BF16 (the native precision) and against types of
similar size, KL divergence against the FP16/BF16 version for the type and those neighbours,
and pure-CPU performance against the neighbours (llama-bench). So, for one type of a GGUF
ladder: its neighbours are the plain llama.cpp variants nearest to it in measured bits per
weight (up to four), plus Q8_0 and the base; three tables built from the registry (no value is
named here): the primary value of each chunk-paired metric not measured against the base (PPL)
with the one judge's change against the base and against Q8_0 on the same chunks; every
declared value of each metric measured against the base (KLD: mean, tails, agreement, the
confidence buckets, the floor verdict); the gated throughputs of the hardware-bound metrics
(pp, tg) with their ratio to the type. Then how to reproduce it, with qbench and with
llama.cpp's own tools.
"""

from __future__ import annotations

import math
from typing import Any

from qbench.metrics import REPETITIONS, known_metric_info, metric_names
from qbench.report.floor import floor_verdicts, twins
from qbench.report.table import fmt, value_of, variant_rows
from qbench.results.judge import judge

NEIGHBOURS = 4


def _plain(r: dict[str, Any]) -> bool:
    """A llama.cpp variant built by qbench from the base with the type's own recipe."""
    cells = list(r["cells"].values())
    source = (cells[0].get("variant") or {}).get("source") if cells else None
    return (r["backend"] == "llama.cpp" and not r.get("kv_cache") and not r.get("imatrix")
            and not source and not r.get("output_asked") and not r.get("token_embd_asked"))


def pick(rows: list[dict[str, Any]], quant: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(suite, model) -> the rows of the pack, ordered by bits per weight: the type, its
    nearest plain neighbours by measured bits per weight, Q8_0 and the base."""
    out = {}
    for suite, model in sorted({(r["suite"], r["model"]) for r in rows}):
        mine = [r for r in rows if r["suite"] == suite and r["model"] == model and _plain(r)]
        target = next((r for r in mine if r["quant"].upper() == quant.upper()), None)
        if target is None or target.get("bpw") is None:
            continue
        others = [r for r in mine if r is not target and not r["is_base"]
                  and r.get("method") != "float" and r.get("bpw") is not None
                  and _measured(r)]
        near = sorted(others, key=lambda r: abs(math.log(r["bpw"] / target["bpw"])))
        chosen = {id(r): r for r in [target, *near[:NEIGHBOURS]]}
        for r in mine:
            if r["is_base"] or r["quant"] == "Q8_0":
                chosen.setdefault(id(r), r)
        out[(suite, model)] = sorted(chosen.values(), key=lambda r: -(r.get("bpw") or 99))
    return out


def _measured(r: dict[str, Any]) -> bool:
    """A row with an ok cell beyond its footprint: a neighbour with only a file's size (a run
    stopped before its measurements) would be a column of dashes."""
    return any(m != "footprint" and c.get("status") == "ok" for m, c in r["cells"].items())


def _cell(r: dict[str, Any], metric: str) -> dict[str, Any] | None:
    c = r["cells"].get(metric)
    return c if c and c.get("status") == "ok" else None


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    esc = [[x.replace("|", "\\|") for x in row] for row in [head, *body]]
    lines = ["| " + " | ".join(esc[0]) + " |",
             "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(head))) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in esc[1:]]


def _name(r: dict[str, Any], quant: str) -> str:
    tag = " (base)" if r["is_base"] else ""
    return f"**{r['quant']}**" if r["quant"].upper() == quant.upper() else r["quant"] + tag


def _pm(v: float | None, err: float | None, digits: int = 4) -> str:
    if v is None:
        return "–"
    return fmt(v, digits) + (f" ± {fmt(err, 2)}" if err else "")


def _change(j: Any) -> str:
    if j is None:
        return "–"
    if not j.comparable or j.change is None:
        return "not comparable"
    unit = " %" if j.unit == "%" else f" {j.unit}"
    if j.low is None:
        return f"{j.change:+.2f}{unit}"
    return f"{j.change:+.2f}{unit} [{j.low:+.2f}, {j.high:+.2f}]"


def _chunked(sel: list[dict[str, Any]], quant: str, base: dict[str, Any] | None,
             q8: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    for metric in metric_names():
        info = known_metric_info(metric)
        spec = info.value_spec(info.primary) if info else None
        if info is None or spec is None or info.needs_base or spec.pairing is None:
            continue
        have = [r for r in sel if _cell(r, metric)]
        if not have:
            continue
        d = _cell(have[0], metric).get("details") or {}   # type: ignore[union-attr]
        lines += [f"### {metric} ({spec.name}), against the base and Q8_0", "",
                  _setup(d) + ". Changes: the one judge's, paired by chunk, 95 % interval.", ""]
        body = []
        for r in have:
            c = _cell(r, metric)
            v, err = value_of(c, spec.name)
            jb = (judge(metric, spec, _cell(base, metric), c)
                  if base is not None and r is not base and _cell(base, metric) else None)
            jq = (judge(metric, spec, _cell(q8, metric), c)
                  if q8 is not None and r is not q8 and _cell(q8, metric) else None)
            body.append([_name(r, quant), fmt(r.get("bpw"), 4), fmt(r.get("size_mb"), 4),
                         _pm(v, err, 5), "base" if r is base else _change(jb),
                         "Q8_0" if r is q8 else _change(jq)])
        lines += _md_table(["type", "bits/weight", "file MiB", f"{spec.name} ± err",
                            f"Δ vs {base['quant'] if base else 'base'}", "Δ vs Q8_0"], body)
        lines.append("")
    return lines


def _setup(d: dict[str, Any]) -> str:
    parts = [str(d.get("dataset") or "the text")]
    if d.get("ctx"):
        parts.append(f"ctx {d['ctx']}")
    if d.get("chunks"):
        parts.append(f"{d['chunks']} chunks")
    if d.get("scored_tokens"):
        parts.append(f"{int(d['scored_tokens']):,} scored tokens")
    return ", ".join(parts)


def _against_base(sel: list[dict[str, Any]], quant: str) -> list[str]:
    lines: list[str] = []
    for metric in metric_names():
        info = known_metric_info(metric)
        if info is None or not info.needs_base:
            continue
        have = [r for r in sel if _cell(r, metric) and not r["is_base"]]
        if not have:
            continue
        specs = [v for v in info.value_specs() if v.name == info.primary or v.column]
        d = _cell(have[0], metric).get("details") or {}   # type: ignore[union-attr]
        lines += [f"### {metric}, against the base", "", _setup(d) + ".", ""]
        body = []
        for v in specs:
            row = [v.column or v.name]
            for r in have:
                x, err = value_of(_cell(r, metric), v.name)
                row.append(_pm(x, err if v.name == info.primary else None, 4))
            body.append(row)
        key = f"{metric}.{info.primary}"
        verdicts = [((r.get("floor") or {}).get(key) or {}).get("verdict") or "–" for r in have]
        if any(x != "–" for x in verdicts):
            twin = next(((r.get("floor") or {}).get(key) or {}).get("twin") for r in have
                         if (r.get("floor") or {}).get(key))
            body.append([f"floor ({info.primary} of {twin})", *verdicts])
        lines += _md_table(["value", *(_name(r, quant) for r in have)], body)
        lines.append("")
    return lines


def _speed(sel: list[dict[str, Any]], quant: str) -> list[str]:
    lines: list[str] = []
    target = next((r for r in sel if r["quant"].upper() == quant.upper()), None)
    for metric in metric_names():
        info = known_metric_info(metric)
        if info is None or not info.hardware_bound:
            continue
        have = [r for r in sel if _cell(r, metric)]
        if not have or target is None or not _cell(target, metric):
            continue
        specs = [v for v in info.value_specs()
                 if v.gated and v.higher_is_better and v.spread == REPETITIONS]
        c0 = _cell(have[0], metric)
        env = c0.get("env") or {}
        run = c0.get("run") or {}
        lines += [f"### {metric}, on the CPU", "",
                  f"{env.get('cpu') or 'CPU unknown'}, {run.get('threads', '?')} threads, "
                  f"device {run.get('device', '?')}; options "
                  + ", ".join(f"{k} {v}" for k, v in sorted((c0.get("options") or {}).items()))
                  + ". Mean ± sd over repetitions; ratio: this type's mean / "
                  f"{target['quant']}'s. A timing taken while other work ran is marked.", ""]
        body = []
        for r in have:
            c = _cell(r, metric)
            row = [_name(r, quant)]
            for v in specs:
                x = ((c.get("values") or {}).get(v.name) or {})
                t = ((_cell(target, metric).get("values") or {}).get(v.name) or {})
                mean, sd, ref = x.get("value"), x.get("sd"), t.get("value")
                ratio = f" (×{mean / ref:.2f})" if mean and ref and r is not target else ""
                row.append(_pm(mean, sd, 4) + ratio)
            fit = c.get("fitness") or {}
            row.append("unreliable: " + "; ".join(map(str, fit.get("reasons") or []))
                       if fit.get("reliable") is False else "ok")
            body.append(row)
        lines += _md_table(["type", *(v.name for v in specs), "timing"], body)
        lines.append("")
    return lines


def _reproduce(sel: list[dict[str, Any]], suite_file: str, model: str, quant: str
               ) -> list[str]:
    """qbench's command and the llama.cpp tools' equivalents (their flags for the options the
    records hold)."""
    quants = [r["quant"] for r in sel]
    base = next((r for r in sel if r["is_base"]), None)
    globs = " ".join(f"--only '{model}/llama.cpp/{q}/*'" for q in quants)
    opts: dict[str, dict[str, Any]] = {}
    threads = None
    for r in sel:
        for m, c in r["cells"].items():
            if c.get("status") == "ok":
                opts.setdefault(m, c.get("options") or {})
                threads = threads or (c.get("run") or {}).get("threads")
    ppl = opts.get("perplexity") or {}
    sp = opts.get("speed") or {}
    b = base["quant"] if base else "F16"
    t = f" -t {threads}" if threads else ""
    lines = ["### Reproduce", "", "With qbench (the same cells, keyed by content: finished ones "
             "are not run again):", "", "```sh",
             f"qbench run {suite_file} {globs}",
             f"qbench report results/{sel[0]['suite']} --evidence-pack {quant.upper()}",
             "```", "", "With llama.cpp's tools (the methods qbench follows; qbench's KLD stores "
             "the base's top tokens covering 99.99 % of the mass plus tail draws instead of "
             "llama-perplexity's full-vocabulary file, within 0.3 % of its mean KLD on SmolLM2):",
             "", "```sh"]
    for q in quants:
        if base is None or q != b:
            lines.append(f"llama-quantize {b}.gguf {q}.gguf {q}")
    if ppl:
        chunks = f" --chunks {ppl['chunks']}" if ppl.get("chunks", 0) > 0 else ""
        lines.append(f"llama-perplexity -m {b}.gguf -f wiki.test.raw -c {ppl.get('ctx')}"
                     f"{chunks}{t} --kl-divergence-base {b}.kld")
        for q in quants:
            if q != b:
                lines.append(f"llama-perplexity -m {q}.gguf -c {ppl.get('ctx')}{chunks}{t} "
                             f"--kl-divergence-base {b}.kld --kl-divergence")
    if sp:
        lines.append(f"llama-bench -m {','.join(q + '.gguf' for q in quants)} "
                     f"-p {sp.get('prompt_tokens')} -n {sp.get('gen_tokens')} "
                     f"-r {sp.get('repetitions')}{t}")
    lines += ["```", ""]
    return lines


def evidence_pack(records: list[dict[str, Any]], quant: str, *,
                  suite_file: str = "SUITE.toml") -> str:
    """The Markdown evidence pack for ``quant`` (raises ValueError naming the types present
    when no model's ladder has it)."""
    rows = variant_rows(records)
    floor_verdicts(rows)
    packs = pick(rows, quant)
    if not packs:
        have = sorted({r["quant"] for r in rows if _plain(r)})
        raise ValueError(f"no llama.cpp variant {quant!r} with a footprint in these results "
                         f"(types present: {', '.join(have) or 'none'})")
    out = []
    for (suite, model), sel in packs.items():
        base = next((r for r in sel if r["is_base"]), None)
        q8 = next((r for r in sel if r["quant"] == "Q8_0"), None)
        twin = twins(rows).get((suite, model, "llama.cpp"))
        out += [f"## {quant.upper()}: evidence for llama.cpp ({model}, suite {suite})", "",
                f"Types of similar size (nearest in measured bits per weight), Q8_0 and the "
                f"base ({base['quant'] if base else 'none'}), measured by qbench as "
                "llama.cpp's CONTRIBUTING asks for a quantization type: perplexity against the "
                "native precision and against those types, KL divergence against the native "
                "precision, CPU performance against those types."
                + (f" The floor is the base's {twin[0]['quant']} twin." if twin else ""), ""]
        if base is not None and base.get("requantized_from"):
            out += [f"Note: the base was dequantized from a {base['requantized_from']} file, "
                    "so it is not the original model's precision; every loss is relative to "
                    "that base.", ""]
        out += _chunked(sel, quant, base, q8)
        out += _against_base(sel, quant)
        out += _speed(sel, quant)
        out += _reproduce(sel, suite_file, model, quant)
    return "\n".join(out)
