"""What the sparse model keeps, recomputed independently of `shadowfx.selection` from the predictor's raw scores.

The reference here ranks with plain Python sorting: per layer, or across layers after each layer's minimum is
reserved, one budget per batch row (and per token). Budgets must be exact, and a row's selection and logits must
not depend on the rest of its batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import pytest
import torch

import shadowfx
from shadowfx.families import build_small
from shadowfx.predictor import LayerwisePredictor, ShadowPredictor, StaticScores
from shadowfx.selection import SparsityConfig, planned_sparsity, select

from conftest import padded_batch, small_model, structure

MIN_KV_HEADS = 1
MIN_NEURON_FRACTION = 1 / 32


@functools.cache
def deep_model(family: str):
    """Five layers: four sparse ones, so a global budget has room to move between layers."""
    return build_small(family, num_layers=5)


@functools.cache
def deep_structure(family: str):
    return shadowfx.discover(deep_model(family))


def reference_keep(scores: list[list[float]], sparsity: float, scope: str, minimum: int) -> list[set[int]]:
    """Kept units per layer of one row's scores ``[L'][N]``."""
    layers, units = len(scores), len(scores[0])
    by_score = [sorted(range(units), key=lambda u, l=l: -scores[l][u]) for l in range(layers)]
    if scope == "per_layer":
        keep = max(minimum, units - math.floor(sparsity * units + 1e-9))
        return [set(order[:keep]) for order in by_score]
    total = layers * units
    budget = max(minimum * layers, total - math.floor(sparsity * total + 1e-9))
    kept = [set(order[:minimum]) for order in by_score]
    rest = sorted(((l, u) for l in range(layers) for u in range(units) if u not in kept[l]),
                  key=lambda lu: -scores[lu[0]][lu[1]])
    for l, u in rest[:budget - minimum * layers]:
        kept[l].add(u)
    return kept


def group_scores(head_scores: torch.Tensor, group: int) -> torch.Tensor:
    """A KV group scores the mean of its query heads."""
    return head_scores.unflatten(-1, (-1, group)).mean(-1)


def kept_sets(indices: torch.Tensor, units: int) -> list[set[int]]:
    """The units a layer's selection ``[rows, k]`` keeps per row, empty slots (``units``) left out."""
    return [{int(i) for i in row if i < units} for row in indices.reshape(-1, indices.shape[-1])]


def check_against_reference(selection, head_scores, neuron_scores, structure, sparsity, scope, block=1):
    """``head_scores`` ``[rows, L', H]`` and ``neuron_scores`` ``[rows, L', F]`` as the predictor returned them."""
    attention = structure.layers[1].attention
    groups = group_scores(head_scores.float(), attention.kv_group_size)
    blocks = neuron_scores.float().unflatten(-1, (-1, block)).mean(-1)
    min_blocks = math.ceil(MIN_NEURON_FRACTION * blocks.shape[-1])
    for row in range(groups.shape[0]):
        want_groups = reference_keep(groups[row].tolist(), sparsity, scope, MIN_KV_HEADS)
        want_blocks = reference_keep(blocks[row].tolist(), sparsity, scope, min_blocks)
        for layer in range(groups.shape[1]):
            got_groups = kept_sets(selection.kv_heads[layer], attention.num_kv_heads)[row]
            got_neurons = kept_sets(selection.neurons[layer], structure.layers[1].mlp.intermediate_size)[row]
            assert got_groups == want_groups[layer], (row, layer)
            assert got_neurons == {b * block + i for b in want_blocks[layer] for i in range(block)}, (row, layer)


@contextlib.contextmanager
def recording(*modules: torch.nn.Module):
    """Per module, the outputs it returns inside the ``with`` block."""
    outputs: list[list] = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda _m, _inputs, output, seen=seen: seen.append(output))
               for m, seen in zip(modules, outputs)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def achieved(kept: list[set[int]], units: int) -> float:
    return 1 - sum(map(len, kept)) / (len(kept) * units)


@pytest.mark.parametrize("family", ["llama", "opt"])  # 2 KV groups of 2 heads (GQA); 4 heads (MHA)
@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_random_static_scores_keep_exactly_the_budget(family, scope, sparsity):
    structure = deep_structure(family)
    scores = StaticScores.random(structure, seed=3)
    config = SparsityConfig(sparsity, sparsity, scope)
    chosen = select(scores(torch.zeros(2, 1)), structure, config)
    attention, width = structure.layers[1].attention, structure.layers[1].mlp.intermediate_size
    want_groups = reference_keep(group_scores(scores.head_scores, attention.kv_group_size).tolist(), sparsity, scope,
                                 MIN_KV_HEADS)
    want_neurons = reference_keep(scores.neuron_scores.tolist(), sparsity, scope,
                                  math.ceil(MIN_NEURON_FRACTION * width))
    for layer in range(structure.num_layers - 1):
        assert kept_sets(chosen.kv_heads[layer], attention.num_kv_heads) == [want_groups[layer]] * 2
        assert kept_sets(chosen.neurons[layer], width) == [want_neurons[layer]] * 2
    plan = planned_sparsity(structure, config)
    assert plan["heads"] == {"requested": sparsity, "achieved": pytest.approx(achieved(want_groups, 2 if family == "llama" else 4))}
    assert plan["neurons"] == {"requested": sparsity, "achieved": pytest.approx(achieved(want_neurons, width))}


