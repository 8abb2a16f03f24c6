"""`shadowfx inspect` and `shadowfx demo` from the command line, on local directories only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import BertConfig

from shadowfx.cli import main
from shadowfx.families import build_small


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


def test_console_script_runs(saved_model):
    result = subprocess.run([sys.executable, "-m", "shadowfx.cli", "inspect", str(saved_model)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fingerprint" in result.stdout
