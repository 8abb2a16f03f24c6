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


def _take(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(0, rows) if rows.dim() == 1 else tensor[rows]


def compact_weights(model: nn.Module, structure: DecoderStructure, selection: Selection) -> CompactWeights:
    """The kept weights of every later layer; shared by all rows when they selected the same units, else per row."""
    params = dict(model.named_parameters(remove_duplicate=False))
    per_row = any(bool((t != t[:1]).any()) for t in selection.kv_heads + selection.neurons)
    tensors: list[torch.Tensor] = []
    gathered = 0

    def add(tensor: torch.Tensor | None, *, fresh: bool = True) -> None:
        nonlocal gathered
        if tensor is not None:
            tensors.append(tensor)
            gathered += tensor.numel() * tensor.element_size() if fresh else 0

    for position, layer in enumerate(structure.layers[1:]):
        attention, mlp = layer.attention, layer.mlp
        kv_heads = selection.kv_heads[position] if per_row else selection.kv_heads[position][0]
        neurons = selection.neurons[position] if per_row else selection.neurons[position][0]
        q_rows = unit_rows(kv_heads, attention.kv_group_size * attention.head_dim)
        kv_rows = unit_rows(kv_heads, attention.head_dim)
        for projection, rows in ((attention.q, q_rows), (attention.k, kv_rows), (attention.v, kv_rows)):
            add(_take(_weight(params, projection), rows))
            bias = _bias(params, projection)
            add(_take(bias, rows) if bias is not None else None)
        add(_take(_weight(params, attention.o).t(), q_rows).transpose(-1, -2))
        add(_bias(params, attention.o), fresh=False)
        for projection in (mlp.up, mlp.gate):
            if projection is None:
                continue
            add(_take(_weight(params, projection), neurons))
            bias = _bias(params, projection)
            add(_take(bias, neurons) if bias is not None else None)
        add(_take(_weight(params, mlp.down).t(), neurons).transpose(-1, -2))
        add(_bias(params, mlp.down), fresh=False)
    return CompactWeights(tensors=tensors, gathered_bytes=gathered, per_row=per_row)
