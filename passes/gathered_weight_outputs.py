"""Pass: let the per-prompt prefill gather each later layer's kept weights once, compute on them, and return them.

Without it, a generation gathers every kept weight twice before its first token: inside each sparse op of the
prefill, then again for the decode steps (:func:`shadowfx.compact.compact_weights`). Here each ``gathered_mlp`` /
``gathered_attention`` of a later layer gets its weights from gather nodes placed before it (per batch row,
``[B, n, ...]``, as :func:`shadowfx.compact.gather_units` takes them), runs on them with no indices, and the graph
returns them after its other outputs, in the order the pre-gathered decode graph takes them (the
``pregathered_weights`` pass): per later layer, the attention's roles, then the MLP's, output biases whole.
"""

from __future__ import annotations

from torch.fx import GraphModule

from shadowfx.compact import gather_units, role_gathers
from shadowfx.passes.base import GraphPass, PassResult
from shadowfx.passes.graph import graph_outputs, set_graph_outputs
from shadowfx.passes.pregathered_weights import GATHERED_OPS, argument_position, gathered_ops, require_gathered_ops
from shadowfx.structure import DecoderStructure


class GatheredWeightOutputs(GraphPass):
    name = "gathered_weight_outputs"

    def __init__(self, structure: DecoderStructure) -> None:
        self.structure = structure

    def requires(self, gm: GraphModule) -> None:
        require_gathered_ops(self, gm, self.structure)

    def call(self, gm: GraphModule) -> PassResult:
        found = gathered_ops(gm)
        kept: list = []
        changed: dict[int, int] = {}
        for layer in self.structure.layers[1:]:
            gathers = role_gathers(layer)
            for kind in ("kv_heads", "neurons"):
                node = found[(layer.index, kind)]
                _, roles, selection = GATHERED_OPS[node.target]
                args = list(node.args)
                units = args[argument_position(node.target, selection)]
                for role in roles:
                    position = argument_position(node.target, role)
                    if position >= len(args) or args[position] is None:
                        continue
                    how = gathers[role]
                    if how.selection is not None:
                        with gm.graph.inserting_before(node):
                            args[position] = gm.graph.call_function(
                                gather_units, (args[position], units, how.unit_rows, how.output))
                    kept.append(args[position])
                args[argument_position(node.target, selection)] = None  # the weights are the kept units now
                node.args = tuple(args)
                changed[layer.index] = changed.get(layer.index, 0) + 1
        set_graph_outputs(gm, graph_outputs(gm) + kept)
        return PassResult(gm, bool(changed), changed)
