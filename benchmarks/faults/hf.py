"""Transformers-backend faults: pickle checkpoints and models that need remote code, on a tiny
random Llama built here (no download).

Apart because they need torch + transformers, which the other scenarios do not; without them
each scenario reports one row saying what is missing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import NO_SANITY, PERPLEXITY, Bench, Row, records, short, suite_text, yes


# -- pickle checkpoints and remote code (transformers backend) ---------------------------------
TINY_MAKER = r'''
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

root = Path(sys.argv[1]); marker = sys.argv[2]
vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
vocab["<s>"] = len(vocab); vocab["</s>"] = len(vocab)
tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                  max_position_embeddings=1024, bos_token_id=vocab["<s>"],
                  eos_token_id=vocab["</s>"])
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
state = {k: v.contiguous() for k, v in model.state_dict().items()}
for name in ("pickle", "stray", "remote"):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(d)
    fast.save_pretrained(d)
# pickle: only pytorch_model.bin (a pickle)
torch.save(state, root / "pickle" / "pytorch_model.bin")
# stray: the same pickle beside an unrelated small safetensors file
torch.save(state, root / "stray" / "pytorch_model.bin")
save_file({"unrelated": torch.zeros(4)}, root / "stray" / "adapter.safetensors")
# remote: safetensors weights, and a config that needs custom code which leaves a marker
save_file({k: v.clone() for k, v in state.items()},
          root / "remote" / "model.safetensors", metadata={"format": "pt"})
(root / "remote" / "configuration_marker.py").write_text(
    "import pathlib\npathlib.Path(%r).write_text('remote code ran')\n"
    "from transformers import LlamaConfig\n"
    "class MarkerConfig(LlamaConfig):\n    model_type = 'markerllama'\n" % marker)
(root / "remote" / "modeling_marker.py").write_text(
    "from transformers import LlamaForCausalLM\n"
    "from .configuration_marker import MarkerConfig\n"
    "class MarkerForCausalLM(LlamaForCausalLM):\n    config_class = MarkerConfig\n")
c = json.loads((root / "remote" / "config.json").read_text())
c.update(model_type="markerllama", architectures=["MarkerForCausalLM"],
         auto_map={"AutoConfig": "configuration_marker.MarkerConfig",
                   "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"})
(root / "remote" / "config.json").write_text(json.dumps(c, indent=1))
'''

HF_METRICS = PERPLEXITY + NO_SANITY + "\n[metrics.footprint]\nenabled = false\n"


def _tiny_models(b: Bench) -> tuple[Path, Path]:
    root = b.work / "hf-models"
    marker = b.work / "remote-code-ran"
    if not (root / "remote" / "config.json").is_file():
        proc = subprocess.run([sys.executable, "-c", TINY_MAKER, str(root), str(marker)],
                              capture_output=True, text=True, timeout=600, env=b.env())
        if proc.returncode != 0:
            raise RuntimeError("could not build the tiny HF models: "
                               + short(proc.stderr[-600:], 400))
    return root, marker


def _hf_available() -> str | None:
    for mod in ("torch", "transformers", "safetensors", "tokenizers"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


def _hf_run(b: Bench, name: str, folder: Path, model_extra: str) -> tuple[
        subprocess.CompletedProcess[str], dict[str, Any]]:
    suite = b.write_suite(name, suite_text(name, quants=("fp32",), models=(("tiny",
                                           str(folder)),), base="fp32",
                                           base_backend="transformers", backend="transformers",
                                           model_extra=model_extra, metrics=HF_METRICS))
    out = b.work / "results-hf"
    proc = b.run(suite, out)
    r = records(out / name / "cells").get("tiny/transformers/fp32/perplexity", {})
    return proc, r


def scenario_pickle(b: Bench) -> list[Row]:
    why = _hf_available()
    if why:
        return [Row("pickle checkpoints (transformers backend)", "refused unless allow_pickle",
                    f"not run: {why}", False)]
    root, _ = _tiny_models(b)
    rows = []
    t0 = time.monotonic()
    proc, r = _hf_run(b, "faults-pickle-off", root / "pickle", "")
    good = r.get("status") == "failed" and "allow_pickle" in (r.get("error") or "")
    rows.append(Row("HF folder with only pytorch_model.bin (pickle), allow_pickle unset",
                    "refused (names allow_pickle), nothing loaded",
                    f"{r.get('status')}: {short(r.get('error'), 110)}", good,
                    seconds=time.monotonic() - t0))
    t0 = time.monotonic()
    proc, r = _hf_run(b, "faults-pickle-on", root / "pickle", "allow_pickle = true\n")
    good = r.get("status") == "ok"
    ppl = r.get("values", {}).get("ppl", {}).get("value")
    rows.append(Row("the same folder, allow_pickle = true", "loaded and measured (ok)",
                    f"{r.get('status')}: {short(r.get('error') or f'ppl {ppl}', 110)}",
                    good, seconds=time.monotonic() - t0))
    t0 = time.monotonic()
    proc, r = _hf_run(b, "faults-pickle-stray", root / "stray", "")
    refused = r.get("status") in ("failed", "skipped") and "pickle" in (r.get("error") or "")
    rows.append(Row("pytorch_model.bin beside an unrelated adapter.safetensors, allow_pickle "
                    "unset",
                    "refused: the weights transformers would load are a pickle",
                    f"{r.get('status')}: " + (short(r.get("error"), 100) if r.get("error") else
                                              "the pickle was loaded and measured"),
                    refused, seconds=time.monotonic() - t0))
    return rows


def scenario_remote_code(b: Bench) -> list[Row]:
    why = _hf_available()
    if why:
        return [Row("trust_remote_code (transformers backend)", "refused unless opted in",
                    f"not run: {why}", False)]
    root, marker = _tiny_models(b)
    rows = []
    marker.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc, r = _hf_run(b, "faults-remote-off", root / "remote", "")
    ran = marker.exists()
    good = r.get("status") in ("failed", "skipped") and not ran
    rows.append(Row("HF folder whose config needs custom code (auto_map), trust_remote_code "
                    "unset",
                    "refused; the folder's code never runs",
                    f"{r.get('status')}: {short(r.get('error'), 100)}; code ran: {yes(ran)}",
                    good, seconds=time.monotonic() - t0))
    marker.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc, r = _hf_run(b, "faults-remote-on", root / "remote", "trust_remote_code = true\n")
    ran = marker.exists()
    rows.append(Row("the same folder, trust_remote_code = true",
                    "the custom code runs (the flag reaches transformers); cell ok",
                    f"{r.get('status')}; code ran: {yes(ran)}",
                    r.get("status") == "ok" and ran, seconds=time.monotonic() - t0))
    return rows
