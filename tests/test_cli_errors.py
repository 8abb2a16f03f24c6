"""The command line on bad inputs and damaged files: one line on stderr naming the problem and the fix, exit code 2,
never a traceback."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shadowfx.cli import main
from shadowfx.families import build_small
from shadowfx.passes.base import PassError

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("the model reads a prompt and every layer scores its heads while neurons of the gated projection fire "
         "when tokens repeat across windows of text that a small tokenizer learns from scratch here").split()


def generated_text(words: int, seed: int = 0) -> str:
    """Sentences of random words: enough structure for a BPE tokenizer, no file from outside the test."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                 for _ in range(words // 9)]
    return " ".join(sentences)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(generated_text(6000))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, text_file):
    """A small OPT saved with a byte-level BPE tokenizer trained here on the generated text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("models") / "opt-tok"
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text_file.read_text()], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    build_small("opt").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def traces(tmp_path_factory, model_dir, text_file):
    out = tmp_path_factory.mktemp("calibrated") / "traces"
    assert main(["calibrate", str(model_dir), str(text_file), "--out", str(out), "--samples", "24", "--window", "16",
                 "--tokens-per-sample", "2"]) == 0
    return out


def fails(argv: list[str], capsys, *messages: str) -> str:
    """Run the CLI; it must exit 2 with one line on stderr holding every message and no traceback."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("shadowfx ")]
    assert len(lines) == 1, err
    for message in messages:
        assert message in lines[0], (message, err)
    return lines[0]


def copied(traces, tmp_path):
    copy = tmp_path / "traces"
    shutil.copytree(traces, copy)
    return copy


def test_a_failing_pass_is_one_line(monkeypatch, capsys):
    def failing_transform(*args, **kwargs):
        raise PassError("sparsify_mlp (after insert_shadow) failed:\nthe graph has no MLP intermediate")

    monkeypatch.setattr("shadowfx.cli.transform", failing_transform)
    fails(["demo", "--family", "gpt2"], capsys, "sparsify_mlp (after insert_shadow) failed:",
          "the graph has no MLP intermediate")


def test_an_unwritable_out_is_refused_before_any_work(model_dir, text_file, traces, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    fails(["calibrate", str(model_dir), str(text_file), "--out", str(blocker / "traces")], capsys,
          f"cannot create the folder {blocker / 'traces'}", "choose a writable folder")
    fails(["train", str(traces), "--model", str(model_dir), "--out", str(blocker / "predictor")], capsys,
          f"cannot create the folder {blocker / 'predictor'}", "choose a writable folder")


def test_a_bare_os_error_names_the_path(monkeypatch, model_dir, capsys):
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(model_dir / "config.json"))

    monkeypatch.setattr("shadowfx.cli.load_decoder", unreadable)
    fails(["inspect", str(model_dir)], capsys, f"cannot use {model_dir / 'config.json'}: Permission denied",
          "check that it exists")


def test_a_damaged_trace_shard(traces, model_dir, tmp_path, capsys):
    damaged = copied(traces, tmp_path)
    (damaged / "shard-00000.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xx")
    fails(["train", str(damaged), "--model", str(model_dir), "--out", str(tmp_path / "p")], capsys,
          "cannot read the trace shard", "re-run calibration")


def test_damaged_model_weights(model_dir, tmp_path, capsys):
    damaged = tmp_path / "model"
    shutil.copytree(model_dir, damaged)
    (damaged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xx")
    fails(["inspect", str(damaged)], capsys, f"cannot read the weights at {damaged}", "save it again")


@pytest.mark.parametrize("key", ["criterion", "tokens_per_sample", "shards"])
def test_a_trace_header_missing_a_key(traces, model_dir, tmp_path, capsys, key):
    damaged = copied(traces, tmp_path)
    header = json.loads((damaged / "traces.json").read_text())
    del header[key]
    (damaged / "traces.json").write_text(json.dumps(header))
    fails(["train", str(damaged), "--model", str(model_dir), "--out", str(tmp_path / "p")], capsys,
          f"lacks {key}", "re-run calibration")


def test_undefined_spearman_is_reported_not_a_crash(traces, model_dir, tmp_path, capsys):
    flat = copied(traces, tmp_path)
    shard = flat / "shard-00000.safetensors"
    tensors = load_file(str(shard))
    for name in ("heads", "neurons"):  # every target row constant: no ranking to compare
        tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(shard))
    capsys.readouterr()
    assert main(["train", str(flat), "--model", str(model_dir), "--out", str(tmp_path / "p"), "--kind", "static"]) == 0
    out = capsys.readouterr().out
    assert "held-out Spearman: predictor undefined, constant undefined, static undefined" in out
    assert "every held-out target row is constant" in out
