"""Recogniser: a layer's MLP, plain (up, down) or gated (gate, up, down; gate and up possibly fused), and its
activation."""

from __future__ import annotations

import torch
from torch.fx import Node

from shadowfx.passes.graph import LAYOUT_OPS, GraphParameters, entry_node, is_call, projection_input
from shadowfx.passes.recognise_activation import activation_of
from shadowfx.passes.recognise_projections import between, fused_parts, projections_in, reaches, trace_back
from shadowfx.structure import AttentionStructure, MLPStructure, Projection, StructureError

aten = torch.ops.aten


def mlp_structure(layer: str, attention: AttentionStructure, layer_nodes: set[Node],
                  params: GraphParameters) -> MLPStructure:
    """The MLP of one layer: the projections besides the attention's, which is down, and (gated) which is the gate."""
    projections = projections_in(layer_nodes, params)
    attention_nodes = {attention.q.node, attention.k.node, attention.v.node, attention.o.node}
    mlp = {n: p for n, p in projections.items() if n.name not in attention_nodes}
    if len(mlp) not in (2, 3):
        raise StructureError(f"layer {layer}: expected an MLP of 2 (up, down) or 3 (gate, up, down) projections "
                             f"besides the attention, found {len(mlp)}: "
                             f"{sorted(p.module for p in mlp.values()) or 'none'}")
    feeds: dict[Node, list[Node]] = {}
    for node in mlp:
        reached, _ = trace_back(projection_input(node), layer_nodes, projections)
        feeds[node] = [r for r in reached if r in mlp]
    downs = [n for n, fed in feeds.items() if fed]
    if len(downs) != 1 or sorted(feeds[downs[0]], key=str) != sorted((n for n in mlp if n is not downs[0]), key=str):
        raise StructureError(f"layer {layer}: cannot tell the MLP's down projection among "
                             f"{sorted(p.module for p in mlp.values())}")
    down_node = downs[0]
    down, feeders = mlp[down_node], feeds[down_node]
    intermediate = entry_node(down_node)
    if len(feeders) == 2:
        gate_node, up_node, activation = _gate_and_up(layer, feeders, intermediate, layer_nodes)
        up, gate = mlp[up_node], mlp[gate_node]
    else:
        up, gate, activation = _up_or_fused_gate_up(layer, feeders[0], mlp[feeders[0]], intermediate, layer_nodes)
    if down.in_features != up.width or (gate is not None and gate.width != up.width):
        raise StructureError(f"layer {layer}: MLP widths disagree (up {up.width}, down takes {down.in_features}"
                             + (f", gate {gate.width}" if gate else "") + ")")
    return MLPStructure(kind="gated" if gate else "plain", up=up, gate=gate, down=down, activation=activation,
                        intermediate_size=up.width, intermediate_node=intermediate.name)


def _up_or_fused_gate_up(layer: str, node: Node, projection: Projection, intermediate: Node,
                         layer_nodes: set[Node]) -> tuple[Projection, Projection | None, str]:
    """The MLP's one input projection: an up projection (plain MLP), or gate and up fused into one whose output is
    taken apart in two halves that multiply (Phi-3's ``gate_up_proj``)."""
    path = between(node, intermediate, layer_nodes) | {intermediate}
    parts = {part: narrowed for part, narrowed in fused_parts(node, projection).items() if part in path}
    if not parts:
        return projection, None, activation_of(layer, path)
    if len(parts) != 2:
        raise StructureError(f"layer {layer}: the MLP takes {len(parts)} parts out of {projection.module}, expected "
                             "a fused gate and up projection in two parts")
    gate_part, up_part, activation = _gate_and_up(layer, list(parts), intermediate, layer_nodes)
    return parts[up_part], parts[gate_part], activation


def _gate_and_up(layer: str, feeders: list[Node], intermediate: Node, layer_nodes: set[Node]):
    """In a gated MLP, the gate is the projection that passes through the activation before the multiply."""
    first, second = feeders

    def is_merge(node: Node) -> bool:
        if not is_call(node, {aten.mul.Tensor}) or not all(isinstance(a, Node) for a in node.args[:2]):
            return False
        a, b = node.args[:2]
        return (reaches(a, first, layer_nodes) and reaches(b, second, layer_nodes)) or (
            reaches(a, second, layer_nodes) and reaches(b, first, layer_nodes))

    merges = [n for n in between(first, intermediate, layer_nodes) | {intermediate} if is_merge(n)]
    if not merges:
        raise StructureError(f"layer {layer}: the two MLP input projections never multiply, so the gated MLP is "
                             "not recognised")
    # the first multiply in graph order, so the answer does not depend on the order of a set
    order = {n: i for i, n in enumerate(first.graph.nodes)}
    merge = min(merges, key=order.__getitem__)
    after = {n for n in between(merge, intermediate, layer_nodes) | ({intermediate} - {merge})
             if n.op == "call_function" and n.target not in LAYOUT_OPS}
    if after:
        raise StructureError(f"layer {layer}: between the gated MLP's multiply and its down projection the MLP "
                             f"computes {sorted(str(n.target) for n in after)}, which the sparse MLP does not "
                             "recompute")
    paths = {f: between(f, merge, layer_nodes) for f in feeders}
    computing = {f: {n for n in path if n.target not in LAYOUT_OPS} for f, path in paths.items()}
    gates = [f for f, ops in computing.items() if ops]
    if len(gates) != 1:
        raise StructureError(f"layer {layer}: cannot tell the gate from the up projection in the gated MLP "
                             f"(activations on {len(gates)} branches)")
    gate = gates[0]
    up = second if gate is first else first
    return gate, up, activation_of(layer, computing[gate])
