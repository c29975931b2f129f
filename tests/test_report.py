"""The static report: self-contained pages, the full variant table, plots, recommendation, fp16
rule, escaping of hostile names. Built from synthetic records (qbench.report.synthetic)."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from qbench.report.build import build_site, render_suite, safe_name
from qbench.report.figures import pareto, suite_figures
from qbench.report.recommend import fp16_rule, kv_cache_mb, recommend
from synthetic_records import SHAPE, demo_records, make_record
from qbench.backends import method_of, nominal_bits
from qbench.report.table import type_mix, variant_rows

HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def demo_rows() -> list[dict]:
    return variant_rows(demo_records())


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("site")
    build_site(demo_records(model=HOSTILE), out, budget_gb=0.3, max_loss_pct=1.0)
    return (out / "demo.html").read_text(encoding="utf-8")


def _visible(page: str) -> str:
    """The page without scripts and styles."""
    return re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.S)


def test_build_site_writes_index_and_one_page_per_suite(tmp_path: Path) -> None:
    recs = demo_records(suite="alpha") + demo_records(suite="beta/../x", model="m2")
    pages = build_site(recs, tmp_path)
    assert pages[0] == tmp_path / "index.html"
    names = sorted(p.name for p in pages[1:])
    assert names == ["alpha.html", "beta_.._x.html"]
    index = pages[0].read_text()
    assert 'href="alpha.html"' in index and 'href="beta_.._x.html"' in index
    assert all(p.parent == tmp_path for p in pages)     # no suite name escapes the folder


def test_safe_name() -> None:
    assert safe_name("../etc") == "_etc"
    assert safe_name("") == "suite"
    assert safe_name("...") == "suite"


def test_page_is_self_contained(page: str) -> None:
    # plotly.js inlined exactly once, in the head; no external script, style, font or image
    assert page.count("Plotly.newPlot") >= 1
    head = page.split("</head>", 1)[0]
    assert "plotly.js v" in head or "plotly" in head.lower()
    assert len(re.findall(r"<script[^>]*>\s*/\*\*?\s*\n?\* plotly\.js", page)) <= 1
    tags = re.findall(r"<(?:script|link|img|iframe|source)\b[^>]*>", page, flags=re.I)
    for tag in tags:
        assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", tag, re.I), tag
    assert "@import" not in _visible(page)
    assert "cdn.plot.ly" not in _visible(page)


def test_plotly_js_is_inlined_once(page: str) -> None:
    from plotly.offline import get_plotlyjs
    marker = get_plotlyjs()[:200]
    assert page.count(marker) == 1


def test_hostile_model_name_is_escaped(page: str) -> None:
    visible = _visible(page)
    assert HOSTILE not in visible                      # never raw markup in the HTML
    assert html.escape(HOSTILE, quote=False) in visible or html.escape(HOSTILE) in visible
    # inside the figures' JSON, '<' is escaped so nothing can close the script tag
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, flags=re.S)
    assert not any("onerror=alert(1)>" in s and "<img" in s for s in scripts[1:])


def test_table_has_every_variant_and_failure_reasons(page: str, demo_rows: list[dict]) -> None:
    visible = _visible(page)
    for quant in ("F16", "Q8_0", "Q6_K", "Q4_K_M", "Q2_K", "fp32", "awq-w4g64", "bnb-nf4"):
        assert f">{quant}" in visible
    assert "perplexity: crashed" in visible and "the cell process died of SIGILL" in visible
    assert "speed: timeout" in visible and "no result within 600 s" in visible
    assert "skipped" in visible and "bitsandbytes is not installed" in visible
    assert "degenerate" in visible
    assert len(demo_rows) == 8


def test_page_has_all_sections(page: str) -> None:
    for anchor in ("recommendation", "variants", "plots", "advice", "fp16", "sanity",
                   "methodology", "environment", "sources"):
        assert f'id="{anchor}"' in page
    for claim in range(1, 5):
        assert f'id="claim-{claim}"' in page
    visible = _visible(page)
    assert "Synthetic CPU" in visible                  # environment
    assert "wikitext-2" in visible and "ctx=512" in visible   # methodology
    assert "stratified by subject" in visible          # MMLU subset rule
    assert "https://arxiv.org/abs/2404.14047v3" in visible     # citation
    # the sequential method --until-decided judges by is named where the decisions are
    assert "group-sequential plan with Bonferroni spending" in visible


def test_all_plots_present_with_data(demo_rows: list[dict]) -> None:
    figs = dict(suite_figures(demo_rows))
    assert set(figs) == {"bpw-perplexity", "bpw-kld", "bpw-mmlu", "speed-memory", "roofline",
                         "speed-depth", "delta-perplexity", "delta-mmlu"}
    for fig_id, fig in figs.items():
        assert fig is not None, fig_id
        assert any(len(tr.x or []) for tr in fig.data), fig_id
    # one colour per backend
    speed = figs["speed-memory"]
    colours = {tr.name: tr.marker.color for tr in speed.data if tr.mode != "lines"}
    assert colours["llama.cpp"] != colours["transformers"]
    # the roofline is drawn at the measured bandwidth: B / bytes per token at every x
    roof = next(tr for tr in figs["roofline"].data if tr.name.startswith("roofline"))
    assert "60.0 GB/s" in roof.name
    assert all(abs(y * x * 1e6 - 60e9) < 1e3 for x, y in zip(roof.x, roof.y))
    # hover names the cell
    assert any("llama.cpp / Q4_K_M" in h for tr in figs["bpw-perplexity"].data
               for h in (tr.hovertext or []))


def test_frontier_marked() -> None:
    rows = [{"bpw": 16, "y": 1.0}, {"bpw": 8, "y": 1.01}, {"bpw": 6, "y": 1.5},
            {"bpw": 5, "y": 1.2}, {"bpw": 4, "y": 2.0}]
    assert [r["bpw"] for r in pareto(rows, "bpw", "y")] == [4, 5, 8, 16]
    up = pareto(rows, "bpw", "y", maximize_y=True)
    assert [r["bpw"] for r in up] == [4]


def test_page_without_metrics_still_renders() -> None:
    recs = [make_record("m", "llama.cpp", "Q4_K_M", "perplexity", status="crashed",
                        error="boom")]
    text = render_suite("s", recs)
    assert "perplexity: crashed" in text and "boom" in text
    assert "No data for the bpw-perplexity plot" in text


def test_deltas_come_from_the_one_judge(demo_rows: list[dict]) -> None:
    """ΔPPL is the judge's chunk-paired t interval (the gate's); a variant whose perplexity
    cells cannot be paired with the base's has no ΔPPL, and says why."""
    q4 = next(r for r in demo_rows if r["quant"] == "Q4_K_M" and r["backend"] == "llama.cpp")
    j = q4["dppl_judged"]
    assert q4["dppl_pct"] == j.change and q4["dppl_ci_high"] == j.high
    assert "paired t on per-chunk ln ppl ratio (16 chunks)" == q4["dppl_how"]
    mmlu = q4["judged"]["mmlu.acc"]
    assert mmlu.method.startswith("exact McNemar") and q4["mmlu_paired"]["n"] == mmlu.n
    awq = next(r for r in demo_rows if r["quant"] == "awq-w4g64")
    assert awq["dppl_pct"] is None and awq["dppl_how"].startswith("not comparable: ")


