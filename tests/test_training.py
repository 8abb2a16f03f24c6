"""Predictor training: Spearman, learnable vs uninformative synthetic traces, real traces of a tiny model, files."""

from __future__ import annotations

import json
import math

import pytest
import torch

import shadowfx
from shadowfx.calibrate import Traces, calibrate
from shadowfx.predictor import (
    LayerwisePredictor,
    PredictorError,
    ShadowPredictor,
    SparseShape,
    StaticScores,
    load_predictor,
    minmax_scale,
    save_predictor,
)
from shadowfx.structure import FingerprintMismatch
from shadowfx.training import TrainingError, rank, spearman, train_predictor

from conftest import padded_batch, small_model, structure

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(hidden=64, epochs=(30, 10), holdout=0.25, progress=False)


# ---- Spearman ----------------------------------------------------------------------------------------------------
def test_rank_averages_ties():
    assert rank(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert rank(torch.tensor([7.0, 7.0, 7.0])).tolist() == [2.0, 2.0, 2.0]
    assert rank(torch.tensor([[0.5, -1.0], [2.0, 2.0]])).tolist() == [[2.0, 1.0], [1.5, 1.5]]


def test_spearman_known_cases():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # y ranks [1, 2, 3.5, 5, 3.5]: deviations from 3 are [-2, -1, .5, 2, .5] against [-2, -1, 0, 1, 2],
    # covariance 8, variances 10 and 9.5, so rho = 8 / sqrt(95).
    y = torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])
    assert spearman(x, y).item() == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert spearman(x, x.exp()).item() == pytest.approx(1.0)
    assert spearman(x, -x).item() == pytest.approx(-1.0)
    assert math.isnan(spearman(x, torch.ones(5)).item())
    batched = spearman(torch.stack([x, x]), torch.stack([y, -x]))
    assert batched.tolist() == pytest.approx([8 / math.sqrt(95), -1.0])


