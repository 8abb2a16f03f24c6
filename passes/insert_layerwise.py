"""Pass: insert a layerwise (DejaVu-style) predictor: before each later layer's attention and MLP, score that
layer's heads (neurons) from the input its q (up) projection takes, and select them.

Each layer is scored from the states the sparse layers before it produced, so the rewritten graph is causal: no
dense pass runs. Per prompt the predictor reads each row's last position and the selection serves the whole
sequence; per token every position gets its own. The selections are tagged and appended to the graph outputs in the
order :class:`~shadowfx.passes.insert_shadow.InsertShadowPredictor` gives them, so the sparsifying passes and the
runtime treat both kinds alike. Counts, per layer, the selections it put into the graph.
"""

from __future__ import annotations

from torch.fx import GraphModule

from shadowfx.passes.base import GraphPass, PassResult, require_no_selection, require_nodes
from shadowfx.passes.graph import (
    SELECTION_META,
    added_nodes,
    entry_node,
    inserting_after,
    nodes_by_name,
    output_selection,
    per_position,
    placeholders,
    predictor_reads,
    selections_per_layer,
)
from shadowfx.passes.insert_shadow import PREDICTOR_ATTR
from shadowfx.predictor import LayerwisePredictor
from shadowfx.selection import LayerSelector, SparsityConfig
from shadowfx.structure import DecoderStructure

HEAD_SELECTOR_ATTR = "shadow_head_selector"
NEURON_SELECTOR_ATTR = "shadow_neuron_selector"


class InsertLayerwisePredictor(GraphPass):
    name = "insert_layerwise"

    def __init__(self, structure: DecoderStructure, predictor: LayerwisePredictor, config: SparsityConfig, *,
                 per_token: bool = False) -> None:
        self.structure = structure
        self.predictor = predictor
        self.selectors = {HEAD_SELECTOR_ATTR: LayerSelector(structure, config, "kv_heads"),
                          NEURON_SELECTOR_ATTR: LayerSelector(structure, config, "neurons")}
        self.per_token = per_token

    def requires(self, gm: GraphModule) -> None:
        require_nodes(self, gm, {f"layer {layer.index} {role}": projection.node for layer in self.structure.layers[1:]
                                 for role, projection in (("query projection", layer.attention.q),
                                                          ("MLP up projection", layer.mlp.up))})
        require_no_selection(self, gm)

    def call(self, gm: GraphModule) -> PassResult:
        before = set(gm.graph.nodes)
        nodes = nodes_by_name(gm)
        gm.add_submodule(PREDICTOR_ATTR, self.predictor)
        for name, selector in self.selectors.items():
            gm.add_submodule(name, selector)
        graph = gm.graph
        tokens = placeholders(gm)[0]
        for position, layer in enumerate(self.structure.layers[1:]):
            for unit, projection, mlps, selector in (("kv_heads", layer.attention.q, "heads", HEAD_SELECTOR_ATTR),
                                                     ("neurons", layer.mlp.up, "neurons", NEURON_SELECTOR_ATTR)):
                x = entry_node(nodes[projection.node])
                with inserting_after(x):
                    reads, size = predictor_reads(graph, x, tokens, self.per_token)
                    scores = graph.call_module(f"{PREDICTOR_ATTR}.{mlps}.{position}", (reads,))
                    kept = graph.call_module(selector, (per_position(graph, scores, size),))
                kept.meta[SELECTION_META] = (unit, layer.index)
        output_selection(gm, [layer.index for layer in self.structure.layers[1:]])
        return PassResult(gm, True, selections_per_layer(added_nodes(gm, before)))
