"""The rewrite checks itself: at sparsity 0 the rewritten prefill graph must equal the captured dense graph.

Discovery reads a layer's projections and attention core and the sparse ops recompute everything between them, so
an op the discovery did not account for (a norm of the queries, a rotary variant, a score bias) would be dropped
without a word. Running both graphs on a small left-padded probe batch catches that before ``transform`` returns,
and the per-layer keys and values name the first layer, and the side (keys, values or after them), that differs.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from shadowfx.capture import CapturedDecoder
from shadowfx.structure import DecoderStructure, StructureError

# Max |difference| allowed, relative to the dense tensor's largest magnitude (at least 1): reassociated sums in
# float32 stay near 1e-6, while a dropped transform moves logits by 1e-3 or more.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}
PROBE_LENGTH = 9


class RewriteMismatch(StructureError):
    """The rewritten graph with every unit kept does not compute what the model computes."""


def probe_batch(vocab_size: int, device: torch.device, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of random tokens, row ``r`` left-padded by ``2 r + 1`` (row 0 not at all), so the masks and positions
    are exercised."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (rows, PROBE_LENGTH), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, rows):
        attention_mask[row, : 2 * row + 1] = 0
    return input_ids, attention_mask


def excess(ours: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """(max |difference|, the allowed difference) between two tensors of the model's dtype."""
    tolerance = _TOLERANCE.get(dense.dtype, 1e-4)
    ours, dense = ours.double(), dense.double()
    diff = (ours - dense).abs().nan_to_num(nan=float("inf")).max().item() if dense.numel() else 0.0
    scale = max(1.0, dense.abs().max().item() if dense.numel() else 0.0)
    return diff, tolerance * scale


def verify_rewrite(prefill_capture: CapturedDecoder, structure: DecoderStructure, dense_rewrite: GraphModule) -> None:
    """Raise :class:`RewriteMismatch` unless ``dense_rewrite`` (the prefill passes run with sparsity 0) gives the
    captured graph's logits, keys and values in every layer on real tokens (those of padding are never attended to,
    and a model may fill a padding query's attention to nothing in a way of its own)."""
    program_inputs = [n for n in prefill_capture.graph.nodes if n.op == "placeholder"]
    device = next((n.meta["val"].device for n in program_inputs if "val" in n.meta), torch.device("cpu"))
    input_ids, attention_mask = probe_batch(structure.vocab_size, device)
    layers = structure.num_layers
    with torch.no_grad():
        dense = prefill_capture.module()(input_ids, attention_mask, (), ())
        ours = dense_rewrite(input_ids, attention_mask)
    dense_logits, (dense_keys, dense_values) = dense[0], dense[1:]
    real = attention_mask.bool()
    for index in range(layers):
        for side, dense_cache, our_cache in (("keys", dense_keys, ours[1:1 + layers]),
                                             ("values", dense_values, ours[1 + layers:1 + 2 * layers])):
            # [B, heads, T, D] -> [real tokens, heads, D]
            diff, allowed = excess(our_cache[index].transpose(1, 2)[real], dense_cache[index].transpose(1, 2)[real])
            if diff > allowed:
                attention = structure.layers[index].attention
                projection = attention.k if side == "keys" else attention.v
                raise RewriteMismatch(
                    f"{structure.model_class}: with every head kept, the rewritten layer {index} computes other "
                    f"attention {side} than the model (max |difference| {diff:.3g}, allowed {allowed:.3g}): the "
                    f"model does something between {projection.module} and its attention core that shadowfx does "
                    "not carry into the sparse op, so this family cannot be sparsified exactly; please report it "
                    "(transform(..., verify=False) skips this check at your own risk)")
    diff, allowed = excess(ours[0][real], dense_logits[real])
    if diff > allowed:
        raise RewriteMismatch(
            f"{structure.model_class}: with every head and neuron kept, the rewritten model's logits differ from the "
            f"model's by {diff:.3g} (allowed {allowed:.3g}) while every layer's keys and values match: the attention "
            "core, its output projection or the MLP computes something shadowfx does not carry into the sparse ops, "
            "so this family cannot be sparsified exactly; please report it (transform(..., verify=False) skips this "
            "check at your own risk)")
