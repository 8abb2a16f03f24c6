"""Analysis pass: find the ``DecoderStructure`` of a captured prefill graph.

Everything is read from the graph: the attention core of each layer (an SDPA call, or the softmax of an eager
attention), the projections that feed its query/key/value and the one its output feeds, the remaining projections of
the layer as the MLP (which one is down, whether a gate multiplies in, which activation sits between), and the
embedding, final norm and LM head around the layers. ``nn_module_stack`` only says which layer and module a node
belongs to. A graph that does not fit raises :class:`StructureError` naming the layer and the part that failed, so
a model is never half-sparsified.
"""

from __future__ import annotations

import math
import operator
import re
from collections import defaultdict
from dataclasses import replace

import torch
from torch.fx import Node

from shadowfx.capture import CapturedDecoder
from shadowfx.passes.graph import (
    LAYOUT_OPS,
    MATMUL_OPS,
    NORM_OPS,
    SOFTMAX_OPS,
    GraphParameters,
    entry_node,
    inputs,
    is_call,
    module_paths,
    owner,
    projection_input,
    projection_of,
    scalar_args,
    shape,
    users,
    walk,
)
from shadowfx.structure import (
    AttentionStructure,
    DecoderStructure,
    LayerStructure,
    MLPStructure,
    Projection,
    Rotary,
    StructureError,
    compute_fingerprint,
    weights_digest,
)

aten = torch.ops.aten

_NUMBERED = re.compile(r"^(?P<container>.+)\.(?P<index>\d+)$")
_SDPA = {aten.scaled_dot_product_attention.default}
# Elementwise ops allowed between the scores matmul and the softmax of an eager attention.
_SCORE_OPS = LAYOUT_OPS | {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten._assert_tensor_metadata.default}


def discover_structure(captured: CapturedDecoder) -> DecoderStructure:
    """Describe the decoder captured in ``captured``; node names refer to that graph.

    Module names, widths and the fingerprint are the same whichever step was captured; a model that is not causal
    is refused when a prefill graph is read.
    """
    graph = captured.program.graph
    params = GraphParameters.of(captured.program)
    cores = [n for n in graph.nodes if is_call(n, _SDPA | SOFTMAX_OPS)]
    if not cores:
        raise StructureError(
            "no attention found: the graph has no scaled_dot_product_attention and no softmax; load the model with "
            "attn_implementation='sdpa' or 'eager'"
        )
    layers_module, layer_of_core = _layer_container(cores)
    if captured.step != "decode":
        _require_causal(captured, layer_of_core[0])
    nodes_by_layer: dict[int, list[Node]] = defaultdict(list)
    for node in graph.nodes:
        index = _layer_index(node, layers_module)
        if index is not None:
            nodes_by_layer[index].append(node)
    layers = []
    for index in range(len(layer_of_core)):
        layer_nodes = set(nodes_by_layer[index])
        layer_path = f"{layers_module}.{index}"
        attention = _attention(layer_path, layer_of_core[index], layer_nodes, params)
        mlp = _mlp(layer_path, attention, layer_nodes, params)
        layers.append(LayerStructure(index=index, module=layer_path, attention=attention, mlp=mlp))
    head = _lm_head(graph, params)
    lm_head = projection_of(head, params)
    embedding, position_embedding = _embeddings(graph, params, captured, layers_module)
    model = captured.model
    config = getattr(model, "config", None)
    structure = DecoderStructure(
        model_class=type(model).__name__,
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        hidden_size=layers[0].attention.o.out_features,
        vocab_size=lm_head.out_features,
        layers_module=layers_module,
        layers=tuple(layers),
        embedding=embedding,
        position_embedding=position_embedding,
        final_norm=_final_norm(head, layers_module),
        lm_head=lm_head,
        weights_digest=weights_digest(model),
        fingerprint="",
    )
    return replace(structure, fingerprint=compute_fingerprint(structure))


# ---- causality -------------------------------------------------------------------------------------------------------
_CAUSAL_MASK_OPS = {aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.tril.default, aten.triu.default}


