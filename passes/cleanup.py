"""Pass: drop what the rewrites left dead (the dense projections, attention cores, activations, unused weights)."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from shadowfx.passes.base import GraphPass, PassResult
from shadowfx.passes.graph import is_call, module_paths
from shadowfx.structure import DecoderStructure

# Export's dtype/shape assertions have no users but count as side effects, so they would keep the replaced dense
# ops alive; the rewritten ops check their own inputs.
_ASSERTIONS = {torch.ops.aten._assert_tensor_metadata.default}


def _has_side_effects(node: torch.fx.Node) -> bool:
    """Only graph inputs/outputs and mutating ops must stay; FX's default also keeps every op tagged as seeded-random
    (SDPA, dropout), which would keep the replaced dense attention alive although it runs without dropout here."""
    if node.op in ("placeholder", "output"):
        return True
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


class Cleanup(GraphPass):
    """Counts removed nodes per layer; key -1 collects those outside the decoder layers."""

    name = "cleanup"

    def __init__(self, structure: DecoderStructure) -> None:
        self.layer_of = {layer.module: layer.index for layer in structure.layers}

    def call(self, gm: GraphModule) -> PassResult:
        before = {node: self._layer(node) for node in gm.graph.nodes}
        for node in list(gm.graph.nodes):
            if is_call(node, _ASSERTIONS):
                gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code(is_impure_node=_has_side_effects)
        gm.delete_all_unused_submodules()
        remaining = set(gm.graph.nodes)
        removed: dict[int, int] = {}
        for node, layer in before.items():
            if node not in remaining:
                removed[layer] = removed.get(layer, 0) + 1
        return PassResult(gm, bool(removed), removed)

    def _layer(self, node: torch.fx.Node) -> int:
        for path in module_paths(node):
            if path in self.layer_of:
                return self.layer_of[path]
        return -1
