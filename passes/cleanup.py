"""Pass: drop what the rewrites left dead (the dense projections, attention cores, activations, unused weights)."""

from __future__ import annotations

import functools

import torch
from torch.fx import GraphModule

from shadowfx.passes.base import GraphPass, PassResult
from shadowfx.passes.graph import is_call, layer_indexer
from shadowfx.structure import DecoderStructure

# Export's dtype/shape assertions have no users but count as side effects, so they would keep the replaced dense
# ops alive; the rewritten ops check their own inputs.
_ASSERTIONS = {torch.ops.aten._assert_tensor_metadata.default}
# detach_ only drops autograd history, which an inference graph has none of: unused, it is dead (export puts one on
# every lifted constant, such as the empty tensors a DynamicCache starts each layer from)
_AUTOGRAD_ONLY = {torch.ops.aten.detach_.default}
_CONSTANT_COPIES = {torch.ops.aten.lift_fresh_copy.default, torch.ops.aten.detach_.default}


def _has_side_effects(node: torch.fx.Node) -> bool:
    """Only graph inputs/outputs and mutating ops must stay; FX's default also keeps every op tagged as seeded-random
    (SDPA, dropout), which would keep the replaced dense attention alive although it runs without dropout here."""
    if node.op in ("placeholder", "output"):
        return True
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable and target not in _AUTOGRAD_ONLY


def _empty_constant(gm: GraphModule, node: object) -> bool:
    """Whether ``node`` is (a detached copy of) a graph constant with no elements."""
    while isinstance(node, torch.fx.Node) and is_call(node, _CONSTANT_COPIES):
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return False
    constant = functools.reduce(lambda owner, name: getattr(owner, name, None), str(node.target).split("."), gm)
    return isinstance(constant, torch.Tensor) and constant.numel() == 0


def _drop_empty_concatenations(gm: GraphModule) -> None:
    """cat([empty, x]) -> x: a DynamicCache built from past tensors concatenates each onto an empty one, which
    copies the layer's whole past KV cache every decode step for nothing."""
    for node in list(gm.graph.nodes):
        if not is_call(node, {torch.ops.aten.cat.default}):
            continue
        kept = [part for part in node.args[0] if not _empty_constant(gm, part)]
        if len(kept) == 1 and len(node.args[0]) > 1 and _same_dtype(node, kept[0]):  # cat promotes dtypes
            node.replace_all_uses_with(kept[0])


def _same_dtype(node: torch.fx.Node, other: object) -> bool:
    value, other_value = node.meta.get("val"), getattr(other, "meta", {}).get("val")
    return isinstance(value, torch.Tensor) and isinstance(other_value, torch.Tensor) and (
        value.dtype == other_value.dtype)


class Cleanup(GraphPass):
    """Counts removed nodes per layer; key -1 collects those outside the decoder layers."""

    name = "cleanup"

    def __init__(self, structure: DecoderStructure) -> None:
        self.layer_of = layer_indexer(structure)

    def call(self, gm: GraphModule) -> PassResult:
        before = {node: self.layer_of(node) for node in gm.graph.nodes}
        for node in list(gm.graph.nodes):
            if is_call(node, _ASSERTIONS):
                gm.graph.erase_node(node)
        _drop_empty_concatenations(gm)
        gm.graph.eliminate_dead_code(is_impure_node=_has_side_effects)
        gm.delete_all_unused_submodules()
        remaining = set(gm.graph.nodes)
        removed: dict[int, int] = {}
        for node, layer in before.items():
            if node not in remaining:
                removed[layer] = removed.get(layer, 0) + 1
        return PassResult(gm, bool(removed), removed)