def _require_causal(captured: CapturedDecoder, core: Node) -> None:
    """Refuse bidirectional models (e.g. BERT behind an LM head): the method predicts from a prefix.

    With weights, the check is behavioural: changing the last token must leave earlier logits unchanged. Without
    (a config-only model on the meta device), the mask must be built by comparing query and key positions.
    """
    model = captured.model
    name = type(model).__name__
    if any(p.is_meta for p in model.parameters()):
        causal = core.kwargs.get("is_causal", False) or any(
            is_call(n, _CAUSAL_MASK_OPS)
            for n in walk(inputs(core), inputs, within=lambda n: True, stop=lambda n: False)[1]
        )
    else:
        # the device the graph was captured on (a model may hold no parameters at all)
        device = _input_ids(captured).meta["val"].device
        input_ids = torch.zeros(1, 4, dtype=torch.long, device=device)
        changed = input_ids.clone()
        changed[0, -1] = 1
        mask = torch.ones_like(input_ids)
        with torch.no_grad():
            run = captured.module()
            empty_cache = ((), ()) if captured.step == "prefill_cache" else ()
            before, after = run(input_ids, mask, *empty_cache), run(changed, mask, *empty_cache)
            if captured.step == "prefill_cache":
                before, after = before[0], after[0]
            causal = torch.allclose(before[:, :-1], after[:, :-1], rtol=1e-5, atol=1e-6)
    if not causal:
        raise StructureError(f"{name} is not a causal decoder: its attention lets a token see later tokens; shadowfx "
                             "rewrites decoder-only causal LMs (for BERT-like models set is_decoder=True)")


# ---- layers ----------------------------------------------------------------------------------------------------------
def _layer_container(cores: list[Node]) -> tuple[str, dict[int, Node]]:
    """The module list holding the decoder layers: the numbered modules that each own one attention core."""
    containers: dict[str, dict[int, list[Node]]] = defaultdict(lambda: defaultdict(list))
    for core in cores:
        for path in reversed(module_paths(core)):
            match = _NUMBERED.match(path)
            if match:
                containers[match["container"]][int(match["index"])].append(core)
                break
        else:
            raise StructureError(f"attention node {core.name} (in {owner(core) or 'the model'}) is not inside a "
                                 "numbered decoder layer")
    if len(containers) != 1:
        raise StructureError(f"attention is spread over several layer lists ({', '.join(sorted(containers))}); "
                             "expected one list of decoder layers")
    (container, by_index), = containers.items()
    indices = sorted(by_index)
    if indices != list(range(len(indices))):
        raise StructureError(f"decoder layers {container} are numbered {indices}, expected 0..{len(indices) - 1}")
    for index, found in by_index.items():
        if len(found) != 1:
            raise StructureError(f"layer {container}.{index}: expected one attention, found {len(found)} "
                                 f"({', '.join(n.name for n in found)})")
    return container, {index: found[0] for index, found in by_index.items()}


