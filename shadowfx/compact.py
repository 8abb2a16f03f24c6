"""Gather a prompt's kept rows and columns of every later layer's weights once, for the decode steps to reuse.

The tensors come out in the order the ``pregathered_weights`` pass gives the decode graph's inputs: per later layer,
the attention's q/k/v/o weights and biases and its ALiBi slopes, then the MLP's up/gate/down weights and biases,
skipping the ones the model does not have. Output-projection weights (attention o, MLP down) have their kept
columns gathered, read in the weight's own order, into the ``[out, kept]`` layout the op multiplies by.
:attr:`CompactWeights.layout` says of each tensor which selection it follows, where its kept rows lie and how many
rows a kept unit owns (what an exporter needs to give the tensors dynamic shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shadowfx import native
from shadowfx.native import input_major
from shadowfx.ops import contiguous_run, kept_cols, kept_rows, unit_rows
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
    per_row: dict[str, bool]  # by selection kind ("kv_heads", "neurons"): gathered per batch row, or once
    layout: list[CompactTensor]  # one per tensor, in the same order


@dataclass(frozen=True)
class _Gather:
    """One tensor of the compact set (``layout`` says which): ``source`` as it is (never gathered), or its ``rows``.

    ``output``: ``source`` is an output projection's ``[out, in]`` weight, whose kept inputs are its columns (see
    :func:`gather_kept`).
    """

    source: torch.Tensor
    layout: CompactTensor
    rows: torch.Tensor | None = None
    output: bool = False

    @property
    def bytes(self) -> int:
        if self.rows is None:
            return 0
        per_unit = self.source.shape[0] if self.output else self.source[0].numel()
        return self.rows.numel() * per_unit * self.source.element_size()

    def take(self) -> torch.Tensor:
        return self.source if self.rows is None else gather_kept(self.source, self.rows, self.output)


def gather_kept(source: torch.Tensor, rows: torch.Tensor, output: bool) -> torch.Tensor:
    """The kept ``rows`` ([n], or per batch row [B, n]) of ``source``, or its kept columns for an output projection
    (``output``: ``source`` is its ``[out, in]`` weight, gathered into the op's ``[.., out, kept]`` layout).

    A row index past the end of ``source`` is an empty slot's, and gathers zeros, so that it adds nothing to the
    layer's output. One ``kept_rows`` / ``kept_cols`` op per tensor, which an exported gather graph keeps as one node.
    """
    shared = rows.dim() == 1
    per_row = rows.unsqueeze(0) if shared else rows
    kept = kept_cols(source, per_row) if output else kept_rows(source, per_row)
    return kept.squeeze(0) if shared else kept


def gather_units(source: torch.Tensor, units: torch.Tensor, unit_width: int, output: bool) -> torch.Tensor:
    """:func:`gather_kept` of the rows that the kept ``units`` own, ``unit_width`` consecutive rows each (a KV
    group's q rows, a head's k rows, a neuron's one row)."""
    return gather_kept(source, units if unit_width == 1 else unit_rows(units, unit_width), output)


def _weight(params: dict[str, torch.Tensor], projection: Projection) -> torch.Tensor:
    """The projection's weight in [out, in] layout, of every role when fused (a view, no copy)."""
    weight = params[projection.weight]
    return weight if projection.weight_layout == "out_in" else weight.t()


def _bias(params: dict[str, torch.Tensor], projection: Projection) -> torch.Tensor | None:
    return None if projection.bias is None else params[projection.bias]


@dataclass(frozen=True)
class RoleGather:
    """How a role's tensor is gathered: by the layer's ``selection`` (``"kv_heads"`` or ``"neurons"``; None: kept
    whole), each kept unit owning ``unit_rows`` consecutive rows, as columns when it is an ``output`` projection's
    ``[out, in]`` weight."""

    selection: str | None
    unit_rows: int = 1
    output: bool = False


def role_gathers(layer: LayerStructure) -> dict[str, RoleGather]:
    """Every role of :data:`ATTENTION_ROLES` and :data:`MLP_ROLES`, in that order, with how ``layer``'s is gathered
    (whether the layer has it or not)."""
    attention = layer.attention
    query, head = attention.kv_group_size * attention.head_dim, attention.head_dim
    gathers = {}
    for name, unit in (("q", query), ("k", head), ("v", head)):
        gathers[f"{name}_weight"] = gathers[f"{name}_bias"] = RoleGather("kv_heads", unit)
    gathers["o_weight"], gathers["o_bias"] = RoleGather("kv_heads", query, output=True), RoleGather(None)
    gathers["alibi_slopes"] = RoleGather("kv_heads", attention.kv_group_size)  # one per query head
    for name in ("up", "gate"):
        gathers[f"{name}_weight"] = gathers[f"{name}_bias"] = RoleGather("neurons")
    gathers["down_weight"], gathers["down_bias"] = RoleGather("neurons", output=True), RoleGather(None)
    assert tuple(gathers) == ATTENTION_ROLES + MLP_ROLES
    return gathers


def _layer_plan(params: dict[str, torch.Tensor], layer: LayerStructure,
                units: dict[str, torch.Tensor]) -> list[_Gather]:
    """One later layer's part of :func:`_plan`; ``units``: its kept units by selection (kv heads, neurons)."""
    attention, mlp = layer.attention, layer.mlp
    # role -> (tensor, the projection whose rows it holds, fused or not); an output projection's are never fused
    tensors: dict[str, tuple[torch.Tensor | None, Projection | None]] = {}
    for name, projection in (("q", attention.q), ("k", attention.k), ("v", attention.v), ("o", attention.o),
                             ("up", mlp.up), ("gate", mlp.gate), ("down", mlp.down)):
        if projection is not None:
            tensors[f"{name}_weight"] = (_weight(params, projection), projection)
            tensors[f"{name}_bias"] = (_bias(params, projection), projection)
    if attention.alibi_slopes is not None:
        slopes = torch.tensor(attention.alibi_slopes, dtype=torch.float32, device=params[attention.q.weight].device)
        tensors["alibi_slopes"] = (slopes, None)
    plan: list[_Gather] = []
    for role, how in role_gathers(layer).items():
        tensor, projection = tensors.get(role, (None, None))
        if tensor is None:
            continue
        if how.selection is None:
            plan.append(_Gather(tensor, CompactTensor(layer.index, role, None, None)))
            continue
        rows = units[how.selection] if how.unit_rows == 1 else unit_rows(units[how.selection], how.unit_rows)
        if projection is not None and not how.output:
            rows = projection.feature_rows(rows)  # where a fused projection holds this role's rows
        layout = CompactTensor(layer.index, role, how.selection, 1 if how.output else 0, how.unit_rows)
        run = contiguous_run(rows, tensor.shape[layout.axis])
        if run is None:
            plan.append(_Gather(tensor, layout, rows, how.output))
        else:  # kept rows in one run (all of them at sparsity 0) are a view of the weight: nothing to copy
            plan.append(_Gather(tensor.narrow(layout.axis, *run), layout))
    return plan


def store_input_major(model: nn.Module, structure: DecoderStructure) -> list[str]:
    """Store every later layer's output-projection weights (attention o, MLP down) input-major, in place: the same
    values, laid out so that a kept input's weights are one contiguous run, as the per-token decode kernels read
    them (see :func:`shadowfx.native.input_major`). Returns the names of the weights it re-laid; GPT-2's ``Conv1D``
    weights, ``[in, out]``, already are."""
    params = dict(model.named_parameters(remove_duplicate=False))
    changed = []
    for layer in structure.layers[1:]:
        for projection in (layer.attention.o, layer.mlp.down):
            weight = params[projection.weight]
            if projection.weight_layout == "out_in" and weight.is_contiguous() and min(weight.shape) > 1:
                weight.data = input_major(weight.data)
                changed.append(projection.weight)
    return changed


def store_whole_weights_on_huge_pages(model: nn.Module, structure: DecoderStructure, predictor: nn.Module) -> list[str]:
    """Move the weights that every decode step reads whole (layer 0's projections, the LM head, the predictor's
    matrices) into memory backed by huge pages where the system allows, in place: the same values, which the native
    GEMV of a one-token step streams about a third faster there (27 against 21 GB/s for OPT-1.3B's LM head on 2
    threads of the development machine). Returns the names of the weights it moved, ``predictor.`` before the
    predictor's; none without the native kernels."""
    params = dict(model.named_parameters(remove_duplicate=False))
    first = structure.layers[0]
    projections = [first.attention.q, first.attention.k, first.attention.v, first.attention.o, first.mlp.up,
                   first.mlp.gate, first.mlp.down, structure.lm_head]
    whole = {projection.weight: params[projection.weight] for projection in projections
             if projection is not None and projection.weight_layout == "out_in"}  # what dense_linear runs
    whole.update({f"predictor.{name}": weight for name, weight in predictor.named_parameters() if weight.dim() == 2})
    moved, seen = [], set()
    for name, weight in whole.items():
        every_row = torch.arange(weight.shape[0])
        if id(weight) in seen or weight.dtype not in native.DTYPES or not native.copies(weight.data, every_row):
            continue  # a tied weight once; other dtypes and devices take no native GEMV
        seen.add(id(weight))
        weight.data = native.copy_rows(weight.data, every_row)
        moved.append(name)
    return moved


def _plan(model: nn.Module, structure: DecoderStructure, selection: Selection,
          per_row: dict[str, bool]) -> list[_Gather]:
    """What :func:`compact_weights` gathers, in the order the decode graph takes it (nothing is copied yet);
    ``per_row``: by selection kind, whether its weights are gathered per batch row or once (from row 0)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    plan: list[_Gather] = []
    for position, layer in enumerate(structure.layers[1:]):
        units = {"kv_heads": selection.kv_heads[position], "neurons": selection.neurons[position]}
        plan += _layer_plan(params, layer, {kind: kept if per_row[kind] else kept[0] for kind, kept in units.items()})
    return plan


def compact_weights(model: nn.Module, structure: DecoderStructure, selection: Selection, *,
                    max_bytes: int | None = None, per_row: bool | None = None) -> CompactWeights | None:
    """The kept weights of every later layer; the heads' and the neurons' each shared by all rows when the rows
    selected the same units, else per row (``per_row`` True: every one per row, as a traced graph must, having no
    values to compare; False: all shared, from row 0).

    The size is known from the selection before anything is copied: beyond ``max_bytes`` nothing is gathered and
    the result is None. Empty slots (rows of a batch that keep fewer units than the widest) gather a real row whose
    output-projection part is zeroed.
    """
    if per_row is None:
        rows_differ = {kind: any(bool((t != t[:1]).any()) for t in kept)
                       for kind, kept in (("kv_heads", selection.kv_heads), ("neurons", selection.neurons))}
    else:
        rows_differ = {"kv_heads": per_row, "neurons": per_row}
    plan = _plan(model, structure, selection, rows_differ)
    gathered = sum(item.bytes for item in plan)
    if max_bytes is not None and gathered > max_bytes:
        return None
    return CompactWeights(tensors=[item.take() for item in plan], gathered_bytes=gathered, per_row=rows_differ,
                          layout=[item.layout for item in plan])