# ---- synthetic traces --------------------------------------------------------------------------------------------
def synthetic(n: int, *, informative: bool, seed: int = 0, layers: int = 3, width: int = 16, heads: int = 8,
              neurons: int = 32) -> Traces:
    """Scores that are a linear function of the (min-max scaled) input, or the same pattern plus input-free noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    if informative:  # centred, so the mean ranking (the constant predictor) carries little
        scaled = minmax_scale(x) - 0.5
        head_scores = (scaled @ torch.randn(width, layers * heads, generator=g)).view(n, layers, heads)
        neuron_scores = (scaled @ torch.randn(width, layers * neurons, generator=g)).view(n, layers, neurons)
    else:
        head_scores = torch.randn(layers, heads, generator=g) + torch.randn(n, layers, heads, generator=g)
        neuron_scores = torch.randn(layers, neurons, generator=g) + torch.randn(n, layers, neurons, generator=g)
    every_layer = x[:, None].repeat(1, layers, 1)
    tensors = {"inputs": x, "attention_inputs": every_layer, "mlp_inputs": every_layer, "heads": head_scores,
               "neurons": neuron_scores.to(torch.bfloat16)}
    header = {"fingerprint": "synthetic", "criterion": "synthetic", "tokens_per_sample": 0,
              "model_class": "Synthetic"}
    return Traces(header=header, tensors=tensors)


def test_predictor_learns_an_input_dependent_ranking():
    result = train_predictor(synthetic(240, informative=True), hidden=64, epochs=(60, 30), holdout=0.25,
                             progress=False)
    held = result.report["spearman"]["held_out"]
    for unit in ("heads", "neurons"):
        # seeds 0..2 give predictor rho 0.66-0.77 against constant -0.02-0.07 (margins 0.65-0.78)
        assert held["predictor"][unit]["flat"] > 0.5 and held["predictor"][unit]["layer"] > 0.5, held
        assert result.report["margin"][unit]["flat"] > 0.4 and result.report["margin"][unit]["layer"] > 0.4, held


def test_predictor_does_not_beat_the_constant_without_information():
    result = train_predictor(synthetic(240, informative=False), hidden=64, epochs=(60, 30), holdout=0.25,
                             progress=False)
    held = result.report["spearman"]["held_out"]
    assert held["constant"]["heads"]["layer"] > 0.4  # the shared pattern is there to be found
    for unit in ("heads", "neurons"):
        for aggregate in ("flat", "layer"):
            # seeds 0..2: margins -0.015 to -0.033 (a predictor fitting noise is slightly worse than the mean)
            assert result.report["margin"][unit][aggregate] < 0.05, result.report["margin"]
    # the constant control is the mean normalised training target
    train = synthetic(240, informative=False).tensors["heads"][result.train_samples, 1:]
    assert torch.allclose(result.constant.head_scores, minmax_scale(train).mean(0), atol=1e-6)


def test_training_is_deterministic_given_the_seed():
    traces = synthetic(40, informative=True)
    a, b = (train_predictor(traces, seed=3, **FAST) for _ in range(2))
    assert torch.equal(a.held_out_samples, b.held_out_samples)
    for (name, x), (_, y) in zip(a.predictor.state_dict().items(), b.predictor.state_dict().items()):
        assert torch.equal(x, y), name
    assert a.report["spearman"] == b.report["spearman"]
    c = train_predictor(traces, seed=4, **FAST)
    assert not torch.equal(a.held_out_samples, c.held_out_samples)


def test_bad_traces_and_settings_are_refused():
    traces = synthetic(40, informative=True)
    with pytest.raises(TrainingError, match="unknown predictor kind"):
        train_predictor(traces, kind="oracle", **FAST)
    with pytest.raises(TrainingError, match="per-token traces"):
        train_predictor(traces, granularity="token", **FAST)
    with pytest.raises(TrainingError, match="at least 2"):
        train_predictor(synthetic(10, informative=True), hidden=8, holdout=0.1, progress=False)
    with pytest.raises(TrainingError, match="at least 2"):
        train_predictor(synthetic(10, informative=True), hidden=8, holdout=0.9, progress=False)
    with pytest.raises(TrainingError, match="divisor of the MLP width 32"):
        train_predictor(traces, neuron_block=5, **FAST)
    with pytest.raises(TrainingError, match="shadowllm' only"):
        train_predictor(traces, kind="dejavu", neuron_block=4, **FAST)
    broken = synthetic(40, informative=True)
    broken.tensors["heads"][3, 1, 2] = math.nan
    with pytest.raises(TrainingError, match="non-finite"):
        train_predictor(broken, **FAST)
    with pytest.raises(FingerprintMismatch):
        train_predictor(traces, structure=structure("llama"), **FAST)


# ---- real traces of a tiny model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_traces(tmp_path_factory):
    samples = torch.randint(0, 512, (32, 16), generator=torch.Generator().manual_seed(0))
    return calibrate(small_model("llama"), samples, structure("llama"), tmp_path_factory.mktemp("traces"),
                     tokens_per_sample=4, progress=False)


@pytest.fixture(scope="module")
def trained(llama_traces):
    found = structure("llama")
    settings = {"shadowllm": dict(), "dejavu": dict(kind="dejavu"), "static": dict(kind="static"),
                "token": dict(granularity="token"), "block": dict(neuron_block=4),
                "static_token": dict(kind="static", granularity="token")}
    return {name: train_predictor(llama_traces, structure=found, **FAST, **extra) for name, extra in settings.items()}


def test_every_kind_trains_and_reports(trained, llama_traces):
    shape = SparseShape.of(structure("llama"))
    for name, result in trained.items():
        report = json.loads(json.dumps(result.report))  # JSON-serialisable
        token = "token" in name
        assert report["granularity"] == ("token" if token else "prompt")
        assert report["criterion"] == "plainact" and report["fingerprint"] == structure("llama").fingerprint
        assert report["samples"] == {"train": 24, "held_out": 8}
        assert report["rows"] == ({"train": 96, "held_out": 32} if token else {"train": 24, "held_out": 8})
        for split in ("held_out", "train"):
            for method in ("predictor", "constant", "static"):
                for unit in ("heads", "neurons"):
                    rho = report["spearman"][split][method][unit]
                    assert -1 <= rho["flat"] <= 1 and -1 <= rho["layer"] <= 1, (name, split, method, unit)
                    assert len(rho["per_layer"]) == shape.sparse_layers
        assert set(report["margin"]) == {"heads", "neurons"}
        if report["kind"] == "static":
            # nothing was trained: no parameters, no fits, no time spent, no training settings recorded
            assert list(result.predictor.parameters()) == [] and report["parameters"]["total"] == 0
            assert report["training"] == {} and report["train_seconds"] == 0
            assert report["settings"]["epochs"] is None and report["settings"]["hidden"] is None
        else:
            assert report["parameters"]["total"] == sum(p.numel() for p in result.predictor.parameters())
            assert report["training"]["heads"]["final_loss"] < report["training"]["heads"]["first_loss"]
    assert isinstance(trained["dejavu"].predictor, LayerwisePredictor)
    assert isinstance(trained["static"].predictor, StaticScores)
    # the static kind is the criterion summed over the training samples, min-max per layer
    static = trained["static"]
    raw = llama_traces.tensors["heads"][static.train_samples, 1:].sum(0)
    assert torch.allclose(static.predictor.head_scores, minmax_scale(raw), atol=1e-6)
    # and its reported held-out Spearman is the one recomputed here from the traces
    for unit in ("heads", "neurons"):
        predicted = getattr(static.predictor, f"{unit[:-1]}_scores").flatten().tolist()
        rhos = []
        for sample in static.held_out_samples.tolist():
            truth = llama_traces.tensors[unit][sample, 1:].double()
            low, high = truth.min(-1, keepdim=True).values, truth.max(-1, keepdim=True).values
            rho = reference_spearman(predicted, ((truth - low) / (high - low)).flatten().tolist())
            if rho is not None:
                rhos.append(rho)
        reported = static.report["spearman"]["held_out"]["predictor"][unit]["flat"]
        assert rhos and reported == pytest.approx(sum(rhos) / len(rhos), abs=1e-5), unit


def reference_spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho the textbook way (Pearson correlation of average ranks); None when y is constant."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                result[order[position]] = (start + end) / 2 + 1
            start = end + 1
        return result

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    covariance = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    spread = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return covariance / spread if spread else None


def test_neuron_blocks_shrink_the_predictor_and_repeat_scores(trained, llama_traces):
    block, plain = trained["block"].predictor, trained["shadowllm"].predictor
    assert block.neurons[-1].out_features * 4 == plain.neurons[-1].out_features
    neurons = block(llama_traces.tensors["inputs"][:3]).neurons  # [3, L - 1, F]
    assert neurons.shape == plain(llama_traces.tensors["inputs"][:3]).neurons.shape
    grouped = neurons.unflatten(-1, (-1, 4))
    assert torch.equal(grouped, grouped[..., :1].expand_as(grouped))


@pytest.mark.parametrize("name", ["block", "static", "dejavu"])
def test_trained_predictors_drive_transform(trained, name):
    sparse = shadowfx.transform(small_model("llama"), trained[name].predictor, sparsity=0.5, scope="per_layer")
    logits = sparse(*padded_batch(2, 6, 512, seed=1))
    assert logits.shape == (2, 6, 512) and torch.isfinite(logits).all()


# ---- files -------------------------------------------------------------------------------------------------------
def test_save_load_round_trip_for_every_kind(trained, llama_traces, tmp_path):
    found = structure("llama")
    for name in ("shadowllm", "block", "dejavu", "static"):
        module = trained[name].predictor
        save_predictor(module, tmp_path / name)
        loaded = load_predictor(tmp_path / name, found)
        assert type(loaded) is type(module) and loaded.fingerprint == module.fingerprint
        names = ("attention_inputs", "mlp_inputs") if name == "dejavu" else ("inputs",)
        x = [llama_traces.tensors[n][:5] for n in names]
        with torch.no_grad():
            for a, b in zip(module(*x), loaded(*x)):
                assert torch.equal(a, b), name
        with pytest.raises(FingerprintMismatch):
            load_predictor(tmp_path / name, structure("opt"))
    assert json.loads((tmp_path / "dejavu" / "shadow_predictor.dejavu.prompt.json").read_text())["kind"] == "dejavu"
    # the ShadowPredictor-specific loader still works, keeps neuron_block, and names load_predictor for other kinds
    assert ShadowPredictor.load(tmp_path / "block", found).neuron_block == 4
    with pytest.raises(PredictorError, match="load_predictor"):
        ShadowPredictor.load(tmp_path / "static", found)
    with pytest.raises(FingerprintMismatch):
        ShadowPredictor.load(tmp_path / "shadowllm", structure("opt"))
    with pytest.raises(PredictorError, match="no shadow predictor in"):
        load_predictor(tmp_path / "nothing", found)
    # a predictor trained per token is saved, and loaded, under its granularity
    save_predictor(trained["token"].predictor, tmp_path / "shadowllm")
    assert (tmp_path / "shadowllm" / "shadow_predictor.shadowllm.token.json").is_file()
    token = load_predictor(tmp_path / "shadowllm", found, granularity="token")
    assert token.granularity == "token" and load_predictor(tmp_path / "shadowllm", found).granularity == "prompt"


def test_dejavu_at_token_granularity(llama_traces):
    result = train_predictor(llama_traces, kind="dejavu", granularity="token", **FAST)
    assert result.report["granularity"] == "token" and "predictor" in result.report["spearman"]["held_out"]
    without = Traces(header=llama_traces.header,
                     tensors={k: v for k, v in llama_traces.tensors.items() if k != "token_mlp_inputs"})
    with pytest.raises(TrainingError, match="lack token_mlp_inputs"):
        train_predictor(without, kind="dejavu", granularity="token", **FAST)
