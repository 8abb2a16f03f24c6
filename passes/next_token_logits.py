"""Pass: compute the logits of the last position only, for a prefill whose generation needs just the next token.

A prompt of T tokens otherwise runs the LM head T times, and only the last row of logits is read; the LM head is a
large share of a prefill's work (for Llama 3.2 1B's 128k vocabulary, a fifth of it at 128 tokens). Hugging Face's
generate asks for the same (``logits_to_keep=1``). The pass slices the LM head's input to its last position; the
prompt must be left-padded, as the runtimes require, so that every row's last token is there. The graph then returns
logits ``[B, 1, V]``.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from shadowfx.passes.base import GraphPass, PassResult, require_nodes
from shadowfx.passes.graph import nodes_by_name, projection_input, shape
from shadowfx.structure import DecoderStructure

aten = torch.ops.aten


class NextTokenLogits(GraphPass):
    """Counts 1 under key -1 (outside the decoder layers) when it sliced the LM head's input; a head whose input is
    not ``[B, T, E]`` is left as it is (count 0), and the graph still returns every position's logits."""

    name = "next_token_logits"

    def __init__(self, structure: DecoderStructure) -> None:
        self.head = structure.lm_head.node

    def requires(self, gm: GraphModule) -> None:
        require_nodes(self, gm, {"the LM head": self.head})

    def call(self, gm: GraphModule) -> PassResult:
        head = nodes_by_name(gm)[self.head]
        hidden = projection_input(head)
        if len(shape(hidden)) != 3:
            return PassResult(gm, False, {})
        with gm.graph.inserting_before(head):
            last = gm.graph.call_function(aten.slice.Tensor, (hidden, 1, -1, None))
        last.meta = {**hidden.meta, "val": hidden.meta["val"][:, -1:]}
        head.replace_input_with(hidden, last)
        return PassResult(gm, True, {-1: 1})
