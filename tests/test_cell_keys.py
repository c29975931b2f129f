"""Cell keys know what and where they measured: the content of every input file (variant
sources, all shards of a split GGUF, imatrix and calibration texts, model folders), threads and
device in every key, the hardware in speed keys only -- and a replaced variant file is measured
anew, KLD included (issue 12 §1)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qbench.suite import plan as plan_mod
from qbench.inputs import sources
from qbench.suite.config import load_suite
from qbench.errors import SourceError
from qbench.suite.plan import PlanContext, expand
from qbench.inputs.sources import content_files, sha256_file

SUITE = """
[suite]
name = "keys"

[defaults]
threads = 2
device = "cpu"

[[models]]
id = "m"
source = "{model}"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q4_K_M"]

[[variants]]
backend = "llama.cpp"
quant = "Q4_K_M"
source = "{pre}"

[[variants]]
backend = "llama.cpp"
quant = "IQ2_XS"
imatrix = "{imatrix}"

[[variants]]
backend = "transformers"
quant = ["fp32", "awq-w4g64"]
calibration = "awq.txt"

[metrics.perplexity]
dataset = "text.txt"
ctx = 64
chunks = 2

[metrics.kld]

[metrics.speed]
prompt_tokens = 8
"""

ENV: dict[str, Any] = {"cpu": "Test CPU 3000", "cpu_flags": ["avx", "avx2"],
                       "cpu_cores_physical": 4, "cpu_cores_logical": 8, "gpus": []}
GPU = {"name": "Test GPU", "memory_total_mb": 24576.0, "driver": "550.1"}


@pytest.fixture
def suite_dir(tmp_path: Path, write_suite) -> Path:
    # expand() hashes the input files but never parses them: any bytes will do
    (tmp_path / "m.gguf").write_bytes(b"model" * 20)
    (tmp_path / "pre.gguf").write_bytes(b"a pre-quantized file" * 10)
    (tmp_path / "text.txt").write_text("evaluation text\n" * 40)
    (tmp_path / "calib.txt").write_text("imatrix calibration text\n" * 40)
    (tmp_path / "awq.txt").write_text("awq calibration text\n" * 40)
    write_suite(SUITE.format(model="m.gguf", pre="pre.gguf", imatrix="calib.txt"))
    return tmp_path


def keys(folder: Path, env: dict[str, Any] | None = None, data_dir: Path | None = None,
         suite: str = "suite.toml") -> dict[str, str]:
    ctx = PlanContext(base_dir=folder, data_dir=data_dir, cache_dir=folder / "cache",
                      env=ENV if env is None else env)
    return {c.id: c.key for c in expand(load_suite(folder / suite), ctx)}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    assert before.keys() == after.keys()
    return {cid for cid in before if before[cid] != after[cid]}


def edit_suite(folder: Path, old: str, new: str) -> None:
    path = folder / "suite.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


# --- input files ---------------------------------------------------------------------------


def test_replaced_variant_source_changes_its_cells_only(suite_dir):
    before = keys(suite_dir)
    (suite_dir / "pre.gguf").write_bytes(b"another file at the same path" * 10)
    after = keys(suite_dir)
    pre = {cid for cid in before if "@pre.gguf/" in cid}
    assert {cid.rsplit("/", 1)[1] for cid in pre} == {"footprint", "sanity", "perplexity",
                                                       "kld", "speed"}
    # the KLD cell's key names the comparison the perplexity pass stores: it moves too
    assert changed(before, after) == pre


def test_same_size_same_mtime_replacement_is_noticed(suite_dir):
    """cp -p / rsync -t keep the mtime; a file of the same size must still be hashed anew."""
    pre = suite_dir / "pre.gguf"
    before = keys(suite_dir)
    st = pre.stat()
    new = suite_dir / "new.gguf"
    new.write_bytes(b"A pre-quantized file" * 10)  # same size, other bytes
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, pre)
    assert (pre.stat().st_size, pre.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert changed(before, keys(suite_dir)) == {cid for cid in before if "@pre.gguf/" in cid}


def test_hub_variant_source_is_keyed_by_its_reference_and_revision(suite_dir):
    """Planning never downloads: a hub source is its reference; pinning a revision is new."""
    edit_suite(suite_dir, 'source = "pre.gguf"', 'source = "hf:org/repo/pre.gguf"')
    ctx = PlanContext(base_dir=suite_dir, data_dir=None, cache_dir=suite_dir / "cache", env=ENV)
    cells = expand(load_suite(suite_dir / "suite.toml"), ctx)
    hub = [c for c in cells if c.variant.source]
    assert {c.inputs["source_sha256"] for c in hub} == {"ref:hf:org/repo/pre.gguf"}
    before = {c.metric: c.key for c in hub}
    edit_suite(suite_dir, "pre.gguf", "pre.gguf@abc1")
    after = {c.metric: c.key for c in expand(load_suite(suite_dir / "suite.toml"), ctx)
             if c.variant.source}
    assert before.keys() == after.keys()
    assert all(before[m] != after[m] for m in before)


def _write_split(folder: Path, stem: str, n: int) -> list[Path]:
    shards = [folder / f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    for i, s in enumerate(shards):
        s.write_bytes(f"shard {i} of {stem}".encode() * 10)
    return shards


def test_later_shard_of_a_split_model_changes_every_key(suite_dir):
    shards = _write_split(suite_dir, "big", 3)
    edit_suite(suite_dir, 'source = "m.gguf"', f'source = "{shards[0].name}"')
    before = keys(suite_dir)
    shards[2].write_bytes(b"the third shard, re-uploaded" * 10)
    assert changed(before, keys(suite_dir)) == set(before)


def test_later_shard_of_a_split_variant_changes_its_cells(suite_dir):
    shards = _write_split(suite_dir, "pre", 2)
    edit_suite(suite_dir, 'source = "pre.gguf"', f'source = "{shards[0].name}"')
    before = keys(suite_dir)
    shards[1].write_bytes(b"the second shard, replaced" * 10)
    after = keys(suite_dir)
    assert changed(before, after) == {c for c in before if f"@{shards[0].name}/" in c} != set()


def test_split_gguf_digest_covers_every_shard_and_needs_them_all(tmp_path):
    shards = _write_split(tmp_path, "x", 3)
    first = sha256_file(shards[0], tmp_path / "cache")
    assert first != hashlib.sha256(shards[0].read_bytes()).hexdigest()
    shards[1].write_bytes(b"changed")
    assert sha256_file(shards[0], tmp_path / "cache") != first
    # a later shard named on its own is just a file
    assert sha256_file(shards[1]) == hashlib.sha256(b"changed").hexdigest()
    shards[2].unlink()
    with pytest.raises(SourceError, match=r"x-00003-of-00003.gguf is not beside it"):
        sha256_file(shards[0])


def test_imatrix_text_changes_the_imatrix_variant_only(suite_dir):
    before = keys(suite_dir)
    (suite_dir / "calib.txt").write_text("another imatrix calibration text\n" * 40)
    assert changed(before, keys(suite_dir)) == {
        c for c in before if "/IQ2_XS+imatrix=calib/" in c} != set()


def test_named_imatrix_dataset_is_keyed_by_its_file(suite_dir, tmp_path):
    data = tmp_path / "data"
    wiki = data / "wikitext-2-raw" / "wiki.test.raw"
    wiki.parent.mkdir(parents=True)
    wiki.write_text("wikitext\n" * 50)
    edit_suite(suite_dir, 'imatrix = "calib.txt"', 'imatrix = "wikitext-2"')
    before = keys(suite_dir, data_dir=data)
    wiki.write_text("wikitext, another release\n" * 50)
    assert changed(before, keys(suite_dir, data_dir=data)) == {
        c for c in before if "/IQ2_XS+imatrix=wikitext-2/" in c} != set()


def test_calibration_text_changes_the_calibrated_variant_only(suite_dir):
    before = keys(suite_dir)
    (suite_dir / "awq.txt").write_text("another awq calibration text\n" * 40)
    assert changed(before, keys(suite_dir)) == {c for c in before if "/awq-w4g64/" in c}


# --- model folders -------------------------------------------------------------------------


def _hf_folder(root: Path) -> Path:
    d = root / "ckpt"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer.json").write_text('{"model": {}}')
    (d / "model-00001-of-00002.safetensors").write_bytes(b"weights one" * 10)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"weights two" * 10)
    (d / "README.md").write_text("# a model card")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (d / "original").mkdir()   # Meta's consolidated checkpoint: transformers never reads it
    (d / "original" / "consolidated.00.pth").write_bytes(b"pickle")
    return d


def test_model_folder_identity_is_its_config_tokenizer_and_weights(tmp_path):
    d = _hf_folder(tmp_path)
    assert [f.name for f in content_files(d)] == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "tokenizer.json"]
    first = sha256_file(d, tmp_path / "cache")
    (d / "README.md").write_text("# an edited model card")
    (d / ".git" / "HEAD").write_text("ref: refs/heads/other")
    assert sha256_file(d, tmp_path / "cache") == first
    for name in ("tokenizer.json", "config.json", "model-00002-of-00002.safetensors"):
        before = sha256_file(d, tmp_path / "cache")
        (d / name).write_text((d / name).read_text(errors="replace") + " ")
        assert sha256_file(d, tmp_path / "cache") != before, name


def test_model_folder_rehashes_only_the_changed_file(tmp_path, monkeypatch):
    d = _hf_folder(tmp_path)
    cache = tmp_path / "cache"
    sha256_file(d, cache)
    hashed: list[str] = []
    real = sources.hashlib.file_digest

    def counting(fh: Any, name: str) -> Any:
        hashed.append(Path(fh.name).name)
        return real(fh, name)

    monkeypatch.setattr(sources.hashlib, "file_digest", counting)
    sha256_file(d, cache)
    assert hashed == []                      # all four from the memo
    (d / "model-00001-of-00002.safetensors").write_bytes(b"new weights" * 10)
    sha256_file(d, cache)
    assert hashed == ["model-00001-of-00002.safetensors"]


def test_model_folder_source_keys_follow_its_weights(suite_dir):
    d = _hf_folder(suite_dir)
    edit_suite(suite_dir, 'source = "m.gguf"', f'source = "{d.name}"')
    before = keys(suite_dir)
    (d / "README.md").write_text("# edited")
    assert keys(suite_dir) == before
    (d / "model-00002-of-00002.safetensors").write_bytes(b"fine-tuned weights" * 10)
    assert changed(before, keys(suite_dir)) == set(before)


# --- threads, device, hardware -------------------------------------------------------------


def _metric(cid: str) -> str:
    return cid.rsplit("/", 1)[1]


def test_threads_and_device_are_in_every_key(suite_dir):
    before = keys(suite_dir)
    edit_suite(suite_dir, "threads = 2", "threads = 1")
    assert changed(before, keys(suite_dir)) == set(before)
    edit_suite(suite_dir, "threads = 1", "threads = 2")
    assert keys(suite_dir) == before
    edit_suite(suite_dir, 'device = "cpu"', 'device = "cuda"')
    assert changed(before, keys(suite_dir)) == set(before)


def test_hardware_is_in_speed_keys_only(suite_dir):
    before = keys(suite_dir)
    for other in ({**ENV, "cpu": "Other CPU 9000"}, {**ENV, "cpu_flags": ["avx"]},
                  {**ENV, "cpu_cores_logical": 16}):
        after = keys(suite_dir, env=other)
        assert changed(before, after) == {c for c in before if _metric(c) == "speed"}
    # a GPU (or another driver) is other hardware for speed, but device = "cpu" cells stay
    gpu = keys(suite_dir, env={**ENV, "gpus": [GPU]})
    assert changed(before, gpu) == {c for c in before if _metric(c) == "speed"}
    newer = keys(suite_dir, env={**ENV, "gpus": [{**GPU, "driver": "560.2"}]})
    assert changed(gpu, newer) == {c for c in before if _metric(c) == "speed"}


def test_accuracy_keys_are_shared_across_machines(suite_dir):
    before = keys(suite_dir)
    elsewhere = keys(suite_dir, env={**ENV, "cpu": "Other CPU", "cpu_cores_logical": 64,
                                     "hostname": "elsewhere"})
    for metric in ("footprint", "sanity", "perplexity", "kld"):
        ids = [c for c in before if _metric(c) == metric]
        assert ids and all(before[c] == elsewhere[c] for c in ids), metric


def test_threads_zero_means_the_physical_cores(suite_dir):
    edit_suite(suite_dir, "threads = 2", "threads = 4")
    four = keys(suite_dir, env={**ENV, "cpu_cores_physical": 4})
    edit_suite(suite_dir, "threads = 4", "threads = 0")
    assert keys(suite_dir, env={**ENV, "cpu_cores_physical": 4}) == four
    eight = keys(suite_dir, env={**ENV, "cpu_cores_physical": 8})
    assert changed(four, eight) == set(four)   # 8 threads there: not the same run


def test_auto_device_is_cpu_without_a_gpu_and_its_own_with_one(suite_dir, monkeypatch):
    if sys.platform == "darwin":
        pytest.skip("on a Mac 'auto' may pick Metal")
    monkeypatch.setattr(plan_mod, "_GPU_NODES", ())
    cpu = keys(suite_dir)
    edit_suite(suite_dir, 'device = "cpu"', 'device = "auto"')
    assert keys(suite_dir) == cpu                       # no GPU here: auto runs on the CPU
    on_gpu = keys(suite_dir, env={**ENV, "gpus": [GPU]})
    assert changed(cpu, on_gpu) == set(cpu)             # auto may run on the GPU there
    edit_suite(suite_dir, 'device = "auto"', 'device = "cuda"')
    assert changed(on_gpu, keys(suite_dir, env={**ENV, "gpus": [GPU]})) == set(cpu)


def test_run_settings_are_recorded(suite_dir):
    ctx = PlanContext(base_dir=suite_dir, data_dir=None, cache_dir=suite_dir / "cache", env=ENV)
    cells = {c.id: c for c in expand(load_suite(suite_dir / "suite.toml"), ctx)}
    speed = cells["m/llama.cpp/F16/speed"].describe()
    ppl = cells["m/llama.cpp/Q4_K_M@pre.gguf/perplexity"].describe()
    assert speed["run"] == {"threads": 2, "device": "cpu",
                            "hardware": plan_mod.envinfo.hardware_id(ENV)}
    assert ppl["run"] == {"threads": 2, "device": "cpu"}
    assert ppl["variant"]["inputs"] == {
        "source_sha256": hashlib.sha256((suite_dir / "pre.gguf").read_bytes()).hexdigest()}
    imatrix = cells["m/llama.cpp/IQ2_XS+imatrix=calib/perplexity"].describe()["variant"]["inputs"]
    assert imatrix["imatrix"]["text"] == hashlib.sha256(
        (suite_dir / "calib.txt").read_bytes()).hexdigest()


def test_planning_hashes_each_input_once(suite_dir, monkeypatch):
    """expand() stays fast: one hash per input file per plan, none from the memo next time."""
    hashed: list[str] = []
    real = sources.hashlib.file_digest

    def counting(fh: Any, name: str) -> Any:
        hashed.append(Path(fh.name).name)
        return real(fh, name)

    monkeypatch.setattr(sources.hashlib, "file_digest", counting)
    keys(suite_dir)
    assert sorted(hashed) == ["awq.txt", "calib.txt", "m.gguf", "pre.gguf", "text.txt"]
    hashed.clear()
    keys(suite_dir)
    assert hashed == []


# --- the scenario, end to end on the real model (slow) -----------------------------

STALE_SUITE = """
[suite]
name = "stale"

