"""The report's views of where the loss lives: the floor and its verdicts, the tables of every
declared KLD value, depth, paired per-token histograms, resident bytes, the tensors people
choose, and the evidence pack - on synthetic records built by the metric's own statistics."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from qbench.cli import main
from qbench.metrics import kld, token_codec
from qbench.report import evidence, floor, resident, tokens
from qbench.report.build import render_suite
from qbench.report.contexts import depth_view
from qbench.report.table import variant_rows
from qbench.results.store import Store
from synthetic_records import SHAPE, _v, make_record

CHUNKS, PER = 8, 255
N = CHUNKS * PER
# quant -> (bits/weight, KLD scale, tg tokens/s, role types, output asked)
LADDER = {
    "F16": (16.0, 0.0, 48.0, "F16", ""),
    "BF16": (16.0, 2e-4, 47.0, "BF16", ""),
    "Q8_0": (8.5, 1.2e-3, 80.0, "Q8_0", ""),
    "Q5_K_M": (5.7, 1.5e-2, 100.0, "Q8_0", ""),
    "Q4_K_M": (4.9, 3e-2, 120.0, "Q8_0", ""),
    "Q4_K_M+output=Q5_0": (4.7, 4e-2, 121.0, "Q5_0", "Q5_0"),
    "Q4_0": (4.6, 5e-2, 125.0, "Q8_0", ""),
    "Q2_K": (3.2, 0.4, 140.0, "Q8_0", ""),
}


def _tokens(rng: np.random.Generator, scale: float, ctx: int) -> dict[str, np.ndarray]:
    conf = np.random.default_rng(ctx).uniform(0, 1, N).astype(np.float32)  # the base's
    k = scale * rng.gamma(0.6, 1.0, N) * (1.6 - conf)
    return {"kld": k, "same": rng.random(N) > 3 * scale, "conf": conf,
            "rank": np.where(rng.random(N) < 3 * scale, 7, 0).astype(np.int32),
            "nll_q": 3.0 + scale + rng.normal(0, 0.01, N), "nll_b": np.full(N, 3.0),
            "dp": rng.normal(0, scale, N), "chunk": np.repeat(np.arange(CHUNKS), PER)}


def _records(with_depth: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    recs = []
    for quant, (bpw, scale, tg, role, asked) in LADDER.items():
        base = quant == "F16"
        plain_quant = quant.split("+")[0]
        variant_extra = {"output_tensor_type": asked} if asked else {}
        params = 134.5e6
        size_b = bpw * params / 8

        def rec(metric: str, suffix: str = "", **kw):
            r = make_record("m", "llama.cpp", plain_quant, metric, is_base=base, suite="loss",
                            **kw)
            r["variant"].update(variant_extra)
            r["id"] = f"m/llama.cpp/{quant}/{metric}{suffix}"
            r["key"] = hashlib.sha256(r["id"].encode()).hexdigest()[:24]
            return r

        recs.append(rec("footprint", values={"file_size_mb": _v(size_b / 2 ** 20 + 1),
                                             "bpw": _v(bpw), "n_params": _v(params)},
                        details={"shape": SHAPE, "tensor_bytes": int(size_b),
                                 "roles": {"token_embd": role, "output": None},
                                 "tensor_types": {role: {"params": int(params)}}}))
        for ctx, suffix in ((512, ""), (8192, "@ctx=8192")) if with_depth else ((512, ""),):
            grow = 3.0 if ctx == 8192 else 1.0
            t = _tokens(rng, scale * grow, ctx)
            stats = kld.statistics(t)
            chunk_nll = [float(t["nll_q"][i * PER:(i + 1) * PER].sum()) for i in range(CHUNKS)]
            ppl = math.exp(float(t["nll_q"].mean()))
            ident = {"dataset_sha256": "d" * 64, "ctx": ctx, "chunks": CHUNKS,
                     "scored_tokens": N}
            recs.append(rec("perplexity", suffix, values={"ppl": _v(ppl, ppl * 0.01, N)},
                            options={"dataset": "wikitext-2", "ctx": ctx, "chunks": CHUNKS},
                            details=ident | {"per_chunk_nll_sum": chunk_nll,
                                             "per_chunk_tokens": [PER] * CHUNKS,
                                             "tokens_in_text": 300000, "dataset": "wiki"}))
            if not base:
                recs.append(rec("kld", suffix, values=stats["values"],
                                options={"dataset": "wikitext-2", "ctx": ctx, "chunks": CHUNKS},
                                details=stats["details"] | ident | {
                                    "base_sha256": "b" * 64, "dataset": "wiki",
                                    "per_token": {"kld": token_codec.encode(
                                        np.maximum(t["kld"], 0))}}))
        recs.append(rec("speed", values={
            "pp_tokens_per_s": _v(400 + 10 * bpw, sd=10.0, n=5),
            "tg_tokens_per_s": _v(tg, sd=tg * 0.03, n=5)},
            options={"prompt_tokens": 256, "gen_tokens": 128, "repetitions": 5},
            memory={"peak_rss_mb": size_b / 2 ** 20 + 100, "peak_vram_mb": None}))
        recs[-1]["run"] = {"threads": 2, "device": "cpu"}
    return recs


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    r = variant_rows(_records())
    floor.floor_verdicts(r)
    return r


def _row(rows: list[dict], quant: str) -> dict:
    return next(r for r in rows if r["quant"] == quant)


def test_the_float_twin_is_the_floor_and_variants_get_verdicts(rows) -> None:
    assert [r["quant"] for r in rows if floor.is_twin(r)] == ["BF16"]
    bf16 = _row(rows, "BF16")["floor"]["kld.kld_mean"]
    assert bf16["is_floor"] and bf16["value"] == pytest.approx(
        _row(rows, "BF16")["cells"]["kld"]["values"]["kld_mean"]["value"])
    assert _row(rows, "Q2_K")["floor"]["kld.kld_mean"]["verdict"] == floor.ABOVE
    assert _row(rows, "Q8_0")["floor"]["kld.kld_mean"]["verdict"] == floor.ABOVE
    assert "kld.kld_mean" not in _row(rows, "F16").get("floor", {})   # the base


def test_a_variant_below_the_twin_is_within_the_floor() -> None:
    recs = _records(with_depth=False)
    for r in recs:     # make Q8_0's per-chunk KLD a tenth of BF16's
        if r["id"] == "m/llama.cpp/Q8_0/kld":
            twin = next(x for x in recs if x["id"] == "m/llama.cpp/BF16/kld")
            r["values"] = dict(r["values"]) | {"kld_mean": dict(twin["values"]["kld_mean"])}
            r["values"]["kld_mean"]["value"] *= 0.1
            r["details"] = dict(r["details"]) | {
                "per_chunk_kld": [x * 0.1 for x in twin["details"]["per_chunk_kld"]]}
    rows = variant_rows(recs)
    floor.floor_verdicts(rows)
    got = _row(rows, "Q8_0")["floor"]["kld.kld_mean"]
    assert got["verdict"] == floor.WITHIN
    assert got["judgement"].change == pytest.approx(-90.0)


def test_resident_bytes_are_every_tensor_plus_the_kv_cache(rows) -> None:
    r = _row(rows, "Q4_K_M")
    mb, how = resident.resident_mb(r, 4096)
    kv = 2 * 30 * 3 * (576 / 9) * 4096 * 2 / 2 ** 20
    assert mb == pytest.approx(r["tensor_bytes"] / 2 ** 20 + kv)
    assert "KV cache at 4,096 tokens" in how
    assert resident.resident_mb(r, 8192)[0] > mb


def test_depth_view_has_both_contexts_and_judges_each_against_the_base_there(rows) -> None:
    view = depth_view(rows)
    assert view is not None and view["contexts"] == [512, 8192]
    kinds = {(c["metric"], c["kind"]) for c in view["columns"]}
    assert kinds == {("perplexity", "change"), ("kld", "value")}
    q4 = next(r for r in view["rows"] if r["quant"] == "Q4_K_M")
    short, long = q4["by"][("kld", 512)], q4["by"][("kld", 8192)]
    assert long["value"] > 2 * short["value"]              # the synthetic loss grows with ctx
    j = q4["by"][("perplexity", 8192)]["judgement"]
    assert j.comparable and j.n == CHUNKS and j.change > 0
    assert long["floor"]["verdict"] == floor.ABOVE


def test_paired_token_summary_pairs_by_position() -> None:
    a = np.array([1e-3, 1e-3, 1e-3, 1e-3])
    b = np.array([2e-3, 5e-4, 1e-2, 1e-3])
    s = tokens.paired(a, b)
    assert s["share_higher"] == 0.5
    assert s["median_log10_ratio"] == pytest.approx(np.median(np.log10(b / a)))


def test_the_page_shows_every_new_view(rows) -> None:
    html = render_suite("loss", _records(), kv_ctx=4096)
    for text in ("KLD, base p(top) [0.95, 1]", "top-5 agreement %", "KLD p99.9",
                 "the floor</b>", floor.ABOVE, 'id="depth"', "ctx 8,192",
                 'id="plot-tokens-kld-kld-m"', 'id="plot-tokens-kld-kld-m-paired"',
                 'id="plot-resident-kld"', 'id="plot-depth-kld"', "floor: BF16 (llama.cpp)",
                 "token_embd Q5_0", "output tied", "resident MiB @4,096"):
        assert text in html, text


def test_evidence_pack_for_q4_k_m(rows) -> None:
    text = evidence.evidence_pack(_records(), "q4_k_m", suite_file="suites/x.toml")
    assert text.startswith("## Q4_K_M: evidence for llama.cpp (m, suite loss)")
    picked = [r["quant"] for r in evidence.pick(variant_rows(_records()), "Q4_K_M")[("loss", "m")]]
    # the nearest four by bits per weight, Q8_0 and the base; never the output-type variant
    assert picked == ["F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0", "Q2_K"]
    for section in ("### perplexity (ppl), against the base and Q8_0",
                    "### kld, against the base", "### speed, on the CPU", "### Reproduce"):
        assert section in text
    assert "| **Q4_K_M** |" in text and "floor (kld_mean of m / llama.cpp / BF16)" in text
    assert "llama-quantize F16.gguf Q4_K_M.gguf Q4_K_M" in text
    assert "--kl-divergence-base F16.kld --kl-divergence" in text
    assert "llama-bench -m F16.gguf,Q8_0.gguf" in text and "-p 256 -n 128 -r 5 -t 2" in text
    assert "(×" in text                                     # speed ratio vs the type
    with pytest.raises(ValueError, match="types present"):
        evidence.evidence_pack(_records(), "IQ4_XS")


def test_cli_writes_the_evidence_pack(tmp_path: Path, capsys) -> None:
    store = Store(tmp_path / "results", "loss")
    store.folders()
    for r in _records():
        store.save(r)
    results = store.dir
    assert main(["report", str(results), "--out", str(tmp_path / "out"),
                 "--evidence-pack", "Q4_K_M"]) == 0
    out = tmp_path / "out" / "loss-evidence-Q4_K_M.md"
    assert out.exists() and "## Q4_K_M" in out.read_text()
    assert main(["report", str(results), "--out", str(tmp_path / "out"),
                 "--evidence-pack", "IQ1_S"]) == 1
    assert "types present" in capsys.readouterr().err


def test_a_depth_points_failed_rerun_does_not_hide_its_ok_record() -> None:
    """Several records of one cell at another context (a rerun that failed, kept for the
    record) resolve as the main context's do: the ok one shows, whatever the order."""
    recs = _records()
    ok = next(r for r in recs if r["id"] == "m/llama.cpp/Q4_K_M/kld@ctx=8192")
    failed = dict(ok, status="failed", values={}, error="killed", run_id="zz-later")
    for order in ([ok, failed], [failed, ok]):
        rows = variant_rows([r for r in recs if r is not ok] + order)
        got = _row(rows, "Q4_K_M")["points"]["ctx=8192"]["kld"]
        assert got["status"] == "ok" and got["values"]["kld_mean"] == ok["values"]["kld_mean"]