def _layer_index(node: Node, layers_module: str) -> int | None:
    prefix = layers_module + "."
    for path in module_paths(node):
        if path.startswith(prefix):
            head = path[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def _projections_in(layer_nodes: set[Node], params: GraphParameters) -> dict[Node, Projection]:
    found = {}
    for node in layer_nodes:
        projection = projection_of(node, params)
        if projection is not None:
            found[node] = projection
    return found


def _trace_back(start: Node, layer_nodes: set[Node], projections: dict[Node, Projection]) -> tuple[list[Node], set[Node]]:
    return walk([start], inputs, within=layer_nodes.__contains__, stop=projections.__contains__)


# ---- attention -------------------------------------------------------------------------------------------------------
def _attention(layer: str, core: Node, layer_nodes: set[Node], params: GraphParameters) -> AttentionStructure:
    projections = _projections_in(layer_nodes, params)
    if core.target in _SDPA:
        q_in, k_in, v_in = core.args[:3]
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        scale = core.kwargs.get("scale")
        core_scale = scale if scale is not None else shape(q_in)[-1] ** -0.5
        core_out, kind = core, "sdpa"
    else:
        q_in, k_in, v_in, mask, core_scale, core_out = _eager_attention(layer, core, layer_nodes)
        kind = "eager"
    num_heads, head_dim = int(shape(q_in)[1]), int(shape(q_in)[-1])

    roles = {}
    for role, start in (("q", q_in), ("k", k_in), ("v", v_in)):
        reached, _ = _trace_back(start, layer_nodes, projections)
        if len(reached) != 1:
            raise StructureError(f"layer {layer}: the attention {role} input comes from {len(reached)} projections "
                                 f"({', '.join(projections[n].module for n in reached) or 'none'}), expected one")
        path = _between(reached[0], start, layer_nodes) | {start}
        roles[role] = (_role_projection(projections[reached[0]], path), path)
    q, q_path = roles["q"]
    k, k_path = roles["k"]
    v, v_path = roles["v"]
    rotary = _rotary(q_path, layer_nodes)
    if rotary != _rotary(k_path, layer_nodes):
        raise StructureError(f"layer {layer}: the query and key paths do not apply the same rotary embedding")
    for role, path in (("q", q_path), ("k", k_path), ("v", v_path)):
        _require_carried(layer, roles[role][0], role, path, rotary is not None)
    if q.width != num_heads * head_dim:
        raise StructureError(f"layer {layer}: query projection {q.module} has {q.width} outputs, expected "
                             f"{num_heads} heads x {head_dim}")
    if k.width % head_dim or v.width != k.width:
        raise StructureError(f"layer {layer}: key/value projections ({k.width}, {v.width} outputs) do not split "
                             f"into heads of {head_dim}")
    num_kv_heads = k.width // head_dim
    if num_heads % num_kv_heads:
        raise StructureError(f"layer {layer}: {num_heads} query heads do not group evenly over {num_kv_heads} KV heads")

    o_reached, _ = walk(users(core_out), users, within=layer_nodes.__contains__, stop=projections.__contains__)
    if len(o_reached) != 1:
        raise StructureError(f"layer {layer}: the attention output feeds {len(o_reached)} projections, expected one "
                             "output projection")
    o_node = o_reached[0]
    o = projections[o_node]
    if o.in_features != num_heads * head_dim:
        raise StructureError(f"layer {layer}: output projection {o.module} takes {o.in_features} features, expected "
                             f"{num_heads} heads x {head_dim}")
    q_scale = math.prod(_scalar_factor(n) for n in q_path if n.op == "call_function")
    return AttentionStructure(
        module=_common_prefix(q.module, o.module),
        q=q, k=k, v=v, o=o,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        scaling=float(core_scale * q_scale),
        core=kind, core_node=core.name,
        mask_node=mask.name if isinstance(mask, Node) else None,
        context_node=entry_node(o_node).name,
        rotary=rotary,
    )


def _eager_attention(layer: str, softmax: Node, layer_nodes: set[Node]):
    """(q, k, v, mask, scale, output) of an eager attention: matmul -> scale/mask -> softmax -> matmul."""
    scores, seen = walk(inputs(softmax), inputs, within=layer_nodes.__contains__,
                        stop=lambda n: is_call(n, MATMUL_OPS))
    values, _ = walk(users(softmax), users, within=layer_nodes.__contains__, stop=lambda n: is_call(n, MATMUL_OPS))
    if len(scores) != 1 or len(values) != 1:
        raise StructureError(f"layer {layer}: softmax {softmax.name} is not between a scores matmul and a values "
                             "matmul, so the eager attention is not recognised")
    score_matmul, value_matmul = scores[0], values[0]
    between = [n for n in seen if n not in (softmax, score_matmul)]
    if any(n.op == "call_function" and n.target not in _SCORE_OPS for n in between):
        raise StructureError(f"layer {layer}: unexpected ops between attention scores and softmax: "
                             f"{sorted({str(n.target) for n in between if n.target not in _SCORE_OPS})}")
    masks = [a for n in between if n.target == aten.add.Tensor for a in n.args
             if isinstance(a, Node) and a not in seen]
    scale = math.prod(_scalar_factor(n) for n in between)
    k_in = score_matmul.args[1]
    return score_matmul.args[0], k_in, value_matmul.args[1], masks[0] if masks else None, scale, value_matmul


# What the sparse attention op recomputes between a projection and the attention core: moving and splitting the
# heads, a constant scale of the queries (folded into the scaling), and a rotate-half rotary embedding.
_HEAD_LAYOUT_OPS = LAYOUT_OPS | {operator.getitem, aten.split.Tensor, aten.split_with_sizes.default,
                                 aten._assert_tensor_metadata.default}
_ROTARY_OPS = {aten.neg.default, aten.cat.default, aten.slice.Tensor, aten.mul.Tensor, aten.add.Tensor}


def _require_carried(layer: str, projection: Projection, role: str, path: set[Node], rotary: bool) -> None:
    """Refuse a q/k/v path that computes anything the sparse op would not recompute (a norm, a soft-cap, ...)."""
    foreign = set()
    for node in path:
        if node.op != "call_function" or node.target in _HEAD_LAYOUT_OPS:
            continue
        if role == "q" and _scalar_factor(node) != 1.0:
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


def _scalar_factor(node: Node) -> float:
    """The constant a node multiplies by (1.0 for everything else)."""
    if node.target == aten.mul.Tensor and len(scalar_args(node)) == 1:
        return scalar_args(node)[0]
    if node.target == aten.div.Tensor and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
        return 1.0 / float(node.args[1])
    return 1.0


def _role_projection(projection: Projection, path: set[Node]) -> Projection:
    """Narrow a fused projection to the rows this path takes out of it (a split or a slice on the last dim)."""
    for node in path:
        if node.target is operator.getitem:
            source = node.args[0]
            if is_call(source, {aten.split.Tensor, aten.split_with_sizes.default}):
                dim = source.args[2] if len(source.args) > 2 else 0
                if dim not in (-1, len(shape(source.args[0])) - 1):
                    continue
                sizes = source.args[1]
                count = math.ceil(projection.out_features / sizes) if isinstance(sizes, int) else len(sizes)
                widths = [sizes] * count if isinstance(sizes, int) else list(sizes)
                start = sum(widths[: node.args[1]])
                return replace(projection, rows=(start, start + widths[node.args[1]]))
    return projection


def _rotary(q_path: set[Node], layer_nodes: set[Node]) -> Rotary | None:
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


def _common_prefix(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)


# ---- MLP -------------------------------------------------------------------------------------------------------------
_ACTIVATION_OPS = {aten.relu.default, aten.square.default, aten.silu.default, aten.gelu.default, aten.tanh.default,
                   aten.sigmoid.default, aten.pow.Tensor_Scalar, aten.mul.Tensor, aten.add.Tensor, aten.div.Tensor, aten.erf.default}


def _mlp(layer: str, attention: AttentionStructure, layer_nodes: set[Node], params: GraphParameters) -> MLPStructure:
    projections = _projections_in(layer_nodes, params)
    attention_nodes = {attention.q.node, attention.k.node, attention.v.node, attention.o.node}
    mlp = {n: p for n, p in projections.items() if n.name not in attention_nodes}
    if len(mlp) not in (2, 3):
        raise StructureError(f"layer {layer}: expected an MLP of 2 (up, down) or 3 (gate, up, down) projections "
                             f"besides the attention, found {len(mlp)}: {sorted(p.module for p in mlp.values()) or 'none'}")
    feeds: dict[Node, list[Node]] = {}
    for node in mlp:
        reached, _ = _trace_back(projection_input(node), layer_nodes, projections)
        feeds[node] = [r for r in reached if r in mlp]
    downs = [n for n, fed in feeds.items() if fed]
    if len(downs) != 1 or sorted(feeds[downs[0]], key=str) != sorted((n for n in mlp if n is not downs[0]), key=str):
        raise StructureError(f"layer {layer}: cannot tell the MLP's down projection among "
                             f"{sorted(p.module for p in mlp.values())}")
    down_node = downs[0]
    down, feeders = mlp[down_node], feeds[down_node]
    intermediate = entry_node(down_node)
    if len(feeders) == 1:
        up_node, gate_node = feeders[0], None
        activation = _activation(layer, _between(up_node, intermediate, layer_nodes) | {intermediate})
    else:
        gate_node, up_node, activation = _gate_and_up(layer, feeders, intermediate, layer_nodes)
    up = mlp[up_node]
    gate = mlp[gate_node] if gate_node is not None else None
    if down.in_features != up.out_features or (gate is not None and gate.out_features != up.out_features):
        raise StructureError(f"layer {layer}: MLP widths disagree (up {up.out_features}, down takes {down.in_features}"
                             + (f", gate {gate.out_features}" if gate else "") + ")")
    return MLPStructure(kind="gated" if gate else "plain", up=up, gate=gate, down=down, activation=activation,
                        intermediate_size=up.out_features, intermediate_node=intermediate.name)


def _between(source: Node, sink: Node, layer_nodes: set[Node]) -> set[Node]:
    """Nodes on some data path from ``source`` (exclusive) to ``sink`` (exclusive)."""
    _, after = walk(users(source), users, within=layer_nodes.__contains__, stop=lambda n: n is sink)
    _, before = walk(inputs(sink), inputs, within=layer_nodes.__contains__, stop=lambda n: n is source)
    return (after & before) - {source, sink}


def _gate_and_up(layer: str, feeders: list[Node], intermediate: Node, layer_nodes: set[Node]):
    """In a gated MLP, the gate is the projection that passes through the activation before the multiply."""
    first, second = feeders

    def is_merge(node: Node) -> bool:
        if not is_call(node, {aten.mul.Tensor}) or not all(isinstance(a, Node) for a in node.args[:2]):
            return False
        a, b = node.args[:2]
        return (_reaches(a, first, layer_nodes) and _reaches(b, second, layer_nodes)) or (
            _reaches(a, second, layer_nodes) and _reaches(b, first, layer_nodes))

    merges = [n for n in _between(first, intermediate, layer_nodes) | {intermediate} if is_merge(n)]
    if not merges:
        raise StructureError(f"layer {layer}: the two MLP input projections never multiply, so the gated MLP is "
                             "not recognised")
    merge = merges[0]
    paths = {f: _between(f, merge, layer_nodes) for f in feeders}
    computing = {f: {n for n in path if n.target not in LAYOUT_OPS} for f, path in paths.items()}
    gates = [f for f, ops in computing.items() if ops]
    if len(gates) != 1:
        raise StructureError(f"layer {layer}: cannot tell the gate from the up projection in the gated MLP "
                             f"(activations on {len(gates)} branches)")
    gate = gates[0]
    up = second if gate is first else first
    return gate, up, _activation(layer, computing[gate])


def _reaches(node: Node, target: Node, layer_nodes: set[Node]) -> bool:
    _, seen = walk([node], inputs, within=layer_nodes.__contains__, stop=lambda n: n is target)
    return target in seen


def _activation(layer: str, nodes: set[Node]) -> str:
    """Name the activation from the ops between the MLP's input projection and what follows it."""
    computing = [n for n in nodes if n.op == "call_function" and n.target not in LAYOUT_OPS
                 and n.target != aten._assert_tensor_metadata.default]
    targets = {n.target for n in computing}
    if any(t not in _ACTIVATION_OPS for t in targets):
        raise StructureError(f"layer {layer}: unrecognised MLP activation ops {sorted(str(t) for t in targets)}")
    gelus = [n for n in computing if n.target == aten.gelu.default]
    if targets == {aten.relu.default}:
        return "relu"
    if targets in ({aten.relu.default, aten.square.default}, {aten.relu.default, aten.pow.Tensor_Scalar}) and all(
            c == 2 for n in computing if n.target == aten.pow.Tensor_Scalar for c in scalar_args(n)):
        return "relu2"
    if targets == {aten.silu.default} or targets == {aten.sigmoid.default, aten.mul.Tensor} and not _constants(computing):
        return "silu"
    if gelus and targets == {aten.gelu.default}:
        return "gelu_tanh" if gelus[0].kwargs.get("approximate", "none") == "tanh" else "gelu"
    if aten.tanh.default in targets and aten.pow.Tensor_Scalar in targets:
        return "gelu_tanh"
    if aten.erf.default in targets:
        return "gelu"
    if targets == {aten.sigmoid.default, aten.mul.Tensor} and any(abs(c - 1.702) < 1e-3 for c in _constants(computing)):
        return "quick_gelu"
    raise StructureError(f"layer {layer}: unrecognised MLP activation ops {sorted(str(t) for t in targets)}")


def _constants(nodes: list[Node]) -> list[float]:
    return [c for n in nodes for c in scalar_args(n)]


# ---- around the layers -----------------------------------------------------------------------------------------------
def _lm_head(graph: torch.fx.Graph, params: GraphParameters) -> Node:
    """The projection node that computes the logits."""
    output = graph.output_node()
    logits = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    reached, _ = walk([logits], inputs, within=lambda n: True, stop=lambda n: projection_of(n, params) is not None)
    if len(reached) != 1:
        raise StructureError(f"the logits come from {len(reached)} projections, expected one LM head")
    return reached[0]


def _final_norm(head: Node, layers_module: str) -> str | None:
    prefix = layers_module + "."
    _, seen = walk([projection_input(head)], inputs, within=lambda n: not owner(n).startswith(prefix),
                   stop=lambda n: False)
    norms = [n for n in seen if is_call(n, NORM_OPS)]
    return owner(norms[0]) if norms else None


def _embeddings(graph: torch.fx.Graph, params: GraphParameters, captured: CapturedDecoder, layers_module: str):
    input_ids = _input_ids(captured)
    lookups = [n for n in graph.nodes if is_call(n, {aten.embedding.default}) and params.name(n.args[0])]
    token = [n for n in lookups if _reaches(n.args[1], input_ids, set(graph.nodes))]
    if len(token) != 1:
        raise StructureError(f"expected one token embedding looked up by input_ids, found {len(token)}")
    positions = [n for n in lookups if n is not token[0] and not owner(n).startswith(layers_module + ".")]
    return owner(token[0]), owner(positions[0]) if positions else None


def _input_ids(captured: CapturedDecoder) -> Node:
    """The graph's placeholder for its first user input, the input ids."""
    name = captured.program.graph_signature.user_inputs[0]
    node = next((n for n in captured.graph.nodes if n.op == "placeholder" and n.name == name), None)
    if node is None:
        raise StructureError(f"the graph has no placeholder {name}, expected its first user input (the input ids)")
    return node
