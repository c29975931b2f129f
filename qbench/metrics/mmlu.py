"""MMLU accuracy with lm-eval's ``mmlu`` prompt and log-likelihood scoring, one forward pass per
question.

lm-eval scores each of the continuations " A", " B", " C", " D" after the prompt (its
``_encode_pair``: ``whole = enc(ctx + cont)``, ``ctx_enc = enc(ctx)``,
``cont = whole[len(ctx_enc):]``, then the model reads ``ctx_enc + cont``) and predicts the argmax
of the summed log-probabilities, without length normalisation. When each ``cont`` is a single
token - true for every tokenizer we know, since "Answer:" ends the prompt - all four
log-likelihoods are the log-softmax at the last prompt position, so qbench evaluates each
prompt once (``Backend.last_logits``, several prompts per batch) instead of four times, with the
same numbers (up to batching's floating-point noise). The check is made per question; a
question where any continuation is not one token is scored the long way, exactly as lm-eval
(``ctx_enc + cont`` through ``Backend.chunk_logits``, one sequence per letter), and counted in
``details.multi_token_fallbacks``.

Tokenization adds special tokens the way the model's tokenizer does (``add_special=True``: BOS
first where the GGUF says ``add_bos_token``), as lm-eval does since it delegated BOS to the
tokenizer (lm-evaluation-harness PR #3347; earlier releases added no BOS except for Gemma).

Accuracy is the mean over the chosen questions (lm-eval's ``acc``, and its group ``mmlu`` with
``weight_by_size``: the micro average); its standard error is lm-eval's sample standard error of
the mean, sqrt(p(1-p)/(n-1)). On a stratified subset every subject weighs the same, so the value
is not an estimate of the full-set micro average; it is for comparing variants on identical
questions (see :mod:`qbench.results.stats` for the paired test on the stored ``correct`` lists).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from qbench.backends.base import Backend
from qbench.errors import DatasetError, QbenchError
from qbench.inputs.mmlu_data import (LETTERS, SUBSET_RULE, Question, build_context, few_shot_prefix, fewshot_examples, load_split, locate, select_subset)
from qbench.options import positive
from qbench.metrics import NONE, POINTS, MetricInfo, Pairing, Value
from qbench.metrics.context import CellContext, value
from qbench.metrics.scoring import log_softmax

CHANCE = 0.25            # four choices
ONE_LETTER_SHARE = 0.6   # a model answering one letter this often reads letter bias


def cannot_discriminate(record: Mapping[str, Any]) -> str | None:
    """Why this MMLU result cannot tell variants apart, None when it can: a model at chance
    (its 95 % Wilson interval includes 25 %) or answering one letter to >= 60 % of the
    questions measures letter bias, not knowledge - a change there is neither a pass nor a
    loss."""
    d = record.get("details") or {}
    correct = d.get("correct") or []
    n = len(correct)
    if not n:
        return None
    reasons = []
    predicted = d.get("predicted") or []
    if predicted:
        letter, k = Counter(predicted).most_common(1)[0]
        if k >= ONE_LETTER_SHARE * len(predicted):
            reasons.append(f"it answers {letter} to {k} of {len(predicted)} questions")
    low, high = _wilson(int(sum(correct)), n)
    if low <= CHANCE <= high:
        reasons.append(f"its accuracy {100 * sum(correct) / n:.1f} % is at chance (95 % "
                       f"interval {100 * low:.1f}-{100 * high:.1f} % includes 25 %)")
    return "; ".join(reasons) or None


@cache
def _wilson(k: int, n: int) -> tuple[float, float]:
    """95 % Wilson interval of k successes in n (scipy's; cached: every comparison asks)."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _questions_available(record: Mapping[str, Any]) -> int | None:
    n = (record.get("details") or {}).get("questions_in_dataset")
    return int(n) if n else None


QUESTIONS = Pairing(items="correct", ids="question_ids", binary=True, unit="questions",
                    identity=("dataset", "shots", "seed", "subset_rule"),
                    available=_questions_available, nested=True)

INFO = MetricInfo(
    name="mmlu", version="1", primary="acc", higher_is_better=True,
    sample_option="subset",    # subsets of one seed nest: 570 questions hold the 285
    cost=lambda options: (5.0 * (options.subset if options.subset > 0 else 14042) / 285.0
                          * (1.0 + options.shots)),
    methodology=(
        "lm-eval's mmlu task: prompt 'The following are multiple choice questions (with answers) "
        "about {subject}.\\n\\n' + k solved dev examples (first k of the subject, 0 by default) "
        "+ '{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:', tokenized with the model's "
        "special tokens (BOS where the model adds it); prediction = argmax of the "
        "log-likelihood of ' A'/' B'/' C'/' D' (no length normalisation), read from one "
        "forward pass when each letter is one token (checked per question, otherwise scored "
        "token by token as lm-eval). acc = mean correctness over the questions, stderr = "
        "sqrt(p(1-p)/(n-1)). A subset is stratified by subject and seeded (subset=285: 5 per "
        "subject), identical for every variant; per-question correctness is stored so that a "
        "variant is compared with its base by an exact McNemar test on the flipped questions. "
        "A base at chance (its 95 % Wilson interval includes 25 %) or answering one letter to "
        "60 % or more of the questions cannot discriminate: its comparisons are shown as such, "
        "neither a pass nor a loss."),
    # 1 point: twice the MMLU fidelity target, below the gap between neighbouring quants
    values=(Value("acc", True, change=POINTS, scale=100.0, tolerance=1.0, pairing=QUESTIONS,
                  figure="MMLU accuracy vs bits per weight", fitness=cannot_discriminate),
            Value("questions_per_s", True, change="log", gated=False, spread=NONE)),
)

CONTINUATIONS = tuple(f" {letter}" for letter in LETTERS)
MAX_SEQS_PER_CALL = 16   # the llama.cpp backend decodes at most 16 prompts at once


@dataclass(frozen=True)
class Options:
    subset: int = 285          # questions, stratified by subject; 0: all 14,042
    shots: int = 0             # k-shot examples per prompt, from the dev split
    seed: int = 0              # which questions a subset takes
    dataset: str = "mmlu"      # 'mmlu' (data dir, else HF cais/mmlu), or a test.jsonl / folder

    def validate(self, *, file: str, key: str) -> None:
        positive(self.subset, file=file, key=f"{key}.subset", allow_zero=True)
        positive(self.shots, file=file, key=f"{key}.shots", allow_zero=True)


def key_extras(options: Options, plan_ctx: Any) -> dict[str, Any]:
    """The data files' content is part of the cell key; a k-shot run without a dev split fails
    here, at planning, rather than after the models are built."""
    from pathlib import Path

    from qbench.inputs.sources import sha256_file

    out: dict[str, Any] = {}
    splits = ("test", "dev") if options.shots > 0 else ("test",)
    for split in splits:
        origin = locate(options.dataset, plan_ctx.data_dir, plan_ctx.base_dir, split)
        if origin.startswith("hf:"):
            out[f"{split}_dataset"] = origin
        else:
            out[f"{split}_sha256"] = sha256_file(Path(origin), plan_ctx.cache_dir)
    return out


# -- scoring ------------------------------------------------------------------------------
@dataclass
class Encoded:
    context: list[int]                 # enc(ctx)
    continuations: list[list[int]]     # whole[len(enc(ctx)):] per letter
    prefix_ok: bool                    # enc(ctx + cont) starts with enc(ctx) for every letter

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.continuations)


