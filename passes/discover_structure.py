"""Analysis pass: find the ``DecoderStructure`` of a captured prefill graph.

Everything is read from the graph: the attention core of each layer (an SDPA call, or the softmax of an eager
attention), the projections that feed its query/key/value and the one its output feeds, the remaining projections of
the layer as the MLP (which one is down, whether a gate multiplies in, which activation sits between), and the
embedding, final norm and LM head around the layers. ``nn_module_stack`` only says which layer and module a node
belongs to. A graph that does not fit raises :class:`StructureError` naming the layer and the part that failed, so
a model is never half-sparsified.

Each concern is a recogniser of its own: the attention core (``recognise_core``), the projections and the parts of a
fused one (``recognise_projections``), what lies between the q/k/v projections and the core
(``recognise_head_transforms``), the MLP (``recognise_mlp``) and its activation (``recognise_activation``). This
pass finds the layers, joins what the recognisers read into a :class:`DecoderStructure`, and reads what sits around
the layers.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import replace

import torch
from torch.fx import Node

from shadowfx.capture import CapturedDecoder, capture
from shadowfx.passes.graph import (
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
    shape,
    users,
    walk,
)
from shadowfx.passes.recognise_alibi import alibi_slopes
from shadowfx.passes.recognise_core import ATTENTION_CORE_OPS, attention_core
from shadowfx.passes.recognise_head_transforms import head_norm, require_carried, rotary, same_rotary, scalar_factor
from shadowfx.passes.recognise_mlp import mlp_structure
from shadowfx.passes.recognise_projections import (
    between,
    common_prefix,
    projections_in,
    reaches,
    role_projection,
    trace_back,
)
from shadowfx.structure import (
    AttentionStructure,
    DecoderStructure,
    LayerStructure,
    StructureError,
    compute_fingerprint,
    weights_digest,
)

aten = torch.ops.aten

_NUMBERED = re.compile(r"^(?P<container>.+)\.(?P<index>\d+)$")
_ATTENTION_MODULE = re.compile(r"attn|attention", re.IGNORECASE)


def discover_structure(captured: CapturedDecoder) -> DecoderStructure:
    """Describe the decoder captured in ``captured``; node names refer to that graph.

    Module names, widths and the fingerprint are the same whichever step was captured; a model that is not causal
    is refused when a prefill graph is read.
    """
    graph = captured.program.graph
    params = GraphParameters.of(captured.program)
    cores = [n for n in graph.nodes if is_call(n, ATTENTION_CORE_OPS)]
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
    score_biases = {}
    for index in range(len(layer_of_core)):
        layer_nodes = set(nodes_by_layer[index])
        layer_path = f"{layers_module}.{index}"
        attention, score_biases[index] = _attention(layer_path, layer_of_core[index], layer_nodes, params)
        mlp = mlp_structure(layer_path, attention, layer_nodes, params)
        layers.append(LayerStructure(index=index, module=layer_path, attention=attention, mlp=mlp))
    _refuse_routed_experts(captured.model, layers)
    head = _lm_head(graph, params)
    lm_head = projection_of(head, params)
    if any(bias is not None for bias in score_biases.values()):
        layers = _with_alibi(captured, layers, score_biases, lm_head.out_features)
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


def _with_alibi(captured: CapturedDecoder, layers: list[LayerStructure], biases: dict[int, Node | None],
                vocab_size: int) -> list[LayerStructure]:
    """The layers with the ALiBi slopes of their score biases, read from a run of the prefill graph (a decode
    graph's are the prefill's: one run of a decode step would need a cache to run on)."""
    if any(bias is None for bias in biases.values()):
        raise StructureError(f"{type(captured.model).__name__}: some layers add a per-head bias to the attention "
                             "scores and some do not; shadowfx expects ALiBi in every layer or in none")
    if captured.step == "decode":
        prefill = discover_structure(capture(captured.model, step="prefill_cache"))
        slopes = {layer.index: layer.attention.alibi_slopes for layer in prefill.layers}
    else:
        slopes = alibi_slopes(captured, biases, layers[0].attention.num_heads, _input_ids(captured), vocab_size)
    return [replace(layer, attention=replace(layer.attention, alibi_slopes=slopes[layer.index])) for layer in layers]


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
            routers = [owner(n) for n in found if n.target in SOFTMAX_OPS and not _ATTENTION_MODULE.search(owner(n))]
            raise StructureError(f"layer {container}.{index}: expected one attention, found {len(found)} ("
                                 + ", ".join(f"{n.name} in {owner(n)}" for n in found) + ")"
                                 + (f"; the softmax in {routers[0]} is outside the attention, as a mixture-of-experts "
                                    "router's is: MoE MLPs are not sparsified yet" if routers else ""))
    return container, {index: found[0] for index, found in by_index.items()}


def _layer_index(node: Node, layers_module: str) -> int | None:
    prefix = layers_module + "."
    for path in module_paths(node):
        if path.startswith(prefix):
            head = path[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def _refuse_routed_experts(model: torch.nn.Module, layers: list[LayerStructure]) -> None:
    """A mixture-of-experts layer whose shared expert was read as its MLP: its routed experts (batched weights, not
    linear projections) would run dense, so the sparsity asked for would not be the sparsity applied."""
    mlp_weights = {p.weight for layer in layers for p in (layer.mlp.up, layer.mlp.gate, layer.mlp.down) if p}
    experts = sorted(name for name, _ in model.named_parameters() if ".experts." in name and name not in mlp_weights)
    for layer in layers:
        inside = [name for name in experts if name.startswith(layer.module + ".")]
        if inside:
            raise StructureError(f"layer {layer.module}: besides the MLP read from "
                                 f"{layer.mlp.down.module.rsplit('.', 1)[0]} the layer has routed experts "
                                 f"({inside[0].rsplit('.', 1)[0]}); mixture-of-experts MLPs are not sparsified yet, "
                                 "and leaving them dense would skip less than asked")


# ---- attention -------------------------------------------------------------------------------------------------------
def _attention(layer: str, core_node: Node, layer_nodes: set[Node],
               params: GraphParameters) -> tuple[AttentionStructure, Node | None]:
    """The attention of one layer: its core, the projection each of q/k/v comes from (or the part of a fused one),
    what the paths between compute (refused unless the sparse op carries it) and the output projection; and the
    per-head bias its scores take, if any (whose slopes need a run of the model)."""
    projections = projections_in(layer_nodes, params)
    core = attention_core(layer, core_node, layer_nodes)
    num_heads, head_dim = int(shape(core.q)[1]), int(shape(core.q)[-1])

    roles = {}
    for role, start in (("q", core.q), ("k", core.k), ("v", core.v)):
        reached, _ = trace_back(start, layer_nodes, projections)
        if len(reached) != 1:
            raise StructureError(f"layer {layer}: the attention {role} input comes from {len(reached)} projections "
                                 f"({', '.join(projections[n].module for n in reached) or 'none'}), expected one")
        path = between(reached[0], start, layer_nodes) | {start}
        roles[role] = (*role_projection(reached[0], projections[reached[0]], path), path)
    q, _, q_path = roles["q"]
    k, _, k_path = roles["k"]
    v, _, v_path = roles["v"]
    rope = rotary(layer, q_path, layer_nodes)
    if not same_rotary(rope, rotary(layer, k_path, layer_nodes), core.node.graph):
        raise StructureError(f"layer {layer}: the query and key paths do not apply the same rotary embedding")
    norms = {role: head_norm(layer, roles[role][0], role, roles[role][2], head_dim, params) for role in ("q", "k")}
    if norms["q"][0] and norms["k"][0] and norms["q"][0].eps != norms["k"][0].eps:
        raise StructureError(f"layer {layer}: the query and key norms use different eps ({norms['q'][0].eps}, "
                             f"{norms['k'][0].eps}); the sparse attention takes one")
    for role, (projection, taking, path) in roles.items():
        norm_nodes = norms[role][1] if role in norms else set()
        require_carried(layer, projection, role, path - taking - norm_nodes, path, rope is not None)
    if q.width != num_heads * head_dim:
        raise StructureError(f"layer {layer}: query projection {q.module} has {q.width} outputs, expected "
                             f"{num_heads} heads x {head_dim}")
    if k.width % head_dim or v.width != k.width:
        raise StructureError(f"layer {layer}: key/value projections ({k.width}, {v.width} outputs) do not split "
                             f"into heads of {head_dim}")
    num_kv_heads = k.width // head_dim
    if num_heads % num_kv_heads:
        raise StructureError(f"layer {layer}: {num_heads} query heads do not group evenly over {num_kv_heads} KV heads")

    o_reached, _ = walk(users(core.output), users, within=layer_nodes.__contains__, stop=projections.__contains__)
    if len(o_reached) != 1:
        raise StructureError(f"layer {layer}: the attention output feeds {len(o_reached)} projections, expected one "
                             "output projection")
    o_node = o_reached[0]
    o = projections[o_node]
    if o.in_features != num_heads * head_dim:
        raise StructureError(f"layer {layer}: output projection {o.module} takes {o.in_features} features, expected "
                             f"{num_heads} heads x {head_dim}")
    q_scale = math.prod(scalar_factor(n) for n in q_path - norms["q"][1] if n.op == "call_function")
    if q_scale != 1.0 and norms["q"][0] is not None:
        raise StructureError(f"layer {layer}: the queries are both scaled by a constant and normalised per head; "
                             "shadowfx folds the scale into the attention's and cannot tell which comes first")
    return AttentionStructure(
        module=common_prefix(q.module, o.module),
        q=q, k=k, v=v, o=o,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        scaling=float(core.scale * q_scale),
        core=core.kind, core_node=core.node.name,
        mask_node=core.mask.name if core.mask is not None else None,
        context_node=entry_node(o_node).name,
        rotary=rope,
        q_norm=norms["q"][0],
        k_norm=norms["k"][0],
        mask_fill=core.mask_fill,
        softcap=core.softcap,
    ), core.score_bias


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
    if not norms:
        return None
    # the norm nearest the head, in graph order (a head may hold a norm of its own after the model's)
    order = {n: i for i, n in enumerate(head.graph.nodes)}
    return owner(max(norms, key=order.__getitem__))


def _embeddings(graph: torch.fx.Graph, params: GraphParameters, captured: CapturedDecoder, layers_module: str):
    input_ids = _input_ids(captured)
    lookups = [n for n in graph.nodes if is_call(n, {aten.embedding.default}) and params.name(n.args[0])]
    token = [n for n in lookups if reaches(n.args[1], input_ids, set(graph.nodes))]
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