[defaults]
threads = 2
timeout_s = 600

[[models]]
id = "smol"
source = "{source}"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16"]

[[variants]]
backend = "llama.cpp"
quant = "Q8_0"
source = "variant.gguf"

[metrics.perplexity]
dataset = "wikitext-2"
ctx = 128
chunks = 4

[metrics.kld]

[metrics.sanity]
enabled = false
"""


def _llama_ok() -> None:
    proc = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("llama-cpp-python is not importable")


def _run(suite: Path, results: Path, data_dir: Path) -> dict[str, dict[str, Any]]:
    from qbench.cli import main

    assert main(["run", str(suite), "--out", str(results), "--no-report",
                 "--data-dir", str(data_dir)]) == 0
    records = [json.loads(p.read_text()) for p in (results / "stale" / "cells").glob("*.json")]
    return {r["id"]: r for r in records}


@pytest.mark.slow
def test_replaced_variant_file_is_remeasured_kld_included(write_suite, smollm2_ref, data_dir,
                                                          isolated_env, tmp_path):
    """The issue: replace a pre-quantized file, run into a fresh results folder -- the KLD cell
    must not read the old file's comparison from the artifact cache."""
    _llama_ok()
    from qbench.quantize.gguf import build_variant
    from qbench.run.runner import cell_rows
    from qbench.inputs.sources import locate
    from qbench.results.store import Store

    model = locate(smollm2_ref, base_dir=tmp_path).path
    sha = sha256_file(model, isolated_env)
    q8 = build_variant(model, sha, "Q8_0", "F16", cache_dir=isolated_env, threads=2).path
    q4 = build_variant(model, sha, "Q4_0", "F16", cache_dir=isolated_env, threads=2).path
    shutil.copyfile(q8, tmp_path / "variant.gguf")
    suite = write_suite(STALE_SUITE.format(source=smollm2_ref))
    vid = "smol/llama.cpp/Q8_0@variant.gguf"

    first = _run(suite, tmp_path / "results-1", data_dir)
    shutil.copyfile(q4, tmp_path / "variant.gguf")   # `cp` over the old file, same path
    second = _run(suite, tmp_path / "results-2", data_dir)

    ppl1, ppl2 = (r[f"{vid}/perplexity"]["values"]["ppl"]["value"] for r in (first, second))
    kld1, kld2 = (r[f"{vid}/kld"] for r in (first, second))
    assert ppl2 > ppl1 * 1.005                        # Q4_0 is measurably worse than Q8_0
    assert kld2["key"] != kld1["key"]
    assert kld2["values"]["kld_mean"]["value"] > 2 * kld1["values"]["kld_mean"]["value"]
    for ppl, kld in ((ppl1, kld1), (ppl2, kld2)):     # each KLD scored the file measured then
        assert kld["values"]["ppl"]["value"] == pytest.approx(ppl, rel=1e-4)
        assert kld["details"]["computed_in"].startswith("the perplexity cell's forward pass")
    # the base's cells did not change; in the first folder the variant's cells are to do again
    for metric in ("footprint", "perplexity", "kld"):
        cid = f"smol/llama.cpp/F16/{metric}"
        assert first[cid]["key"] == second[cid]["key"]
    ctx = PlanContext(base_dir=tmp_path, data_dir=data_dir, cache_dir=isolated_env)
    status = {r["id"]: r["status"] for r in cell_rows(expand(load_suite(suite), ctx),
                                                      Store(tmp_path / "results-1", "stale"))}
    assert status == {f"smol/llama.cpp/F16/{m}": "ok" for m in ("footprint", "perplexity", "kld")
                      } | {f"{vid}/{m}": "todo" for m in ("footprint", "perplexity", "kld")}


