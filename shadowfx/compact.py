"""Gather a prompt's kept rows and columns of every later layer's weights once, for the decode steps to reuse.

The tensors come out in the order the ``pregathered_weights`` pass gives the decode graph's inputs: per later layer,
the attention's q/k/v/o weights and biases and its ALiBi slopes, then the MLP's up/gate/down weights and biases,
skipping the ones the model does not have. Output-projection weights (attention o, MLP down) are gathered as
contiguous rows of their transpose, so the kept units are contiguous in memory and the op reads them with one dense
matmul.
:attr:`CompactWeights.layout` says of each tensor which selection it follows, where its kept rows lie and how many
rows a kept unit owns (what an exporter needs to give the tensors dynamic shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shadowfx.ops import unit_rows
from shadowfx.selection import Selection
from shadowfx.structure import DecoderStructure, LayerStructure, Projection

ATTENTION_ROLES = ("q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "o_weight", "o_bias",
                   "alibi_slopes")
MLP_ROLES = ("up_weight", "up_bias", "gate_weight", "gate_bias", "down_weight", "down_bias")


@dataclass(frozen=True)
class CompactTensor:
    """What one tensor of the compact set holds: the ``role`` (of :data:`ATTENTION_ROLES` / :data:`MLP_ROLES`) of
    layer ``layer``'s weights, gathered by that layer's ``selection`` (``"kv_heads"`` or ``"neurons"``), each kept
    unit owning ``unit_rows`` consecutive rows along ``axis`` of one batch row's tensor (a per-row tensor has the
    batch axis before it). ``selection`` None: an output bias, kept whole and shared by all rows (no ``axis``).
    """

    layer: int
    role: str
    selection: str | None
    axis: int | None
    unit_rows: int = 1

    @property
    def shared(self) -> bool:
        return self.selection is None


@dataclass(frozen=True)
class CompactWeights:
    tensors: list[torch.Tensor]
    gathered_bytes: int
    per_row: bool
    layout: list[CompactTensor]  # one per tensor, in the same order


@dataclass(frozen=True)
class _Gather:
    """One tensor of the compact set (``layout`` says which): ``source`` as it is (never gathered), or its ``rows``.

    An empty slot's row index is past the end of ``source``; it gathers the last row instead. For an output
    projection (``output``: ``source`` is its transpose) those rows are zeroed, so an empty slot adds nothing to
    the layer's output, and the result is transposed back to the op's ``[.., out, kept]`` layout.
    """

    source: torch.Tensor
    layout: CompactTensor
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
    """The projection's weight in [out, in] layout, of every role when fused (a view, no copy)."""
    weight = params[projection.weight]
    return weight if projection.weight_layout == "out_in" else weight.t()


def _bias(params: dict[str, torch.Tensor], projection: Projection) -> torch.Tensor | None:
    return None if projection.bias is None else params[projection.bias]


def _layer_plan(params: dict[str, torch.Tensor], layer: LayerStructure,
                units: dict[str, torch.Tensor]) -> list[_Gather]:
    """One later layer's part of :func:`_plan`; ``units``: its kept units by selection (kv heads, neurons)."""
    attention, mlp = layer.attention, layer.mlp
    plan: list[_Gather] = []
    rows: dict[tuple[str, int], torch.Tensor] = {}  # per (selection, rows per unit): the rows to gather

    def add(role: str, tensor: torch.Tensor | None, kind: str | None = None, unit: int = 1, *,
            output: bool = False, projection: Projection | None = None) -> None:
        """``tensor`` (if the model has it) gathered by the layer's ``kind`` of selection, ``unit`` rows per kept
        unit, at the rows ``projection`` holds them in when it is fused; or kept whole (``kind`` None). An output
        projection's kept rows are its last axis, once transposed back to the op's layout."""
        if tensor is None:
            return
        if kind is None:
            plan.append(_Gather(tensor, CompactTensor(layer.index, role, None, None)))
            return
        if (kind, unit) not in rows:
            rows[kind, unit] = units[kind] if unit == 1 else unit_rows(units[kind], unit)
        taken = rows[kind, unit] if projection is None else projection.feature_rows(rows[kind, unit])
        layout = CompactTensor(layer.index, role, kind, 1 if output else 0, unit)
        plan.append(_Gather(tensor, layout, taken, output))

    query_rows = attention.kv_group_size * attention.head_dim
    for name, projection, unit in (("q", attention.q, query_rows), ("k", attention.k, attention.head_dim),
                                   ("v", attention.v, attention.head_dim)):
        add(f"{name}_weight", _weight(params, projection), "kv_heads", unit, projection=projection)
        add(f"{name}_bias", _bias(params, projection), "kv_heads", unit, projection=projection)
    add("o_weight", _weight(params, attention.o).t(), "kv_heads", query_rows, output=True)
    add("o_bias", _bias(params, attention.o))
    if attention.alibi_slopes is not None:  # one per query head: a kept KV group's r heads
        slopes = torch.tensor(attention.alibi_slopes, dtype=torch.float32, device=params[attention.q.weight].device)
        add("alibi_slopes", slopes, "kv_heads", attention.kv_group_size)
    for name, projection in (("up", mlp.up), ("gate", mlp.gate)):
        if projection is not None:
            add(f"{name}_weight", _weight(params, projection), "neurons", projection=projection)
            add(f"{name}_bias", _bias(params, projection), "neurons", projection=projection)
    add("down_weight", _weight(params, mlp.down).t(), "neurons", output=True)
    add("down_bias", _bias(params, mlp.down))
    return plan


def _plan(model: nn.Module, structure: DecoderStructure, selection: Selection, per_row: bool) -> list[_Gather]:
    """What :func:`compact_weights` gathers, in the order the decode graph takes it (nothing is copied yet)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    plan: list[_Gather] = []
    for position, layer in enumerate(structure.layers[1:]):
        units = {"kv_heads": selection.kv_heads[position], "neurons": selection.neurons[position]}
        plan += _layer_plan(params, layer, units if per_row else {kind: kept[0] for kind, kept in units.items()})
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
    return CompactWeights(tensors=[item.take() for item in plan], gathered_bytes=gathered, per_row=per_row,
                          layout=[item.layout for item in plan])
