"""Importance criteria for attention heads and MLP neurons, measured with hooks on the eager model.

The hooks sit where DecoderStructure says the units are: a head is its slice of the attention context entering the
output projection, a neuron its entry of the MLP intermediate entering the down projection. Each hooked input ``x``
is multiplied by a gate of ones ``m[b, t, u]`` (one per token and unit) that requires grad, so one backward pass of
the loss gives, per token and unit, the activation ``A``, its gradient ``G`` and the gate gradient
``dL/dm[t, u] = sum_{d in u} A_td G_td``. The criteria are then, per sample (sums over that sample's tokens t, and
over the dims d of a unit; ``u`` = head or neuron):

* ``plainact``  sum_t |dL/dm[t, u]|                first-order Taylor importance, ShadowLLM's choice
* ``magnitude`` sqrt(sum_t sum_d A_td^2)           activation l2 norm, DejaVu's target
* ``fisher``    sum_t (dL/dm[t, u])^2              empirical Fisher of the per-token gate
* ``grad_norm`` sqrt(sum_t sum_d G_td^2)
* ``snip``      |sum_t dL/dm[t, u]|                gradient w.r.t. one mask per unit (a true per-head SNIP)

Per-token scores (the token granularity's targets) are the same quantities without the sum over t.
The loss of a sample is the mean next-token cross-entropy over its scored positions; samples are summed, so one
backward gives every sample's own gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from shadowfx.capture import positions_from_mask
from shadowfx.structure import DecoderStructure

Criterion = Literal["plainact", "magnitude", "fisher", "grad_norm", "snip"]
CRITERIA: tuple[Criterion, ...] = ("plainact", "magnitude", "fisher", "grad_norm", "snip")


@dataclass
class _Capture:
    activation: torch.Tensor | None = None  # A, [B, S, U, d]
    gradient: torch.Tensor | None = None  # G, [B, S, U, d]
    gate: torch.Tensor | None = None  # m, [B, S, U], ones, requires grad


def _units(activation: torch.Tensor, gate: torch.Tensor, gradient: torch.Tensor, criterion: Criterion,
           per_token: bool) -> torch.Tensor:
    """Scores [B, U] (or [B, S, U] per token) from A, G [B, S, U, d] and the gate gradient [B, S, U]."""
    gate_grad = gate.grad
    if criterion == "plainact":
        per = gate_grad.abs()
    elif criterion == "fisher":
        per = gate_grad.square()
    elif criterion == "snip":
        return gate_grad if per_token else gate_grad.sum(1).abs()
    else:
        tensor = activation if criterion == "magnitude" else gradient
        squares = tensor.float().square().sum(-1)
        return squares.sqrt() if per_token else squares.sum(1).sqrt()
    return per if per_token else per.sum(1)


@dataclass(frozen=True)
class UnitScores:
    """Per-sample scores of every layer: heads ``[B, L, H]`` and neurons ``[B, L, F]`` (per token: ``[B, S, L, .]``).

    ``context`` is layer 0's attention context ``[B, S, E]``, the shadow predictor's input.
    """

    heads: torch.Tensor
    neurons: torch.Tensor
    context: torch.Tensor


class CriterionHooks:
    """Gates on every layer's head context and MLP intermediate of ``model``; use as a context manager."""

    def __init__(self, model: nn.Module, structure: DecoderStructure) -> None:
        self.model = model
        self.structure = structure
        self.heads = [_Capture() for _ in structure.layers]
        self.neurons = [_Capture() for _ in structure.layers]
        # what a layerwise (DejaVu-style) predictor reads: each layer's attention and MLP input [B, S, E]
        self.attention_inputs: list[torch.Tensor | None] = [None] * len(structure.layers)
        self.mlp_inputs: list[torch.Tensor | None] = [None] * len(structure.layers)
        self._batch = 0
        self._handles = []
        # gradients are needed for the gates only: freezing the weights saves their gradient memory and time
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        for layer in structure.layers:
            attention = layer.attention
            o_proj = model.get_submodule(attention.o.module)
            down = model.get_submodule(layer.mlp.down.module)
            self._handles.append(o_proj.register_forward_pre_hook(
                self._gate(self.heads[layer.index], attention.num_heads)))
            self._handles.append(down.register_forward_pre_hook(
                self._gate(self.neurons[layer.index], layer.mlp.intermediate_size)))
            q = model.get_submodule(attention.q.module)
            up = model.get_submodule(layer.mlp.up.module)
            self._handles.append(q.register_forward_pre_hook(self._keep_input(self.attention_inputs, layer.index)))
            self._handles.append(up.register_forward_pre_hook(self._keep_input(self.mlp_inputs, layer.index)))

    def _gate(self, capture: _Capture, units: int) -> Callable:
        def hook(module: nn.Module, args: tuple):
            x = args[0]
            # some models (OPT) run the MLP on [B * S, F]: score per sample and token all the same
            shaped = x.reshape(self._batch, -1, units, x.shape[-1] // units)
            gate = torch.ones(shaped.shape[:3], dtype=x.dtype, device=x.device, requires_grad=True)
            gated = shaped * gate.unsqueeze(-1)
            gated.register_hook(lambda grad: setattr(capture, "gradient", grad.detach()))
            capture.activation, capture.gate = shaped.detach(), gate
            return (gated.reshape(x.shape), *args[1:])

        return hook

    def _keep_input(self, inputs: list, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            inputs[index] = args[0].detach().reshape(self._batch, -1, args[0].shape[-1])

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self._requires_grad[name])

    def __enter__(self) -> CriterionHooks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def score(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, criterion: Criterion, *,
              per_token: bool = False) -> UnitScores:
        """Scores of every unit for each sample of ``input_ids`` [B, S] (full windows, no padding).

        ``loss_mask`` [B, S] marks the positions whose next-token prediction is scored (position t predicts t + 1).
        """
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
        self._batch = input_ids.shape[0]
        attention_mask = torch.ones_like(input_ids)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions_from_mask(attention_mask), use_cache=False).logits
        token_loss = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                                                 reduction="none")
        weights = loss_mask[:, :-1].float()
        per_sample = (token_loss * weights).sum(1) / weights.sum(1).clamp(min=1)
        per_sample.sum().backward()
        heads = torch.stack([_units(c.activation, c.gate, c.gradient, criterion, per_token) for c in self.heads], -2)
        neurons = torch.stack([_units(c.activation, c.gate, c.gradient, criterion, per_token)
                               for c in self.neurons], -2)
        context = self.heads[0].activation.flatten(-2)
        return UnitScores(heads=heads.detach(), neurons=neurons.detach(), context=context)
