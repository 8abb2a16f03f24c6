"""Pass: replace the MLP of every later layer with ``shadowfx::gathered_mlp`` on the selected neurons."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from shadowfx.passes.base import GraphPass, PassResult, require_nodes, require_selection
from shadowfx.passes.graph import (
    inserting_after,
    entry_node,
    exit_node,
    nodes_by_name,
    placeholders,
    selection_nodes,
    shape,
    weight_and_bias,
)
from shadowfx.structure import DecoderStructure

aten = torch.ops.aten


class SparsifyMLP(GraphPass):
    name = "sparsify_mlp"

    def __init__(self, structure: DecoderStructure) -> None:
        self.structure = structure

    def requires(self, gm: GraphModule) -> None:
        later = self.structure.layers[1:]
        require_selection(self, gm, "neurons", [layer.index for layer in later])
        require_nodes(self, gm, {f"layer {layer.index} MLP {role}": projection.node for layer in later
                                 for role, projection in (("up", layer.mlp.up), ("gate", layer.mlp.gate),
                                                          ("down", layer.mlp.down)) if projection is not None})

    def call(self, gm: GraphModule) -> PassResult:
        nodes = nodes_by_name(gm)
        indices = selection_nodes(gm)
        graph = gm.graph
        tokens = placeholders(gm)[0]  # input_ids [B, S]
        rewritten = {}
        for layer in self.structure.layers[1:]:
            mlp = layer.mlp
            up, down = nodes[mlp.up.node], nodes[mlp.down.node]
            x, last = entry_node(up), exit_node(down)
            hidden = self.structure.hidden_size
            with inserting_after(last):
                flat = len(shape(x)) == 2  # some models (OPT) run the MLP on [B * S, E]
                if flat:
                    size = [graph.call_function(aten.sym_size.int, (tokens, d)) for d in (0, 1)]
                    x = graph.call_function(aten.view.default, (x, [*size, hidden]))
                up_weight, up_bias = weight_and_bias(gm, up, mlp.up)
                gate_weight, gate_bias = (weight_and_bias(gm, nodes[mlp.gate.node], mlp.gate)
                                          if mlp.gate else (None, None))
                down_weight, down_bias = weight_and_bias(gm, down, mlp.down)
                out = graph.call_function(
                    torch.ops.shadowfx.gathered_mlp.default,
                    (x, up_weight, up_bias, gate_weight, gate_bias, down_weight, down_bias,
                     indices[("neurons", layer.index)], mlp.activation),
                )
                if flat:
                    out = graph.call_function(aten.view.default, (out, [-1, hidden]))
            out.meta["nn_module_stack"] = dict(last.meta.get("nn_module_stack", {}))
            last.replace_all_uses_with(out)
            rewritten[layer.index] = 1
        return PassResult(gm, bool(rewritten), rewritten)
