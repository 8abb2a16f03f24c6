"""Recogniser: the activation between an MLP's input projection and what follows it, by name."""

from __future__ import annotations

import torch
from torch.fx import Node

from shadowfx.passes.graph import LAYOUT_OPS, scalar_args
from shadowfx.structure import StructureError

aten = torch.ops.aten


_ACTIVATION_OPS = {aten.relu.default, aten.square.default, aten.silu.default, aten.gelu.default, aten.tanh.default,
                   aten.sigmoid.default, aten.pow.Tensor_Scalar, aten.mul.Tensor, aten.add.Tensor, aten.div.Tensor,
                   aten.erf.default}


def activation_of(layer: str, nodes: set[Node]) -> str:
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
    if targets == {aten.silu.default} or (targets == {aten.sigmoid.default, aten.mul.Tensor}
                                           and not _constants(computing)):
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
