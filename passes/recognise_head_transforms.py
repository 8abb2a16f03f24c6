"""Recogniser: what the q/k/v paths compute between a projection and the attention core, per head.

The sparse attention op recomputes the path from the kept heads' projection rows, so everything on it must be
something the op carries (head layout, a constant query scale, an RMSNorm of each query/key head, a rotary
embedding on halves or on interleaved pairs, the KV-cache append); anything else is refused with the layer, the
projection and the ops found.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
from torch.fx import Node

from shadowfx.passes.graph import LAYOUT_OPS, GraphParameters, inputs, is_call, scalar_args, shape, walk
from shadowfx.passes.recognise_projections import between
from shadowfx.structure import HeadNorm, Projection, Rotary, StructureError

aten = torch.ops.aten


# What the sparse attention op recomputes between a projection and the attention core: moving and splitting the
# heads, a constant scale of the queries (folded into the scaling), and a rotary embedding (on halves or pairs).
_HEAD_LAYOUT_OPS = LAYOUT_OPS | {operator.getitem, aten.split.Tensor, aten.split_with_sizes.default,
                                 aten._assert_tensor_metadata.default}
_ROTARY_OPS = {aten.neg.default, aten.cat.default, aten.slice.Tensor, aten.mul.Tensor, aten.add.Tensor,
               aten.stack.default, aten.flatten.using_ints}


def require_carried(layer: str, projection: Projection, role: str, computing: set[Node], path: set[Node],
                     rotary: bool) -> None:
    """Refuse a q/k/v path that computes anything the sparse op would not recompute (a norm, a soft-cap, ...);
    ``computing`` is the ``path`` without the nodes that take this role's part out of a fused projection and
    without those of a recognised per-head norm."""
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
            foreign.add("a rotary embedding other than on halves or interleaved pairs")
        raise StructureError(
            f"layer {layer}: between {projection.module} and the attention core the {role} path computes "
            f"{sorted(foreign)}, which the sparse attention does not recompute (it carries head reshapes, a constant "
            "query scale, an RMSNorm of each query/key head and a rotary embedding on halves or interleaved pairs)")


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


def rotary(layer: str, q_path: set[Node], layer_nodes: set[Node]) -> Rotary | None:
    """Rotary embedding on the query path: ``q * cos + rotate(q) * sin`` with cos/sin computed from positions, where
    rotate(q) is ``cat(-q2, q1)`` of the halves, or ``stack(-q_odd, q_even).flatten()`` of interleaved pairs."""
    if not (any(is_call(n, {aten.neg.default}) for n in q_path)
            and any(is_call(n, {aten.cat.default, aten.stack.default}) for n in q_path)):
        return None
    for node in q_path:
        muls = [a for a in node.args if is_call(a, {aten.mul.Tensor})] if is_call(node, {aten.add.Tensor}) else []
        if len(muls) != 2:
            continue
        factors, interleaved, heads_axis = {}, False, None
        for mul in muls:
            query_side = [a for a in mul.args if a in q_path]
            factor = [a for a in mul.args if isinstance(a, Node) and a not in q_path]
            if len(query_side) != 1 or len(factor) != 1:
                break
            pairs = _pairs_turned(query_side[0])
            rotated = pairs or is_call(query_side[0], {aten.cat.default})
            interleaved |= pairs
            factors["sin" if rotated else "cos"] = _outside(factor[0], layer_nodes)
            heads_axis = _heads_axis(layer, factors["sin" if rotated else "cos"], query_side[0])
        if len(factors) == 2:
            return Rotary(cos_node=factors["cos"].name, sin_node=factors["sin"].name,
                          rotary_dim=int(shape(factors["cos"])[-1]), interleaved=interleaved, heads_axis=heads_axis)
    return None


def _heads_axis(layer: str, factor: Node, query: Node) -> int | None:
    """None for cos/sin of shape [B, S, rot]; for one built [B, 1, S, rot] or [B, S, 1, rot] beside the heads in
    the layer (GPT-J, GLM), the axis of the heads it broadcasts over, which the sparse op squeezes out."""
    sizes, query_sizes = shape(factor), shape(query)
    if len(sizes) == 3:
        return None
    # the heads' axis is static; in a decode step the sequence axis is 1 on both sides
    axes = [axis for axis in (1, 2) if len(sizes) == 4 and sizes[axis] == 1 and query_sizes[axis] != 1]
    if len(axes) != 1:
        raise StructureError(f"layer {layer}: the rotary embedding's {factor.name} has shape {tuple(sizes)} beside "
                             f"heads of shape {tuple(query_sizes)}; the sparse attention takes cos/sin as [B, S, rot] "
                             "or broadcast over the heads' axis")
    return axes[0]


def same_rotary(a: Rotary | None, b: Rotary | None, graph: torch.fx.Graph) -> bool:
    """Whether two paths' rotary embeddings are the same: equal but for their cos/sin nodes, and those computed
    alike (GPT-J builds them once per path, from the same positions)."""
    if a is None or b is None:
        return a is b
    nodes = {n.name: n for n in graph.nodes}
    return (replace(a, cos_node=b.cos_node, sin_node=b.sin_node) == b
            and all(_computed_alike(nodes[x], nodes[y]) for x, y in ((a.cos_node, b.cos_node),
                                                                      (a.sin_node, b.sin_node))))


def _computed_alike(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_computed_alike(x, y) for x, y in zip(a, b))
    if not (isinstance(a, Node) and isinstance(b, Node)) or a is b:
        return a is b or a == b
    return (a.op == b.op == "call_function" and a.target == b.target and a.kwargs == b.kwargs
            and _computed_alike(a.args, b.args))


def _pairs_turned(node: Node) -> bool:
    """``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)``: each interleaved pair turned a quarter."""
    if not (is_call(node, {aten.flatten.using_ints}) and is_call(node.args[0], {aten.stack.default})):
        return False
    parts = node.args[0].args[0]
    if not (len(parts) == 2 and is_call(parts[0], {aten.neg.default}) and is_call(parts[1], {aten.slice.Tensor})
            and is_call(parts[0].args[0], {aten.slice.Tensor})):
        return False
    odd, even = parts[0].args[0], parts[1]
    return (odd.args[0] is even.args[0] and tuple(odd.args[2:]) in _EVERY_SECOND_FROM[1]
            and tuple(even.args[2:]) in _EVERY_SECOND_FROM[0])


# slice(x, dim, start, end, step) arguments after dim that take every second feature from 0 or 1 to the end
_EVERY_SECOND_FROM = {start: ((start, None, 2), (start, 2**63 - 1, 2)) for start in (0, 1)}


def _outside(node: Node, layer_nodes: set[Node]) -> Node:
    """Follow a broadcast (unsqueeze/expand) back to the tensor that comes into the layer."""
    while node in layer_nodes and is_call(node, LAYOUT_OPS):
        node = node.args[0]
    return node


_RMS_NORM_OPS = {aten.pow.Tensor_Scalar, aten.mean.dim, aten.add.Tensor, aten.rsqrt.default, aten.mul.Tensor,
                 aten.type_as.default}


def head_norm(layer: str, projection: Projection, role: str, path: set[Node], head_dim: int,
              params: GraphParameters) -> tuple[HeadNorm | None, set[Node]]:
    """The RMSNorm of each head on a q/k path, ``x * rsqrt(mean(x^2, -1) + eps) * scale`` over ``head_dim``
    features, and its nodes; (None, no nodes) on a path without one. A norm over all heads at once (OLMo 2's, of
    the whole projection) or one applied after the rotary embedding is refused: the sparse op normalises each kept
    head before its rotary embedding."""
    statistics = [n for n in path if is_call(n, {aten.rsqrt.default})]
    if not statistics:
        return None, set()
    where = f"layer {layer}: the {role} path of {projection.module}"
    eps_add = statistics[0].args[0]
    mean = next((a for a in eps_add.args if isinstance(a, Node)), None) if is_call(eps_add, {aten.add.Tensor}) else None
    square = mean.args[0] if is_call(mean, {aten.mean.dim}) else None
    if len(statistics) != 1 or len(scalar_args(eps_add)) != 1 or not (
            is_call(square, {aten.pow.Tensor_Scalar}) and scalar_args(square) == [2]):
        raise StructureError(f"{where} normalises in a way shadowfx does not recognise "
                             f"({len(statistics)} rsqrt, not of mean(x^2) + eps); only RMSNorm is carried")
    x = square.args[0]
    if list(mean.args[1]) not in ([-1], [len(shape(x)) - 1]) or shape(x)[-1] != head_dim or len(shape(x)) != 4:
        raise StructureError(f"{where} normalises over {shape(x)[-1]} features of shape {list(shape(x))}, not over "
                             f"each head's {head_dim}: a norm across heads cannot be computed from the kept heads "
                             "alone, so this family cannot be sparsified per head")
    _, before = walk([x], inputs, within=path.__contains__, stop=lambda n: False)
    if any(is_call(n, {aten.neg.default}) for n in before):
        raise StructureError(f"{where} normalises each head after the rotary embedding; the sparse op normalises "
                             "before it")
    scale, nodes = _norm_scale(x, statistics[0], path)
    if scale is None:
        raise StructureError(f"{where} normalises each head but then computes "
                             f"{sorted(str(n.target) for n in nodes)} instead of multiplying by a weight")
    scale_arg = next(i for i, a in enumerate(scale.args[:2]) if a not in path)
    weight = _parameter_behind(scale.args[scale_arg], params)
    if weight is None:
        raise StructureError(f"{where} multiplies the normalised heads by {scale.args[scale_arg]}, which is not a "
                             "weight of the model")
    return HeadNorm(weight=weight, eps=float(scalar_args(eps_add)[0]), node=scale.name, scale_arg=scale_arg), nodes


def _norm_scale(x: Node, rsqrt: Node, path: set[Node]) -> tuple[Node | None, set[Node]]:
    """The multiply by the norm's weight that follows ``x * rsqrt`` on the path, and the norm's nodes after ``x``
    up to it (and a cast after it); (None, the nodes found) if the norm computes anything else on the way."""
    normalising = [u for u in rsqrt.users if u in path]
    failed = None, {rsqrt, *normalising}
    if len(normalising) != 1 or not is_call(normalising[0], {aten.mul.Tensor}):
        return failed
    scale = normalising[0]
    while True:  # through casts (and multiplies of path tensors) to the multiply by one tensor from off the path
        after = [u for u in scale.users if u in path]
        if len(after) != 1 or not is_call(after[0], _HEAD_LAYOUT_OPS | {aten.mul.Tensor}):
            return failed
        scale = after[0]
        if is_call(scale, {aten.mul.Tensor}) and sum(a in path for a in scale.args[:2]) == 1:
            break
    last = scale
    while len(last.users) == 1 and is_call(next(iter(last.users)), {aten.type_as.default, aten.to.dtype}):
        last = next(iter(last.users))
    nodes = between(x, last, path) | {last}
    unexpected = {n for n in nodes if n.op == "call_function" and n.target not in _RMS_NORM_OPS | _HEAD_LAYOUT_OPS}
    return (None, unexpected) if unexpected else (scale, nodes)


def _parameter_behind(node: Node, params: GraphParameters) -> str | None:
    """The model weight a norm scale is (through casts and Gemma's ``1 +``), or None."""
    while isinstance(node, Node) and params.name(node) is None and (
            is_call(node, LAYOUT_OPS) or (is_call(node, {aten.add.Tensor}) and len(scalar_args(node)) == 1)):
        node = next(a for a in node.args if isinstance(a, Node))
    return params.name(node) if isinstance(node, Node) else None