def encode(backend: Backend, context: str, continuations: Sequence[str] = CONTINUATIONS
           ) -> Encoded:
    """lm-eval's ``_encode_pair`` for each continuation (the context never ends in whitespace
    here, so its whitespace move is a no-op)."""
    ctx_ids = backend.tokenize(context, add_special=True)
    conts, prefix_ok = [], True
    for cont in continuations:
        whole = backend.tokenize(context + cont, add_special=True)
        prefix_ok &= whole[:len(ctx_ids)] == ctx_ids
        conts.append(whole[len(ctx_ids):])
    if not all(conts):
        raise QbenchError("tokenizing the prompt with a continuation gave no continuation "
                          "tokens; this tokenizer cannot score MMLU by log-likelihood")
    return Encoded(ctx_ids, conts, prefix_ok)


def _row_logprobs(logits: np.ndarray) -> np.ndarray:
    return log_softmax(np.asarray(logits, dtype=np.float32).reshape(1, -1))[0]


def _groups(order: list[int], lengths: list[int], n_batch: int) -> list[list[int]]:
    """Consecutive groups (of ``order``, longest first) that the backend decodes in one call:
    at most 16 prompts and (count x longest) <= n_batch tokens."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if current and (len(current) >= MAX_SEQS_PER_CALL
                        or (len(current) + 1) * max(longest, n) > n_batch):
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def _prefix_groups(encoded: Sequence[Encoded], prefixes: Sequence[list[int]] | None,
                   fast: list[int]) -> tuple[dict[tuple[int, ...], list[int]], list[int]]:
    """Questions whose context starts with their (few-shot) prefix, grouped by prefix, and
    the rest. A prefix is used only where it really is the start of the tokenized context."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    rest = []
    for i in fast:
        pre = prefixes[i] if prefixes is not None else []
        ctx = encoded[i].context
        if len(pre) >= 2 and len(ctx) > len(pre) and ctx[:len(pre)] == pre:
            groups[tuple(pre)].append(i)
        else:
            rest.append(i)
    return groups, rest


