"""`shadowfx inspect` and `shadowfx demo` from the command line, on local directories only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import BertConfig

from shadowfx.cli import main
from shadowfx.families import build_small

from conftest import save_with_tokenizer


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "opt-small"
    build_small("opt").save_pretrained(path)
    return path


def test_inspect_saved_directory(saved_model, capsys):
    assert main(["inspect", str(saved_model)]) == 0
    out = capsys.readouterr().out
    assert "OPTForCausalLM (opt): 3 layers" in out
    assert "2 attentions -> shadowfx::gathered_attention, 2 MLPs -> shadowfx::gathered_mlp" in out


def test_inspect_json_is_the_structure(saved_model, capsys):
    assert main(["inspect", str(saved_model), "--json", "--attn", "eager"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model_type"] == "opt" and len(data["layers"]) == 3
    assert data["layers"][2]["mlp"]["activation"] == "relu"
    assert data["weights_digest"] is not None


def test_inspect_config_only(saved_model, tmp_path, capsys):
    config_dir = tmp_path / "config-only"
    build_small("mistral").config.save_pretrained(config_dir)
    assert main(["inspect", str(config_dir / "config.json"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["weights_digest"] is None and data["layers"][1]["attention"]["num_kv_heads"] == 2


@pytest.mark.parametrize("problem", ["missing", "no-config", "bad-json", "encoder"])
def test_inspect_bad_inputs_exit_2_with_a_message(problem, tmp_path, capsys):
    path = tmp_path / problem
    if problem == "no-config":
        path.mkdir()
    elif problem == "bad-json":
        path.mkdir()
        (path / "config.json").write_text("{not json")
    elif problem == "encoder":
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64).save_pretrained(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    expected = {"missing": "does not exist", "no-config": "no config.json", "bad-json": "not a readable JSON",
                "encoder": "not a causal decoder"}[problem]
    assert expected in err and "Traceback" not in err


def test_demo_json(capsys):
    assert main(["demo", "--family", "gpt2", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["family"] == "gpt2" and entry["max_abs_diff_vs_eager"] < 1e-5
    assert entry["structure"]["layers"][0]["attention"]["q"]["rows"] == [0, 64]
    assert entry["rewrites"]["prefill"]["sparsify_mlp"] == entry["rewrites"]["decode"]["sparsify_attention"] == 2
    assert 0 < entry["effective_sparsity"]["neurons"] < 1 and len(entry["generated"][0]) == 4


def test_console_script_runs(saved_model):
    result = subprocess.run([sys.executable, "-m", "shadowfx.cli", "inspect", str(saved_model)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fingerprint" in result.stdout


@pytest.fixture(scope="module")
def corpus():
    """A slice of the built-in corpus (the installed packages' docs and code): text that every machine has."""
    from shadowfx.data import build_corpus

    return build_corpus(docs_chars=60_000, code_chars=60_000)


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory, corpus):
    """A small OPT saved with a byte-level BPE tokenizer trained here on the corpus."""
    return save_with_tokenizer(build_small("opt"), tmp_path_factory.mktemp("models") / "opt-tok",
                               corpus.texts("train"), 500)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text("\n\n".join(corpus.texts("train", "docs"))[:30_000])
    return path


def test_calibrate_then_train(model_with_tokenizer, text_file, tmp_path, capsys):
    traces = tmp_path / "traces"
    assert main(["calibrate", str(model_with_tokenizer), str(text_file), "--out", str(traces), "--samples", "24",
                 "--window", "16", "--tokens-per-sample", "2"]) == 0
    header = json.loads((traces / "traces.json").read_text())
    assert header["samples"] == 24 and header["data"]["text"].endswith("calibration.txt")
    out = tmp_path / "predictor"
    assert main(["train", str(traces), "--model", str(model_with_tokenizer), "--out", str(out), "--hidden", "32"]) == 0
    report = json.loads((out / "shadow_predictor_report_shadowllm_prompt.json").read_text())
    assert {"predictor", "constant", "static"} <= set(report["spearman"]["held_out"])
    assert (out / "shadow_predictor.json").is_file()
    assert "held-out Spearman" in capsys.readouterr().out


def test_calibrate_and_train_refuse_bad_inputs(model_with_tokenizer, text_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    no_tokenizer = tmp_path / "bare"
    build_small("opt").save_pretrained(no_tokenizer)
    other = tmp_path / "other"
    build_small("opt", seed=5).save_pretrained(other)
    traces = tmp_path / "traces"
    main(["calibrate", str(model_with_tokenizer), str(text_file), "--out", str(traces), "--samples", "8",
          "--window", "16"])
    capsys.readouterr()
    cases = [
        (["calibrate", str(model_with_tokenizer), str(tmp_path / "missing.txt"), "--out", str(tmp_path / "a")],
         "does not exist"),
        (["calibrate", str(model_with_tokenizer), str(empty), "--out", str(tmp_path / "b")], "is empty"),
        (["calibrate", str(no_tokenizer), str(text_file), "--out", str(tmp_path / "c")], "no usable tokenizer"),
        (["train", str(traces), "--model", str(other), "--out", str(tmp_path / "d")], "re-run calibration"),
        (["train", str(tmp_path / "nothing"), "--model", str(model_with_tokenizer)], "run calibration first"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    for never_written in ("a", "b", "c", "d"):
        assert not (tmp_path / never_written).exists() or not any((tmp_path / never_written).iterdir())
