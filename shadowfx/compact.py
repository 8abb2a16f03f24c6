"""Gather a prompt's kept rows and columns of every later layer's weights once, for the decode steps to reuse.

The tensors come out in the order the ``pregathered_weights`` pass gives the decode graph's inputs: per later layer,
the attention's q/k/v/o weights and biases, then the MLP's up/gate/down weights and biases, skipping the ones the
model does not have. Output-projection weights (attention o, MLP down) are gathered as contiguous rows of their
transpose, so the kept units are contiguous in memory and the op reads them with one dense matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shadowfx.ops import unit_rows
from shadowfx.selection import Selection
from shadowfx.structure import DecoderStructure, Projection

ATTENTION_ROLES = ("q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "o_weight", "o_bias")
MLP_ROLES = ("up_weight", "up_bias", "gate_weight", "gate_bias", "down_weight", "down_bias")


@dataclass(frozen=True)
class CompactWeights:
    tensors: list[torch.Tensor]
    gathered_bytes: int
    per_row: bool


@dataclass(frozen=True)
class _Gather:
    """One tensor of the compact set: ``source`` as it is (never gathered), or its ``rows``.

    An empty slot's row index is past the end of ``source``; it gathers the last row instead. For an output
    projection (``output``: ``source`` is its transpose) those rows are zeroed, so an empty slot adds nothing to
    the layer's output, and the result is transposed back to the op's ``[.., out, kept]`` layout.
    """

    source: torch.Tensor
    rows: torch.Tensor | None = None
    output: bool = False

    @property
    def bytes(self) -> int:
        if self.rows is None:
            return 0
        return self.rows.numel() * self.source[0].numel() * self.source.element_size()

    def take(self) -> torch.Tensor:
        if self.rows is None:
            return self.source
        rows = self.rows.clamp(max=self.source.shape[0] - 1)
        taken = self.source.index_select(0, rows) if rows.dim() == 1 else self.source[rows]
        if not self.output:
            return taken
        return taken.masked_fill((self.rows >= self.source.shape[0]).unsqueeze(-1), 0).transpose(-1, -2)


def _weight(params: dict[str, torch.Tensor], projection: Projection) -> torch.Tensor:
    """The projection's weight in [out, in] layout, narrowed to its rows when fused (a view, no copy)."""
    weight = params[projection.weight]
    weight = weight if projection.weight_layout == "out_in" else weight.t()
    return weight[projection.rows[0]:projection.rows[1]] if projection.rows else weight


def _bias(params: dict[str, torch.Tensor], projection: Projection) -> torch.Tensor | None:
    if projection.bias is None:
        return None
    bias = params[projection.bias]
    return bias[projection.rows[0]:projection.rows[1]] if projection.rows else bias


def _plan(model: nn.Module, structure: DecoderStructure, selection: Selection, per_row: bool) -> list[_Gather]:
    """What :func:`compact_weights` gathers, in the order the decode graph takes it (nothing is copied yet)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    plan: list[_Gather] = []

    def add(tensor: torch.Tensor | None, rows: torch.Tensor | None = None, *, output: bool = False) -> None:
        if tensor is not None:
            plan.append(_Gather(tensor, rows, output))

    for position, layer in enumerate(structure.layers[1:]):
        attention, mlp = layer.attention, layer.mlp
        kv_heads = selection.kv_heads[position] if per_row else selection.kv_heads[position][0]
        neurons = selection.neurons[position] if per_row else selection.neurons[position][0]
        q_rows = unit_rows(kv_heads, attention.kv_group_size * attention.head_dim)
        kv_rows = unit_rows(kv_heads, attention.head_dim)
        for projection, rows in ((attention.q, q_rows), (attention.k, kv_rows), (attention.v, kv_rows)):
            add(_weight(params, projection), rows)
            add(_bias(params, projection), rows)
        add(_weight(params, attention.o).t(), q_rows, output=True)
        add(_bias(params, attention.o))
        for projection in (mlp.up, mlp.gate):
            if projection is not None:
                add(_weight(params, projection), neurons)
                add(_bias(params, projection), neurons)
        add(_weight(params, mlp.down).t(), neurons, output=True)
        add(_bias(params, mlp.down))
    return plan


def compact_weights(model: nn.Module, structure: DecoderStructure, selection: Selection, *,
                    max_bytes: int | None = None, per_row: bool | None = None) -> CompactWeights | None:
    """The kept weights of every later layer; shared by all rows when they selected the same units, else per row
    (``per_row`` True: per row always, as a traced graph must, having no values to compare).

    The size is known from the selection before anything is copied: beyond ``max_bytes`` nothing is gathered and
    the result is None. Empty slots (rows of a batch that keep fewer units than the widest) gather a real row whose
    output-projection part is zeroed.
    """
    if per_row is None:
        per_row = any(bool((t != t[:1]).any()) for t in selection.kv_heads + selection.neurons)
    plan = _plan(model, structure, selection, per_row)
    gathered = sum(item.bytes for item in plan)
    if max_bytes is not None and gathered > max_bytes:
        return None
    return CompactWeights(tensors=[item.take() for item in plan], gathered_bytes=gathered, per_row=per_row)
