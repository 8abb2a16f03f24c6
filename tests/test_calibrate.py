"""Calibration traces: contents, shards, resuming after an interruption, refusing mixed or foreign traces."""

from __future__ import annotations

import json

import pytest
import torch

from shadowfx.calibrate import TraceError, calibrate, load_traces
from shadowfx.criteria import CriterionHooks
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
    torch.testing.assert_close(tensors["inputs"][:3], direct.context[:, -1])
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
    torch.testing.assert_close(tensors["attention_inputs"][:3, -1], seen["attention"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tensors["mlp_inputs"][:3, -1], seen["mlp"], rtol=1e-4, atol=1e-5)


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
    with pytest.raises(TraceError, match="differ in criterion"):
        calibrate(model, windows(4), found, tmp_path, criterion="magnitude", progress=False)
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
