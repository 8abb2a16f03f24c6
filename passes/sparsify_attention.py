"""Pass: replace the attention of every later layer with a head-sparse op on the selected KV groups.

The op takes the layer's hidden input, its q/k/v/o weights (a fused QKV is sliced per role), the rotary cos/sin
and their pairing, the attention mask the model built (a masked_fill's mask of the blocked scores becomes the boolean
mask of the attended ones), the scales of per-head query/key norms, the ALiBi slopes and the scores' soft cap. Per
prompt (``shadowfx::gathered_attention``) it computes only the kept KV groups, and the layer's KV cache holds only
the kept heads: the graph's present keys/values become the op's, and a decode graph's past comes from cache inputs
of that size. Per token (``shadowfx::token_sparse_attention``) every token keeps its own groups' queries and outputs
while K/V of all heads are computed, so the cache stays complete.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

from shadowfx.passes.base import GraphPass, PassResult, require_nodes, require_selection
from shadowfx.passes.graph import (
    inserting_after,
    entry_node,
    exit_node,
    graph_outputs,
    nodes_by_name,
    placeholders,
    selection_nodes,
    set_graph_outputs,
    weight_and_bias,
)
from shadowfx.structure import DecoderStructure


def _heads_squeezed(graph: torch.fx.Graph, node: Node, heads_axis: int | None) -> Node:
    """cos/sin as the op takes them, [B, S, rot]: one built broadcast over the heads (GPT-J's [B, S, 1, rot]) has
    that axis squeezed out."""
    if heads_axis is None:
        return node
    squeezed = graph.call_function(aten.squeeze.dim, (node, heads_axis))
    squeezed.meta["val"] = node.meta["val"].squeeze(heads_axis)
    return squeezed


class SparsifyAttention(GraphPass):
    name = "sparsify_attention"

    def __init__(self, structure: DecoderStructure, *, cache: bool, per_token: bool = False) -> None:
        """``cache``: the graph returns the KV cache after the logits (keys of every layer, then values)."""
        self.structure = structure
        self.cache = cache
        self.op = (torch.ops.shadowfx.token_sparse_attention.default if per_token
                   else torch.ops.shadowfx.gathered_attention.default)

    def requires(self, gm: GraphModule) -> None:
        later = self.structure.layers[1:]
        require_selection(self, gm, "kv_heads", [layer.index for layer in later])
        wanted = {}
        for layer in later:
            attention = layer.attention
            for role in ("q", "k", "v", "o"):
                wanted[f"layer {layer.index} attention {role}"] = getattr(attention, role).node
            if attention.rotary:
                wanted[f"layer {layer.index} rotary cos"] = attention.rotary.cos_node
                wanted[f"layer {layer.index} rotary sin"] = attention.rotary.sin_node
            if attention.mask_node:
                wanted[f"layer {layer.index} attention mask"] = attention.mask_node
            for role, norm in (("query", attention.q_norm), ("key", attention.k_norm)):
                if norm is not None:
                    wanted[f"layer {layer.index} {role} norm"] = norm.node
        require_nodes(self, gm, wanted)

    def call(self, gm: GraphModule) -> PassResult:
        nodes = nodes_by_name(gm)
        indices = selection_nodes(gm)
        graph = gm.graph
        num_layers = self.structure.num_layers
        past = {node.name: node for node in placeholders(gm)}
        outputs = graph_outputs(gm)
        rewritten = {}
        for layer in self.structure.layers[1:]:
            attention = layer.attention
            q, k, v, o = (nodes[p.node] for p in (attention.q, attention.k, attention.v, attention.o))
            hidden, last = entry_node(q), exit_node(o)
            rotary = attention.rotary
            with inserting_after(last):
                weights = []
                for projection, node in ((attention.q, q), (attention.k, k), (attention.v, v), (attention.o, o)):
                    weights.extend(weight_and_bias(gm, node, projection))
                mask = nodes[attention.mask_node] if attention.mask_node else None
                if attention.mask_fill is not None:
                    # a fill this low gives the blocked scores zero weight, as a boolean mask does (one that ONNX
                    # export takes); the two differ only on queries that attend to nothing, which are padding
                    mask = graph.call_function(aten.logical_not.default, (mask,))
                slopes = None
                if attention.alibi_slopes is not None:
                    name = f"shadowfx_alibi_slopes_{layer.index}"
                    device = hidden.meta["val"].device
                    gm.register_buffer(name, torch.tensor(attention.alibi_slopes, dtype=torch.float32, device=device))
                    slopes = graph.get_attr(name)
                cos, sin = ((_heads_squeezed(graph, nodes[rotary.cos_node], rotary.heads_axis),
                             _heads_squeezed(graph, nodes[rotary.sin_node], rotary.heads_axis))
                            if rotary else (None, None))
                op = graph.call_function(
                    self.op,
                    (hidden, *weights, indices[("kv_heads", layer.index)], cos, sin,
                     mask,
                     past.get(f"past_keys_{layer.index}"), past.get(f"past_values_{layer.index}"),
                     attention.num_heads, attention.num_kv_heads, attention.head_dim, attention.scaling,
                     *(nodes[norm.node].args[norm.scale_arg] if norm else None
                       for norm in (attention.q_norm, attention.k_norm)),
                     next((n.eps for n in (attention.q_norm, attention.k_norm) if n is not None), 0.0), slopes,
                     attention.softcap or 0.0, bool(rotary and rotary.interleaved)),
                )
                out, key, value = (graph.call_function(operator.getitem, (op, i)) for i in range(3))
            out.meta["nn_module_stack"] = dict(last.meta.get("nn_module_stack", {}))
            last.replace_all_uses_with(out)
            if self.cache:
                outputs[1 + layer.index] = key
                outputs[1 + num_layers + layer.index] = value
            rewritten[layer.index] = 1
        set_graph_outputs(gm, outputs)
        return PassResult(gm, bool(rewritten), rewritten)

