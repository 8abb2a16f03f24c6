"""From predicted scores to the index sets the sparse ops take, and what that selection skips.

Heads are selected by whole KV groups (a group's score is the mean of its query heads' scores), so every layer's
K/V projections and cache shrink with its query heads. Layer 0 is always dense (the predictor reads it).

Budgets are exact: with ``scope="per_layer"`` every later layer keeps the same number of units; with
``scope="global"`` the budget is ranked across layers (as ShadowLLM does; its per-layer-normalised targets make
scores comparable), after each layer's minimum has been taken out of it, so the total kept is the budget. Every
batch row (and, per token, every token) gets exactly its own selection, whatever else is in the batch: where rows
keep different counts in a layer, the shorter ones are padded with the empty slot ``N`` (the layer's unit count),
which the ops skip, so the index tensors stay rectangular.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from shadowfx.ops import global_topk_indices, topk_indices, unit_rows
from shadowfx.predictor import Scores
from shadowfx.structure import DecoderStructure, LayerStructure

BatchSelection = Literal["per_row", "union"]
BATCH_SELECTIONS: tuple[BatchSelection, ...] = get_args(BatchSelection)
Scope = Literal["global", "per_layer"]
SCOPES: tuple[Scope, ...] = get_args(Scope)


class SparsityError(ValueError):
    """A sparsity setting that cannot be applied."""


class SparsityWarning(UserWarning):
    """The sparsity applied differs from the one asked for (too few units to reach it, or the per-layer minimums)."""


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise SparsityError(f"{name} must be a number in [0, 1) (the fraction of units skipped), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SparsityConfig:
    """Fractions of KV-head groups and MLP neurons to skip in layers 1..L-1, and how to rank them."""

    heads: float
    neurons: float
    scope: Scope = "global"
    min_kv_heads: int = 1
    min_neuron_fraction: float = 1 / 32
    neuron_block: int = 1  # neurons are kept in contiguous blocks of this many (a block-scoring predictor's unit)

    def __post_init__(self) -> None:
        _fraction("heads sparsity", self.heads)
        _fraction("neurons sparsity", self.neurons)
        if self.scope not in SCOPES:
            raise SparsityError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {self.scope!r}")
        if self.min_kv_heads < 1:
            raise SparsityError(f"min_kv_heads must be >= 1, got {self.min_kv_heads}")
        if not 0.0 < self.min_neuron_fraction <= 1.0:
            raise SparsityError(f"min_neuron_fraction must be in (0, 1], got {self.min_neuron_fraction}")
        if self.neuron_block < 1:
            raise SparsityError(f"neuron_block must be >= 1, got {self.neuron_block}")

    @property
    def keeps_every_unit(self) -> bool:
        """Sparsity 0 for heads and neurons: every unit is kept, whatever the scores."""
        return self.heads == 0.0 and self.neurons == 0.0

    @classmethod
    def from_arguments(cls, sparsity: float, heads_sparsity: float | None, neurons_sparsity: float | None,
                       scope: Scope) -> SparsityConfig:
        _fraction("sparsity", sparsity)
        return cls(heads=sparsity if heads_sparsity is None else heads_sparsity,
                   neurons=sparsity if neurons_sparsity is None else neurons_sparsity, scope=scope)


@dataclass(frozen=True)
class Selection:
    """Per later layer (1..L-1): kept KV heads ``[B, g_l]`` and MLP neurons ``[B, k_l]``, ascending.

    A per-token selection has a token dim: ``[B, S, g_l]`` and ``[B, S, k_l]``.
    """

    kv_heads: tuple[torch.Tensor, ...]
    neurons: tuple[torch.Tensor, ...]

    @property
    def batch(self) -> int:
        return self.kv_heads[0].shape[0]


def _keep(total: int, sparsity: float, minimum: int) -> int:
    return min(total, max(minimum, total - math.floor(sparsity * total + 1e-9)))


def kept_per_layer(layers: int, units: int, sparsity: float, scope: Scope, minimum: int) -> int:
    """Units kept over all ``layers`` of ``units`` each: the budget, or the per-layer minimums where they exceed it."""
    if scope == "per_layer":
        return layers * _keep(units, sparsity, minimum)
    return _keep(layers * units, sparsity, minimum * layers)


def _select_units(scores: torch.Tensor, sparsity: float, scope: Scope, minimum: int) -> tuple[torch.Tensor, ...]:
    """scores [..., L', N] -> per layer int64 [..., k_l] indices of the kept units, ascending.

    The leading dims are sequences ([B]) or tokens ([B, S]), each selecting on its own. Per layer every one keeps
    the same count; with scope "global" each ranks its budget across layers after reserving its top ``minimum``
    units of every layer, so counts differ between them and the shorter are padded with the empty slot ``N``.
    """
    *leading, layers, units = scores.shape
    if sparsity == 0.0:  # every unit, in order, without ranking [..., L' * N] scores per token
        every = torch.arange(units, device=scores.device).expand(*leading, units)
        return (every,) * layers
    rows = scores.reshape(-1, layers, units).float()
    if scope == "per_layer":
        keep = _keep(units, sparsity, minimum)
        return tuple(topk_indices(rows[:, layer].contiguous(), keep).reshape(*leading, keep) for layer in range(layers))
    budget = kept_per_layer(layers, units, sparsity, scope, minimum)
    kept = global_topk_indices(rows.contiguous(), budget, minimum)
    return tuple(indices.reshape(*leading, indices.shape[-1]) for indices in kept)


def planned_sparsity(structure: DecoderStructure, config: SparsityConfig) -> dict[str, dict[str, float]]:
    """What ``config`` will skip of the later layers' KV groups and neurons (exact: the budgets are kept), next to
    what was asked: ``{"heads": {"requested", "achieved"}, "neurons": {...}}``."""
    layers = structure.num_layers - 1
    groups = structure.layers[1].attention.num_kv_heads
    blocks = structure.layers[1].mlp.intermediate_size // config.neuron_block
    kept_groups = kept_per_layer(layers, groups, config.heads, config.scope, min(config.min_kv_heads, groups))
    kept_blocks = kept_per_layer(layers, blocks, config.neurons, config.scope, _min_blocks(config, blocks))
    return {"heads": {"requested": config.heads, "achieved": 1 - kept_groups / (layers * groups)},
            "neurons": {"requested": config.neurons, "achieved": 1 - kept_blocks / (layers * blocks)}}


def _min_blocks(config: SparsityConfig, blocks: int) -> int:
    return max(1, math.ceil(config.min_neuron_fraction * blocks))


def kept_kv_groups(head_scores: torch.Tensor, structure: DecoderStructure,
                   config: SparsityConfig) -> tuple[torch.Tensor, ...]:
    """Query-head scores ``[..., L', H]`` -> per layer the kept KV groups ``[..., g_l]`` (a group scores the mean of
    its query heads)."""
    attention = structure.layers[1].attention
    groups = head_scores.unflatten(-1, (attention.num_kv_heads, attention.kv_group_size)).mean(-1)
    return _select_units(groups, config.heads, config.scope, min(config.min_kv_heads, attention.num_kv_heads))


def kept_neurons(neuron_scores: torch.Tensor, config: SparsityConfig) -> tuple[torch.Tensor, ...]:
    """Neuron scores ``[..., L', F]`` -> per layer the kept neurons ``[..., k_l]``, whole blocks of
    ``config.neuron_block`` (a block scores the mean of its neurons)."""
    block = config.neuron_block
    if config.neurons == 0.0:  # every neuron: no block scores, and no copy of the indices per token
        return _select_units(neuron_scores, 0.0, config.scope, 0)
    blocks = neuron_scores.unflatten(-1, (-1, block)).mean(-1) if block > 1 else neuron_scores
    kept_blocks = _select_units(blocks, config.neurons, config.scope, _min_blocks(config, blocks.shape[-1]))
    if block == 1:
        return kept_blocks
    # an empty block slot expands to rows past the width; they all become the one empty slot F
    return tuple(unit_rows(b, block).clamp_(max=neuron_scores.shape[-1]) for b in kept_blocks)


def select(scores: Scores, structure: DecoderStructure, config: SparsityConfig) -> Selection:
    """Turn predicted scores ``[..., L-1, H]`` / ``[..., L-1, F]`` into the kept KV heads and neurons per layer."""
    return Selection(kv_heads=kept_kv_groups(scores.heads, structure, config),
                     neurons=kept_neurons(scores.neurons, config))


def union_of_neurons(selection: Selection, structure: DecoderStructure) -> Selection:
    """``selection`` with every row's neurons replaced by the union of all rows' (per layer, ascending, the same in
    every row; a row then computes its own neurons and the others'), the heads as they are."""
    neurons = []
    for layer, kept in zip(structure.layers[1:], selection.neurons):
        union = torch.unique(kept[kept < layer.mlp.intermediate_size])  # sorted; the empty slot is no neuron
        neurons.append(union.expand(kept.shape[0], -1))
    return Selection(kv_heads=selection.kv_heads, neurons=tuple(neurons))


def full_selection(structure: DecoderStructure, batch: int, device: torch.device | None = None, *,
                   tokens: int | None = None) -> Selection:
    """Every unit of every later layer kept (what sparsity 0 selects): per row [B, k], or per token [B, S, k] for
    ``tokens`` = S."""
    lead = (batch, -1) if tokens is None else (batch, tokens, -1)
    later = structure.layers[1:]
    return Selection(
        kv_heads=tuple(torch.arange(l.attention.num_kv_heads, device=device).expand(*lead) for l in later),
        neurons=tuple(torch.arange(l.mlp.intermediate_size, device=device).expand(*lead) for l in later),
    )


def kept_counts(indices: torch.Tensor, units: int) -> torch.Tensor:
    """How many units each row (token) of a layer's selection ``[..., k]`` keeps: its slots below ``units``."""
    return (indices < units).sum(-1)


@dataclass(frozen=True)
class LayerSparsity:
    """One layer's kept units, as means over the batch rows (and tokens): every row keeps its own budget."""

    layer: int
    kv_heads_kept: float
    kv_heads: int
    heads_kept: float
    heads: int
    neurons_kept: float
    neurons: int
    weight_bytes_kept: float
    weight_bytes: int
    kv_heads_cached: int  # KV heads the cache holds per row: the widest row's count, or all of them per token


@dataclass(frozen=True)
class EffectiveSparsity:
    """What a selection actually skips, as fractions and bytes.

    ``heads``, ``neurons``, ``weight_bytes`` and ``kv_bytes`` count all layers (layer 0 dense); ``sparse_layers``
    the same fractions for layers 1..L-1 alone, which is what a sparsity setting asks for; ``requested`` the
    setting. ``padding`` is the share of the computed slots that were empty (rows of a batch that keep fewer units
    in a layer than the widest row): computed, then discarded.
    """

    layers: tuple[LayerSparsity, ...]
    heads: float
    neurons: float
    weight_bytes: float
    kv_bytes: float
    weight_bytes_skipped: float
    kv_bytes_per_token_skipped: int
    sparse_layers: dict[str, float]
    requested: dict[str, float]
    padding: float

    def to_dict(self) -> dict:
        return {
            "heads": self.heads, "neurons": self.neurons, "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes,
            "weight_bytes_skipped": self.weight_bytes_skipped,
            "kv_bytes_per_token_skipped": self.kv_bytes_per_token_skipped,
            "sparse_layers": self.sparse_layers, "requested": self.requested, "padding": self.padding,
            "layers": [vars(layer) for layer in self.layers],
        }


def attention_and_mlp_bytes(structure: DecoderStructure, layer: LayerStructure,
                            element_bytes: int) -> tuple[int, int]:
    """Bytes of ``layer``'s attention weights (q, k, v, o) and of its MLP weights (up, gate, down), biases aside."""
    attention, mlp = layer.attention, layer.mlp
    attention_bytes = (2 * attention.num_heads + 2 * attention.num_kv_heads) * attention.head_dim
    mlp_bytes = (3 if mlp.gate else 2) * mlp.intermediate_size
    return attention_bytes * structure.hidden_size * element_bytes, mlp_bytes * structure.hidden_size * element_bytes


def per_row_copy_bytes(structure: DecoderStructure, selection: Selection, element_bytes: int) -> int:
    """Bytes of the copies of the kept weights that a gather per batch row makes for ``selection``: every row's
    slots of every later layer, empty slots included (copied as zeros), biases aside."""
    total = 0
    for layer, heads, neurons in zip(structure.layers[1:], selection.kv_heads, selection.neurons):
        attention_bytes, mlp_bytes = attention_and_mlp_bytes(structure, layer, element_bytes)
        rows = heads.shape[0] if heads.dim() > 1 else 1
        total += rows * (heads.shape[-1] * attention_bytes // layer.attention.num_kv_heads
                         + neurons.shape[-1] * mlp_bytes // layer.mlp.intermediate_size)
    return total


def effective_sparsity(structure: DecoderStructure, selection: Selection, config: SparsityConfig, *,
                       element_bytes: int, kv_cache_shrinks: bool) -> EffectiveSparsity:
    """Fractions of heads, neurons, layer weight bytes and KV-cache bytes that ``selection`` skips.

    ``kv_cache_shrinks`` is true when skipped KV heads are not cached (a per-prompt selection); a per-token selection
    keeps the cache complete.
    """
    rows = []
    kv_total = kv_kept = 0
    slots = empty = 0
    for layer in structure.layers:
        attention, mlp = layer.attention, layer.mlp
        if layer.index == 0:
            groups, neurons, cached = attention.num_kv_heads, mlp.intermediate_size, attention.num_kv_heads
        else:
            kv_index, neuron_index = selection.kv_heads[layer.index - 1], selection.neurons[layer.index - 1]
            group_counts = kept_counts(kv_index, attention.num_kv_heads)
            neuron_counts = kept_counts(neuron_index, mlp.intermediate_size)
            groups, neurons = group_counts.float().mean().item(), neuron_counts.float().mean().item()
            cached = kv_index.shape[-1] if kv_cache_shrinks else attention.num_kv_heads
            slots += kv_index.numel() + neuron_index.numel()
            empty += kv_index.numel() + neuron_index.numel() - int(group_counts.sum()) - int(neuron_counts.sum())
        attention_bytes, mlp_bytes = attention_and_mlp_bytes(structure, layer, element_bytes)
        kept = attention_bytes * groups / attention.num_kv_heads + mlp_bytes * neurons / mlp.intermediate_size
        rows.append(LayerSparsity(
            layer=layer.index, kv_heads_kept=groups, kv_heads=attention.num_kv_heads,
            heads_kept=groups * attention.kv_group_size, heads=attention.num_heads,
            neurons_kept=neurons, neurons=mlp.intermediate_size,
            weight_bytes_kept=kept, weight_bytes=attention_bytes + mlp_bytes, kv_heads_cached=cached,
        ))
        per_head = 2 * attention.head_dim * element_bytes
        kv_total += attention.num_kv_heads * per_head
        kv_kept += cached * per_head

    def skipped(layers: list[LayerSparsity], kept: str, total: str) -> float:
        return 1 - sum(getattr(r, kept) for r in layers) / sum(getattr(r, total) for r in layers)

    weight_total = sum(r.weight_bytes for r in rows)
    return EffectiveSparsity(
        layers=tuple(rows),
        heads=skipped(rows, "heads_kept", "heads"),
        neurons=skipped(rows, "neurons_kept", "neurons"),
        weight_bytes=skipped(rows, "weight_bytes_kept", "weight_bytes"),
        kv_bytes=1 - kv_kept / kv_total,
        weight_bytes_skipped=weight_total - sum(r.weight_bytes_kept for r in rows),
        kv_bytes_per_token_skipped=kv_total - kv_kept,
        sparse_layers={"heads": skipped(rows[1:], "heads_kept", "heads"),
                       "neurons": skipped(rows[1:], "neurons_kept", "neurons"),
                       "weight_bytes": skipped(rows[1:], "weight_bytes_kept", "weight_bytes")},
        requested={"heads": config.heads, "neurons": config.neurons},
        padding=empty / slots if slots else 0.0,
    )


class Selector(torch.nn.Module):
    """The selection node of a rewritten graph: scores in, the flat tuple of per-layer index tensors out.

    Output order: kept KV heads of layers 1..L-1, then kept neurons of layers 1..L-1. ``shared_heads``: every row of
    a batch keeps the same KV heads, those of the rows' mean head scores (a batch's cache then holds the same heads
    in every row, which a union of the rows' neurons needs: see :func:`union_of_neurons`).
    """

    def __init__(self, structure: DecoderStructure, config: SparsityConfig, shared_heads: bool = False) -> None:
        super().__init__()
        self.structure = structure
        self.config = config
        self.shared_heads = shared_heads

    def forward(self, head_scores: torch.Tensor, neuron_scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.shared_heads:
            head_scores = head_scores.mean(0, keepdim=True).expand_as(head_scores)
        selection = select(Scores(head_scores, neuron_scores), self.structure, self.config)
        return selection.kv_heads + selection.neurons


def require_layerwise_scope(config: SparsityConfig) -> None:
    """Refuse a scope that a layerwise predictor cannot rank by."""
    if config.scope != "per_layer":
        raise SparsityError("a layerwise (DejaVu-style) predictor scores each layer as it runs, so units cannot "
                            "be ranked across layers; pass scope='per_layer'")


class LayerSelector(torch.nn.Module):
    """The selection node of one layer's heads or neurons, for a predictor that scores each layer from that layer's
    own input as the layer runs (a layerwise predictor): scores ``[..., H]`` or ``[..., F]`` in, kept indices out.

    Layers are ranked one at a time, so the scope must be "per_layer".
    """

    def __init__(self, structure: DecoderStructure, config: SparsityConfig, unit: Literal["kv_heads", "neurons"]):
        super().__init__()
        require_layerwise_scope(config)
        self.structure = structure
        self.config = config
        self.unit = unit

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        one_layer = scores.unsqueeze(-2)
        if self.unit == "kv_heads":
            return kept_kv_groups(one_layer, self.structure, self.config)[0]
        return kept_neurons(one_layer, self.config)[0]
