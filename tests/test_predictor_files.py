"""Predictor modules and files: dtype moves, one atomic unit on disk (a crash leaves a loadable predictor), weights
checked against the hash their config records."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from shadowfx.api import discover
from shadowfx.families import build_small
from shadowfx.predictor import (
    DEFAULT_PREDICTOR,
    LayerwisePredictor,
    PredictorError,
    SavedPredictor,
    ShadowPredictor,
    StaticScores,
    default_predictor,
    load_predictor,
    save_predictor,
    saved_predictors,
)
from shadowfx.structure import DtypeWarning, FingerprintMismatch

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
    config_path = tmp_path / "two" / "shadow_predictor.shadowllm.prompt.json"
    config = json.loads(config_path.read_text())
    (tmp_path / "two" / other).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    config["weights"]["sha256"] = hashlib.sha256((tmp_path / "two" / other).read_bytes()).hexdigest()
    config_path.write_text(json.dumps(config))
    with pytest.raises(PredictorError, match="not a readable safetensors file"):
        load_predictor(tmp_path / "two", found)
    (tmp_path / "two" / other).unlink()
    with pytest.raises(PredictorError, match="cannot read the predictor weights"):
        load_predictor(tmp_path / "two", found)


def test_configs_are_parsed_in_one_place_with_clear_errors(tmp_path):
    found = structure("llama")
    for kind, module in predictors().items():
        save_predictor(module, tmp_path / kind)
        config_path = tmp_path / kind / f"shadow_predictor.{kind}.prompt.json"
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
        with pytest.raises(PredictorError, match="describes a oracle/prompt predictor, not the"):
            load_predictor(tmp_path / kind, found)
    with pytest.raises(PredictorError, match="unknown predictor kind 'oracle'"):
        load_predictor(tmp_path / "static", found, kind="oracle")


def outputs(module) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(module(*inputs(module.kind)))


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(outputs(a), outputs(b)))


def test_each_kind_and_granularity_has_its_own_files_and_one_is_the_default(tmp_path):
    found = structure("llama")
    first = ShadowPredictor.for_structure(found, hidden=8, seed=1)
    static = StaticScores.random(found, seed=2)
    per_token = ShadowPredictor.for_structure(found, hidden=8, seed=3)
    per_token.granularity = "token"
    for module in (first, static, per_token):
        save_predictor(module, tmp_path)
    assert saved_predictors(tmp_path) == [SavedPredictor("shadowllm", "prompt"), SavedPredictor("shadowllm", "token"),
                                         SavedPredictor("static", "prompt")]
    assert len(saved_weights(tmp_path)) == 3
    # the first one saved is the default, which is what load_predictor(directory, structure) (and transform) loads
    assert default_predictor(tmp_path) == SavedPredictor("shadowllm", "prompt")
    assert same(load_predictor(tmp_path, found), first)
    assert same(load_predictor(tmp_path, found, kind="static"), static)
    assert same(load_predictor(tmp_path, found, granularity="token"), per_token)
    assert same(load_predictor(tmp_path, found, kind="shadowllm"), first)  # several match: the default
    assert same(ShadowPredictor.load(tmp_path, found, granularity="token"), per_token)
    with pytest.raises(PredictorError, match=r"holds no dejavu/\* shadow predictor \(it holds: shadowllm/prompt "
                                             r"\(default\), shadowllm/token, static/prompt\)"):
        load_predictor(tmp_path, found, kind="dejavu")
    # another default, on request; saving again replaces only that kind and granularity
    save_predictor(static, tmp_path, default=True)
    assert default_predictor(tmp_path) == SavedPredictor("static", "prompt")
    assert same(load_predictor(tmp_path, found), static)
    with pytest.raises(PredictorError, match="several shadowllm/\\* shadow predictors and none of them is the "
                                             "default"):
        load_predictor(tmp_path, found, kind="shadowllm")
    replacement = ShadowPredictor.for_structure(found, hidden=8, seed=4)
    replacement.save(tmp_path)
    assert same(load_predictor(tmp_path, found, kind="shadowllm", granularity="prompt"), replacement)
    assert same(load_predictor(tmp_path, found, granularity="token"), per_token)
    assert default_predictor(tmp_path) == SavedPredictor("static", "prompt") and len(saved_weights(tmp_path)) == 3


def test_a_directory_without_a_default_or_with_an_old_one(tmp_path):
    found = structure("llama")
    with pytest.raises(PredictorError, match="no shadow predictor in .* .it holds: none.; pass predictor="):
        load_predictor(tmp_path, found)
    ShadowPredictor.for_structure(found, hidden=8).save(tmp_path)
    StaticScores.random(found, seed=0).save(tmp_path)
    (tmp_path / "shadow_predictor.shadowllm.prompt.json").unlink()
    with pytest.raises(PredictorError, match="the default shadow predictor of .*, shadowllm/prompt, is not there "
                                             r"\(it holds: static/prompt\); pick one with load_predictor"):
        load_predictor(tmp_path, found)
    (tmp_path / DEFAULT_PREDICTOR).unlink()
    with pytest.raises(PredictorError, match="names no default shadow predictor"):
        load_predictor(tmp_path, found)
    # the single-file layout of older versions: a whole predictor config where the default is named now
    (tmp_path / DEFAULT_PREDICTOR).write_text(json.dumps({"kind": "shadowllm", "hidden": 8}))
    with pytest.raises(PredictorError, match="older shadowfx holds a whole predictor.*train the predictor again"):
        load_predictor(tmp_path, found)
    ShadowPredictor.for_structure(found, hidden=8).save(tmp_path)  # replaces the old file
    assert default_predictor(tmp_path) == SavedPredictor("shadowllm", "prompt")


def test_a_predictor_made_in_another_dtype_loads_with_a_warning(tmp_path):
    predictor = ShadowPredictor.for_structure(structure("llama"), hidden=8)
    predictor.save(tmp_path)
    for dtype in ("bfloat16", "float16"):  # the same weights (build_small is seeded), held in another dtype
        other_dtype = discover(build_small("llama").to(getattr(torch, dtype)))
        with pytest.warns(DtypeWarning, match=f"made with the model in float32; this model holds its weights in "
                                              f"{dtype}"):
            assert same(load_predictor(tmp_path, other_dtype), predictor)
    with pytest.raises(FingerprintMismatch, match=r"a model with other weights and another dtype \(float32, not "
                                                  r"bfloat16\)"):
        load_predictor(tmp_path, discover(build_small("llama", seed=1).to(torch.bfloat16)))
    with pytest.raises(FingerprintMismatch, match="a model with other weights .*re-run calibration"):
        load_predictor(tmp_path, discover(build_small("llama", seed=1)))
    with pytest.raises(FingerprintMismatch, match="a model with another architecture and other weights "):
        load_predictor(tmp_path, structure("opt"))


@pytest.mark.parametrize("kind", ["shadowllm", "dejavu", "static"])
def test_weights_stored_in_float16_load_as_the_rounded_float32_module(kind, tmp_path):
    module = predictors()[kind]
    save_predictor(module, tmp_path / "full")
    save_predictor(module, tmp_path / "half", dtype=torch.float16)
    (full,), (half,) = (list((tmp_path / d).glob("*.safetensors")) for d in ("full", "half"))
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_predictor(tmp_path / "half", structure("llama"))
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, module.state_dict()[name].half().float(), rtol=0, atol=0)
