"""Suite parsing: every mistake is a ConfigError naming the file and the key, with the fix."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from qbench.cli import main
from qbench.suite.config import load_suite
from qbench.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

MODEL = """
[[models]]
id = "m"
source = "model.gguf"
base = "F16"
"""

SUITE = """
[suite]
name = "t"

[defaults]
threads = 1

[[models]]
id = "m"
source = "model.gguf"
base = "F16"

[[variants]]
backend = "llama.cpp"
quant = ["F16", "Q8_0"]

[metrics.speed]
prompt_tokens = 16
"""


def error_of(write_suite, text: str) -> tuple[str, ConfigError]:
    path = write_suite(text)
    with pytest.raises(ConfigError) as info:
        load_suite(path)
    return str(path), info.value


def test_minimal_suite_parses(write_suite):
    suite = load_suite(write_suite(SUITE))
    assert suite.name == "t"
    assert suite.defaults.threads == 1
    assert [v.quant for v in suite.variants] == ["F16", "Q8_0"]
    # implicit metrics are added; explicit options are kept
    assert set(suite.metrics) == {"footprint", "sanity", "speed"}
    assert suite.metrics["speed"].prompt_tokens == 16
    assert suite.base_variant(suite.models[0]).quant == "F16"


def test_quant_names_are_canonicalised(write_suite):
    suite = load_suite(write_suite(SUITE.replace('["F16", "Q8_0"]', '["f16", "q4_k_m"]')))
    assert [v.quant for v in suite.variants] == ["F16", "Q4_K_M"]


def test_disabled_implicit_metric(write_suite):
    suite = load_suite(write_suite(SUITE + "\n[metrics.sanity]\nenabled = false\n"))
    assert set(suite.metrics) == {"footprint", "speed"}


def test_unknown_quant_with_suggestion(write_suite):
    file, err = error_of(write_suite, SUITE.replace('"Q8_0"]', '"Q4_KM"]'))
    assert str(err) == (f"{file}: variants[0].quant[1]: unknown llama.cpp type 'Q4_KM' "
                        "(did you mean Q4_K_M?)")
    assert err.file == file and err.key == "variants[0].quant[1]"


def test_unknown_quant_single_string(write_suite):
    file, err = error_of(write_suite, SUITE.replace('["F16", "Q8_0"]', '"Q9_9"'))
    assert str(err).startswith(f"{file}: variants[0].quant: unknown llama.cpp type 'Q9_9'")


def test_unknown_section(write_suite):
    file, err = error_of(write_suite, SUITE + "\n[metric.perplexity]\nctx = 512\n")
    assert str(err) == (f"{file}: metric: unknown section 'metric' (did you mean metrics?); "
                        "expected one of: suite, defaults, models, variants, metrics, report, decide")


def test_unknown_key_in_defaults_lists_expected_keys(write_suite):
    file, err = error_of(write_suite, SUITE.replace("threads = 1", "thread = 1"))
    assert str(err) == (f"{file}: defaults.thread: unknown key 'thread' (did you mean threads?); "
                        "expected one of: cache_dir, data_dir, device, memory_limit_mb, "
                        "threads, timeout_s")


def test_unknown_key_in_metric_options(write_suite):
    file, err = error_of(write_suite, SUITE + "\n[metrics.perplexity]\nchunk = 2\n")
    assert str(err) == (f"{file}: metrics.perplexity.chunk: unknown key 'chunk' (did you mean "
                        "chunks?); expected one of: chunks, ctx, dataset")


def test_wrong_type(write_suite):
    file, err = error_of(write_suite, SUITE + '\n[metrics.perplexity]\nctx = "big"\n')
    assert str(err) == f"{file}: metrics.perplexity.ctx: expected an integer, got 'big'"


def test_bool_is_not_an_integer(write_suite):
    file, err = error_of(write_suite, SUITE.replace("threads = 1", "threads = true"))
    assert str(err) == f"{file}: defaults.threads: expected an integer, got True"


def test_negative_value(write_suite):
    file, err = error_of(write_suite, SUITE.replace("threads = 1", "timeout_s = -5"))
    assert str(err) == f"{file}: defaults.timeout_s: expected a number > 0, got -5.0"


def test_odd_perplexity_context(write_suite):
    file, err = error_of(write_suite, SUITE + "\n[metrics.perplexity]\nctx = 511\n")
    assert err.key == "metrics.perplexity.ctx"
    assert "expected an even context of at least 8 tokens, got 511" in str(err)


def test_literal_choice_with_suggestion(write_suite):
    file, err = error_of(write_suite, SUITE.replace("threads = 1", 'device = "CUDA"'))
    assert str(err) == (f"{file}: defaults.device: expected one of 'auto', 'cpu', 'cuda', "
                        "got 'CUDA' (did you mean cuda?)")


def test_duplicate_model_ids(write_suite):
    file, err = error_of(write_suite, SUITE + MODEL)
    assert str(err) == f"{file}: models[1].id: duplicate model id 'm' (also models[0])"


def test_duplicate_variants_across_spellings(write_suite):
    file, err = error_of(write_suite, SUITE.replace('["F16", "Q8_0"]', '["F16", "Q8_0", "q8_0"]'))
    assert str(err) == (f"{file}: variants[0].quant[2]: duplicate variant llama.cpp/Q8_0 "
                        "(also variants[0].quant[1])")


def test_duplicate_variants_across_groups(write_suite):
    text = SUITE + '\n[[variants]]\nbackend = "llama.cpp"\nquant = ["Q8_0"]\n'
    file, err = error_of(write_suite, text)
    assert str(err) == (f"{file}: variants[1].quant[0]: duplicate variant llama.cpp/Q8_0 "
                        "(also variants[0].quant[1])")


def test_duplicate_variant_from_overlapping_groups(write_suite):
    # one group for every model, one restricted to "m": model m would get Q8_0 twice
    text = (SUITE + MODEL.replace('id = "m"', 'id = "n"')
            + '\n[[variants]]\nbackend = "llama.cpp"\nquant = ["Q8_0"]\nmodels = ["m"]\n')
    file, err = error_of(write_suite, text)
    assert str(err) == (f"{file}: variants[1].quant[0]: duplicate variant llama.cpp/Q8_0 for "
                        "model 'm' (also variants[0].quant[1])")
    # disjoint restricted groups are fine
    ok = text.replace('quant = ["F16", "Q8_0"]', 'quant = ["F16", "Q8_0"]\nmodels = ["n"]')
    ok += '\n[[variants]]\nbackend = "llama.cpp"\nquant = ["F16"]\nmodels = ["m"]\n'
    suite = load_suite(write_suite(ok))
    for model in suite.models:
        labels = [v.label for v in suite.variants_for(model)]
        assert len(labels) == len(set(labels)) == 2


def test_empty_quant_list(write_suite):
    file, err = error_of(write_suite, SUITE.replace('["F16", "Q8_0"]', "[]"))
    assert str(err) == f"{file}: variants[0].quant: empty quant list"


def test_empty_models(write_suite):
    text = "models = []\n" + SUITE.replace(MODEL.strip(), "")
    file, err = error_of(write_suite, text)
    assert str(err) == f"{file}: models: empty: a suite needs at least one entry in [[models]]"


def test_missing_models(write_suite):
    file, err = error_of(write_suite, SUITE.replace(MODEL.strip(), ""))
    assert str(err) == f"{file}: models: missing [[models]]: a suite needs at least one"


def test_variant_for_unknown_model(write_suite):
    text = SUITE.replace('quant = ["F16", "Q8_0"]', 'quant = ["F16", "Q8_0"]\nmodels = ["mm"]')
    file, err = error_of(write_suite, text)
    assert str(err) == f"{file}: variants[0].models: no model with id 'mm' (did you mean m?)"


def test_unknown_metric(write_suite):
    file, err = error_of(write_suite, SUITE + "\n[metrics.perplexty]\n")
    assert str(err).startswith(f"{file}: metrics.perplexty: unknown metric 'perplexty' "
                               "(did you mean perplexity?); available: footprint, sanity, "
                               "perplexity")


def test_only_implicit_metrics_is_an_error(write_suite):
    text = SUITE.replace("[metrics.speed]\nprompt_tokens = 16", "[metrics.footprint]")
    file, err = error_of(write_suite, text)
    assert err.key == "metrics"
    assert str(err).startswith(f"{file}: metrics: no metric to measure")


def test_unknown_backend(write_suite):
    file, err = error_of(write_suite, SUITE.replace('backend = "llama.cpp"',
                                                    'backend = "llamacpp"'))
    assert str(err) == (f"{file}: variants[0].backend: unknown backend 'llamacpp' "
                        "(did you mean llama.cpp?); available: llama.cpp, transformers")


def test_iq_type_needs_imatrix(write_suite):
    file, err = error_of(write_suite, SUITE.replace('"Q8_0"]', '"iq2_xxs"]'))
    assert str(err) == (f"{file}: variants[0].quant[1]: IQ2_XXS needs an importance matrix: "
                        'set imatrix = "wikitext-2" (or a text file) in variants[0]')
    # with an imatrix it is accepted
    text = SUITE.replace('quant = ["F16", "Q8_0"]',
                         'quant = ["F16", "IQ2_XXS"]\nimatrix = "wikitext-2"')
    assert load_suite(write_suite(text)).variants[1].imatrix == "wikitext-2"


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 101, "a b"])
def test_invalid_suite_name(write_suite, name):
    file, err = error_of(write_suite, SUITE.replace('name = "t"', f'name = "{name}"'))
    assert err.key == "suite.name"
    assert str(err).startswith(f"{file}: suite.name: expected 1-100 letters")
    assert repr(name) in str(err)


def test_missing_suite_section(write_suite):
    file, err = error_of(write_suite, SUITE.replace('[suite]\nname = "t"\n', ""))
    assert err.key == "suite"
    assert "missing [suite] section" in str(err)


def test_malformed_toml(write_suite):
    file, err = error_of(write_suite, SUITE + "\n[metrics.speed\n")
    assert str(err).startswith(f"{file}: invalid TOML: ")
    assert "line" in str(err)  # tomllib says where


def test_not_utf8(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[suite]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 16\)"):
        load_suite(path)


def test_missing_suite_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_suite(path)
    assert str(info.value) == f"{path}: suite file not found"


def test_base_must_be_a_variant_when_a_metric_compares_with_it(write_suite):
    try:
        importlib.import_module("qbench.metrics.kld")
    except ImportError as exc:
        pytest.skip(f"kld metric not available yet: {exc}")
    text = SUITE.replace('["F16", "Q8_0"]', '["Q8_0", "Q4_K_M"]') + "\n[metrics.kld]\n"
    file, err = error_of(write_suite, text)
    assert err.key == "models[0].base"
    assert str(err).startswith(f"{file}: models[0].base: base 'llama.cpp/F16' is not among "
                               "this model's variants, and kld compares every variant with it")
    # without a metric that needs the base, the same matrix is fine
    load_suite(write_suite(text.replace("\n[metrics.kld]\n", "")))


def test_unknown_base_quant(write_suite):
    file, err = error_of(write_suite, SUITE.replace('base = "F16"', 'base = "F17"'))
    assert err.key == "models[0].base"
    assert "unknown llama.cpp type 'F17'" in str(err)


@pytest.mark.parametrize("base", ["Q4_K_M", "q8_0"])
def test_a_quantized_base_is_refused_by_validate_as_run_would(write_suite, base):
    """validate accepted base = "Q4_K_M" and every cell then failed at run time ("the base
    must be a float type"): what validate accepts, run must not refuse."""
    file, err = error_of(write_suite, SUITE.replace('base = "F16"', f'base = "{base}"'))
    assert err.key == "models[0].base"
    assert "unquantized llama.cpp type (BF16, F16, F32), got " + base.upper() in str(err)
    assert f'quant = "{base.upper()}", source = ' in str(err)     # says how to measure the file


def test_hostile_model_id_with_newline_is_rejected(write_suite):
    file, err = error_of(write_suite, SUITE.replace('id = "m"', 'id = "m\\nINFO fake log line"'))
    assert err.key == "models[0].id"
    assert str(err) == (f"{file}: models[0].id: expected a printable id of 1-200 characters, "
                        "got 'm\\nINFO fake log line'")


def test_html_in_model_id_is_accepted_as_data(write_suite):
    suite = load_suite(write_suite(SUITE.replace('id = "m"', 'id = "<script>alert(1)</script>"')))
    assert suite.models[0].id == "<script>alert(1)</script>"


def test_quant_of_wrong_type(write_suite):
    file, err = error_of(write_suite, SUITE.replace('["F16", "Q8_0"]', "8"))
    assert str(err) == f"{file}: variants[0].quant: expected a list of strings or a string, got 8"


def test_list_item_of_wrong_type_names_index(write_suite):
    file, err = error_of(write_suite, SUITE.replace('["F16", "Q8_0"]', '["F16", 8]'))
    assert err.key == "variants[0].quant"  # the union falls back to the whole value
    assert "got ['F16', 8]" in str(err)


# --- through the command line --------------------------------------------------------------


def test_cli_validate_reports_error_and_exits_1(write_suite, capsys):
    path = write_suite(SUITE.replace('"Q8_0"]', '"Q4_KM"]'))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"qbench: error: {path}: variants[0].quant[1]: unknown llama.cpp "
                           "type 'Q4_KM' (did you mean Q4_K_M?)")


