"""Recogniser: the projections of a layer, and the rows of a fused projection that each role takes.

A fused projection (QKV, or gate and up) is taken apart by a split, a chunk or slices of its output's last dim; each
part becomes the :class:`Projection` narrowed to its rows, which the sparse ops slice out of the one weight.
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace

import torch
from torch.fx import Node

from shadowfx.passes.graph import GraphParameters, inputs, is_call, projection_of, shape, users, walk
from shadowfx.structure import Projection

aten = torch.ops.aten


def projections_in(layer_nodes: set[Node], params: GraphParameters) -> dict[Node, Projection]:
    found = {}
    for node in layer_nodes:
        projection = projection_of(node, params)
        if projection is not None:
            found[node] = projection
    return found


def trace_back(start: Node, layer_nodes: set[Node],
               projections: dict[Node, Projection]) -> tuple[list[Node], set[Node]]:
    """The projections ``start`` is computed from, walking back inside the layer, and every node on the way."""
    return walk([start], inputs, within=layer_nodes.__contains__, stop=projections.__contains__)


def between(source: Node, sink: Node, layer_nodes: set[Node]) -> set[Node]:
    """Nodes on some data path from ``source`` (exclusive) to ``sink`` (exclusive)."""
    _, after = walk(users(source), users, within=layer_nodes.__contains__, stop=lambda n: n is sink)
    _, before = walk(inputs(sink), inputs, within=layer_nodes.__contains__, stop=lambda n: n is source)
    return (after & before) - {source, sink}


def reaches(node: Node, target: Node, layer_nodes: set[Node]) -> bool:
    _, seen = walk([node], inputs, within=layer_nodes.__contains__, stop=lambda n: n is target)
    return target in seen


def fused_parts(node: Node, projection: Projection) -> dict[Node, Projection]:
    """The contiguous slices of a fused projection's output features that the graph takes apart (a split, a chunk or
    slices of its last dim, of the projection's output or of a view of it that keeps that dim), each as the
    Projection narrowed to those rows; empty for a projection used whole."""
    width = projection.out_features
    _, forms = walk([node], lambda n: [u for u in users(n) if is_call(u, _FEATURE_KEEPING_OPS)
                                       and shape(u) and shape(u)[-1] == width],
                    within=lambda n: True, stop=lambda n: False)
    parts = {}
    for source in forms | {node}:
        for user in source.users:
            if is_call(user, {aten.slice.Tensor}):
                dim, begin, end, step = (list(user.args[1:]) + [0, None, None, 1][len(user.args) - 1:])[:4]
                if _is_last_dim(dim, source) and step == 1:
                    begin, end = _clamp(begin, width, 0), _clamp(end, width, width)
                    parts[user] = replace(projection, rows=(begin, end))
            elif is_call(user, _SPLIT_OPS) and _is_last_dim(_split_dim(user), source):
                widths = _split_widths(user, width)
                for item in user.users:
                    if item.target is operator.getitem:
                        begin = sum(widths[: item.args[1]])
                        parts[item] = replace(projection, rows=(begin, begin + widths[item.args[1]]))
    return parts


_SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
# Layout ops that leave a projection's output features, in order, on the last dim (a reshape may only regroup the
# dims in front of it).
_FEATURE_KEEPING_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                        aten.squeeze.dim, aten.contiguous.default, aten.clone.default, aten.alias.default,
                        aten.to.dtype, aten._to_copy.default, aten.dropout.default}


def _split_dim(split: Node) -> int:
    return split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)


def _split_widths(split: Node, width: int) -> list[int]:
    sizes = split.args[1]
    if split.target == aten.chunk.default:  # torch.chunk: pieces of ceil(width / chunks), the last one shorter
        sizes = math.ceil(width / sizes)
    if isinstance(sizes, int):
        return [min(sizes, width - begin) for begin in range(0, width, sizes)]
    return list(sizes)


def _is_last_dim(dim: object, source: Node) -> bool:
    return isinstance(dim, int) and dim in (-1, len(shape(source)) - 1)


def _clamp(index: int | None, width: int, default: int) -> int:
    if index is None:
        return default
    return max(0, min(width, index + width if index < 0 else index))


def role_projection(node: Node, projection: Projection, path: set[Node]) -> tuple[Projection, set[Node]]:
    """A fused projection narrowed to the rows this path takes out of it, and the nodes that take them (the split
    and the item, or the slice); a projection used whole as it is, with no such nodes."""
    taken = [(part, narrowed) for part, narrowed in fused_parts(node, projection).items() if part in path]
    if len(taken) != 1:
        return projection, set()
    (part, narrowed), = taken
    return narrowed, {part, part.args[0]} if part.target is operator.getitem else {part}


def common_prefix(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)
