"""Pass: compute the LM head's logits for some positions only: the last one, or those a new graph input names.

A prompt of T tokens otherwise runs the LM head T times, and a generation reads only the last row of logits; the LM
head is a large share of a prefill's work (for Llama 3.2 1B's 128k vocabulary, a fifth of it at 128 tokens).
Hugging Face's generate asks for the same (``logits_to_keep=1``). The pass gathers the LM head's input ``[B, T, E]``
at the positions before the head, and the graph returns logits ``[B, P, V]``:

* ``"last"``: the last position, ``P = 1`` (the PyTorch runtime's graph for a generation's start). The prompt must be
  left-padded, as the runtimes require, so that every row's last token is there.
* ``"input"``: the positions of a new last graph input, ``logit_positions`` (int64 ``[P]``). An exported prefill
  then serves both a forward (every position) and a generation's start (the last one) from one graph: one
  onnxruntime session, one prepacked copy of the weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.fx import GraphModule

from shadowfx.passes.base import GraphPass, PassResult, require_nodes
from shadowfx.passes.graph import nodes_by_name, placeholders, projection_input, shape
from shadowfx.structure import DecoderStructure

aten = torch.ops.aten

INPUT_NAME = "logit_positions"


class LogitPositions(GraphPass):
    """Counts 1 under key -1 (outside the decoder layers) when it gathered the LM head's input; a head whose input is
    not ``[B, T, E]`` (one that reads it flattened) is left as it is (count 0, and no input added), and the
    graph still returns every position's logits."""

    name = "logit_positions"

    def __init__(self, structure: DecoderStructure, positions: Literal["last", "input"]) -> None:
        self.head = structure.lm_head.node
        self.positions = positions

    def requires(self, gm: GraphModule) -> None:
        require_nodes(self, gm, {"the LM head": self.head})

    def call(self, gm: GraphModule) -> PassResult:
        head = nodes_by_name(gm)[self.head]
        hidden = projection_input(head)
        if len(shape(hidden)) != 3:
            return PassResult(gm, False, {})
        fake_hidden = hidden.meta["val"]
        if self.positions == "last":
            with gm.graph.inserting_before(head):
                picked = gm.graph.call_function(aten.slice.Tensor, (hidden, 1, -1, None))
            picked.meta = {**hidden.meta, "val": fake_hidden[:, -1:]}
        else:
            with gm.graph.inserting_after(placeholders(gm)[-1]):
                positions = gm.graph.placeholder(INPUT_NAME)
            positions.meta = {"val": fake_hidden.new_empty((fake_hidden.shape[1],), dtype=torch.int64)}
            with gm.graph.inserting_before(head):
                picked = gm.graph.call_function(aten.index_select.default, (hidden, 1, positions))
            picked.meta = {**hidden.meta, "val": fake_hidden}
        head.replace_input_with(hidden, picked)
        return PassResult(gm, True, {-1: 1})