def test_dppl_bars_draw_the_tables_asymmetric_95_interval(demo_rows: list[dict]) -> None:
    """The ΔPPL figure's bars end where the table's interval ends (computed on ln ratio, so the
    upper arm is longer than the lower), not at ± one standard error."""
    fig = dict(suite_figures(demo_rows))["delta-perplexity"]
    checked = 0
    for tr in fig.data:
        err = tr.error_y
        assert err.symmetric is False
        for x, y, up, down in zip(tr.x, tr.y, err.array, err.arrayminus):
            row = next(r for r in demo_rows if f"{r['model']} {r['quant']}" == x
                       and not r["is_base"] and r["backend"] == tr.name)
            assert y + up == pytest.approx(row["dppl_ci_high"])
            assert y - down == pytest.approx(row["dppl_ci_low"])
            if row["dppl_pct"] > 1:
                assert up > down
            checked += 1
    assert checked >= 3


def test_mmlu_paired_against_base(demo_rows: list[dict]) -> None:
    q2 = next(r for r in demo_rows if r["quant"] == "Q2_K")
    p = q2["mmlu_paired"]
    assert p["flips_lost"] == 30 and p["flips_gained"] == 10
    assert p["significant"] and p["diff"] < 0
    q8 = next(r for r in demo_rows if r["quant"] == "Q8_0")
    assert not q8["mmlu_paired"]["significant"]


