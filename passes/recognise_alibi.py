"""Recogniser: ALiBi, a bias linear in the key's position added to each head's attention scores (MPT, BLOOM).

Models build the bias in ways of their own (distances to the query, positions counted from the mask, one table
sliced to the length), outside the layers. The sparse attention needs one slope per query head, so the bias is
proven free of the tokens from the graph, and its values in one run of the model on a probe batch are proven linear
in the key's position, for every row, head and query, over the keys the row attends to; the slopes are read from
them. Softmax ignores a constant a query adds to all its keys, so the origin of the positions does not matter.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from shadowfx.capture import CapturedDecoder
from shadowfx.passes.graph import inputs, walk
from shadowfx.structure import StructureError

aten = torch.ops.aten

# how far the bias may be from linear, relative to its largest value (float32 rounding of positions up to ~1e4)
_LINEAR_TOLERANCE = 1e-5


def alibi_slopes(captured: CapturedDecoder, biases: dict[int, Node], num_heads: int, input_ids: Node,
                 vocab_size: int) -> dict[int, tuple[float, ...]]:
    """The slopes of each layer's score bias (``biases``: layer index -> the bias node of a prefill graph whose
    token input is ``input_ids``)."""
    model = captured.model
    name = type(model).__name__
    for bias in biases.values():
        _require_token_free(name, bias, input_ids)
    if any(p.is_meta for p in model.parameters()):
        raise StructureError(f"{name}: its attention adds a per-head bias to the scores, whose slopes shadowfx reads "
                             "from a run of the model; a model without weights (on the meta device) cannot run")
    from shadowfx.verify import probe_batch  # verify imports the passes' structure; imported here, no cycle

    device = next((n.meta["val"].device for n in captured.graph.nodes if n.op == "placeholder" and "val" in n.meta),
                  torch.device("cpu"))
    tokens, attention_mask = probe_batch(vocab_size, device)
    values = _values_of(captured, {bias.name for bias in biases.values()}, tokens, attention_mask)
    batch, length = tokens.shape
    attended = attention_mask.bool()  # [B, T]: the keys of each row that are not padding
    slopes = {}
    for index, bias in biases.items():
        value = torch.broadcast_to(values[bias.name].double(), (batch, num_heads, length, length))
        offsets = value - value[..., -1:]  # relative to the last key, which every row attends to
        distance = torch.arange(length, device=device, dtype=torch.float64) - (length - 1)
        slope = offsets[0, :, -1, 0] / distance[0]  # row 0 is not padded
        expected = slope[None, :, None, None] * distance
        error = (offsets - expected).abs().where(attended[:, None, None, :], 0.0).max().item()
        if error > _LINEAR_TOLERANCE * max(1.0, value.abs().max().item()):
            raise StructureError(f"layer {index}: the per-head bias added to the attention scores ({bias.name}) is not "
                                 f"linear in the key's position (off by {error:.3g}); the sparse attention supports "
                                 "such a bias as ALiBi only")
        slopes[index] = tuple(float(s) for s in slope)
    return slopes


def _require_token_free(name: str, bias: Node, input_ids: Node) -> None:
    """Refuse a bias computed from the tokens' values (it may use their count and the mask)."""
    _, ancestors = walk([bias], inputs, within=lambda n: True, stop=lambda n: False)
    if any(u in ancestors and u.target != aten.sym_size.int for u in input_ids.users):
        raise StructureError(f"{name}: the bias added to the attention scores ({bias.name}) is computed from the "
                             "tokens, not only from their positions; the sparse attention supports a per-head bias as "
                             "ALiBi only")


def _values_of(captured: CapturedDecoder, names: set[str], input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The values of the nodes ``names`` in a run of the captured prefill graph."""
    found: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: Node) -> object:
            value = super().run_node(node)
            if node.name in names:
                found[node.name] = value
            return value

    with torch.no_grad():
        Recorder(captured.module()).run(input_ids, attention_mask)
    return found
