"""Pass: make a prompt's selection an input of the decode graph (a per-prompt selection is chosen at prefill).

Adds one placeholder per later layer for the kept KV heads and one for the kept neurons, after the cache inputs,
in the order the prefill graph outputs them. Counts, per layer, the selection inputs it put into the graph.
"""

from __future__ import annotations

from torch.fx import GraphModule

from shadowfx.passes.base import GraphPass, PassResult, require_no_selection
from shadowfx.passes.graph import SELECTION_META, added_nodes, placeholders, selections_per_layer
from shadowfx.structure import DecoderStructure


class AddSelectionInputs(GraphPass):
    name = "selection_inputs"

    def __init__(self, structure: DecoderStructure) -> None:
        self.structure = structure

    def requires(self, gm: GraphModule) -> None:
        require_no_selection(self, gm)

    def call(self, gm: GraphModule) -> PassResult:
        before = set(gm.graph.nodes)
        later = [layer.index for layer in self.structure.layers[1:]]
        anchor = placeholders(gm)[-1]
        for kind in ("kv_heads", "neurons"):
            for index in later:
                with gm.graph.inserting_after(anchor):
                    anchor = gm.graph.placeholder(f"{kind}_{index}")
                anchor.meta[SELECTION_META] = (kind, index)
        added = selections_per_layer(added_nodes(gm, before))
        return PassResult(gm, bool(added), added)
