"""Recogniser: the attention core of a layer, an SDPA call or an eager attention around its softmax."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.fx import Node

from shadowfx.passes.graph import LAYOUT_OPS, MATMUL_OPS, SOFTMAX_OPS, inputs, is_call, shape, users, walk
from shadowfx.passes.recognise_head_transforms import scalar_factor
from shadowfx.structure import AttentionCore as AttentionCoreKind, StructureError

aten = torch.ops.aten


_SDPA = {aten.scaled_dot_product_attention.default}
ATTENTION_CORE_OPS = _SDPA | SOFTMAX_OPS
# Elementwise ops allowed between the scores matmul and the softmax of an eager attention.
_SCORE_OPS = LAYOUT_OPS | {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten._assert_tensor_metadata.default}


class AttentionCore(NamedTuple):
    """The attention core of one layer: the tensors it takes, its mask and scale, and the node its output leaves."""

    kind: AttentionCoreKind
    node: Node
    q: Node
    k: Node
    v: Node
    mask: Node | None
    scale: float
    output: Node


def attention_core(layer: str, core: Node, layer_nodes: set[Node]) -> AttentionCore:
    """Read an SDPA call, or the matmul -> scale/mask -> softmax -> matmul of an eager attention around ``core``."""
    if core.target in _SDPA:
        q_in, k_in, v_in = core.args[:3]
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        scale = core.kwargs.get("scale")
        return AttentionCore("sdpa", core, q_in, k_in, v_in, mask if isinstance(mask, Node) else None,
                             scale if scale is not None else shape(q_in)[-1] ** -0.5, core)
    q_in, k_in, v_in, mask, scale, output = _eager_attention(layer, core, layer_nodes)
    return AttentionCore("eager", core, q_in, k_in, v_in, mask, scale, output)


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
                             f"{sorted({_op_name(n.target) for n in between if n.target not in _SCORE_OPS})}")
    masks = [a for n in between if n.target == aten.add.Tensor for a in n.args
             if isinstance(a, Node) and a not in seen]
    scale = math.prod(scalar_factor(n) for n in between)
    k_in = score_matmul.args[1]
    return score_matmul.args[0], k_in, value_matmul.args[1], masks[0] if masks else None, scale, value_matmul


def _op_name(target: object) -> str:
    """An aten op as torch prints it, a Python function by its name (not its address, which changes every run)."""
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