def score_choices(backend: Backend, encoded: Sequence[Encoded],
                  prefixes: Sequence[list[int]] | None = None,
                  stats: dict[str, int] | None = None) -> np.ndarray:
    """Log-likelihood of each continuation after its context: shape (questions, choices).

    With ``prefixes`` (per question, the tokens of its shared few-shot prefix) and a backend
    that keeps a KV cache (``prefix_last_logits``), each prefix is evaluated once per subject
    and only the question's own tokens per question."""
    n_choices = len(encoded[0].continuations) if encoded else 0
    lls = np.zeros((len(encoded), n_choices), dtype=np.float64)
    fast = [i for i, e in enumerate(encoded) if e.single_token]
    slow = [i for i, e in enumerate(encoded) if not e.single_token]
    if (prefixes is not None and hasattr(backend, "prefix_last_logits")
            and getattr(backend, "supports_prefix_cache", True)):
        by_prefix, fast = _prefix_groups(encoded, prefixes, fast)
        for pre, group in by_prefix.items():
            try:
                rows = backend.prefix_last_logits(list(pre), [encoded[i].context[len(pre):]
                                                              for i in group])
                scored = [[_row_logprobs(logits)[c[0]] for c in encoded[i].continuations]
                          for i, logits in zip(group, rows, strict=True)]
            except Exception:  # noqa: BLE001 - e.g. a cache that cannot be cut back to the
                fast += group  # prefix (recurrent/hybrid layers): score these the usual way
                continue
            for i, row in zip(group, scored):
                lls[i] = row
            if stats is not None:
                stats["prefix_cached"] = stats.get("prefix_cached", 0) + len(group)
    lengths = [len(e.context) for e in encoded]
    # longest first: the backend's context grows to the longest prompt once, early
    fast.sort(key=lambda i: (-lengths[i], i))
    n_batch = int(getattr(backend, "n_batch", 2048) or 2048)
    for group in _groups(fast, lengths, n_batch):
        rows = list(backend.last_logits([encoded[i].context for i in group]))
        if len(rows) != len(group):
            raise RuntimeError(f"backend returned {len(rows)} logit rows for {len(group)} "
                               "prompts")
        for i, logits in zip(group, rows):
            lp = _row_logprobs(logits)
            lls[i] = [lp[c[0]] for c in encoded[i].continuations]
    for i in slow:  # lm-eval's way: context + continuation, score the continuation's tokens
        e = encoded[i]
        first = len(e.context) - 1
        chunks = [e.context + c for c in e.continuations]
        for j, logits in enumerate(backend.chunk_logits(chunks, first)):
            cont = e.continuations[j]
            lp = log_softmax(np.asarray(logits, dtype=np.float32))
            if lp.shape[0] != len(cont):
                raise RuntimeError(f"backend returned {lp.shape[0]} rows for a {len(cont)}-"
                                   "token continuation")
            lls[i, j] = float(lp[np.arange(len(cont)), cont].astype(np.float64).sum())
    return lls


def binomial_stderr(p: float, n: int) -> float | None:
    """lm-eval's stderr of a mean of 0/1 scores: sample sd (n-1) / sqrt(n)."""
    return float(np.sqrt(p * (1 - p) / (n - 1))) if n > 1 else None


# -- the metric -----------------------------------------------------------------------------
def reused_answers(reuse: dict[str, Any] | None, ids: list[int], options: Options,
                   questions_in_dataset: int) -> dict[int, tuple[int, str]]:
    """question id -> (correct, predicted letter) from a smaller cell of this family, when its
    questions are a subset of these (subsets of one seed nest: select_subset), on the same
    dataset file, shots and seed; {} otherwise."""
    d = (reuse or {}).get("details") or {}
    qids, correct, predicted = d.get("question_ids"), d.get("correct"), d.get("predicted")
    if not reuse or not qids or not correct or not predicted:
        return {}
    if (len(qids) != len(correct) or len(qids) != len(predicted) or d.get("shots") != options.shots
            or d.get("seed") != options.seed or d.get("dataset") != options.dataset
            or d.get("questions_in_dataset") != questions_in_dataset
            or d.get("subset_rule") != SUBSET_RULE or not set(qids) < set(ids)):
        return {}
    return {int(q): (int(c), str(p)) for q, c, p in zip(qids, correct, predicted)}


