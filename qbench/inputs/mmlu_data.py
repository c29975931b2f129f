"""MMLU questions, lm-eval's ``mmlu`` prompt, and the seeded stratified subset.

Data: the name ``mmlu`` resolves to ``<data dir>/mmlu/test.jsonl`` (one JSON object a line:
``subject``, ``question``, ``choices`` (4 strings), ``answer`` (0-3)); with no data dir, to the
Hugging Face dataset ``cais/mmlu`` (config ``all``) through the optional ``datasets`` package.
Any other value is a path: a ``.jsonl`` file of test questions, or a folder holding
``test.jsonl``. k-shot examples come from a dev split: ``dev.jsonl`` beside the test file, else
``cais/mmlu``'s ``dev`` split; asking for shots where neither exists is a :class:`DatasetError`,
never a silent 0-shot run.

A question's id is its 0-based line (row) in the test file: results store ids, so a paired
comparison between variants can be made later from stored records.

The prompt is byte-for-byte lm-eval's ``mmlu`` task (lm-evaluation-harness,
``lm_eval/tasks/mmlu/default/_default_template_yaml`` for ``doc_to_text``/``doc_to_choice``/
``fewshot_config: sampler: first_n``, and ``lm_eval/tasks/mmlu/_generate_configs.py`` for the
per-subject ``description``), with lm-eval's default ``target_delimiter=" "`` and
``fewshot_delimiter="\\n\\n"``.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qbench.errors import DatasetError

LETTERS = ("A", "B", "C", "D")
HF_PATH, HF_CONFIG = "cais/mmlu", "all"

# lm-eval's SUBJECTS (lm_eval/tasks/mmlu/_generate_configs.py), in its order.
SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)


@dataclass(frozen=True)
class Question:
    id: int                      # 0-based row in the split it came from
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int                  # 0-3


@dataclass(frozen=True)
class Split:
    name: str                    # test | dev
    origin: str                  # a file path, or hf:cais/mmlu/all/<split>
    questions: tuple[Question, ...]


# -- where the data is ------------------------------------------------------------------
def _local_test_file(dataset: str, data_dir: Path | None, base_dir: Path) -> Path | None:
    """The test file ``dataset`` names, or None when it names the Hugging Face fallback."""
    if dataset == "mmlu":
        if data_dir is None:
            return None
        path = data_dir / "mmlu" / "test.jsonl"
        if not path.is_file():
            raise DatasetError(f"dataset 'mmlu' not found: expected {path} (data dir {data_dir} "
                               "from --data-dir / QBENCH_DATA_DIR)")
        return path
    path = Path(dataset).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if path.is_dir():
        path = path / "test.jsonl"
    if not path.is_file():
        raise DatasetError(f"MMLU dataset '{dataset}' is neither 'mmlu' nor an existing "
                           f"test.jsonl file or folder holding one ({path})")
    return path.resolve()


def _hf_available(why: str) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DatasetError(
            f"{why}, and the 'datasets' package is not installed for the Hugging Face fallback "
            f"({HF_PATH}) (pip install 'qbench-llm[datasets]')") from None


def locate(dataset: str, data_dir: Path | None, base_dir: Path, split: str = "test") -> str:
    """Where ``split`` ('test' or 'dev') will be read from, checked without reading it.

    Returns a file path or ``hf:cais/mmlu/all/<split>``; DatasetError if nowhere.
    """
    test = _local_test_file(dataset, data_dir, base_dir)
    if split == "test":
        if test is not None:
            return str(test)
        _hf_available("MMLU: no data dir given (--data-dir or QBENCH_DATA_DIR pointing at a "
                      "folder with mmlu/test.jsonl)")
        return f"hf:{HF_PATH}/{HF_CONFIG}/test"
    if split != "dev":
        raise ValueError(f"unknown MMLU split {split!r}")
    if test is not None:
        dev = test.with_name("dev.jsonl")
        if dev.is_file():
            return str(dev)
        _hf_available(f"MMLU k-shot needs a dev split: {dev} does not exist")
    else:
        _hf_available("MMLU k-shot needs a dev split: no data dir given")
    return f"hf:{HF_PATH}/{HF_CONFIG}/dev"


# -- reading ------------------------------------------------------------------------------
def _question(i: int, row: dict, where: str) -> Question:
    try:
        subject, question = row["subject"], row["question"]
        choices, answer = row["choices"], row["answer"]
    except (KeyError, TypeError):
        raise DatasetError(f"{where}: expected an object with subject, question, choices, "
                           f"answer; got {str(row)[:120]}") from None
    if (not isinstance(subject, str) or not isinstance(question, str)
            or not isinstance(choices, list) or len(choices) != 4
            or not all(isinstance(c, str) for c in choices)
            or isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3):
        raise DatasetError(f"{where}: expected subject and question strings, 4 string choices "
                           f"and an answer 0-3; got {str(row)[:120]}")
    return Question(i, subject, question, tuple(choices), answer)  # type: ignore[arg-type]


def read_split(origin: str, split: str) -> Split:
    if origin.startswith("hf:"):
        import datasets
        try:
            rows = datasets.load_dataset(HF_PATH, HF_CONFIG, split=split)
        except Exception as exc:  # the datasets library raises many kinds when offline
            raise DatasetError(f"MMLU: Hugging Face download of {HF_PATH}/{HF_CONFIG} {split} "
                               f"failed ({type(exc).__name__}: {exc}); give a local data dir "
                               "instead") from None
        qs = tuple(_question(i, dict(r), f"{origin} row {i}") for i, r in enumerate(rows))
    else:
        qs_list = []
        try:
            with open(origin, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise DatasetError(f"{origin}:{lineno}: not JSON ({exc})") from None
                    qs_list.append(_question(len(qs_list), row, f"{origin}:{lineno}"))
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read MMLU {split} split from {origin}: {exc}") from None
        qs = tuple(qs_list)
    if not qs:
        raise DatasetError(f"MMLU {split} split {origin} is empty")
    return Split(split, origin, qs)


_CACHE: dict[tuple[str, int, int], Split] = {}


def load_split(dataset: str, data_dir: Path | None, base_dir: Path, split: str = "test"
               ) -> Split:
    """Read a split once per process (memoised on path, size and mtime)."""
    origin = locate(dataset, data_dir, base_dir, split)
    if origin.startswith("hf:"):
        memo = (origin, 0, 0)
    else:
        st = Path(origin).stat()
        memo = (origin, st.st_size, st.st_mtime_ns)
    if memo not in _CACHE:
        _CACHE[memo] = read_split(origin, split)
    return _CACHE[memo]


# -- the prompt (lm-eval's mmlu task) ---------------------------------------------------
def description(subject: str) -> str:
    """lm-eval ``_generate_configs.py``: the per-subject task description."""
    return ("The following are multiple choice questions (with answers) about "
            f"{' '.join(subject.split('_'))}.\n\n")


def doc_to_text(q: Question) -> str:
    """lm-eval ``_default_template_yaml`` ``doc_to_text``."""
    c = q.choices
    return (f"{q.question.strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")


def few_shot_prefix(subject: str, fewshot: Sequence[Question] = ()) -> str:
    """What every question of ``subject`` shares: the description and the k solved examples."""
    return description(subject) + "".join(f"{doc_to_text(d)} {LETTERS[d.answer]}\n\n"
                                          for d in fewshot)


def build_context(q: Question, fewshot: Sequence[Question] = ()) -> str:
    """description + k solved examples (``text + " " + letter``, each followed by ``\\n\\n``) +
    the question's text: lm-eval's ``fewshot_context`` for this task."""
    return few_shot_prefix(q.subject, fewshot) + doc_to_text(q)


def fewshot_examples(dev: Split, k: int) -> dict[str, tuple[Question, ...]]:
    """Per subject, the first ``k`` dev questions (lm-eval's ``first_n`` sampler).

    The dev split is separate from the test split, so lm-eval draws exactly k (no self-exclusion
    needed). A subject with fewer than k dev questions is an error, not a silently shorter prompt.
    """
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for q in dev.questions:
        by_subject[q.subject].append(q)
    return {s: tuple(qs[:k]) for s, qs in by_subject.items()}


# -- the stratified subset --------------------------------------------------------------
def _rank(seed: int, *parts: object) -> bytes:
    """A seeded, version-independent sort key (sha256), unlike ``random`` whose streams may
    change between Python versions."""
    return hashlib.sha256("|".join(["qbench-mmlu", str(seed), *map(str, parts)]).encode()
                          ).digest()


def subset_quotas(sizes: dict[str, int], n: int, seed: int) -> dict[str, int]:
    """How many questions each subject gets: floor(n / subjects) each (capped at the subject's
    size), and the rest one at a time to subjects in a seeded order, cycling while any remain."""
    subjects = sorted(sizes)
    base = n // len(subjects)
    quotas = {s: min(base, sizes[s]) for s in subjects}
    left = n - sum(quotas.values())
    order = sorted(subjects, key=lambda s: _rank(seed, "subject", s))
    while left > 0:
        progressed = False
        for s in order:
            if left == 0:
                break
            if quotas[s] < sizes[s]:
                quotas[s] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return quotas


def select_subset(questions: Sequence[Question], n: int, seed: int) -> list[int]:
    """Ids of a subset of ``n`` questions stratified by subject (all when n <= 0 or n >= all).

    Per subject the questions with the smallest seeded hash of (subject, id) are taken, so a
    larger subset with the same seed contains a smaller one, every variant gets the same
    questions, and the choice does not depend on Python's random-number streams. Sorted ids.
    """
    if n <= 0 or n >= len(questions):
        return sorted(q.id for q in questions)
    by_subject: dict[str, list[int]] = defaultdict(list)
    for q in questions:
        by_subject[q.subject].append(q.id)
    quotas = subset_quotas({s: len(ids) for s, ids in by_subject.items()}, n, seed)
    chosen: list[int] = []
    for s, ids in by_subject.items():
        ranked = sorted(ids, key=lambda i: _rank(seed, s, i))
        chosen += ranked[:quotas[s]]
    return sorted(chosen)


SUBSET_RULE = ("stratified by subject: floor(n/subjects) per subject (capped at its size), the "
               "remainder one each to subjects ordered by sha256(seed, subject); within a subject "
               "the questions with the smallest sha256(seed, subject, id); n <= 0: all questions")
