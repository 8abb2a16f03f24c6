"""Calibration traces: contents, shards, resuming after an interruption, refusing mixed or foreign traces."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from shadowfx.api import discover
from shadowfx.calibrate import TraceError, calibrate, load_traces, trace_bytes
from shadowfx.criteria import CriterionHooks
from shadowfx.families import build_small
from shadowfx.structure import FingerprintMismatch
from conftest import small_model, structure


def windows(count: int, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (count, length), generator=torch.Generator().manual_seed(seed))


def test_traces_hold_inputs_and_scores(tmp_path, family):
    model, found = small_model(family), structure(family)
    samples = windows(6)
    traces = calibrate(model, samples, found, tmp_path, shard_size=4, batch_size=3, tokens_per_sample=3,
                       progress=False, data={"source": "random ids"})
    layers, heads = found.num_layers, found.layers[0].attention.num_heads
    tensors = traces.tensors
    assert tensors["inputs"].shape == (6, found.predictor_input_size)
    for name in ("attention_inputs", "mlp_inputs"):
        assert tensors[name].shape == (6, layers, found.hidden_size)
        assert tensors[f"token_{name}"].shape == (18, layers, found.hidden_size)
    assert tensors["heads"].shape == (6, layers, heads)
    assert tensors["neurons"].shape == (6, layers, found.layers[0].mlp.intermediate_size)
    assert tensors["token_heads"].shape == (18, layers, heads)
    assert [s["count"] for s in traces.header["shards"]] == [4, 2]
    assert traces.header["data"] == {"source": "random ids"} and traces.header["fingerprint"] == found.fingerprint
    # the stored per-sample scores are the criterion of the whole window
    with CriterionHooks(model, found) as hooks:
        direct = hooks.score(samples[:3], torch.ones_like(samples[:3]), "plainact")
    torch.testing.assert_close(tensors["heads"][:3], direct.heads, rtol=1e-4, atol=1e-6)
    assert_close_bf16(tensors["inputs"][:3], direct.context[:, -1])
    # the layerwise inputs are what layer l's q and up projections take, at the last token
    seen = {}
    last = found.layers[-1]
    handles = [model.get_submodule(module).register_forward_pre_hook(
        lambda m, args, role=role: seen.__setitem__(role, args[0].reshape(3, -1, args[0].shape[-1])[:, -1]))
        for role, module in (("attention", last.attention.q.module), ("mlp", last.mlp.up.module))]
    with torch.no_grad():
        model(input_ids=samples[:3])
    for handle in handles:
        handle.remove()
    assert_close_bf16(tensors["attention_inputs"][:3, -1], seen["attention"])
    assert_close_bf16(tensors["mlp_inputs"][:3, -1], seen["mlp"])


def assert_close_bf16(stored: torch.Tensor, computed: torch.Tensor) -> None:
    """Stored inputs are the computed ones rounded to bfloat16 (one rounding step apart at most)."""
    assert stored.dtype == torch.bfloat16
    torch.testing.assert_close(stored.float(), computed.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-5)


def test_traces_are_stored_in_half_precision_where_it_suffices(tmp_path):
    traces = calibrate(small_model("llama"), windows(6), structure("llama"), tmp_path, shard_size=4,
                       tokens_per_sample=2, progress=False)
    dtypes = {name: tensor.dtype for name, tensor in traces.tensors.items()}
    assert dtypes.pop("heads") == dtypes.pop("token_heads") == torch.float32  # few, and ranked exactly
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes
    on_disk = sum(path.stat().st_size for path in tmp_path.iterdir())
    assert trace_bytes(tmp_path) == on_disk
    as_float32 = sum(tensor.numel() * 4 for tensor in traces.tensors.values())
    assert on_disk < 0.6 * as_float32


def test_non_finite_scores_name_a_command_that_recalibrates_in_float32(tmp_path):
    calibrate(small_model("opt"), windows(2), structure("opt"), tmp_path, tokens_per_sample=0, progress=False)
    shard = tmp_path / "shard-00000.safetensors"
    tensors = load_file(str(shard))
    tensors["heads"][0, 1, 0] = float("inf")
    save_file(tensors, str(shard))
    with pytest.raises(TraceError, match="shadowfx calibrate ... --dtype float32 --out NEW"):
        load_traces(tmp_path)


def test_interrupted_run_resumes(tmp_path):
    model, found = small_model("opt"), structure("opt")
    samples = windows(10)
    full = calibrate(model, samples, found, tmp_path / "full", shard_size=4, progress=False)
    partial_dir = tmp_path / "partial"
    calibrate(model, samples[:4], found, partial_dir, shard_size=4, progress=False)
    header = json.loads((partial_dir / "traces.json").read_text())
    header["samples"] = 10  # as if the first shard of the 10-sample run had been written before an interruption
    (partial_dir / "traces.json").write_text(json.dumps(header))
    (partial_dir / "shard-00001.safetensors.tmp").write_bytes(b"half-written")
    resumed = calibrate(model, samples, found, partial_dir, shard_size=4, progress=False)
    assert len(resumed) == 10
    for name in ("inputs", "heads", "neurons", "token_heads"):
        torch.testing.assert_close(resumed.tensors[name], full.tensors[name])


def test_other_traces_in_the_directory_are_not_overwritten(tmp_path):
    model, found = small_model("gpt2"), structure("gpt2")
    calibrate(model, windows(4), found, tmp_path, progress=False)
    with pytest.raises(TraceError, match="other settings: criterion 'plainact' \\(here 'magnitude'\\); write into "
                                         "another directory"):
        calibrate(model, windows(4), found, tmp_path, criterion="magnitude", progress=False)
    with pytest.raises(TraceError, match="window 12 \\(here 8\\); samples 4 \\(here 3\\)"):
        calibrate(model, windows(3, length=8), found, tmp_path, progress=False)
    with pytest.raises(TraceError, match="the model \\(other weights\\)"):
        calibrate(model, windows(4), discover(build_small("gpt2", seed=1)), tmp_path, progress=False)
    with pytest.raises(TraceError, match="the model's dtype float32 \\(here bfloat16; pass --dtype float32 to "
                                         "resume\\)"):
        calibrate(model, windows(4), discover(build_small("gpt2").to(torch.bfloat16)), tmp_path, progress=False)
    with pytest.raises(FingerprintMismatch):
        load_traces(tmp_path, structure("qwen2"))


@pytest.mark.parametrize("bad", ["criterion", "shape", "tokens"])
def test_bad_arguments(tmp_path, bad):
    model, found = small_model("gpt2"), structure("gpt2")
    with pytest.raises(TraceError):
        if bad == "criterion":
            calibrate(model, windows(2), found, tmp_path, criterion="taylor", progress=False)
        elif bad == "shape":
            calibrate(model, torch.zeros(0, 8, dtype=torch.long), found, tmp_path, progress=False)
        else:
            calibrate(model, windows(2, length=4), found, tmp_path, tokens_per_sample=5, progress=False)


def test_missing_traces(tmp_path):
    with pytest.raises(TraceError, match="run calibration first"):
        load_traces(tmp_path)
