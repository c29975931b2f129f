"""Questions per second of qbench's MMLU metric on one GGUF file.

    .venv/bin/python benchmarks/mmlu_speed.py --model model.gguf --subset 285
    .venv/bin/python benchmarks/mmlu_speed.py --model model.gguf --subset 57 --threads 2

The data dir comes from --data-dir, else $QBENCH_DATA_DIR, else ../shared/data next to the repo.
Prints accuracy, questions/s and the time of the scoring (model loading excluded). Comparing with
lm-eval's own run on the same questions is a later step.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="a GGUF file")
    ap.add_argument("--subset", type=int, default=285, help="questions (0: all 14,042)")
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="0: physical cores")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args(argv)

    data_dir = args.data_dir or Path(os.environ.get("QBENCH_DATA_DIR")
                                     or REPO.parent / "shared" / "data")
    from qbench.backends.llamacpp import load

    t0 = time.perf_counter()
    backend = load(args.model, LoadOptions(threads=args.threads, device=args.device))
    load_s = time.perf_counter() - t0
    info = backend.describe()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = CellContext(cell_id="bench/mmlu", model_id=args.model.stem,
                          artifact_path=args.model, artifact={}, base_dir=Path.cwd(),
                          data_dir=data_dir, cache_dir=Path(tmp), is_base=True,
                          _load=lambda: backend)
        try:
            out = mmlu.run(ctx, mmlu.Options(subset=args.subset, shots=args.shots,
                                             seed=args.seed))
        finally:
            ctx.close()
    acc, qps, d = out["values"]["acc"], out["values"]["questions_per_s"], out["details"]
    print(f"model      {args.model}")
    print(f"device     {info['device']}  threads {info['threads']}  n_batch {info['n_batch']}  "
          f"llama-cpp-python {info['library_version']}")
    print(f"questions  {d['n']} ({args.shots}-shot, seed {args.seed}), prompt tokens mean "
          f"{d['prompt_tokens_mean']:.0f} max {d['prompt_tokens_max']}")
    print(f"acc        {acc['value']:.4f} +/- {acc.get('stderr', 0.0):.4f}")
    print(f"speed      {qps['value']:.2f} questions/s ({d['eval_seconds']:.1f} s scoring, "
          f"{load_s:.1f} s loading)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
