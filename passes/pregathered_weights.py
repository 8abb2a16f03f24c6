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

GATHERED_OPS = {
    torch.ops.shadowfx.gathered_attention.default: ("kv_heads", ATTENTION_ROLES, "kv_head_idx"),
    torch.ops.shadowfx.gathered_mlp.default: ("neurons", MLP_ROLES, "neuron_idx"),
}


def argument_position(op: torch._ops.OpOverload, argument: str) -> int:
    return [a.name for a in op._schema.arguments].index(argument)


def gathered_ops(gm: GraphModule) -> dict[tuple[int, str], torch.fx.Node]:
    """The per-prompt sparse ops that gather by a selection, keyed by (layer, "kv_heads" | "neurons")."""
    found = {}
    for node in gm.graph.nodes:
        if is_call(node, GATHERED_OPS):
            kind, _, selection = GATHERED_OPS[node.target]
            indices = node.args[argument_position(node.target, selection)]
            if isinstance(indices, torch.fx.Node) and SELECTION_META in indices.meta:
                found[(indices.meta[SELECTION_META][1], kind)] = node
    return found


def require_gathered_ops(graph_pass: GraphPass, gm: GraphModule, structure: DecoderStructure) -> None:
    """Every later layer of ``structure`` must have both per-prompt sparse ops, gathering by a selection."""
    found = gathered_ops(gm)
    op_of = {kind: op.name() for op, (kind, _, _) in GATHERED_OPS.items()}
    missing = [f"{op_of[kind]} of layer {layer.index}" for layer in structure.layers[1:]
               for kind in ("kv_heads", "neurons") if (layer.index, kind) not in found]
    if missing:
        raise PassError(f"{graph_pass.name} needs the per-prompt sparse ops that gather by a selection, which the "
                        f"graph does not have: {', '.join(missing)}; run sparsify_mlp and sparsify_attention (per "
                        "prompt) first")


class PregatheredWeights(GraphPass):
    name = "pregathered_weights"

    def __init__(self, structure: DecoderStructure) -> None:
        self.structure = structure

    def requires(self, gm: GraphModule) -> None:
        require_gathered_ops(self, gm, self.structure)

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        found = gathered_ops(gm)
        anchor = placeholders(gm)[-1]
        changed: dict[int, int] = {}
        for layer in self.structure.layers[1:]:
            for kind in ("kv_heads", "neurons"):
                node = found[(layer.index, kind)]
                _, roles, selection = GATHERED_OPS[node.target]
                args = list(node.args)
                for role in roles:
                    position = argument_position(node.target, role)
                    if position >= len(args) or args[position] is None:
                        continue
                    with graph.inserting_after(anchor):
                        anchor = graph.placeholder(f"compact_{layer.index}_{role}")
                    args[position] = anchor
                args[argument_position(node.target, selection)] = None  # the weights are the kept units already
                node.args = tuple(args)
                changed[layer.index] = changed.get(layer.index, 0) + 1
        for node in placeholders(gm):
            if SELECTION_META in node.meta and not node.users:
                graph.erase_node(node)
        return PassResult(gm, bool(changed), changed)
