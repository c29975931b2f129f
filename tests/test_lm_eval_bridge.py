"""[metrics.lm_eval]: lm-eval tasks on a transformers variant's loaded model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qbench.suite.config import load_suite
from qbench.errors import ConfigError, NotApplicable
from qbench.metrics import lm_eval_bridge as bridge
from qbench.metrics.context import CellContext

HAVE_LM_EVAL = all(importlib.util.find_spec(m) is not None
                   for m in ("lm_eval", "torch", "transformers"))


def test_results_become_task_metric_values() -> None:
    res = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5,
                                    "acc_stderr,none": 0.05, "acc_norm,none": 0.6,
                                    "acc_norm_stderr,none": "N/A"},
                       "gsm8k": {"exact_match,strict-match": 0.1,
                                 "exact_match_stderr,strict-match": 0.01}},
           "n-samples": {"arc_easy": {"original": 2376, "effective": 100},
                         "gsm8k": {"original": 1319, "effective": 50}}}
    values = bridge.parse_results(res, ("gsm8k", "arc_easy"))
    assert values["arc_easy:acc"] == {"value": 0.5, "stderr": 0.05, "n": 100}
    assert values["arc_easy:acc_norm"] == {"value": 0.6, "n": 100}   # "N/A" stderr: none
    assert values["gsm8k:exact_match[strict-match]"]["stderr"] == 0.01
    # the headline is the first *requested* task's first metric
    assert values["score"]["source"] == "gsm8k:exact_match[strict-match]"
    assert values["score"]["value"] == 0.1


def test_gguf_variant_is_not_applicable(tmp_path: Path) -> None:
    ctx = CellContext(cell_id="m/llama.cpp/Q4_0/lm_eval", model_id="m",
                      artifact_path=tmp_path / "model.gguf", artifact={}, base_dir=tmp_path,
                      data_dir=None, cache_dir=tmp_path, is_base=False)
    with pytest.raises(NotApplicable, match="#4158"):
        bridge.run(ctx, bridge.Options(tasks=("arc_easy",)))


def test_options_are_checked(write_suite) -> None:
    text = """
[suite]
name = "t"
[[models]]
id = "m"
source = "m"
base = "fp32"
base_backend = "transformers"
[[variants]]
backend = "transformers"
quant = ["fp32"]
[metrics.lm_eval]
tasks = []
"""
    with pytest.raises(ConfigError) as info:
        load_suite(write_suite(text))
    assert info.value.key == "metrics.lm_eval.tasks"


TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LM_EVAL, reason="needs lm-eval, torch, transformers "
                    "(pip install -r requirements/hf.txt)")
def test_local_task_runs_through_qbench_run(tiny_hf_model: Path, tmp_path: Path) -> None:
    """A suite with [metrics.lm_eval] on a local task: lm-eval runs offline on the loaded
    model, its accuracy and stderr are stored per cell and the report lists them."""
    import shutil

    from transformers import AutoTokenizer

    from qbench.cli import main

    model = tmp_path / "model"   # lm-eval needs a BOS or EOS token to prefix contexts with
    shutil.copytree(tiny_hf_model, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.bos_token, tok.eos_token = "w63", "w62"
    tok.save_pretrained(model)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"w{i} w{i + 1}", "choices": [f"w{i}", f"w{i + 2}", f"w{i + 3}"],
             "answer": i % 3} for i in range(1, 13)]
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tasks / "tiny.jsonl"))
    suite = tmp_path / "suite.toml"
    suite.write_text(f"""
[suite]
name = "lm-eval-test"
[defaults]
threads = 1
[[models]]
id = "tiny"
source = "{model}"
base = "fp32"
base_backend = "transformers"
[[variants]]
backend = "transformers"
quant = ["fp32"]
[metrics.lm_eval]
tasks = ["tiny_mc"]
include_path = "tasks"
batch_size = 4
""")
    out = tmp_path / "results"
    rc = main(["run", str(suite), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
               "--report-dir", str(tmp_path / "reports")])
    recs = [json.loads(p.read_text()) for p in (out / "lm-eval-test" / "cells").glob("*.json")]
    cell = next(r for r in recs if r["metric"] == "lm_eval")
    assert rc == 0, cell.get("error")
    acc = cell["values"]["tiny_mc:acc"]
    assert 0.0 <= acc["value"] <= 1.0 and acc["n"] == 12 and acc["stderr"] > 0
    assert cell["values"]["score"]["source"] == "tiny_mc:acc"
    assert cell["details"]["configs"]["tiny_mc"]["output_type"] == "multiple_choice"
    html = (tmp_path / "reports" / "lm-eval-test.html").read_text()
    assert "tiny_mc:acc" in html
