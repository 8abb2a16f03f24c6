"""Train predictors on calibration traces, and measure them against the controls that say whether they help.

:func:`train_predictor` follows ShadowLLM's recipe (§3 of the method notes): the targets are the criterion of layers
1..L-1 (layer 0 stays dense), min-max normalised per layer and per example ("b1eL"); the input is min-max scaled per
sample inside the predictor; MSE, AdamW (default weight decay) and a cosine schedule stepped per batch; heads 100
epochs of batch 32 and neurons 20 epochs of batch 16 by default, the head and neuron MLPs trained separately. Three
kinds:

* ``"shadowllm"``: :class:`~shadowfx.predictor.ShadowPredictor`, one MLP per unit kind from layer 0's context
  (optionally one score per block of ``neuron_block`` contiguous neurons, trained on the block means).
* ``"dejavu"``: :class:`~shadowfx.predictor.LayerwisePredictor`, per layer one MLP for heads from that layer's
  attention input and one for neurons from its MLP input (the DejaVu-style baseline; usually given magnitude traces).
* ``"static"``: :class:`~shadowfx.predictor.StaticScores` from the criterion summed over the training samples, then
  min-max per layer; nothing is trained.

Samples are split into train and held-out sets with a seeded permutation (at granularity "token" a sample's tokens
all go to the same side). The report gives the held-out (and train) mean per-example Spearman rho of the predictor,
of the **constant predictor** (the mean normalised target of the training rows: what an MSE predictor outputs when
its input tells it nothing) and of the static aggregate, each over all (L-1)*U slots flattened and averaged within
layer. Only the margin over the constant predictor is what the input contributes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from shadowfx.api import GRANULARITIES
from shadowfx.calibrate import RECALIBRATE_FP32, Traces
from shadowfx.files import atomic_write_text
from shadowfx.predictor import (
    KINDS,
    LayerwisePredictor,
    PredictorKind,
    ShadowPredictor,
    SparseShape,
    StaticScores,
    load_predictor,
    minmax_scale,
    save_predictor,
    seeded,
)
from shadowfx.runtimes.pytorch import Granularity
from shadowfx.structure import DecoderStructure, check_fingerprint

DEFAULT_EPOCHS = (100, 20)  # heads, neurons
DEFAULT_BATCH_SIZE = (32, 16)
EVAL_CHUNK = 128  # rows per prediction/ranking chunk (bounds the memory of the neuron rankings)

__all__ = ["CriterionSums", "TrainResult", "TrainingError", "load_predictor", "normalise_targets", "save_trained",
           "rank", "save_predictor", "spearman", "train_predictor"]


class TrainingError(ValueError):
    """Traces or settings a predictor cannot be trained on."""


# ---- Spearman --------------------------------------------------------------------------------------------------
def rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along the last dim, ties sharing their average rank (float64)."""
    n = x.shape[-1]
    values, order = x.sort(dim=-1)
    positions = torch.arange(n, device=x.device).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[..., 1:] = values[..., 1:] != values[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    first = torch.where(starts, positions, 0).cummax(-1).values
    last = torch.where(ends, positions, n).flip(-1).cummin(-1).values.flip(-1)
    average = (first + last).double() / 2 + 1
    return torch.empty_like(average).scatter_(-1, order, average)


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rho along the last dim (Pearson correlation of average ranks); NaN where either side is constant."""
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    rx, ry = rank(x), rank(y)
    rx = rx - rx.mean(-1, keepdim=True)
    ry = ry - ry.mean(-1, keepdim=True)
    denominator = (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    covariance = (rx * ry).sum(-1)
    return torch.where(denominator > 0, covariance / torch.where(denominator > 0, denominator, 1.0),
                       torch.full_like(covariance, math.nan))


def _rho_rows(predicted: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: rho over all slots ``[R]`` and within each layer ``[R, L - 1]``.

    A constant prediction ranks nothing (rho 0); a constant truth leaves rho undefined (NaN, left out of means).
    """

    def fix(rho: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat_p = p.amax(-1) == p.amin(-1)
        flat_t = t.amax(-1) == t.amin(-1)
        return torch.where(flat_p & ~flat_t, torch.zeros_like(rho), rho)

    p_all, t_all = predicted.flatten(1), true.flatten(1)
    return fix(spearman(p_all, t_all), p_all, t_all), fix(spearman(predicted, true), predicted, true)


class _RhoSums:
    """Running sums of per-row rho, ignoring NaNs."""

    def __init__(self, layers: int) -> None:
        self.flat, self.flat_n = 0.0, 0
        self.layer = torch.zeros(layers, dtype=torch.float64)
        self.layer_n = torch.zeros(layers, dtype=torch.float64)

    def add(self, flat: torch.Tensor, layer: torch.Tensor) -> None:
        ok = ~flat.isnan()
        self.flat += float(flat[ok].sum())
        self.flat_n += int(ok.sum())
        ok = ~layer.isnan()
        self.layer += torch.where(ok, layer, 0).sum(0)
        self.layer_n += ok.sum(0)

    def result(self) -> dict:
        def mean(total: float, count: float) -> float | None:
            return round(total / count, 6) if count else None

        layer_total, layer_count = float(self.layer.sum()), float(self.layer_n.sum())
        return {"flat": mean(self.flat, self.flat_n), "layer": mean(layer_total, layer_count),
                "per_layer": [mean(float(s), float(c)) for s, c in zip(self.layer, self.layer_n)]}


# ---- data --------------------------------------------------------------------------------------------------------
def normalise_targets(scores: torch.Tensor, *, block: int = 1) -> torch.Tensor:
    """Scores ``[..., L, U]`` min-max scaled per layer and example (ShadowLLM's b1eL), then block means."""
    normalised = minmax_scale(scores.float())
    if block > 1:
        normalised = normalised.unflatten(-1, (-1, block)).mean(-1)
    return normalised


@dataclass
class _Data:
    """One granularity's rows: predictor inputs and raw scores of layers 1..L-1, and each row's sample."""

    inputs: tuple[torch.Tensor, ...]  # (layer 0's context [R, E],) or (attention inputs, MLP inputs) [R, L, E]
    heads: torch.Tensor  # [R, L - 1, H] raw
    neurons: torch.Tensor  # [R, L - 1, F] raw (bf16 as stored)
    rows_per_sample: int

    @property
    def head_inputs(self) -> torch.Tensor:
        return self.inputs[0]

    @property
    def neuron_inputs(self) -> torch.Tensor:
        return self.inputs[-1]

    def rows(self, samples: torch.Tensor) -> torch.Tensor:
        t = self.rows_per_sample
        return (samples[:, None] * t + torch.arange(t)).flatten()


def _data(traces: Traces, kind: PredictorKind, granularity: Granularity) -> _Data:
    tensors = traces.tensors
    n = len(traces)
    input_names = ("attention_inputs", "mlp_inputs") if kind == "dejavu" else ("inputs",)
    if granularity == "prompt":
        per_sample = 1
    else:
        per_sample = int(traces.header.get("tokens_per_sample") or 0)
        if per_sample < 1 or "token_inputs" not in tensors:
            raise TrainingError("granularity 'token' needs per-token traces, but these have none "
                                "(tokens_per_sample 0); calibrate with tokens_per_sample >= 1")
        input_names = tuple(f"token_{name}" for name in input_names)
    names = (*input_names, *(("heads", "neurons") if granularity == "prompt" else ("token_heads", "token_neurons")))
    missing = [name for name in names if name not in tensors]
    if missing:
        raise TrainingError(f"the traces lack {', '.join(missing)}; re-run calibration")
    for name in names:
        tensor = tensors[name]
        if tensor.shape[0] != n * per_sample:
            raise TrainingError(f"traces: {name} has {tensor.shape[0]} rows, expected {n} samples x {per_sample}")
        if not torch.isfinite(tensor.float()).all():
            raise TrainingError(f"traces: {name} holds non-finite values (a diverged model?); {RECALIBRATE_FP32}")
    *inputs, heads, neurons = (tensors[name] for name in names)
    if heads.dim() != 3 or neurons.dim() != 3 or heads.shape[1] != neurons.shape[1]:
        raise TrainingError(f"traces: heads {tuple(heads.shape)} and neurons {tuple(neurons.shape)} are not "
                            "[n, L, H] and [n, L, F]")
    if heads.shape[1] < 2:
        raise TrainingError("the traces are of a one-layer model; layer 0 stays dense, so there is nothing to predict")
    return _Data(tuple(inputs), heads[:, 1:], neurons[:, 1:], per_sample)


def _per_kind(value, default: tuple[int, int], name: str) -> tuple[int, int]:
    if value is None:
        return default
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TrainingError(f"{name} must be an int or a (heads, neurons) pair of ints, got {value!r}")
    return pair


# ---- training ----------------------------------------------------------------------------------------------------
def _fit(parameters: list[nn.Parameter], loss_of: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, *,
         epochs: int, batch_size: int, lr: float, generator: torch.Generator, desc: str, progress: bool) -> dict:
    """AdamW + cosine schedule (stepped per batch) over shuffled ``rows``; returns the loss of each epoch."""
    started = time.perf_counter()
    losses: list[float] = []
    steps = epochs * math.ceil(len(rows) / batch_size)
    if steps:
        optimizer = torch.optim.AdamW(parameters, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
        for _ in bar:
            order = rows[torch.randperm(len(rows), generator=generator)]
            total = 0.0
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                loss = loss_of(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(batch)
            losses.append(total / len(order))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        bar.close()
    return {"seconds": round(time.perf_counter() - started, 3), "epochs": epochs, "batch_size": batch_size,
            "first_loss": round(losses[0], 6) if losses else None,
            "final_loss": round(losses[-1], 6) if losses else None}


@dataclass(frozen=True)
class CriterionSums:
    """Per-prompt targets of some samples, summed: min-max normalised per example (the constant predictor is their
    mean) and raw (the static aggregate is their per-layer min-max). Sums of disjoint samples add up."""

    normalised: tuple[torch.Tensor, torch.Tensor]  # heads [L - 1, H], neurons [L - 1, F], float64
    raw: tuple[torch.Tensor, torch.Tensor]
    count: int
    fingerprint: str

    @classmethod
    def of_rows(cls, data: _Data, rows: torch.Tensor, fingerprint: str) -> CriterionSums:
        normalised = [torch.zeros(data.heads.shape[1:], dtype=torch.float64),
                      torch.zeros(data.neurons.shape[1:], dtype=torch.float64)]
        raw = [torch.zeros_like(normalised[0]), torch.zeros_like(normalised[1])]
        for start in range(0, len(rows), EVAL_CHUNK):
            chunk = rows[start:start + EVAL_CHUNK]
            for i, scores in enumerate((data.heads[chunk], data.neurons[chunk])):
                normalised[i] += normalise_targets(scores).sum(0, dtype=torch.float64)
                raw[i] += scores.float().sum(0, dtype=torch.float64)
        return cls(tuple(normalised), tuple(raw), len(rows), fingerprint)

    @classmethod
    def of(cls, traces: Traces) -> CriterionSums:
        """Over every sample of ``traces``, per prompt."""
        return cls.of_rows(_data(traces, "shadowllm", "prompt"), torch.arange(len(traces)), traces.fingerprint)

    def __add__(self, other: CriterionSums) -> CriterionSums:
        if other.fingerprint != self.fingerprint:
            raise TrainingError("criterion sums of two different models cannot be pooled")
        return CriterionSums(tuple(a + b for a, b in zip(self.normalised, other.normalised)),
                             tuple(a + b for a, b in zip(self.raw, other.raw)), self.count + other.count,
                             self.fingerprint)

    def constant(self) -> StaticScores:
        """The mean normalised target."""
        return StaticScores(*(s / self.count for s in self.normalised), self.fingerprint)

    def static(self) -> StaticScores:
        """The summed raw criterion, min-max per layer."""
        return StaticScores(*(minmax_scale(s) for s in self.raw), self.fingerprint)


@torch.no_grad()
def _evaluate(modules: dict[str, nn.Module], data: _Data, rows: torch.Tensor) -> dict:
    layers = data.heads.shape[1]
    sums = {name: {"heads": _RhoSums(layers), "neurons": _RhoSums(layers)} for name in modules}
    for start in range(0, len(rows), EVAL_CHUNK):
        chunk = rows[start:start + EVAL_CHUNK]
        true_heads, true_neurons = normalise_targets(data.heads[chunk]), normalise_targets(data.neurons[chunk])
        for name, module in modules.items():
            heads, neurons = module(*(x[chunk] for x in data.inputs))
            sums[name]["heads"].add(*_rho_rows(heads.float(), true_heads))
            sums[name]["neurons"].add(*_rho_rows(neurons.float(), true_neurons))
    return {name: {unit: s.result() for unit, s in units.items()} for name, units in sums.items()}


def _margin(a: dict, b: dict) -> dict:
    def diff(x, y):
        return None if x is None or y is None else round(x - y, 6)

    return {unit: {agg: diff(a[unit][agg], b[unit][agg]) for agg in ("flat", "layer")} for unit in a}


@dataclass
class TrainResult:
    """The trained module, its controls, the sample split and a JSON-serialisable report."""

    predictor: nn.Module
    report: dict
    constant: StaticScores  # mean normalised target of the training rows
    static: StaticScores  # criterion summed over the training rows, min-max per layer
    train_samples: torch.Tensor = field(repr=False)
    held_out_samples: torch.Tensor = field(repr=False)


def save_trained(result: TrainResult, directory: str | Path, *, default: bool | None = None,
                 dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    """Save a trained predictor (weights in ``dtype``, if given) and its report
    (``shadow_predictor_report_<kind>_<granularity>.json``) into ``directory``; returns (config, report) paths."""
    config = save_predictor(result.predictor, directory, default=default, dtype=dtype)
    report = result.report | ({"stored_dtype": str(dtype)} if dtype is not None else {})
    kind, granularity = result.report["kind"], result.report["granularity"]
    path = atomic_write_text(Path(directory) / f"shadow_predictor_report_{kind}_{granularity}.json",
                             json.dumps(report, indent=2))
    return config, path


def train_predictor(traces: Traces, *, kind: PredictorKind = "shadowllm", granularity: Granularity = "prompt",
                    structure: DecoderStructure | None = None, hidden: int = 1024, neuron_block: int = 1,
                    epochs: int | tuple[int, int] | None = None, batch_size: int | tuple[int, int] | None = None,
                    lr: float = 1e-3, holdout: float = 0.1, seed: int = 0, progress: bool = True) -> TrainResult:
    """Train a ``kind`` predictor on ``traces`` and report held-out Spearman rho against the controls.

    ``epochs`` and ``batch_size`` are one int for both unit kinds or a (heads, neurons) pair (default (100, 20) and
    (32, 16)). ``holdout`` is the fraction of samples held out. With ``structure``, traces of another model are
    refused (:class:`~shadowfx.structure.FingerprintMismatch`). Deterministic given ``seed``.
    """
    if kind not in KINDS:
        raise TrainingError(f"unknown predictor kind {kind!r}; expected one of {', '.join(KINDS)}")
    if granularity not in GRANULARITIES:
        raise TrainingError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if structure is not None:
        check_fingerprint(traces.fingerprint, structure, what="the traces")
    if not 0.0 < holdout < 1.0:
        raise TrainingError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    if not lr > 0:
        raise TrainingError(f"lr must be > 0, got {lr!r}")
    if hidden < 1:
        raise TrainingError(f"hidden must be >= 1, got {hidden}")
    epoch_pair = _per_kind(epochs, DEFAULT_EPOCHS, "epochs")
    batch_pair = _per_kind(batch_size, DEFAULT_BATCH_SIZE, "batch_size")
    if min(epoch_pair) < 0 or min(batch_pair) < 1:
        raise TrainingError(f"epochs must be >= 0 and batch_size >= 1, got {epoch_pair} and {batch_pair}")
    data = _data(traces, kind, granularity)
    shape = SparseShape(input_size=data.head_inputs.shape[-1], sparse_layers=data.heads.shape[1],
                        num_heads=data.heads.shape[2], intermediate_size=data.neurons.shape[2])
    if structure is not None:
        expected = SparseShape.layerwise(structure) if kind == "dejavu" else SparseShape.of(structure)
        if expected != shape:
            raise TrainingError(f"the traces have shape {shape}, but the model has {expected}")
    if neuron_block != 1 and kind != "shadowllm":
        raise TrainingError(f"neuron_block applies to kind 'shadowllm' only, got {neuron_block} with kind {kind!r}")
    if neuron_block < 1 or shape.intermediate_size % neuron_block:
        raise TrainingError(f"neuron_block must be a positive divisor of the MLP width {shape.intermediate_size}, "
                            f"got {neuron_block}")

    n = len(traces)
    held = int(round(holdout * n))
    if held < 2 or n - held < 2:
        raise TrainingError(f"{n} samples with holdout {holdout} leave {n - held} to train on and {held} held out; "
                            "each side needs at least 2 (calibrate more samples or change holdout)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held_out_samples, train_samples = order[:held].sort().values, order[held:].sort().values
    train_rows, held_rows = data.rows(train_samples), data.rows(held_out_samples)
    fingerprint = traces.fingerprint
    sums = CriterionSums.of_rows(data, train_rows, fingerprint)
    constant, static = sums.constant(), sums.static()

    fits: dict[str, dict] = {}
    if kind == "static":
        module: nn.Module = static
    else:
        module = seeded(seed, (lambda: ShadowPredictor(shape, fingerprint, hidden=hidden, neuron_block=neuron_block))
                        if kind == "shadowllm" else (lambda: LayerwisePredictor(shape, fingerprint, hidden=hidden)))
        block = neuron_block if kind == "shadowllm" else 1

        def head_loss(batch: torch.Tensor) -> torch.Tensor:
            return nn.functional.mse_loss(module.head_scores(data.head_inputs[batch]),
                                          normalise_targets(data.heads[batch]))

        def neuron_loss(batch: torch.Tensor) -> torch.Tensor:
            return nn.functional.mse_loss(module.block_scores(data.neuron_inputs[batch]),
                                          normalise_targets(data.neurons[batch], block=block))

        module.train()
        with torch.enable_grad():
            for unit, loss_of, index in (("heads", head_loss, 0), ("neurons", neuron_loss, 1)):
                fits[unit] = _fit(list(getattr(module, unit).parameters()), loss_of, train_rows,
                                  epochs=epoch_pair[index], batch_size=batch_pair[index], lr=lr,
                                  generator=torch.Generator().manual_seed(seed + 1 + index),
                                  desc=f"training {kind} {unit}", progress=progress)
        module.eval()
    module.granularity = granularity  # names its files beside its kind

    controls = {"predictor": module, "constant": constant, "static": static}
    held_out = _evaluate(controls, data, held_rows)
    train = _evaluate(controls, data, train_rows)
    head_params = sum(p.numel() for p in module.heads.parameters()) if kind != "static" else 0
    neuron_params = sum(p.numel() for p in module.neurons.parameters()) if kind != "static" else 0
    report = {
        "kind": kind,
        "granularity": granularity,
        "criterion": traces.header.get("criterion"),
        "fingerprint": fingerprint,
        "model_class": traces.header.get("model_class"),
        "targets": "layers 1..L-1, min-max per layer and example (b1eL)",
        "shape": vars(shape),
        "samples": {"train": len(train_samples), "held_out": len(held_out_samples)},
        "rows": {"train": len(train_rows), "held_out": len(held_rows)},
        "parameters": {"heads": head_params, "neurons": neuron_params, "total": head_params + neuron_params},
        "settings": {"hidden": hidden if kind != "static" else None, "neuron_block": neuron_block,
                     "epochs": list(epoch_pair) if kind != "static" else None,
                     "batch_size": list(batch_pair) if kind != "static" else None,
                     "lr": lr, "holdout": holdout, "seed": seed},
        "training": fits,
        "train_seconds": round(sum(fit["seconds"] for fit in fits.values()), 3),
        "spearman": {"held_out": held_out, "train": train},
        "margin": _margin(held_out["predictor"], held_out["constant"]),
    }
    return TrainResult(module, report, constant, static, train_samples, held_out_samples)
