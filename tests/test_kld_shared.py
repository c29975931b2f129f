"""KLD computed in the perplexity cell's pass gives exactly the KLD cell's own numbers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from qbench.metrics import kld, perplexity, shared_pass
from qbench.metrics.context import CellContext


class Bigram:
    """Characters as tokens; next-token logits depend on the last token only."""

    name = "fake"
    add_bos = True
    bos_id = 1
    n_vocab = 400

    def __init__(self, noise: float = 0.0) -> None:
        rng = np.random.default_rng(0)
        self.table = (rng.normal(size=(self.n_vocab, self.n_vocab)) * 3).astype(np.float32)
        if noise:
            self.table += np.random.default_rng(1).normal(
                size=self.table.shape).astype(np.float32) * noise
        self.passes = 0

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return ([self.bos_id] if add_special else []) + [2 + ord(c) % 398 for c in text]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t - 2) for t in tokens)

    def chunk_logits(self, chunks: Sequence[Sequence[int]], first: int) -> Iterator[np.ndarray]:
        self.passes += 1
        for c in chunks:
            yield self.table[list(c[first:len(c) - 1])].copy()

    def close(self) -> None:
        pass


def _ctx(tmp: Path, backend: Bigram, base: Bigram, *, is_base: bool, sha: str,
         companions: dict | None = None, key: str = "") -> CellContext:
    return CellContext(cell_id="m/fake/x/m", model_id="m", artifact_path=tmp / f"{sha}.gguf",
                       artifact={"sha256": sha}, base_dir=tmp, data_dir=None,
                       cache_dir=tmp / "cache", is_base=is_base,
                       base_artifact={"sha256": "b" * 64}, _backend=backend,
                       _load_base=lambda: base, companions=companions or {}, cell_key=key)


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    (tmp_path / "t.txt").write_text("".join(chr(97 + int(i)) for i in rng.integers(0, 26, 9000)))
    return tmp_path


def test_shared_pass_matches_the_kld_cell(text_dir: Path, tmp_path: Path) -> None:
    opts = kld.Options(dataset="t.txt", ctx=128, chunks=6, max_tokens=32, tail_samples=16)
    ppl_opts = perplexity.Options(dataset="t.txt", ctx=128, chunks=6)
    base, variant = Bigram(), Bigram(noise=0.5)

    # the KLD cell on its own (fresh cache): loads the base, builds the cache, compares
    alone = kld.run(_ctx(text_dir, variant, base, is_base=False, sha="v" * 64), opts)
    assert alone["details"]["computed_in"] == "this cell"

    # shared: the base's perplexity pass builds the cache, the variant's pass compares
    shared_dir = tmp_path / "shared"
    shared_dir.mkdir()
    (shared_dir / "t.txt").write_text((text_dir / "t.txt").read_text())
    comp_base = {"kld": {**opts.__dict__, "cell_key": "kldbase"}}
    comp_var = {"kld": {**opts.__dict__, "cell_key": "kldvar"}}
    b2, v2 = Bigram(), Bigram(noise=0.5)
    p_base = perplexity.run(_ctx(shared_dir, b2, b2, is_base=True, sha="b" * 64,
                                 companions=comp_base), ppl_opts)
    p_var = perplexity.run(_ctx(shared_dir, v2, b2, is_base=False, sha="v" * 64,
                                companions=comp_var), ppl_opts)
    assert p_var["details"]["kld_shared_pass_s"] is not None
    passes = v2.passes
    via = kld.run(_ctx(shared_dir, v2, b2, is_base=False, sha="v" * 64, key="kldvar"), opts)
    assert v2.passes == passes        # no second forward pass
    assert "shared" in via["details"]["computed_in"]
    for name, v in alone["values"].items():
        assert via["values"][name]["value"] == pytest.approx(v["value"], rel=1e-9, abs=1e-12), name
    # per chunk (the regression gate's paired units): one per chunk, the same either way
    per_chunk = alone["details"]["per_chunk_kld"]
    assert len(per_chunk) == alone["details"]["chunks"] == 6
    assert via["details"]["per_chunk_kld"] == pytest.approx(per_chunk, rel=1e-9)
    assert np.mean(per_chunk) == pytest.approx(alone["values"]["kld_mean"]["value"], rel=1e-9)
    assert len(via["details"]["per_chunk_same_top"]) == 6
    # the perplexity values do not depend on the shared work
    plain = perplexity.run(_ctx(text_dir, Bigram(noise=0.5), base, is_base=False, sha="v" * 64),
                           ppl_opts)
    assert p_var["values"]["ppl"]["value"] == pytest.approx(plain["values"]["ppl"]["value"],
                                                            rel=1e-6)
    # the base compared with itself, from its own pass
    self_kld = kld.run(_ctx(shared_dir, b2, b2, is_base=True, sha="b" * 64, key="kldbase"),
                       opts)
    assert "shared" in self_kld["details"]["computed_in"]
    # a KLD cell with another key (other library version, batch, GPU setting) never reads it
    other = kld.run(_ctx(shared_dir, Bigram(noise=0.5), b2, is_base=False, sha="v" * 64,
                         key="kldvar2"), opts)
    assert other["details"]["computed_in"] == "this cell"
    assert self_kld["values"]["kld_mean"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert self_kld["values"]["same_top_pct"]["value"] == 100.0
    assert p_base["values"]["ppl"]["value"] > 1


def test_no_shared_pass_without_a_base_cache(text_dir: Path) -> None:
    """A variant's perplexity pass before the base cache exists leaves KLD to its own cell."""
    opts = kld.Options(dataset="t.txt", ctx=128, chunks=2)
    comp = {"kld": {**opts.__dict__, "cell_key": "k"}}
    v = Bigram(noise=0.5)
    out = perplexity.run(_ctx(text_dir, v, Bigram(), is_base=False, sha="v" * 64,
                              companions=comp), perplexity.Options(dataset="t.txt", ctx=128,
                                                                   chunks=2))
    assert out["details"]["kld_shared_pass_s"] is None
    assert not (text_dir / "cache" / "kld-base").exists()


