"""Recogniser: the attention core of a layer, an SDPA call or an eager attention around its softmax."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.fx import Node

from shadowfx.passes.graph import LAYOUT_OPS, MATMUL_OPS, SOFTMAX_OPS, inputs, is_call, shape, users, walk
from shadowfx.passes.recognise_head_transforms import scalar_factor
from shadowfx.passes.recognise_projections import between
from shadowfx.structure import AttentionCore as AttentionCoreKind, StructureError

aten = torch.ops.aten


_SDPA = {aten.scaled_dot_product_attention.default}
ATTENTION_CORE_OPS = _SDPA | SOFTMAX_OPS
# Elementwise ops allowed between the scores matmul and the softmax of an eager attention.
_SCORE_OPS = LAYOUT_OPS | {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten._assert_tensor_metadata.default,
                           aten.masked_fill.Scalar}
_CAP_OPS = {aten.tanh.default}


class AttentionCore(NamedTuple):
    """The attention core of one layer: the tensors it takes, its mask and scale, and the node its output leaves.

    ``mask_fill`` set: ``mask`` is a boolean mask of the blocked scores (True = blocked), which the core fills with
    this value; else ``mask`` is added to the scores (a float mask) or, for SDPA, True = attend. ``score_bias``: a
    tensor of one bias per head added to the scores (ALiBi), computed outside the layer. ``softcap``: the scaled
    scores are capped as softcap * tanh(scores / softcap) before the mask and bias (Gemma 2).
    """

    kind: AttentionCoreKind
    node: Node
    q: Node
    k: Node
    v: Node
    mask: Node | None
    scale: float
    output: Node
    mask_fill: float | None = None
    score_bias: Node | None = None
    softcap: float | None = None


# the fill of a masked_fill that the additive form gives exactly: adding it to any score rounds to it in float32
_ABSORBING_FILL = -1e37


def attention_core(layer: str, core: Node, layer_nodes: set[Node]) -> AttentionCore:
    """Read an SDPA call, or the matmul -> scale/bias/mask -> softmax -> matmul of an eager attention around
    ``core``."""
    if core.target in _SDPA:
        q_in, k_in, v_in = core.args[:3]
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        scale = core.kwargs.get("scale")
        return AttentionCore("sdpa", core, q_in, k_in, v_in, mask if isinstance(mask, Node) else None,
                             scale if scale is not None else shape(q_in)[-1] ** -0.5, core)
    return _eager_attention(layer, core, layer_nodes)


def _eager_attention(layer: str, softmax: Node, layer_nodes: set[Node]) -> AttentionCore:
    """An eager attention: the scores matmul, then scalings, a soft cap (c * tanh(x / c)), additions of a mask and
    of a per-head bias, a masked_fill, layout ops, the softmax and the values matmul. Anything else on the way
    refuses."""
    scores, _ = walk(inputs(softmax), inputs, within=layer_nodes.__contains__, stop=lambda n: is_call(n, MATMUL_OPS))
    values, _ = walk(users(softmax), users, within=layer_nodes.__contains__, stop=lambda n: is_call(n, MATMUL_OPS))
    if len(scores) != 1 or len(values) != 1:
        raise StructureError(f"layer {layer}: softmax {softmax.name} is not between a scores matmul and a values "
                             "matmul, so the eager attention is not recognised")
    score_matmul, value_matmul = scores[0], values[0]
    chain = between(score_matmul, softmax, layer_nodes)
    unexpected = sorted({_op_name(n.target) for n in chain
                         if n.op == "call_function" and n.target not in _SCORE_OPS | _CAP_OPS})
    if unexpected:
        raise StructureError(f"layer {layer}: unexpected ops between attention scores and softmax: {unexpected}")
    scale, softcap, capped = _soft_cap(layer, score_matmul, chain, layer_nodes)
    heads = shape(score_matmul)[1]
    additive, blocked, biases = [], [], []
    for node in chain:
        # tensors from outside the chain (a view's symbolic sizes are not)
        side = [a for a in node.all_input_nodes if a not in chain and a is not score_matmul
                and isinstance(a.meta.get("val"), torch.Tensor)]
        if not side:
            continue
        if is_call(node, {aten.add.Tensor}) and len(side) == 1:
            # a mask is one for all heads ([B, 1, S, T]); a tensor of one value per head is a score bias
            sizes = shape(side[0])
            (additive if len(sizes) == 4 and sizes[1] == 1 else biases).append(side[0])
        elif is_call(node, {aten.masked_fill.Scalar}) and side == [node.args[1]]:
            fill = float(node.args[2])
            if not math.isfinite(fill) or fill > _ABSORBING_FILL:
                raise StructureError(f"layer {layer}: the scores are masked_fill-ed with {fill}, which the sparse "
                                     f"attention cannot add as a mask; supported: a finite fill below "
                                     f"{_ABSORBING_FILL:g} (the float32 minimum HF uses)")
            blocked.append((node.args[1], fill))
        else:
            raise StructureError(f"layer {layer}: {node.name} ({_op_name(node.target)}) combines the attention scores "
                                 f"with {[a.name for a in side]}; the sparse attention adds one mask and one bias per "
                                 "head, and scales by constants")
    if capped & {n for n in chain if n.target in {aten.add.Tensor, aten.masked_fill.Scalar}}:
        raise StructureError(f"layer {layer}: a mask or bias is added to the scores before their tanh soft cap; the "
                             "sparse attention caps the scaled scores, then adds the mask and bias")
    if len(additive) + len(blocked) > 1 or len(biases) > 1:
        raise StructureError(f"layer {layer}: the scores take {len(additive) + len(blocked)} masks and "
                             f"{len(biases)} per-head biases, expected at most one of each")
    if biases and len(shape(biases[0])) < 3 or biases and shape(biases[0])[-3] not in (1, heads):
        raise StructureError(f"layer {layer}: the bias added to the scores has shape {shape(biases[0])}, not one "
                             f"[.., heads, queries, keys] bias for the {heads} heads")
    mask, fill = blocked[0] if blocked else (additive[0] if additive else None, None)
    return AttentionCore("eager", softmax, score_matmul.args[0], score_matmul.args[1], value_matmul.args[1], mask,
                         scale, value_matmul, fill, biases[0] if biases else None, softcap)


def _soft_cap(layer: str, score_matmul: Node, chain: set[Node], layer_nodes: set[Node]
              ) -> tuple[float, float | None, set[Node]]:
    """(the scale of the scores, the soft cap or None, the nodes up to the cap's tanh). The constants before the
    tanh and after it multiply to the scale, the ones after it are the cap: c * tanh(p x) is the op's
    cap * tanh(scale x / cap) with scale = p c and cap = c."""
    tanhs = [n for n in chain if n.target in _CAP_OPS]
    if not tanhs:
        return math.prod(scalar_factor(n) for n in chain), None, set()
    if len(tanhs) > 1:
        raise StructureError(f"layer {layer}: the scores pass {len(tanhs)} tanh ops before the softmax; the sparse "
                             "attention supports one soft cap")
    tanh = tanhs[0]
    capped = between(score_matmul, tanh, layer_nodes) - {score_matmul}
    before = math.prod(scalar_factor(n) for n in capped)
    after = math.prod(scalar_factor(n) for n in chain - capped - {tanh})
    if not after > 0:
        raise StructureError(f"layer {layer}: the scores' tanh is multiplied by {after} after it, not by a positive "
                             "soft cap")
    return before * after, after, capped


def _op_name(target: object) -> str:
    """An aten op as torch prints it, a Python function by its name (not its address, which changes every run)."""
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
