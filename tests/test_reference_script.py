"""scripts/train_reference.py end to end at toy size: data, tokenizer, training, resume, save_pretrained, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import shadowfx

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_reference.py"
TOY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--batch", "2", "--length", "32",
       "--vocab", "300", "--corpus-chars", "40000", "--threads", "1"]


def run(home: Path, steps: int) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "llama", "--home", str(home), "--steps",
                             str(steps), *TOY], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_resume_and_report(tmp_path):
    run(tmp_path, 2)
    resumed = run(tmp_path, 4)
    assert "resuming llama-2x32 at step 2" in resumed
    directory = tmp_path / "reference" / "llama-2x32"
    report = json.loads((directory / "report.json").read_text())
    assert report["steps"] == 4 and set(report["perplexity"]) == {"prose", "docs", "code"}
    assert {"dense", "random_0.50", "random_0.50_ratio"} <= set(report["damage"])
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)  # an ordinary HF directory
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert tokenizer("def f(x): return x")["input_ids"]
    assert shadowfx.discover(model).layers[1].attention.num_kv_heads == 1