def test_evidence_pack_skips_a_neighbour_with_only_a_footprint() -> None:
    """A type whose run stopped after its footprint is no neighbour: the next nearest is."""
    recs = [r for r in _records()
            if not (r["id"].startswith("m/llama.cpp/Q4_0/") and r["metric"] != "footprint")]
    picked = [r["quant"] for r in evidence.pick(variant_rows(recs), "Q4_K_M")[("loss", "m")]]
    assert "Q4_0" not in picked
    assert picked == ["F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q2_K"]


def test_one_chunk_above_the_twin_is_not_called_indistinguishable() -> None:
    """At one chunk the judge has a change but no interval: a variant far above the twin must
    not read as "indistinguishable from the floor" (SmolLM2 at 8,192 tokens: Q4_K_M did)."""
    recs = []
    for r in _records(with_depth=False):
        if r["metric"] == "kld":
            d = r["details"]
            for key, items in list(d.items()):
                if key.startswith("per_chunk_") and isinstance(items, list):
                    d[key] = items[:1]
            d["per_chunk_kld_conf"] = {k: v[:1] for k, v in d["per_chunk_kld_conf"].items()}
            d["chunks"] = 1
        recs.append(r)
    rows = variant_rows(recs)
    floor.floor_verdicts(rows)
    got = _row(rows, "Q4_K_M")["floor"]["kld.kld_mean"]["verdict"]
    assert got.startswith(floor.NO_INTERVAL) and got != floor.INDISTINGUISHABLE