def run(ctx: CellContext, options: Options) -> dict[str, Any]:
    test = load_split(options.dataset, ctx.data_dir, ctx.base_dir, "test")
    fewshot: dict[str, tuple[Question, ...]] = {}
    dev_origin = None
    if options.shots > 0:
        dev = load_split(options.dataset, ctx.data_dir, ctx.base_dir, "dev")
        dev_origin = dev.origin
        fewshot = fewshot_examples(dev, options.shots)
    ids = select_subset(test.questions, options.subset, options.seed)
    prior = reused_answers(ctx.reuse, ids, options, len(test.questions))
    if prior:
        ctx.notes.append(f"mmlu: {len(prior)} of {len(ids)} questions taken from cell "
                         f"{ctx.reuse['key']} (a smaller subset of the same seed)")
    all_ids, ids = ids, [i for i in ids if i not in prior]
    questions = [test.questions[i] for i in ids]
    if options.shots > 0:
        short = sorted({q.subject for q in questions
                        if len(fewshot.get(q.subject, ())) < options.shots})
        if short:
            raise DatasetError(f"MMLU {options.shots}-shot: the dev split {dev_origin} has fewer "
                               f"than {options.shots} questions for {', '.join(short[:5])}"
                               + (f" and {len(short) - 5} more subjects" if len(short) > 5
                                  else ""))
    contexts = [build_context(q, fewshot.get(q.subject, ())[:options.shots]) for q in questions]

    backend = ctx.backend
    t0 = time.perf_counter()
    encoded = [encode(backend, c) for c in contexts]
    prefixes = None
    if options.shots > 0 and hasattr(backend, "prefix_last_logits"):
        # the subject's header + k examples, less its last token (a merge across the boundary
        # then cannot break the prefix property; it is checked per question anyway)
        per_subject = {s: backend.tokenize(c, add_special=True)[:-1] for s, c in
                       ((s, few_shot_prefix(s, fewshot.get(s, ())[:options.shots]))
                        for s in {q.subject for q in questions})}
        prefixes = [per_subject[q.subject] for q in questions]
    stats: dict[str, int] = {}
    lls = score_choices(backend, encoded, prefixes, stats)
    elapsed = time.perf_counter() - t0
    cached = stats.get("prefix_cached", 0)

    predicted_here = lls.argmax(axis=1)   # ties: the first letter, as np.argmax in lm-eval
    answers = {i: (int(p == q.answer), LETTERS[int(p)])
               for i, p, q in zip(ids, predicted_here, questions)} | prior
    scored_here = len(ids)
    ids = all_ids
    questions = [test.questions[i] for i in ids]
    correct = [answers[i][0] for i in ids]
    predicted_letters = [answers[i][1] for i in ids]
    n = len(correct)
    acc = sum(correct) / n
    per_subject: dict[str, list[int]] = defaultdict(list)
    for q, c in zip(questions, correct):
        per_subject[q.subject].append(c)
    fallbacks = sum(not e.single_token for e in encoded)
    prefix_bad = sum(not e.prefix_ok for e in encoded)
    letter_tokens = sorted({tuple(c[0] for c in e.continuations)
                            for e in encoded if e.single_token})
    if fallbacks:
        ctx.notes.append(f"mmlu: {fallbacks} of {n} questions had a multi-token answer "
                         "continuation and were scored token by token")
    prompt_tokens = [len(e.context) for e in encoded]
    return {
        "values": {
            "acc": value(acc, binomial_stderr(acc, n), n),
            "questions_per_s": value(scored_here / elapsed if elapsed > 0 and scored_here
                                     else math.nan, None, scored_here, "questions/s"),
        },
        "details": {
            "dataset": options.dataset, "dataset_origin": test.origin,
            "dev_origin": dev_origin, "n": n, "shots": options.shots, "seed": options.seed,
            "subset": options.subset, "subset_rule": SUBSET_RULE,
            "questions_in_dataset": len(test.questions),
            "per_subject": {s: {"acc": sum(v) / len(v), "n": len(v)}
                            for s, v in sorted(per_subject.items())},
            "question_ids": ids,
            "correct": correct,
            "predicted": predicted_letters,
            "questions_scored_here": scored_here,
            "questions_reused_from": ctx.reuse["key"] if prior else None,
            "bos_added": bool(backend.add_bos),
            "letter_token_ids": [list(t) for t in letter_tokens],
            "multi_token_fallbacks": fallbacks,
            "prefix_mismatches": prefix_bad,
            "fewshot_prefix_cached": cached,
            "prompt_tokens_mean": float(np.mean(prompt_tokens)),
            "prompt_tokens_max": int(max(prompt_tokens)),
            "first_prompt": contexts[0],
            "eval_seconds": round(elapsed, 3),
        },
    }
