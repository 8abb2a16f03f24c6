"""Reading a captured decoder graph: who owns a node, which nodes are projections, walks along the data flow.

Shared by the passes; nothing here names an architecture. Module paths are relative to the user's model (the
capture wrapper's attribute is stripped).
"""

from __future__ import annotations

import operator
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from shadowfx.capture import WRAPPED_MODEL_ATTR
from shadowfx.structure import DecoderStructure, Projection

aten = torch.ops.aten

_PREFIX = WRAPPED_MODEL_ATTR + "."

# Ops that only move or relabel data: walks pass through them when looking for the op that computes something.
LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.contiguous.default, aten.clone.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.dropout.default, aten.alias.default,
    aten.t.default, aten.flatten.using_ints,
}
NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rsqrt.default, aten.rms_norm.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}


def strip_wrapper(path: str) -> str:
    return path[len(_PREFIX):] if path.startswith(_PREFIX) else path


def owner(node: Node) -> str:
    """Path of the innermost module that produced ``node`` ('' for the model itself)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path == WRAPPED_MODEL_ATTR else strip_wrapper(path)


def module_paths(node: Node) -> list[str]:
    """Paths of every module enclosing ``node``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [strip_wrapper(path) for path, _ in stack.values() if path != WRAPPED_MODEL_ATTR]


def layer_indexer(structure: DecoderStructure) -> Callable[[Node], int]:
    """node -> the index of the decoder layer whose module computes it, -1 outside the layers."""
    layer_of = {layer.module: layer.index for layer in structure.layers}

    def index(node: Node) -> int:
        return next((layer_of[path] for path in module_paths(node) if path in layer_of), -1)

    return index


def shape(node: Node) -> tuple:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"node {node.name} carries no tensor metadata")
    return tuple(value.shape)


def is_call(node: object, targets: Iterable) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in set(targets)


@dataclass(frozen=True)
class GraphParameters:
    """Maps the placeholders of an ExportedProgram to the parameter names of the user's model."""

    names: dict[str, str]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, program: ExportedProgram) -> GraphParameters:
        names = {ph: strip_wrapper(fqn) for ph, fqn in program.graph_signature.inputs_to_parameters.items()}
        shapes = {}
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in names:
                shapes[node.name] = tuple(int(d) for d in shape(node))
        return cls(names=names, shapes=shapes)

    def name(self, arg: object) -> str | None:
        return self.names.get(arg.name) if isinstance(arg, Node) and arg.op == "placeholder" else None


def projection_of(node: Node, params: GraphParameters) -> Projection | None:
    """The Projection computed by ``node``, or None when ``node`` is not a parameterised linear map."""
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        weight = params.name(node.args[1])
        if weight is None:
            return None
        bias = params.name(node.args[2]) if len(node.args) > 2 else None
        out_features, in_features = params.shapes[node.args[1].name]
        layout = "out_in"
    elif node.target == aten.addmm.default:  # Conv1D: bias + x @ W with W stored [in, out]
        weight = params.name(node.args[2])
        if weight is None:
            return None
        bias = params.name(node.args[0])
        in_features, out_features = params.shapes[node.args[2].name]
        layout = "in_out"
    elif node.target in (aten.mm.default, aten.matmul.default):
        weight = params.name(node.args[1])
        if weight is None or len(params.shapes[node.args[1].name]) != 2:
            return None
        bias = None
        in_features, out_features = params.shapes[node.args[1].name]
        layout = "in_out"
    else:
        return None
    return Projection(
        module=owner(node), weight=weight, bias=bias, in_features=in_features, out_features=out_features,
        weight_layout=layout, node=node.name,
    )


def projection_input(node: Node) -> Node:
    """The activation operand of a projection node."""
    return node.args[1] if node.target == aten.addmm.default else node.args[0]