def test_a_failing_shared_pass_leaves_perplexity_intact(text_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    opts = kld.Options(dataset="t.txt", ctx=128, chunks=2)
    comp = {"kld": {**opts.__dict__, "cell_key": "k"}}
    ppl_opts = perplexity.Options(dataset="t.txt", ctx=128, chunks=2)

    def broken(self, *args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(shared_pass.SharedPass, "feed", broken)
    ctx = _ctx(text_dir, Bigram(), Bigram(), is_base=True, sha="b" * 64, companions=comp)
    out = perplexity.run(ctx, ppl_opts)
    plain = perplexity.run(_ctx(text_dir, Bigram(), Bigram(), is_base=True, sha="b" * 64),
                           ppl_opts)
    assert out["values"]["ppl"]["value"] == pytest.approx(plain["values"]["ppl"]["value"])
    assert any("disk on fire" in n for n in ctx.notes)
    assert not (text_dir / "cache" / "kld-base").exists() or not list(
        (text_dir / "cache" / "kld-base").rglob("*.npz"))


def test_the_plan_names_the_kld_cell_a_perplexity_cell_serves(write_suite, tmp_path: Path
                                                               ) -> None:
    from qbench.suite.config import load_suite
    from qbench.suite.plan import PlanContext, expand

    path = write_suite("""
[suite]
name = "t"
[[models]]
id = "m"
source = "model.gguf"
[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0"]
[metrics.perplexity]
ctx = 128
[metrics.kld]
""")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    suite = load_suite(path)
    cells = expand(suite, PlanContext(base_dir=tmp_path, data_dir=None,
                                      cache_dir=tmp_path / "c"))
    by_id = {c.id: c for c in cells}
    comp = by_id["m/llama.cpp/Q8_0/perplexity"].companions
    assert comp["kld"]["cell_key"] == by_id["m/llama.cpp/Q8_0/kld"].key
    assert by_id["m/llama.cpp/Q8_0/kld"].companions == {}
    # --only narrows the plan after companions are attached: the KLD cell is still named
    only = expand(suite, PlanContext(base_dir=tmp_path, data_dir=None,
                                     cache_dir=tmp_path / "c"),
                  only=("m/llama.cpp/Q8_0/perplexity",))
    assert [c.companions for c in only] == [comp]
    # KLD on other tokens than perplexity: nothing to share
    other = load_suite(write_suite(path.read_text().replace("[metrics.kld]",
                                                            "[metrics.kld]\nctx = 256")))
    cells2 = expand(other, PlanContext(base_dir=tmp_path, data_dir=None,
                                       cache_dir=tmp_path / "c"))
    ppl = next(c for c in cells2 if c.id == "m/llama.cpp/Q8_0/perplexity")
    assert ppl.companions == {}
