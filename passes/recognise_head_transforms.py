"""Recogniser: what the q/k/v paths compute between a projection and the attention core, per head.

The sparse attention op recomputes the path from the kept heads' projection rows, so everything on it must be
something the op carries (head layout, a constant query scale, a rotate-half rotary embedding, the KV-cache append);
anything else is refused with the layer, the projection and the ops found.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from shadowfx.passes.graph import LAYOUT_OPS, is_call, scalar_args, shape
from shadowfx.structure import Projection, Rotary, StructureError

aten = torch.ops.aten


# What the sparse attention op recomputes between a projection and the attention core: moving and splitting the
# heads, a constant scale of the queries (folded into the scaling), and a rotate-half rotary embedding.
_HEAD_LAYOUT_OPS = LAYOUT_OPS | {operator.getitem, aten.split.Tensor, aten.split_with_sizes.default,
                                 aten._assert_tensor_metadata.default}
_ROTARY_OPS = {aten.neg.default, aten.cat.default, aten.slice.Tensor, aten.mul.Tensor, aten.add.Tensor}


def require_carried(layer: str, projection: Projection, role: str, computing: set[Node], path: set[Node],
                     rotary: bool) -> None:
    """Refuse a q/k/v path that computes anything the sparse op would not recompute (a norm, a soft-cap, ...);
    ``computing`` is the ``path`` without the nodes that take this role's part out of a fused projection."""
    foreign = set()
    for node in computing:
        if node.op != "call_function" or node.target in _HEAD_LAYOUT_OPS:
            continue
        if role == "q" and scalar_factor(node) != 1.0:
            continue
        if rotary and role != "v" and node.target in _ROTARY_OPS and not (
                node.target == aten.mul.Tensor and scalar_args(node)):
            continue
        if role != "q" and _appends_to_cache(node, path):
            continue
        foreign.add(str(node.target))
    if foreign:
        if not rotary and aten.neg.default in {n.target for n in path}:
            foreign.add("a rotary embedding other than rotate-half (e.g. on interleaved pairs)")
        raise StructureError(
            f"layer {layer}: between {projection.module} and the attention core the {role} path computes "
            f"{sorted(foreign)}, which the sparse attention does not recompute (it carries head reshapes, a constant "
            "query scale and a rotate-half rotary embedding)")


def _appends_to_cache(node: Node, path: set[Node]) -> bool:
    """The past key/value cache (computed outside this path: a graph input, or an empty constant in a prefill)
    concatenated in front of this step's keys/values."""
    return (is_call(node, {aten.cat.default}) and len(node.args[0]) == 2
            and node.args[0][0] not in path and node.args[0][1] in path)


def scalar_factor(node: Node) -> float:
    """The constant a node multiplies by (1.0 for everything else)."""
    if node.target == aten.mul.Tensor and len(scalar_args(node)) == 1:
        return scalar_args(node)[0]
    if node.target == aten.div.Tensor and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
        return 1.0 / float(node.args[1])
    return 1.0


def rotary(q_path: set[Node], layer_nodes: set[Node]) -> Rotary | None:
    """Rotary embedding on the query path: ``q * cos + rotate_half(q) * sin`` with cos/sin from outside the layer."""
    if not any(is_call(n, {aten.neg.default}) for n in q_path) or not any(is_call(n, {aten.cat.default}) for n in q_path):
        return None
    for node in q_path:
        muls = [a for a in node.args if is_call(a, {aten.mul.Tensor})] if is_call(node, {aten.add.Tensor}) else []
        if len(muls) != 2:
            continue
        factors = {}
        for mul in muls:
            query_side = [a for a in mul.args if a in q_path]
            factor = [a for a in mul.args if isinstance(a, Node) and a not in q_path]
            if len(query_side) != 1 or len(factor) != 1:
                break
            rotated = is_call(query_side[0], {aten.cat.default})
            factors["sin" if rotated else "cos"] = _outside(factor[0], layer_nodes)
        if len(factors) == 2:
            return Rotary(cos_node=factors["cos"].name, sin_node=factors["sin"].name,
                          rotary_dim=int(shape(factors["cos"])[-1]))
    return None


def _outside(node: Node, layer_nodes: set[Node]) -> Node:
    """Follow a broadcast (unsqueeze/expand) back to the tensor that comes into the layer."""
    while node in layer_nodes and is_call(node, LAYOUT_OPS):
        node = node.args[0]
    return node