@pytest.mark.parametrize("backend,quant,bits,method", [
    ("llama.cpp", "F16", 16, "float"), ("llama.cpp", "Q8_0", 8, "gguf"),
    ("llama.cpp", "Q4_K_M", 4, "gguf"), ("llama.cpp", "IQ3_XXS", 3, "gguf"),
    ("transformers", "awq-w4g64", 4, "awq"), ("transformers", "gptq-w3g128", 3, "gptq"),
    ("transformers", "bnb-int8", 8, "bnb"), ("transformers", "bnb-nf4", 4, "bnb"),
    ("transformers", "fp32", 32, "float"), ("llama.cpp", "Q4_K_M@hf:org/repo", 4, "gguf"),
])
def test_nominal_bits(backend: str, quant: str, bits: float, method: str) -> None:
    assert nominal_bits(backend, quant) == bits
    assert method_of(backend, quant) == method


def test_type_mix_orders_by_share() -> None:
    assert type_mix({"F32": {"params": 1}, "Q5_0": {"params": 90}, "Q8_0": {"params": 9}}) \
        == "Q5_0 90% · Q8_0 9% · F32 1%"
    assert type_mix({}) == "–"


def test_kv_cache_formula() -> None:
    # 2 (K,V) x 30 layers x 3 kv heads x 64 head dim x 4096 tokens x 2 bytes
    assert kv_cache_mb(SHAPE, 4096) == pytest.approx(2 * 30 * 3 * 64 * 4096 * 2 / 2 ** 20)
    # Llama-3-8B: 32 layers, 8 KV heads, head dim 128: 512 MiB at 4096 tokens
    llama3 = {"block_count": 32, "attention.head_count": 32, "attention.head_count_kv": 8,
              "embedding_length": 4096}
    assert kv_cache_mb(llama3, 4096) == pytest.approx(512.0)
    assert kv_cache_mb({}, 4096) is None


def test_recommendation_with_budget_picks_lowest_loss_that_fits(demo_rows: list[dict]) -> None:
    [rec] = recommend(demo_rows, budget_gb=0.35, max_loss_pct=1.0, kv_ctx=4096)
    assert rec["choice"] is not None
    assert rec["choice"]["row"]["quant"] == "Q8_0"      # F16 does not fit 0.35 GiB
    assert rec["choice"]["need_mb"] <= 0.35 * 1024
    assert "Q8_0" in rec["why"] and "4096" in rec["why"]
    by = {c["row"]["quant"]: c for c in rec["candidates"]}
    assert not by["Q2_K"]["eligible"]                     # loss, degenerate
    assert any("degenerate" in r for r in by["Q2_K"]["reasons"])
    assert not by["F16"]["fits"]
    assert by["Q6_K"]["reasons"] == ["loss unknown: perplexity crashed"]


def test_recommendation_without_budget_picks_smallest_within_loss(demo_rows) -> None:
    # Q4_K_M: +2.92 %, upper end of its chunk-paired 95 % interval +3.35 %
    [rec] = recommend(demo_rows, budget_gb=None, max_loss_pct=3.0)
    assert rec["choice"]["row"]["quant"] == "Q8_0"          # Q4_K_M straddles 3 %
    assert [c["row"]["quant"] for c in rec["borderline"]] == ["Q4_K_M"]
    assert "Q4_K_M is borderline" in rec["borderline_text"][0]
    [rec] = recommend(demo_rows, budget_gb=None, max_loss_pct=3.5)
    assert rec["choice"]["row"]["quant"] == "Q4_K_M" and not rec["borderline"]
    [none] = recommend(demo_rows, budget_gb=0.05, max_loss_pct=0.1)
    assert none["choice"] is None and "No measured variant" in none["why"]


def test_fp16_rule_of_thumb(demo_rows: list[dict]) -> None:
    [m] = fp16_rule(demo_rows)
    assert m["estimate_mb"] == pytest.approx(2 * 134.5e6 / 2 ** 20)
    [check] = m["checks"]
    assert check["label"].endswith("F16")
    assert check["file_ratio"] == pytest.approx(1.0)
    assert check["peak_ratio"] > 1.0