def entry_node(node: Node) -> Node:
    """The node outside the projection's own module that feeds it (skipping the module's internal reshapes)."""
    module = owner(node)
    current = projection_input(node)
    while owner(current) == module and current.op == "call_function" and current.target in LAYOUT_OPS:
        current = current.args[0]
    return current


def walk(
    start: Iterable[Node],
    step: Callable[[Node], Iterable[Node]],
    *,
    within: Callable[[Node], bool],
    stop: Callable[[Node], bool],
) -> tuple[list[Node], set[Node]]:
    """Breadth-first walk from ``start``; returns (nodes where ``stop`` held, every node visited).

    The walk does not continue past a stop node nor into nodes outside ``within``.
    """
    stops: list[Node] = []
    seen: set[Node] = set()
    queue = deque(start)
    while queue:
        node = queue.popleft()
        if node in seen or not within(node):
            continue
        seen.add(node)
        if stop(node):
            stops.append(node)
            continue
        queue.extend(step(node))
    return stops, seen


def inputs(node: Node) -> list[Node]:
    return list(node.all_input_nodes)


def users(node: Node) -> list[Node]:
    return list(node.users)


def scalar_args(node: Node) -> list[float]:
    return [float(a) for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]


# ---- editing ---------------------------------------------------------------------------------------------------------
SELECTION_META = "shadowfx_selection"  # node.meta tag: ("kv_heads" | "neurons", layer index)


def editable_module(program: ExportedProgram) -> torch.fx.GraphModule:
    """The program as a GraphModule with flat positional inputs/outputs and without export's input-shape guards.

    The guards describe the dense graph; the rewritten one takes smaller KV caches and extra inputs.
    """
    gm = program.module()
    gm._forward_pre_hooks.clear()  # export's check of inputs against the original (nested) signature
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph.set_codegen(torch.fx.graph.CodeGen())
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def nodes_by_name(gm: torch.fx.GraphModule) -> dict[str, Node]:
    return {node.name: node for node in gm.graph.nodes}


def placeholders(gm: torch.fx.GraphModule) -> list[Node]:
    return [node for node in gm.graph.nodes if node.op == "placeholder"]


def output_node(gm: torch.fx.GraphModule) -> Node:
    return gm.graph.output_node()


def graph_outputs(gm: torch.fx.GraphModule) -> list:
    return list(output_node(gm).args[0])


def set_graph_outputs(gm: torch.fx.GraphModule, values: list) -> None:
    output_node(gm).args = (tuple(values),)


def selection_nodes(gm: torch.fx.GraphModule) -> dict[tuple[str, int], Node]:
    """The nodes that carry the kept indices of each later layer, keyed by ("kv_heads"|"neurons", layer)."""
    return {node.meta[SELECTION_META]: node for node in gm.graph.nodes if SELECTION_META in node.meta}


def selections_per_layer(nodes: Iterable[Node]) -> dict[int, int]:
    """How many of ``nodes`` carry a selection (kept KV heads or neurons), per layer."""
    counts = Counter(node.meta[SELECTION_META][1] for node in nodes if SELECTION_META in node.meta)
    return dict(sorted(counts.items()))


def added_nodes(gm: torch.fx.GraphModule, before: set[Node]) -> list[Node]:
    """The graph's nodes that are not in ``before``: what a pass inserted since, in graph order."""
    return [node for node in gm.graph.nodes if node not in before]


def exit_node(projection: Node) -> Node:
    """The last node of a projection's module (GPT-2's Conv1D reshapes its addmm back to [B, S, out])."""
    module = owner(projection)
    current = projection
    while len(current.users) == 1:
        (user,) = current.users
        if owner(user) != module or not is_call(user, LAYOUT_OPS):
            break
        current = user
    return current


