"""Perplexity of a dense or transformed model on a token stream, and the damage curve of random sparsity."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from shadowfx.api import discover, transform
from shadowfx.capture import PrefillStep
from shadowfx.data import token_windows
from shadowfx.predictor import StaticScores


@torch.inference_mode()
def mean_nll(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], windows: torch.Tensor, *,
             batch_size: int = 8, score_from: int = 1) -> float:
    """Mean next-token negative log-likelihood of positions ``score_from..`` of each window."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = forward(batch, torch.ones_like(batch))
        predicted = logits[:, score_from - 1:-1].float()
        targets = batch[:, score_from:]
        total += torch.nn.functional.cross_entropy(predicted.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total / count


def _dense_forward(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return PrefillStep(model.eval())


def perplexity(model: nn.Module, tokens: torch.Tensor, *, length: int = 256, windows: int = 128) -> float:
    """Perplexity of the dense model over up to ``windows`` disjoint windows of ``length`` tokens."""
    return math.exp(mean_nll(_dense_forward(model), token_windows(tokens, length, limit=windows)))


def damage_curve(model: nn.Module, tokens: torch.Tensor, *, fractions: Sequence[float] = (0.3, 0.5, 0.7),
                 seeds: Sequence[int] = (0, 1, 2), length: int = 256, windows: int = 64) -> dict:
    """Perplexity when a random fraction of the heads and neurons of every layer >= 1 is removed (mean of seeds).

    Says how much a model relies on its upper layers: where removing half costs little, no selection method can
    differ much.
    """
    chunks = token_windows(tokens, length, limit=windows)
    dense = math.exp(mean_nll(_dense_forward(model), chunks))
    structure = discover(model)
    curve = {"dense": dense}
    verify = True
    for fraction in fractions:
        values = []
        for seed in seeds:
            sparse = transform(model, StaticScores.random(structure, seed), sparsity=fraction, scope="per_layer",
                               verify=verify)
            verify = False  # the rewrite's self-check depends on the model only: the first transform ran it
            values.append(math.exp(mean_nll(sparse, chunks)))
        mean = statistics.mean(values)
        curve[f"random_{fraction:.2f}"] = mean
        curve[f"random_{fraction:.2f}_ratio"] = mean / dense
    return curve
