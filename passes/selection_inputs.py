"""Pass: make a prompt's selection an input of the decode graph (a per-prompt selection is chosen at prefill).

Adds one placeholder per later layer for the kept KV heads and one for the kept neurons, after the cache inputs,
in the order the prefill graph outputs them.
"""

from __future__ import annotations

from torch.fx import GraphModule

from shadowfx.passes.base import GraphPass, PassResult
from shadowfx.passes.graph import SELECTION_META, placeholders
from shadowfx.structure import DecoderStructure


class AddSelectionInputs(GraphPass):
    name = "selection_inputs"

    def __init__(self, structure: DecoderStructure) -> None:
        self.structure = structure

    def run(self, gm: GraphModule) -> PassResult:
        later = [layer.index for layer in self.structure.layers[1:]]
        anchor = placeholders(gm)[-1]
        added = {}
        for kind in ("kv_heads", "neurons"):
            for index in later:
                with gm.graph.inserting_after(anchor):
                    anchor = gm.graph.placeholder(f"{kind}_{index}")
                anchor.meta[SELECTION_META] = (kind, index)
                added[index] = added.get(index, 0) + 1
        return PassResult(gm, True, added)
