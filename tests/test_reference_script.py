"""scripts/train_reference.py end to end at toy size: data, tokenizer, training, resume, save_pretrained, report."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import shadowfx
from shadowfx.data import WIKITEXT_ENV, DataError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_reference.py"
TOY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--batch", "2", "--length", "32",
       "--vocab", "300", "--corpus-chars", "40000", "--threads", "1"]


def run(home: Path, steps: int, wikitext: Path | None = None, *, succeeds: bool = True) -> subprocess.CompletedProcess:
    """The script on ``home``, with ``SHADOWFX_WIKITEXT`` set to ``wikitext`` (unset when None, whatever the caller's
    environment says)."""
    env = {key: value for key, value in os.environ.items() if key != WIKITEXT_ENV}
    if wikitext is not None:
        env[WIKITEXT_ENV] = str(wikitext)
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "llama", "--home", str(home), "--out",
                             str(home / "reference"), "--steps", str(steps), *TOY], capture_output=True, text=True,
                            timeout=600, env=env)
    assert (result.returncode == 0) == succeeds, result.stderr[-3000:]
    return result


def test_train_resume_and_report(tmp_path):
    directory = tmp_path / "reference" / "llama-2x32"
    run(tmp_path, 2)
    first = json.loads((directory / "report.json").read_text())
    resumed = run(tmp_path, 4).stdout
    assert "resuming llama-2x32 at step 2" in resumed
    report = json.loads((directory / "report.json").read_text())
    assert report["steps"] == 4 and set(report["perplexity"]) == {"docs", "code"} and report["damage_domain"] == "docs"
    assert {"dense", "random_0.50", "random_0.50_ratio"} <= set(report["damage"])
    # the training time adds up across the interrupted and the resumed run
    assert report["train_minutes_this_run"] > 0 and first["train_minutes"] == first["train_minutes_this_run"] > 0
    assert report["train_minutes"] == pytest.approx(first["train_minutes"] + report["train_minutes_this_run"])
    assert sorted(path.name for path in directory.parent.iterdir()) == ["llama-2x32"]  # replaced whole, no leftovers
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)  # an ordinary HF directory
    assert model.dtype == torch.float16 and report["saved_dtype"] == "float16"  # small enough to commit
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert tokenizer("def f(x): return x")["input_ids"]
    assert shadowfx.discover(model).layers[1].attention.num_kv_heads == 1


def load_script():
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wikitext_from_the_environment_adds_prose(tmp_path):
    missing = run(tmp_path, 0, tmp_path / "missing", succeeds=False)
    assert f"{tmp_path / 'missing' / 'valid.txt'} does not exist" in missing.stderr and WIKITEXT_ENV in missing.stderr
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    words = random.Random(0).choices(["the", "river", "city", "was", "built", "in", "north", "of", "a", "king"], k=3000)
    for name, part in (("valid.txt", words[:2000]), ("test.txt", words[2000:])):
        (folder / name).write_text(" = Article = \n " + " ".join(part) + " . \n")
    script = load_script()  # in process: the data step alone, without training and the damage curve
    tokenizer, streams = script.prepare_data(tmp_path, 300, 20_000, folder)
    assert set(streams) == {"train", "heldout_prose", "heldout_docs", "heldout_code"}
    assert tokenizer.decode(streams["heldout_prose"][:40].tolist()).startswith(" = Article = ")
    assert script.prepare_data(tmp_path, 300, 20_000, folder)[1]["train"].equal(streams["train"])  # cached
    with pytest.raises(DataError, match="was built from .* use another --home"):
        script.prepare_data(tmp_path, 300, 20_000, None)  # the cached data has prose; this asks for none
