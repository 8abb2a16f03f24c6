"""Pass: let the decode graph's sparse ops read a prompt's pre-gathered weights instead of gathering every step.

Each ``gathered_mlp`` / ``gathered_attention`` of a later layer gets its weights and biases from new graph inputs
(named ``compact_<layer>_<role>``, in the order :func:`shadowfx.compact.compact_weights` produces them) and no
indices; output biases, which are never gathered, come in as inputs too. The selection inputs become unused and go.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from shadowfx.compact import ATTENTION_ROLES, MLP_ROLES
from shadowfx.passes.base import GraphPass, PassError, PassResult
from shadowfx.passes.graph import SELECTION_META, is_call, placeholders
from shadowfx.structure import DecoderStructure

_OPS = {
    torch.ops.shadowfx.gathered_attention.default: ("kv_heads", ATTENTION_ROLES, "kv_head_idx"),
    torch.ops.shadowfx.gathered_mlp.default: ("neurons", MLP_ROLES, "neuron_idx"),
}


def _position(op: torch._ops.OpOverload, argument: str) -> int:
    return [a.name for a in op._schema.arguments].index(argument)


def _gathered_ops(gm: GraphModule) -> dict[tuple[int, str], torch.fx.Node]:
    """The per-prompt sparse ops that gather by a selection, keyed by (layer, "kv_heads" | "neurons")."""
    found = {}
    for node in gm.graph.nodes:
        if is_call(node, _OPS):
            kind, _, selection = _OPS[node.target]
            indices = node.args[_position(node.target, selection)]
            if isinstance(indices, torch.fx.Node) and SELECTION_META in indices.meta:
                found[(indices.meta[SELECTION_META][1], kind)] = node
    return found


class PregatheredWeights(GraphPass):
    name = "pregathered_weights"

    def __init__(self, structure: DecoderStructure) -> None:
        self.structure = structure

    def requires(self, gm: GraphModule) -> None:
        found = _gathered_ops(gm)
        op_of = {kind: op.name() for op, (kind, _, _) in _OPS.items()}
        missing = [f"{op_of[kind]} of layer {layer.index}" for layer in self.structure.layers[1:]
                   for kind in ("kv_heads", "neurons") if (layer.index, kind) not in found]
        if missing:
            raise PassError(f"{self.name} needs the per-prompt sparse ops that gather by a selection, which the graph "
                            f"does not have: {', '.join(missing)}; run sparsify_mlp and sparsify_attention "
                            "(per prompt) first")

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        found = _gathered_ops(gm)
        anchor = placeholders(gm)[-1]
        changed: dict[int, int] = {}
        for layer in self.structure.layers[1:]:
            for kind in ("kv_heads", "neurons"):
                node = found[(layer.index, kind)]
                _, roles, selection = _OPS[node.target]
                args = list(node.args)
                for role in roles:
                    position = _position(node.target, role)
                    if position >= len(args) or args[position] is None:
                        continue
                    with graph.inserting_after(anchor):
                        anchor = graph.placeholder(f"compact_{layer.index}_{role}")
                    args[position] = anchor
                args[_position(node.target, selection)] = None  # the weights are the kept units already
                node.args = tuple(args)
                changed[layer.index] = changed.get(layer.index, 0) + 1
        for node in placeholders(gm):
            if SELECTION_META in node.meta and not node.users:
                graph.erase_node(node)
        return PassResult(gm, bool(changed), changed)
