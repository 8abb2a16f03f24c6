"""The command line on bad inputs and damaged files (one line on stderr naming the problem and the fix, exit code 2,
never a traceback), and its dtype, training and resuming options."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shadowfx.api import discover
from shadowfx.cli import main
from shadowfx.families import build_small

from conftest import save_with_tokenizer
from shadowfx.loading import load_decoder
from shadowfx.passes.base import PassError
from shadowfx.predictor import SavedPredictor, ShadowPredictor, StaticScores, load_predictor, saved_predictors
from shadowfx.structure import DtypeWarning

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
    return save_with_tokenizer(build_small("opt"), tmp_path_factory.mktemp("models") / "opt-tok",
                               [text_file.read_text()], 400)


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


# ---- options of issue #9 -------------------------------------------------------------------------------------------
def test_dtype_is_chosen_not_inherited_from_the_checkpoint(model_dir, text_file, tmp_path, capsys):
    saved_in_fp16 = tmp_path / "fp16"
    shutil.copytree(model_dir, saved_in_fp16)
    build_small("opt").half().save_pretrained(saved_in_fp16)
    for argv, dtype in ((["inspect", str(saved_in_fp16), "--json"], "float32"),
                        (["inspect", str(saved_in_fp16), "--json", "--dtype", "float16"], "float16"),
                        (["inspect", str(saved_in_fp16), "--json", "--dtype", "bfloat16"], "bfloat16")):
        capsys.readouterr()
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["fingerprint"].endswith(f".{dtype}"), argv
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(saved_in_fp16), "--dtype", "float64"])
    assert exit_info.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err
    # calibration holds the weights in float32 unless told otherwise, and says how much it wrote
    traces = tmp_path / "traces"
    assert main(["calibrate", str(saved_in_fp16), str(text_file), "--out", str(traces), "--samples", "4",
                 "--window", "16", "--tokens-per-sample", "1"]) == 0
    assert json.loads((traces / "traces.json").read_text())["fingerprint"].endswith(".float32")
    on_disk = sum(path.stat().st_size for path in traces.iterdir()) / 2 ** 20
    assert f"scored with plainact in float32; traces in {traces} ({on_disk:.2f} MiB on disk)" in capsys.readouterr().out


def test_loading_in_another_dtype_than_calibration_is_a_note(traces, model_dir, tmp_path, capsys):
    with pytest.warns(DtypeWarning, match="made with the model in float32; this model holds its weights in bfloat16"):
        assert main(["train", str(traces), "--model", str(model_dir), "--out", str(tmp_path), "--kind", "static",
                     "--dtype", "bfloat16"]) == 0
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    build_small("opt", seed=5).save_pretrained(other)
    fails(["train", str(traces), "--model", str(other), "--out", str(tmp_path), "--dtype", "bfloat16"], capsys,
          "a model with other weights and another dtype (float32, not bfloat16)", "re-run calibration")


def test_train_takes_epochs_batch_size_and_lr(traces, model_dir, tmp_path):
    assert main(["train", str(traces), "--model", str(model_dir), "--out", str(tmp_path), "--hidden", "8",
                 "--epochs", "3", "2", "--batch-size", "5", "--lr", "0.02"]) == 0
    settings = json.loads((tmp_path / "shadow_predictor_report_shadowllm_prompt.json").read_text())["settings"]
    assert settings["epochs"] == [3, 2] and settings["batch_size"] == [5, 5] and settings["lr"] == 0.02
    report = json.loads((tmp_path / "shadow_predictor_report_shadowllm_prompt.json").read_text())
    assert report["training"]["heads"]["epochs"] == 3 and report["training"]["neurons"]["batch_size"] == 5


def test_train_saves_each_kind_apart_and_names_the_default(traces, model_dir, tmp_path, capsys):
    structure = discover(load_decoder(model_dir))
    common = ["--model", str(model_dir), "--out", str(tmp_path), "--hidden", "8", "--epochs", "1"]
    capsys.readouterr()
    assert main(["train", str(traces), *common]) == 0
    assert "it is the default (the first one saved in" in capsys.readouterr().out
    assert main(["train", str(traces), *common, "--kind", "static"]) == 0
    out = capsys.readouterr().out
    assert f"predictor saved as {tmp_path / 'shadow_predictor.static.prompt.json'}" in out
    assert "the default stays shadowllm/prompt (pass --default" in out
    assert isinstance(load_predictor(tmp_path, structure), ShadowPredictor)  # training static replaced nothing
    assert isinstance(load_predictor(tmp_path, structure, kind="static"), StaticScores)
    assert main(["train", str(traces), *common, "--kind", "static", "--default"]) == 0
    assert "it is the default (as asked with --default)" in capsys.readouterr().out
    assert isinstance(load_predictor(tmp_path, structure), StaticScores)
    assert saved_predictors(tmp_path) == [SavedPredictor("shadowllm", "prompt"), SavedPredictor("static", "prompt")]


@pytest.mark.parametrize("other", ["criterion", "window", "text", "model", "dtype"])
def test_calibrate_refuses_other_traces_before_any_work(traces, model_dir, text_file, tmp_path, monkeypatch, capsys,
                                                        other):
    def no_work(*args, **kwargs):
        raise AssertionError("tokenised or captured before the traces were checked")

    monkeypatch.setattr("shadowfx.cli.load_tokenizer", no_work)
    monkeypatch.setattr("shadowfx.cli.discover", no_work)
    model, text, extra = model_dir, text_file, []
    if other == "criterion":
        extra, message = ["--criterion", "magnitude"], "criterion 'plainact' (here 'magnitude')"
    elif other == "window":
        extra, message = ["--window", "8"], "window 16 (here 8)"
    elif other == "text":
        text = tmp_path / "other.txt"
        text.write_text(generated_text(3000, seed=1))
        message = "data.text "
    elif other == "model":
        model = tmp_path / "other"
        build_small("opt", seed=5).save_pretrained(model)
        message = "the model (other weights)"
    else:
        extra, message = ["--dtype", "bfloat16"], "the model's dtype float32 (here bfloat16; pass --dtype float32"
    before = sorted(path.name for path in traces.iterdir())
    if other != "window":
        extra += ["--window", "16"]
    fails(["calibrate", str(model), str(text), "--out", str(traces), "--tokens-per-sample", "2", *extra], capsys,
          f"{traces} holds traces made with other settings", message, "write into another directory (--out)")
    assert sorted(path.name for path in traces.iterdir()) == before
