"""The eager masked reference computes what "only the selected heads and neurons" means, for every family.

Its hooks are checked against plain Hugging Face runs and against weight surgery on deep copies (zeroed output
projection columns / down projection columns), so later graph-equivalence tests can trust it as the ground truth.
"""

from __future__ import annotations

import copy

import pytest
import torch

from shadowfx.capture import PrefillStep
from conftest import padded_batch, small_model, structure
from shadowfx.masked_reference import MaskedReference

BATCH, LENGTH, NEW_TOKENS = 3, 10, 5
CLOSE = dict(rtol=1e-5, atol=1e-5)


def _inputs(family: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return padded_batch(BATCH, LENGTH, structure(family).vocab_size, seed=seed)


@torch.no_grad()
def _plain_logits(model, input_ids, attention_mask) -> torch.Tensor:
    """The unhooked model, called the way the prefill capture calls it."""
    return PrefillStep(model)(input_ids, attention_mask)


def _no_hooks_left(model, found) -> bool:
    return all(
        not model.get_submodule(path)._forward_pre_hooks
        for layer in found.layers
        for path in (layer.attention.o.module, layer.mlp.down.module)
    )


def _full_selection(found, batch: int, layers) -> tuple[dict, dict]:
    heads = {l: torch.arange(found.layers[l].attention.num_kv_heads).expand(batch, -1) for l in layers}
    neurons = {l: torch.arange(found.layers[l].mlp.intermediate_size).expand(batch, -1) for l in layers}
    return heads, neurons


def _random_selection(found, batch: int, layers, *, seed: int) -> tuple[dict, dict]:
    """Per row: a random non-empty proper subset of KV heads and about a third of the neurons."""
    generator = torch.Generator().manual_seed(seed)
    heads, neurons = {}, {}
    for l in layers:
        kv, size = found.layers[l].attention.num_kv_heads, found.layers[l].mlp.intermediate_size
        g, k = max(1, kv // 2), size // 3
        heads[l] = torch.stack([torch.randperm(kv, generator=generator)[:g] for _ in range(batch)])
        neurons[l] = torch.stack([torch.randperm(size, generator=generator)[:k] for _ in range(batch)])
    return heads, neurons


def _zero_inputs_of(model, projection, features: torch.Tensor) -> None:
    """Zero the weights that read input features ``features`` of ``projection`` (Linear [out, in], Conv1D [in, out])."""
    weight = model.get_parameter(projection.weight)
    with torch.no_grad():
        if projection.weight_layout == "out_in":
            weight[:, features] = 0
        else:
            weight[features, :] = 0


def _unselected(selected: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.zeros(size, dtype=torch.bool)
    keep[selected] = True
    return (~keep).nonzero().flatten()


def test_no_selection_is_the_plain_model(family):
    model, found = small_model(family), structure(family)
    input_ids, attention_mask = _inputs(family)
    plain = _plain_logits(model, input_ids, attention_mask)
    with MaskedReference(model, found) as ref:
        assert torch.equal(ref.logits(input_ids, attention_mask), plain)
        ref.set_selection(*_random_selection(found, BATCH, [1, 2], seed=1))
        assert not torch.allclose(ref.logits(input_ids, attention_mask), plain)  # the hooks do act when selected
        ref.clear()
        assert torch.equal(ref.logits(input_ids, attention_mask), plain)
    assert _no_hooks_left(model, found)
    assert torch.equal(_plain_logits(model, input_ids, attention_mask), plain)


def test_selecting_everything_is_the_plain_model(family):
    model, found = small_model(family), structure(family)
    input_ids, attention_mask = _inputs(family)
    plain = _plain_logits(model, input_ids, attention_mask)
    with MaskedReference(model, found) as ref:
        ref.set_selection(*_full_selection(found, BATCH, range(found.num_layers)))
        assert torch.equal(ref.logits(input_ids, attention_mask), plain)
        # Order and repeats do not matter: a shuffled, duplicated full selection is still everything.
        heads, neurons = _full_selection(found, BATCH, [1, 2])
        ref.set_selection({l: torch.cat([h.flip(1), h], 1) for l, h in heads.items()},
                          {l: torch.cat([n, n.flip(1)], 1) for l, n in neurons.items()})
        assert torch.equal(ref.logits(input_ids, attention_mask), plain)


def test_empty_mlp_selection_leaves_only_the_down_bias(family):
    model, found = small_model(family), structure(family)
    input_ids, attention_mask = _inputs(family)
    down = found.layers[1].mlp.down
    surgery = copy.deepcopy(model)
    with torch.no_grad():
        surgery.get_parameter(down.weight).zero_()
    expected = _plain_logits(surgery, input_ids, attention_mask)
    with MaskedReference(model, found) as ref:
        ref.set_selection({}, {1: torch.zeros(BATCH, 0, dtype=torch.long)})
        got = ref.logits(input_ids, attention_mask)
    torch.testing.assert_close(got, expected, **CLOSE)
    assert not torch.allclose(got, _plain_logits(model, input_ids, attention_mask))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masking_equals_zeroed_weight_columns(family, attn):
    """Zeroing a head's context (a neuron's activation) == zeroing the o_proj (down_proj) weights that read it."""
    model, found = small_model(family, attn), structure(family)  # module paths do not depend on the kernel
    input_ids, attention_mask = _inputs(family, seed=3)
    heads, neurons = _random_selection(found, 1, [1, 2], seed=4)
    surgery = copy.deepcopy(model)
    for l in (1, 2):
        attention, mlp = found.layers[l].attention, found.layers[l].mlp
        dropped_kv = _unselected(heads[l][0], attention.num_kv_heads)
        dropped_q = (dropped_kv[:, None] * attention.kv_group_size + torch.arange(attention.kv_group_size)).flatten()
        columns = (dropped_q[:, None] * attention.head_dim + torch.arange(attention.head_dim)).flatten()
        _zero_inputs_of(surgery, attention.o, columns)
        _zero_inputs_of(surgery, mlp.down, _unselected(neurons[l][0], mlp.intermediate_size))
    expected = _plain_logits(surgery, input_ids, attention_mask)
    with MaskedReference(model, found) as ref:
        ref.set_selection({l: h.expand(BATCH, -1) for l, h in heads.items()},
                          {l: n.expand(BATCH, -1) for l, n in neurons.items()})
        got = ref.logits(input_ids, attention_mask)
    torch.testing.assert_close(got, expected, **CLOSE)
    assert not torch.allclose(got, _plain_logits(model, input_ids, attention_mask))


def test_selection_is_per_row(family):
    model, found = small_model(family), structure(family)
    input_ids, attention_mask = _inputs(family, seed=5)
    plain = _plain_logits(model, input_ids, attention_mask)
    heads, neurons = _random_selection(found, BATCH, [1, 2], seed=6)
    full_heads, full_neurons = _full_selection(found, BATCH, [1, 2])
    # Row 0 dense (it lists every head and neuron), rows 1 and 2 sparse (their lists padded with repeats).
    heads = {l: _dense_row0(h, full_heads[l][0]) for l, h in heads.items()}
    neurons = {l: _dense_row0(n, full_neurons[l][0]) for l, n in neurons.items()}
    with MaskedReference(model, found) as ref:
        ref.set_selection(heads, neurons)
        batched = ref.logits(input_ids, attention_mask)
        torch.testing.assert_close(batched[0], plain[0], **CLOSE)
        for row in (1, 2):
            real = attention_mask[row].bool()
            assert not torch.allclose(batched[row, real], plain[row, real])
        # Each row alone, with its own selection, gives what it gives in the batch: rows do not mix.
        for row in range(BATCH):
            ref.set_selection({l: h[row : row + 1] for l, h in heads.items()},
                              {l: n[row : row + 1] for l, n in neurons.items()})
            alone = ref.logits(input_ids[row : row + 1], attention_mask[row : row + 1])
            real = attention_mask[row].bool()
            torch.testing.assert_close(alone[0, real], batched[row, real], **CLOSE)


def _dense_row0(indices: torch.Tensor, everything: torch.Tensor) -> torch.Tensor:
    """``indices`` widened so that row 0 lists every index (other rows repeat their own first index)."""
    width = max(indices.shape[1], everything.numel())
    rows = [everything.repeat(width // everything.numel() + 1)[:width]]
    for row in indices[1:]:
        rows.append(torch.cat([row, row[:1].expand(width - row.numel())]))
    return torch.stack(rows)


def _hf_greedy(model, input_ids, attention_mask) -> torch.Tensor:
    config = model.generation_config
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
    )


def test_generate_greedy_matches_hf_generate(family):
    model, found = small_model(family), structure(family)
    input_ids, attention_mask = _inputs(family, seed=7)
    with torch.no_grad():
        expected = _hf_greedy(model, input_ids, attention_mask)
    assert expected.shape == (BATCH, LENGTH + NEW_TOKENS)
    with MaskedReference(model, found) as ref:
        got = ref.generate_greedy(input_ids, attention_mask, NEW_TOKENS)
    assert torch.equal(got, expected)


def test_generate_greedy_with_selection_matches_recompute(family):
    """The selection holds at every decode step: cached step logits == a full masked recompute of the sequence."""
    model, found = small_model(family), structure(family)
    input_ids, attention_mask = _inputs(family, seed=8)
    with MaskedReference(model, found) as ref:
        ref.set_selection(*_random_selection(found, BATCH, [1, 2], seed=9))
        tokens, step_logits = ref.generate_greedy(input_ids, attention_mask, NEW_TOKENS, return_logits=True)
        assert tokens.shape == (BATCH, LENGTH + NEW_TOKENS) and torch.equal(tokens[:, :LENGTH], input_ids)
        recomputed = ref.logits_recomputed(tokens, attention_mask)
    torch.testing.assert_close(step_logits, recomputed[:, LENGTH - 1 : -1], rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens[:, LENGTH:], step_logits.argmax(-1))


def test_selection_is_checked_and_hooks_are_removed():
    model, found = small_model("llama"), structure("llama")
    input_ids, attention_mask = _inputs("llama")
    ref = MaskedReference(model, found)
    try:
        with pytest.raises(ValueError, match="0..1"):
            ref.set_selection({1: torch.tensor([[3]] * BATCH)}, {})  # 2 is the empty slot of 2 KV groups
        with pytest.raises(ValueError, match="layer index"):
            ref.set_selection({}, {found.num_layers: torch.zeros(BATCH, 1, dtype=torch.long)})
        with pytest.raises(ValueError, match="disagree"):
            ref.set_selection({1: torch.zeros(BATCH, 1, dtype=torch.long)}, {2: torch.zeros(2, 1, dtype=torch.long)})
        ref.set_selection({1: torch.zeros(2, 1, dtype=torch.long)}, {})
        with pytest.raises(ValueError, match="2 rows"):
            ref.logits(input_ids, attention_mask)
    finally:
        ref.close()
    assert _no_hooks_left(model, found)
    with pytest.raises(RuntimeError, match="closed"):
        ref.set_selection({}, {})


def test_an_empty_slot_keeps_nothing():
    model, found = small_model("llama"), structure("llama")
    input_ids, attention_mask = _inputs("llama")
    groups, width = found.layers[1].attention.num_kv_heads, found.layers[1].mlp.intermediate_size
    with MaskedReference(model, found) as ref:
        ref.set_selection({1: torch.tensor([[0, groups]] * BATCH)}, {1: torch.tensor([[5, width, width]] * BATCH)})
        padded = ref.logits(input_ids, attention_mask)
        ref.set_selection({1: torch.tensor([[0]] * BATCH)}, {1: torch.tensor([[5]] * BATCH)})
        assert torch.equal(padded, ref.logits(input_ids, attention_mask))