def weight_and_bias(gm: torch.fx.GraphModule, projection: Node, role: Projection) -> tuple[Node, Node | None]:
    """Nodes giving the projection's weight in [out, in] layout and its bias, narrowed to ``role``'s rows if fused.

    New nodes are inserted at the current insertion point. Rows that repeat every block (interleaved heads) are no
    slice of the weight: they are gathered once, here, into buffers of the graph module
    (``shadowfx_<node>_weight_<first row>``, and ``_bias_``), so that no call copies them again.
    """
    graph = gm.graph
    if projection.target == aten.linear.default:
        weight, bias = projection.args[1], projection.args[2] if len(projection.args) > 2 else None
    elif projection.target == aten.addmm.default:
        weight, bias = graph.call_function(aten.t.default, (projection.args[2],)), projection.args[0]
    else:
        weight, bias = graph.call_function(aten.t.default, (projection.args[1],)), None
    if role.blocks is not None:
        rows = role.feature_rows(torch.arange(role.width))
        weight, bias = (_gathered_buffer(gm, tensor, rows, f"shadowfx_{projection.name}_{what}_{role.rows[0]}")
                        if tensor is not None else None for tensor, what in ((weight, "weight"), (bias, "bias")))
    elif role.rows is not None:
        weight = graph.call_function(aten.slice.Tensor, (weight, 0, role.rows[0], role.rows[1]))
        if bias is not None:
            bias = graph.call_function(aten.slice.Tensor, (bias, 0, role.rows[0], role.rows[1]))
    return weight, bias


def _gathered_buffer(gm: torch.fx.GraphModule, tensor: Node, rows: torch.Tensor, name: str) -> Node:
    """A get_attr of a new buffer holding ``rows`` of the parameter ``tensor`` (a get_attr, or its transpose)."""
    transposed = tensor.target == aten.t.default
    source = operator.attrgetter((tensor.args[0] if transposed else tensor).target)(gm)
    gm.register_buffer(name, (source.t() if transposed else source).index_select(0, rows.to(source.device)))
    return gm.graph.get_attr(name)


def inserting_after(node: Node):
    """Insertion point right after ``node`` that keeps several new nodes in creation order."""
    return node.graph.inserting_before(node.next)


def predictor_reads(graph: torch.fx.Graph, x: Node, tokens: Node, per_token: bool) -> tuple[Node, list[Node] | None]:
    """What a predictor reads from activations ``x`` (``[B, S, E]``, or ``[B * S, E]`` as OPT's MLP takes them):
    every row's last position ``[B, E]`` (prompts are left-padded), or per token every position ``[B * S, E]``.

    Returns the node and, per token, the ``[B, S]`` sizes (from ``tokens``, the input ids) to restore the scores'
    token dims with :func:`per_position`. New nodes go to the current insertion point.
    """
    flat = len(shape(x)) == 2
    size = [graph.call_function(aten.sym_size.int, (tokens, d)) for d in (0, 1)] if per_token or flat else None
    if per_token:
        return (x if flat else graph.call_function(aten.flatten.using_ints, (x, 0, 1))), size
    if flat:
        x = graph.call_function(aten.view.default, (x, [*size, shape(x)[-1]]))
    return graph.call_function(aten.select.int, (x, 1, -1)), None


def per_position(graph: torch.fx.Graph, scores: Node, size: list[Node] | None) -> Node:
    """Per-token scores ``[B * S, ...]`` back to ``[B, S, ...]`` (``size`` from :func:`predictor_reads`)."""
    return graph.call_function(aten.unflatten.int, (scores, 0, size)) if size is not None else scores


def output_selection(gm: torch.fx.GraphModule, layers: list[int]) -> list[Node]:
    """Append the tagged selection nodes to the graph outputs: kept KV heads of the given layers, then their kept
    neurons (the order a runtime unpacks)."""
    chosen = selection_nodes(gm)
    ordered = [chosen[("kv_heads", i)] for i in layers] + [chosen[("neurons", i)] for i in layers]
    set_graph_outputs(gm, graph_outputs(gm) + ordered)
    return ordered
