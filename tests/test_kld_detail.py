"""KLD v4: confidence buckets, the 99.9 % tail, top-k agreement, their per-chunk pairing by
the one judge, and per-token KLD stored at two bytes a token."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest

from qbench.metrics import kld, token_codec
from qbench.metrics.scoring import log_softmax
from qbench.results.judge import judge


# -- the per-token codec ----------------------------------------------------------------------

def test_codec_keeps_every_scale_within_0_034_percent_at_two_bytes_a_token() -> None:
    x = np.concatenate([np.geomspace(1e-12, 1e6, 4000), [0.0, 1.3e-6, 0.05]])
    entry = token_codec.encode(x)
    assert len(base64.b64decode(entry["data"])) == 2 * len(x)
    back = token_codec.decode(entry)
    assert back is not None and back[-3] == 0.0
    nz = x > 0
    assert np.max(np.abs(back[nz] / x[nz] - 1)) < 3.4e-4
    # float16 would have lost what matters at near-lossless KLD (why this codec exists)
    assert abs(float(np.float16(1.3e-6)) / 1.3e-6 - 1) > 0.005    # a subnormal: 0.9 % off
    assert float(np.float16(2e-8)) == 0.0                          # flushed
    assert back[-2] == pytest.approx(1.3e-6, rel=3.4e-4)


def test_codec_refuses_what_it_cannot_store_and_reads_unknown_entries_as_absent() -> None:
    with pytest.raises(ValueError):
        token_codec.encode(np.array([1.0, np.nan]))
    assert token_codec.decode({"encoding": "fp16", "data": ""}) is None
    assert token_codec.decode(None) is None
    entry = token_codec.encode(np.array([1e-3, 2e-3]))
    assert token_codec.decode(entry | {"n": 3}) is None          # truncated data
    assert set(token_codec.per_token({"per_token": {"kld": entry}})) == {"kld"}


# -- per token: the base's confidence and the rank of its top token -----------------------------

def _rows(base_logits: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    targets = np.zeros(len(base_logits), dtype=np.int64)
    lp = log_softmax(base_logits.astype(np.float32))
    return kld._top_rows(lp, targets, kld.Options(max_tokens=64, tail_samples=8)), targets


def test_compare_rows_gives_the_bases_confidence_and_the_rank_of_its_top_token() -> None:
    rng = np.random.default_rng(3)
    vocab = 300
    base = rng.normal(size=(4, vocab)) * 2
    base[:, 7] += 12.0                      # token 7 is the base's top everywhere, confidently
    stored, targets = _rows(base)
    variant = base.copy()
    # row 0: unchanged; row 1: 3 tokens above 7; row 2: 6 above; row 3: 12 above
    for row, above in ((1, 3), (2, 6), (3, 12)):
        variant[row, 100:100 + above] = base[row, 7] + 1.0
    out = kld._compare_rows(stored, log_softmax(variant.astype(np.float32)), targets)
    assert out["rank"].tolist() == [0, 3, 6, 12]
    assert out["same"].tolist() == [True, False, False, False]
    p_top = np.exp(log_softmax(base.astype(np.float32))[:, 7])
    assert out["conf"] == pytest.approx(p_top, rel=1e-5)


def _tokens(rng: np.random.Generator, chunks: int, per: int) -> dict[str, np.ndarray]:
    n = chunks * per
    conf = rng.uniform(0, 1, n)
    return {"kld": rng.gamma(0.5, 0.02, n) * (1.5 - conf), "same": rng.random(n) < 0.9,
            "nll_q": rng.uniform(1, 4, n), "nll_b": rng.uniform(1, 4, n),
            "dp": rng.normal(0, 1e-2, n), "conf": conf.astype(np.float32),
            "rank": rng.integers(0, 20, n).astype(np.int32),
            "chunk": np.repeat(np.arange(chunks), per).astype(np.int32)}


def test_buckets_tail_and_top_k_values_match_their_definitions() -> None:
    rng = np.random.default_rng(11)
    t = _tokens(rng, 8, 255)
    out = kld.statistics(t)
    v, d = out["values"], out["details"]
    bounds = dict(zip(kld.BUCKET_NAMES, kld.CONF_BUCKETS))
    shares = 0.0
    for name, (lo, hi) in bounds.items():
        mask = (t["conf"] >= lo) & ((t["conf"] < hi) if hi < 1 else True)
        assert v[f"kld_conf_{name}"]["value"] == pytest.approx(t["kld"][mask].mean())
        assert v[f"share_conf_{name}"]["value"] == pytest.approx(100 * mask.mean())
        shares += v[f"share_conf_{name}"]["value"]
        # the per-chunk items average to the bucket's mean (equal chunks): what pairs two runs
        assert np.mean(d["per_chunk_kld_conf"][name]) == pytest.approx(t["kld"][mask].mean())
    assert shares == pytest.approx(100.0)
    assert v["kld_p999"]["value"] == pytest.approx(np.percentile(t["kld"], 99.9))
    for k in kld.TOP_K:
        assert v[f"top{k}_pct"]["value"] == pytest.approx(100 * (t["rank"] < k).mean())
        assert d[f"per_chunk_top{k}"][2] == pytest.approx((t["rank"][510:765] < k).mean())
    assert len(d["per_chunk_kld_p999"]) == 8


def test_an_empty_bucket_stores_a_share_of_zero_and_no_mean() -> None:
    rng = np.random.default_rng(2)
    t = _tokens(rng, 4, 50)
    t["conf"] = np.full(200, 0.6, dtype=np.float32)
    v = kld.statistics(t)["values"]
    assert v["share_conf_50_75"]["value"] == 100.0 and v["share_conf_0_25"]["value"] == 0.0
    assert "kld_conf_0_25" not in v and "kld_conf_50_75" in v


def test_records_from_kld_v3_still_compute_their_old_values() -> None:
    """Per-token arrays without the v4 fields (old pairs files, tests) give the v3 values."""
    rng = np.random.default_rng(4)
    t = {k: x for k, x in _tokens(rng, 3, 40).items() if k not in ("conf", "rank")}
    v = kld.statistics(t)["values"]
    assert "kld_mean" in v and "top5_pct" not in v and "kld_conf_0_25" not in v


# -- the one judge pairs the new values chunk by chunk -----------------------------------------

def _record(t: dict[str, np.ndarray]) -> dict:
    out = kld.statistics(t)
    details = out["details"] | {"dataset_sha256": "d", "ctx": 512, "chunks": 8,
                                "scored_tokens": len(t["kld"]), "base_sha256": "b"}
    return {"status": "ok", "values": out["values"], "details": details}


def test_the_judge_pairs_bucket_and_top_k_values_by_chunk() -> None:
    rng = np.random.default_rng(7)
    a = _tokens(rng, 8, 255)
    b = dict(a)
    conf = a["conf"]
    # the variant loses 30 % more where the base is confident, the same elsewhere
    b["kld"] = np.where(conf >= 0.95, a["kld"] * 1.3, a["kld"])
    b["rank"] = np.where(rng.random(len(conf)) < 0.05, 30, a["rank"]).astype(np.int32)
    ra, rb = _record(a), _record(b)
    spec = kld.INFO.value_spec("kld_conf_95_100")
    j = judge("kld", spec, ra, rb)
    assert j.comparable and j.n == 8 and j.method.startswith("paired t")
    assert j.change == pytest.approx(30.0, rel=1e-6)      # the bucket mean's relative change
    other = judge("kld", kld.INFO.value_spec("kld_conf_0_25"), ra, rb)
    assert other.change == pytest.approx(0.0, abs=1e-9)
    top5 = judge("kld", kld.INFO.value_spec("top5_pct"), ra, rb)
    assert top5.comparable and top5.change < 0 and top5.unit == "points"
    expected = 100 * ((b["rank"] < 5).mean() - (a["rank"] < 5).mean())
    assert top5.change == pytest.approx(expected)
    # another base's chunks are not the same items: not comparable, never a passing interval
    rb["details"]["base_sha256"] = "other"
    assert not judge("kld", spec, ra, rb).comparable


def test_declared_values_gate_only_what_the_docstring_justifies() -> None:
    gated = set(kld.INFO.gated_values())
    assert gated == {"kld_mean", "same_top_pct", "kld_conf_95_100"}
    for v in kld.INFO.value_specs():
        if v.gated or v.name.startswith(("top", "kld_conf", "kld_p999")):
            assert v.pairing is not None, v.name


def test_kld_run_stores_every_tokens_kld_compactly(tmp_path, monkeypatch) -> None:
    """kld.run keeps the per-token KLD in the record, two bytes a token, in scoring order."""
    rng = np.random.default_rng(1)
    t = _tokens(rng, 2, 30)
    base = {"counts": np.full(60, 3, np.int32), "rest": np.full(60, -9.0, np.float32)}
    cache = tmp_path / "kld" / "base.npz"
    cache.parent.mkdir()
    kld.save_npz(cache, base)
    monkeypatch.setattr(kld, "base_cache_path", lambda *a, **k: cache)
    kld.save_npz(kld.pairs_path(cache, "cellkey"), t)

    class Text:
        name, sha256 = "text", "sha"

    class Ctx:
        base_artifact = {"sha256": "b"}
        cache_dir, data_dir, base_dir, cell_key = tmp_path, None, tmp_path, "cellkey"
        notes: list[str] = []

    monkeypatch.setattr(kld, "load_text", lambda *a: Text())
    out = kld.run(Ctx(), kld.Options(ctx=64, chunks=2))
    back = token_codec.per_token(out["details"])["kld"]
    assert len(back) == 60
    assert back == pytest.approx(np.maximum(t["kld"], 0), rel=3.4e-4)
    assert out["details"]["computed_in"].startswith("the perplexity cell")
    assert math.isclose(out["values"]["kld_mean"]["value"], float(t["kld"].mean()))
