"""Pass: run the projections that no selection touches (layer 0's, the LM head) as ``shadowfx::dense_linear``.

The op computes what ``aten.linear`` does. A batch of one's decode step reads each of these weights once for one
token, which the native kernel streams faster than ``F.linear`` does (:func:`shadowfx.native.gemv`); on a
per-token decode step the LM head alone is a fifth of the bytes read. So does the LM head of a prefill that computes
the next token's logits only (``logit_positions``). An ONNX export writes the op as the standard
ops of ``aten.linear``, the same nodes a dense export has.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from shadowfx.passes.base import GraphPass, PassResult
from shadowfx.passes.graph import is_call, layer_indexer, shape
from shadowfx.structure import DecoderStructure

aten = torch.ops.aten


class DenseLinears(GraphPass):
    """Counts the projections it routes per layer; key -1 collects those outside the decoder layers."""

    name = "dense_linears"

    def __init__(self, structure: DecoderStructure, only: set[str] | None = None) -> None:
        """``only``: the names of the nodes to route, if not every one (a prefill's other projections see many
        tokens, where the op would only add its dispatch to F.linear's)."""
        self.layer_of = layer_indexer(structure)
        self.only = only

    def call(self, gm: GraphModule) -> PassResult:
        routed: dict[int, int] = {}
        for node in gm.graph.nodes:
            if self.only is not None and node.name not in self.only:
                continue
            # a weight held by the module (a parameter), 2-D; a weight computed in the graph stays with aten
            if is_call(node, {aten.linear.default}) and node.args[1].op == "get_attr" and len(shape(node.args[1])) == 2:
                node.target = torch.ops.shadowfx.dense_linear.default
                layer = self.layer_of(node)
                routed[layer] = routed.get(layer, 0) + 1
        return PassResult(gm, bool(routed), routed)