@pytest.mark.parametrize(("family", "scope", "sparsity", "heads_applied"), [
    ("llama", "global", 0.7, 0.5),  # 4 groups of 8 are the per-layer minimum
    ("llama", "per_layer", 0.3, 0.0),  # skipping 0.3 of 2 groups rounds to none
    ("opt", "global", 0.5, None),  # reachable: no warning
])
def test_transform_says_once_what_it_applies_instead(family, scope, sparsity, heads_applied, one_thread):
    structure = deep_structure(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = shadowfx.transform(deep_model(family), StaticScores.random(structure, seed=3), sparsity=sparsity,
                                    scope=scope)
    told = [str(w.message) for w in caught if issubclass(w.category, shadowfx.SparsityWarning)]
    sparse(*padded_batch(2, 6, 512, seed=1))
    effective = sparse.effective_sparsity()
    assert effective.requested == {"heads": sparsity, "neurons": sparsity}
    if heads_applied is None:
        assert told == [] and effective.sparse_layers["heads"] == sparsity
    else:
        assert len(told) == 1 and told[0].startswith(f"heads sparsity {sparsity:g} ")
        assert f"applying {heads_applied:.4g} instead" in told[0]
        assert effective.sparse_layers["heads"] == heads_applied
    assert effective.sparse_layers["neurons"] == pytest.approx(sparsity, abs=0.005)
    assert effective.heads < effective.sparse_layers["heads"] or heads_applied == 0.0  # layer 0 counts dense


@functools.cache
def shadow_predictor(family: str, block: int = 1) -> ShadowPredictor:
    return ShadowPredictor.for_structure(structure(family), hidden=32, neuron_block=block, seed=2)


@pytest.mark.parametrize(("family", "scope", "granularity", "block"), [
    ("llama", "global", "prompt", 1), ("llama", "per_layer", "prompt", 1), ("opt", "global", "prompt", 1),
    ("opt", "per_layer", "prompt", 1), ("llama", "global", "token", 1), ("opt", "per_layer", "token", 1),
    ("llama", "global", "prompt", 4), ("opt", "global", "token", 4),
])
def test_selection_equals_independent_topk_of_the_raw_scores(family, scope, granularity, block, one_thread):
    predictor = shadow_predictor(family, block)
    sparse = shadowfx.transform(small_model(family), predictor, sparsity=0.5, scope=scope, granularity=granularity)
    input_ids, attention_mask = padded_batch(3, 7, 512, seed=9)
    with recording(predictor) as (outputs,):
        sparse(input_ids, attention_mask)
    heads, neurons = outputs[-1]
    check_against_reference(sparse.last_selection, heads, neurons, structure(family), 0.5, scope, block)
    if granularity == "token":  # one selection per token of every row
        assert sparse.last_selection.kv_heads[0].shape[:2] == input_ids.shape
        assert heads.shape[0] == input_ids.numel()


@pytest.mark.parametrize("granularity", ["prompt", "token"])
def test_layerwise_selection_equals_independent_topk(granularity, one_thread):
    predictor = LayerwisePredictor.for_structure(structure("llama"), hidden=16, seed=4)
    sparse = shadowfx.transform(small_model("llama"), predictor, sparsity=0.5, scope="per_layer",
                                granularity=granularity)
    with recording(*predictor.heads, *predictor.neurons) as outputs:
        sparse(*padded_batch(2, 6, 512, seed=3))
    layers = len(predictor.heads)
    heads = torch.stack([seen[-1] for seen in outputs[:layers]], -2)
    neurons = torch.stack([seen[-1] for seen in outputs[layers:]], -2)
    check_against_reference(sparse.last_selection, heads.flatten(0, -3), neurons.flatten(0, -3), structure("llama"),
                            0.5, "per_layer")


def one_by_one_and_batched(sparse, prompts: list[torch.Tensor], new_tokens: int):
    """Each prompt's prefill logits and greedy step logits alone, and the same from one left-padded batch."""
    alone = [sparse.generate(p[None], max_new_tokens=new_tokens, eos_token_id=[], return_logits=True)
             for p in prompts]
    alone_prefill = [sparse(p[None])[0] for p in prompts]
    length = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, length - len(p):] = p
        attention_mask[row, length - len(p):] = 1
    batched_prefill = sparse(input_ids, attention_mask)
    padding = sparse.effective_sparsity().padding
    tokens, logits = sparse.generate(input_ids, attention_mask, max_new_tokens=new_tokens, eos_token_id=[],
                                     return_logits=True)
    return alone, alone_prefill, (tokens, logits, batched_prefill), padding


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("granularity", ["prompt", "token"])
def test_a_row_computes_the_same_alone_and_in_any_batch(family, scope, granularity, one_thread):
    sparse = shadowfx.transform(small_model(family), shadow_predictor(family), sparsity=0.5, scope=scope,
                                granularity=granularity)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (n,), generator=generator) for n in (9, 4, 7, 9)]
    alone, alone_prefill, (tokens, logits, prefill), padding = one_by_one_and_batched(sparse, prompts, 3)
    length = prefill.shape[1]
    for row, p in enumerate(prompts):
        torch.testing.assert_close(prefill[row, length - len(p):], alone_prefill[row], rtol=1e-4, atol=1e-4)
        alone_tokens, alone_logits = alone[row]
        assert torch.equal(tokens[row, length:], alone_tokens[0, len(p):])
        torch.testing.assert_close(logits[row], alone_logits[0], rtol=1e-4, atol=1e-4)
    if scope == "global":  # rows (tokens) kept different counts per layer, so the batch really was padded
        assert padding > 0
    else:
        assert padding == 0
