"""Predictor modules and files: dtype moves, one atomic unit on disk (a crash leaves a loadable predictor), weights
checked against the hash their config records."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from shadowfx.predictor import (
    PREDICTOR_CONFIG,
    LayerwisePredictor,
    PredictorError,
    ShadowPredictor,
    StaticScores,
    load_predictor,
    save_predictor,
)

from conftest import structure

pytestmark = pytest.mark.usefixtures("one_thread")


def predictors() -> dict[str, torch.nn.Module]:
    found = structure("llama")
    return {"shadowllm": ShadowPredictor.for_structure(found, hidden=8),
            "dejavu": LayerwisePredictor.for_structure(found, hidden=8),
            "static": StaticScores.random(found, seed=0)}


def inputs(kind: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    found = structure("llama")
    generator = torch.Generator().manual_seed(0)
    if kind == "dejavu":
        return tuple(torch.randn(3, found.num_layers, found.hidden_size, generator=generator).to(dtype)
                     for _ in range(2))
    return (torch.randn(3, found.predictor_input_size, generator=generator).to(dtype),)


def saved_weights(directory) -> list[str]:
    return sorted(path.name for path in directory.glob("*.safetensors"))


@pytest.mark.parametrize("kind", ["shadowllm", "dejavu", "static"])
def test_every_kind_moves_between_dtypes(kind):
    module = predictors()[kind]
    with torch.no_grad():
        reference = module(*inputs(kind))
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            module.to(dtype)
            assert all(p.dtype == dtype for p in module.state_dict().values()), dtype
            scores = module(*inputs(kind, dtype))
            assert all(s.dtype == dtype for s in scores), dtype
            # bf16 rounds the weights (and the scores); back in fp32 and fp64 the rounding stays in the weights
            for got, want in zip(scores, reference):
                torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
        module.half().float().cpu()  # the other nn.Module moves work too


def test_building_a_predictor_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ShadowPredictor.for_structure(structure("llama"), hidden=8, seed=1)
    LayerwisePredictor.for_structure(structure("llama"), hidden=8, seed=1)
    assert torch.equal(torch.rand(3), expected)
    a, b = (ShadowPredictor.for_structure(structure("llama"), hidden=8, seed=1) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("crash", ["weights", "config"])
def test_a_crash_while_saving_leaves_the_old_predictor(tmp_path, monkeypatch, crash):
    found = structure("llama")
    old, new = ShadowPredictor.for_structure(found, hidden=8, seed=1), ShadowPredictor.for_structure(found, hidden=8,
                                                                                                     seed=2)
    old.save(tmp_path)
    before = saved_weights(tmp_path)

    def crash_here(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(f"shadowfx.predictor.{'atomic_write' if crash == 'weights' else 'atomic_write_text'}",
                        crash_here)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path)
    monkeypatch.undo()
    loaded = load_predictor(tmp_path, found)
    x = inputs("shadowllm")
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(*x), old(*x)))
    if crash == "config":  # the new weights were written beside the old ones; the old config still names its own
        assert len(saved_weights(tmp_path)) == 2 and set(before) < set(saved_weights(tmp_path))
    # the next complete save replaces the old unit and removes the weights no config names
    new.save(tmp_path)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(load_predictor(tmp_path, found)(*x), new(*x)))
    assert len(saved_weights(tmp_path)) == 1 and saved_weights(tmp_path) != before


def test_weights_that_do_not_match_their_config_are_refused(tmp_path):
    found = structure("llama")
    ShadowPredictor.for_structure(found, hidden=8, seed=1).save(tmp_path / "one")
    ShadowPredictor.for_structure(found, hidden=8, seed=2).save(tmp_path / "two")
    (name,) = saved_weights(tmp_path / "one")
    (other,) = saved_weights(tmp_path / "two")
    # another save's weights under this config's file name: same shapes, so only the hash can tell
    (tmp_path / "one" / name).write_bytes((tmp_path / "two" / other).read_bytes())
    with pytest.raises(PredictorError, match="do not match the sha256 recorded in"):
        load_predictor(tmp_path / "one", found)
    # a damaged file whose hash was recorded again still fails to parse, with a clear message
    config = json.loads((tmp_path / "two" / PREDICTOR_CONFIG).read_text())
    (tmp_path / "two" / other).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    config["weights"]["sha256"] = hashlib.sha256((tmp_path / "two" / other).read_bytes()).hexdigest()
    (tmp_path / "two" / PREDICTOR_CONFIG).write_text(json.dumps(config))
    with pytest.raises(PredictorError, match="not a readable safetensors file"):
        load_predictor(tmp_path / "two", found)
    (tmp_path / "two" / other).unlink()
    with pytest.raises(PredictorError, match="cannot read the predictor weights"):
        load_predictor(tmp_path / "two", found)


def test_configs_are_parsed_in_one_place_with_clear_errors(tmp_path):
    found = structure("llama")
    for kind, module in predictors().items():
        save_predictor(module, tmp_path / kind)
        config_path = tmp_path / kind / PREDICTOR_CONFIG
        config = json.loads(config_path.read_text())
        assert config["kind"] == kind
        broken = {k: v for k, v in config.items() if k != "shape"}
        config_path.write_text(json.dumps(broken))
        with pytest.raises(PredictorError, match=f"not a readable {kind} predictor config: KeyError"):
            load_predictor(tmp_path / kind, found)
        config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "weights"}))
        with pytest.raises(PredictorError, match="names no weights file"):
            load_predictor(tmp_path / kind, found)
        config_path.write_text(json.dumps(config | {"kind": "oracle"}))
        with pytest.raises(PredictorError, match="unknown predictor kind 'oracle'"):
            load_predictor(tmp_path / kind, found)
