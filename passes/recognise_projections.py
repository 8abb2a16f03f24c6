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
    """The parts of a fused projection's output features that the graph takes apart, each as the Projection narrowed
    to its rows; empty for a projection used whole.

    A part is a split, a chunk or a slice of the last dim of the projection's output (or of a view of it that keeps
    that dim): contiguous rows. When a view first splits the features into ``[..., n, F / n]`` blocks (heads) and a
    split or chunk takes each block apart, a part's rows repeat every block (``Projection.blocks``); slices of a
    block are not parts (they are what a rotary embedding takes of each head).
    """
    width = projection.out_features
    parts = {}
    for source in _forms(node, width):
        parts |= _taken_apart(source, width, projection)
        for user in source.users:
            blocks = _block_view(user, source, width)
            if blocks is not None:
                for form in _forms(user, blocks[1]):
                    parts |= _taken_apart(form, blocks[1], projection, blocks)
    return parts


def _forms(node: Node, width: int) -> set[Node]:
    """``node`` and the views of it that keep its ``width`` features, in order, on the last dim."""
    _, forms = walk([node], lambda n: [u for u in users(n) if _keeps_last_dim(u) and shape(u)
                                       and shape(u)[-1] == width],
                    within=lambda n: True, stop=lambda n: False)
    return forms | {node}


def _keeps_last_dim(node: Node) -> bool:
    if is_call(node, _FEATURE_KEEPING_OPS):
        return True
    if not is_call(node, {aten.transpose.int, aten.permute.default}):
        return False
    rank = len(shape(node))
    if node.target == aten.transpose.int:
        return all(d % rank != rank - 1 for d in node.args[1:3])
    return node.args[1][-1] % rank == rank - 1


def _block_view(view: Node, source: Node, width: int) -> tuple[int, int] | None:
    """``(count, stride)`` when ``view`` reshapes ``source``'s ``width`` features into ``count`` blocks."""
    if not is_call(view, {aten.view.default, aten.reshape.default, aten._unsafe_view.default}):
        return None
    before, after = shape(source), shape(view)
    if not before or not after or len(after) != len(before) + 1 or list(after[:-2]) != list(before[:-1]):
        return None
    count, size = after[-2], after[-1]
    if not (isinstance(count, int) and isinstance(size, int)) or count < 2 or count * size != width:
        return None
    return count, size


def _taken_apart(source: Node, width: int, projection: Projection,
                 blocks: tuple[int, int] | None = None) -> dict[Node, Projection]:
    """The slices and splits of ``source``'s last dim (``width`` features), each as ``projection`` narrowed."""
    parts = {}
    for user in source.users:
        if is_call(user, {aten.slice.Tensor}) and blocks is None:
            dim, begin, end, step = (list(user.args[1:]) + [0, None, None, 1][len(user.args) - 1:])[:4]
            if _is_last_dim(dim, source) and step == 1:
                begin, end = _clamp(begin, width, 0), _clamp(end, width, width)
                parts[user] = replace(projection, rows=(begin, end))
        elif is_call(user, _SPLIT_OPS) and _is_last_dim(_split_dim(user), source):
            widths = _split_widths(user, width)
            for item in user.users:
                if item.target is operator.getitem:
                    begin = sum(widths[: item.args[1]])
                    parts[item] = replace(projection, rows=(begin, begin + widths[item.args[1]]), blocks=blocks)
    return parts


_SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
# Layout ops that leave a projection's output features, in order, on the last dim (a reshape may only regroup the
# dims in front of it; a transpose or permute may move the others).
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