def _tiny_gguf(path: Path, tensors: dict[str, tuple[int, ...]], arch: str) -> None:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    for name, shape in tensors.items():
        writer.add_tensor(name, np.ones(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_split_gguf_is_inspected_across_its_shards(tmp_path):
    pytest.importorskip("gguf")
    from qbench.quantize.gguf import inspect_gguf

    first, second = tmp_path / "m-00001-of-00002.gguf", tmp_path / "m-00002-of-00002.gguf"
    _tiny_gguf(first, {"a.weight": (4, 8)}, "llama")
    _tiny_gguf(second, {"b.weight": (4, 16), "c.weight": (8,)}, "gpt2")
    summary = inspect_gguf(first, tmp_path / "cache")
    assert (summary["n_tensors"], summary["n_params"], summary["shards"]) == (3, 32 + 64 + 8, 2)
    assert summary["types"] == {"F32": {"tensors": 3, "params": 104, "bytes": 416}}
    assert summary["file_bytes"] == first.stat().st_size + second.stat().st_size
    assert summary["architecture"] == "llama"
    with second.open("r+b") as fh:   # the second shard cut short: named in the error
        fh.truncate(second.stat().st_size - 64)
    with pytest.raises(SourceError, match="m-00002-of-00002.gguf is (corrupt or )?truncated"):
        inspect_gguf(first)


def test_split_gguf_traffic_facts_add_up_across_shards(tmp_path):
    """The roofline's facts come from the same reader pass as the type mix, summed over shards."""
    pytest.importorskip("gguf")
    from qbench.quantize.gguf import inspect_gguf

    first, second = tmp_path / "m-00001-of-00002.gguf", tmp_path / "m-00002-of-00002.gguf"
    _tiny_gguf(first, {"token_embd.weight": (4, 8)}, "llama")
    _tiny_gguf(second, {"output.weight": (4, 8), "blk.0.ffn_up_exps.weight": (2, 4, 8)}, "llama")
    traffic = inspect_gguf(first)["traffic"]
    assert (traffic["embed_bytes"], traffic["output_bytes"], traffic["expert_bytes"]) == (
        128, 128, 256)
    assert traffic["has_output"] is True


def test_a_build_keeps_the_summary_it_checked_the_file_with(tmp_path, monkeypatch):
    """gguf's reader takes seconds per pass on a large vocabulary: the build reads its new file
    once (to refuse a broken one), and the footprint and roofline then find that summary."""
    pytest.importorskip("gguf")
    from qbench.quantize import gguf as qgguf

    cache = tmp_path / "cache"
    art = qgguf._cached(cache, {"tool": "test", "n": 1},
                        lambda out: _tiny_gguf(out, {"token_embd.weight": (4, 8)}, "llama"))
    assert art.path.is_file()

    def no_second_pass(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(qgguf, "tensor_summary", no_second_pass)
    summary = qgguf.inspect_gguf(art.path, cache)
    assert summary["n_params"] == 32 and summary["traffic"]["embed_bytes"] == 128
    with pytest.raises(AssertionError, match="read again"):   # without the cache: a real read
        qgguf.inspect_gguf(art.path)


def test_missing_variant_input_names_the_suite_key(suite_dir):
    from qbench.errors import ConfigError

    (suite_dir / "pre.gguf").unlink()
    with pytest.raises(ConfigError) as info:
        keys(suite_dir)
    assert info.value.key == "variants (llama.cpp/Q4_K_M@pre.gguf).source"
    assert "model file not found" in str(info.value)
    (suite_dir / "pre.gguf").write_bytes(b"back")
    (suite_dir / "awq.txt").unlink()
    with pytest.raises(ConfigError) as info:
        keys(suite_dir)
    assert info.value.key == "variants (transformers/awq-w4g64).calibration"


def test_converter_is_in_the_keys_of_gguf_variants_of_a_model_folder(suite_dir, monkeypatch):
    d = _hf_folder(suite_dir)
    edit_suite(suite_dir, 'source = "m.gguf"', f'source = "{d.name}"')
    before = keys(suite_dir)
    script = suite_dir / "convert_hf_to_gguf.py"   # another converter makes other GGUF files
    script.write_text("# a llama.cpp checkout's converter\n")
    monkeypatch.setenv("QBENCH_CONVERT_HF_TO_GGUF", str(script))
    assert changed(before, keys(suite_dir)) == {c for c in before if "/llama.cpp/" in c}


def test_torch_and_quantization_libraries_are_in_transformers_keys(suite_dir, monkeypatch):
    before = keys(suite_dir)
    real = plan_mod.library_version
    for lib, hit in (("torch", "/transformers/"), ("llmcompressor", "/awq-w4g64/"),
                     ("llama-cpp-python", "/llama.cpp/")):
        monkeypatch.setattr(plan_mod, "library_version",
                            lambda d, lib=lib: "9.9.9" if d == lib else real(d))
        assert changed(before, keys(suite_dir)) == {c for c in before if hit in c}, lib


def test_kld_base_cache_is_keyed_by_how_the_base_ran(tmp_path):
    """A base cache made on a GPU (other logits: batch-shape dependent kernels) or with other
    batch sizes is never read by a CPU run."""
    from qbench.metrics.kld import Options, base_cache_path
    opts = Options().resolved(None)
    cpu = {"device": "cpu", "batch": 512, "ubatch": 512, "n_gpu_layers": 0}
    paths = {str(base_cache_path(tmp_path, "sha-b", "sha-t", opts, rt))
             for rt in (cpu, cpu | {"device": "cuda"}, cpu | {"ubatch": 128},
                        cpu | {"n_gpu_layers": 99})}
    assert len(paths) == 4
    assert base_cache_path(tmp_path, "sha-b", "sha-t", opts, dict(cpu)) == \
        base_cache_path(tmp_path, "sha-b", "sha-t", opts, cpu)


def test_the_plain_reader_reads_what_ggufs_reader_reads(tmp_path):
    """The view over the memory map changes how fast, not what: every field's parts and every
    tensor's type, size, offset and data agree with gguf's own reader."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

    from qbench.quantize.gguf import plain_reader

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list([f"tok{i}" for i in range(500)])
    writer.add_token_scores([float(i) for i in range(500)])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.normal(size=(500, 64)).astype(np.float16))
    writer.add_tensor("output_norm.weight", rng.normal(size=64).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, theirs = plain_reader(path), GGUFReader(str(path))
    assert type(ours.data) is np.ndarray and isinstance(theirs.data, np.memmap)
    assert list(ours.fields) == list(theirs.fields) and len(ours.fields) > 5
    for name, field in theirs.fields.items():
        assert len(ours.fields[name].parts) == len(field.parts)
        assert all(np.array_equal(a, b) for a, b in zip(ours.fields[name].parts, field.parts))
    assert [(t.name, t.tensor_type, int(t.n_bytes), int(t.data_offset)) for t in ours.tensors] \
        == [(t.name, t.tensor_type, int(t.n_bytes), int(t.data_offset)) for t in theirs.tensors]
    assert ours.tensors[0].tensor_type == GGMLQuantizationType.F16
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))
