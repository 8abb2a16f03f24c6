"""Pass: insert the shadow predictor and the selection node after layer 0's attention context.

Per prompt, the predictor reads the context of the last position (prompts are left-padded, so it is every row's last
prompt token) and one selection serves the whole sequence. Per token, it reads every position's context and each
token gets its own selection. The selection node's per-layer index tensors feed the sparsifying passes and are also
appended to the graph outputs, so a runtime can reuse a prompt's selection while decoding and report what it skipped.
Counts the predictor calls it put into the graph, under layer 0 (whose context they read).
"""

from __future__ import annotations

import operator

from torch import nn
from torch.fx import GraphModule

from shadowfx.passes.base import GraphPass, PassResult, require_no_selection, require_nodes
from shadowfx.passes.graph import (
    SELECTION_META,
    added_nodes,
    inserting_after,
    nodes_by_name,
    output_selection,
    per_position,
    placeholders,
    predictor_reads,
)
from shadowfx.structure import DecoderStructure

PREDICTOR_ATTR = "shadow_predictor"
SELECTOR_ATTR = "shadow_selector"


class InsertShadowPredictor(GraphPass):
    name = "insert_shadow"

    def __init__(self, structure: DecoderStructure, predictor: nn.Module, selector: nn.Module, *,
                 per_token: bool = False) -> None:
        self.structure = structure
        self.predictor = predictor
        self.selector = selector
        self.per_token = per_token

    def requires(self, gm: GraphModule) -> None:
        require_nodes(self, gm, {"layer 0 attention context": self.structure.predictor_input_node})
        require_no_selection(self, gm)

    def call(self, gm: GraphModule) -> PassResult:
        before = set(gm.graph.nodes)
        context = nodes_by_name(gm)[self.structure.predictor_input_node]
        gm.add_submodule(PREDICTOR_ATTR, self.predictor)
        gm.add_submodule(SELECTOR_ATTR, self.selector)
        graph = gm.graph
        later = [layer.index for layer in self.structure.layers[1:]]
        with inserting_after(context):
            reads, size = predictor_reads(graph, context, placeholders(gm)[0], self.per_token)
            scores = graph.call_module(PREDICTOR_ATTR, (reads,))
            head_scores, neuron_scores = (per_position(graph, graph.call_function(operator.getitem, (scores, i)), size)
                                          for i in (0, 1))
            selected = graph.call_module(SELECTOR_ATTR, (head_scores, neuron_scores))
        anchor = selected
        for position, tag in enumerate([("kv_heads", i) for i in later] + [("neurons", i) for i in later]):
            with inserting_after(anchor):
                anchor = graph.call_function(operator.getitem, (selected, position))
            anchor.meta[SELECTION_META] = tag
        output_selection(gm, later)
        predictors = [node for node in added_nodes(gm, before)
                      if node.op == "call_module" and node.target == PREDICTOR_ATTR]
        return PassResult(gm, True, {self.structure.layers[0].index: len(predictors)})