def test_cli_validate_missing_model_file_names_source_key(write_suite, capsys, isolated_env):
    path = write_suite(SUITE)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"qbench: error: {path}: models[0].source: model file not found: ")
    assert str(path.parent / "model.gguf") in err


def test_cli_validate_corrupt_model_file(write_suite, capsys, isolated_env):
    path = write_suite(SUITE)
    (path.parent / "model.gguf").write_bytes(b"not a gguf at all, just text" * 4)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"qbench: error: {path}: models[0].source: ")
    assert "is not a GGUF file" in err and str(path.parent / "model.gguf") in err


def test_default_suite_validates(data_dir, smollm2_ref, isolated_env, capsys):
    assert main(["validate", str(REPO / "suites" / "smoke.toml"),
                 "--data-dir", str(data_dir)]) == 0
    err = capsys.readouterr().err
    assert "suite 'smoke'" in err and "cells" in err


def test_default_suite_smoke_shape():
    suite = load_suite(REPO / "suites" / "smoke.toml")
    gguf = [v for v in suite.variants if v.backend == "llama.cpp"]
    assert len(gguf) >= 6
    assert suite.base_variant(suite.models[0]) is not None


def test_default_suite_without_dataset_names_the_key(tmp_path, smollm2_ref, isolated_env,
                                                     capsys, monkeypatch):
    monkeypatch.delenv("QBENCH_DATA_DIR", raising=False)
    empty = tmp_path / "nodata"
    empty.mkdir()
    smoke = REPO / "suites" / "smoke.toml"
    assert main(["validate", str(smoke), "--data-dir", str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"qbench: error: {smoke}: metrics.perplexity.dataset: dataset "
                          "'wikitext-2' not found: expected ")
    assert str(empty / "wikitext-2-raw" / "wiki.test.raw") in err


HF_GROUP = """
[[variants]]
backend = "transformers"
quant = ["fp32", "awq-w4g64", "bnb-int8"]
"""


def test_calibration_keys_reach_awq_gptq_keys_only(write_suite):
    text = SUITE + HF_GROUP + 'calibration = "wikitext-2"\ncalibration_samples = 8\n'
    suite = load_suite(write_suite(text))
    by_quant = {v.quant: v for v in suite.variants}
    awq = by_quant["awq-w4g64"]
    assert awq.calibrated and awq.calibration_samples == 8
    assert awq.params()["calibration_samples"] == 8
    assert awq.params()["calibration_seq_len"] == 256
    # the same group's fp32 and bnb rows run no calibration: their keys do not carry it
    assert "calibration" not in by_quant["fp32"].params()
    assert "calibration" not in by_quant["bnb-int8"].params()
    # a different calibration size is a different artifact, hence a different key
    other = load_suite(write_suite(text.replace("calibration_samples = 8",
                                                "calibration_samples = 16")))
    assert {v.quant: v for v in other.variants}["awq-w4g64"].params() != awq.params()


def test_calibration_on_a_group_without_calibration_pass_is_refused(write_suite):
    text = SUITE.replace('quant = ["F16", "Q8_0"]',
                         'quant = ["F16", "Q8_0"]\ncalibration_samples = 8')
    file, err = error_of(write_suite, text)
    assert err.file == file and err.key == "variants[0].calibration_samples"
    assert "awq-*/gptq-*" in str(err) and "imatrix" in str(err)


def test_calibration_sizes_are_checked(write_suite):
    text = SUITE + HF_GROUP + "calibration_seq_len = 4\n"
    _, err = error_of(write_suite, text)
    assert err.key == "variants[1].calibration_seq_len" and "16 tokens" in str(err)


def test_group_metrics_restrict_cells(write_suite, tmp_path):
    from qbench.suite.plan import PlanContext, expand

    text = SUITE.replace('quant = ["F16", "Q8_0"]', 'quant = ["F16"]') + '''
[[variants]]
backend = "llama.cpp"
quant = ["Q8_0"]
metrics = ["perplexity"]

[metrics.perplexity]
ctx = 128
'''
    suite = load_suite(write_suite(text))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # hashed, not read, by expand()
    ctx = PlanContext(base_dir=tmp_path, data_dir=None, cache_dir=tmp_path / "c")
    ids = {c.id.split("/", 2)[2] for c in expand(suite, ctx)}
    assert "Q8_0/perplexity" in ids and "Q8_0/speed" not in ids
    assert {"Q8_0/footprint", "Q8_0/sanity", "F16/speed"} <= ids   # implicit ones always run


def test_group_metrics_are_checked(write_suite):
    text = SUITE + '''
[[variants]]
backend = "llama.cpp"
quant = ["Q4_0"]
metrics = ["perplexty"]
'''
    _, err = error_of(write_suite, text)
    assert err.key == "variants (llama.cpp/Q4_0).metrics"
    assert "not a metric of this suite" in str(err)


def test_base_must_measure_what_its_variants_measure(write_suite):
    text = SUITE.replace('quant = ["F16", "Q8_0"]', 'quant = ["F16"]\nmetrics = ["speed"]') + '''
[[variants]]
backend = "llama.cpp"
quant = ["Q8_0"]

[metrics.perplexity]
ctx = 128
'''
    _, err = error_of(write_suite, text)
    assert err.key == "variants (llama.cpp/F16).metrics" and "perplexity" in str(err)
