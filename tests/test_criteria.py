"""Each criterion against a direct autograd computation that uses no gates, on every family."""

from __future__ import annotations

import pytest
import torch

from shadowfx.capture import positions_from_mask
from shadowfx.criteria import CRITERIA, CriterionHooks
from conftest import small_model, structure


def direct_scores(model, found, input_ids, loss_mask):
    """A (inputs of every o-projection and down projection) and G = dL/dA via retain_grad, plus per-unit mask grads."""
    captured, handles = {}, []
    head_masks = {}
    for layer in found.layers:
        attention = layer.attention

        def o_hook(module, args, index=layer.index, heads=attention.num_heads):
            x = args[0]
            mask = torch.ones(x.shape[0], heads, requires_grad=True)  # one mask per sample and head: SNIP
            head_masks[index] = mask
            gated = (x.unflatten(-1, (heads, -1)) * mask[:, None, :, None]).flatten(-2)
            gated.retain_grad()
            captured[("heads", index)] = gated
            return (gated, *args[1:])

        def down_hook(module, args, index=layer.index):
            x = args[0].reshape(input_ids.shape[0], input_ids.shape[1], -1)
            x.retain_grad()
            captured[("neurons", index)] = x
            return (x.reshape(args[0].shape), *args[1:])

        handles.append(model.get_submodule(attention.o.module).register_forward_pre_hook(o_hook))
        handles.append(model.get_submodule(layer.mlp.down.module).register_forward_pre_hook(down_hook))
    try:
        mask = torch.ones_like(input_ids)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                       use_cache=False).logits
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        weights = loss_mask[:, :-1].float()
        ((losses * weights).sum(1) / weights.sum(1)).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return captured, head_masks


def expected(criterion, activation, gradient, units):
    a = activation.detach().unflatten(-1, (units, -1))  # [B, S, U, d]
    g = gradient.unflatten(-1, (units, -1))
    per_token = (a * g).sum(-1)  # dL/d(per-token gate)
    return {
        "plainact": per_token.abs().sum(1),
        "fisher": per_token.square().sum(1),
        "snip": per_token.sum(1).abs(),
        "magnitude": a.square().sum((1, 3)).sqrt(),
        "grad_norm": g.square().sum((1, 3)).sqrt(),
    }[criterion]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criterion_matches_direct_autograd(family, criterion):
    model = small_model(family)
    found = structure(family)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 512, (3, 10), generator=generator)
    loss_mask = torch.zeros_like(input_ids)
    loss_mask[:, 4:] = 1  # score the continuation only
    with CriterionHooks(model, found) as hooks:
        scores = hooks.score(input_ids, loss_mask, criterion)
    captured, head_masks = direct_scores(model, found, input_ids, loss_mask)
    for layer in found.layers:
        a = captured[("heads", layer.index)]
        want_heads = expected(criterion, a, a.grad, layer.attention.num_heads)
        if criterion == "snip":  # the identity the gates rely on: a per-head mask's gradient
            torch.testing.assert_close(head_masks[layer.index].grad.abs(), want_heads, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(scores.heads[:, layer.index], want_heads, rtol=1e-4, atol=1e-6)
        z = captured[("neurons", layer.index)]
        want_neurons = expected(criterion, z, z.grad, layer.mlp.intermediate_size)
        torch.testing.assert_close(scores.neurons[:, layer.index], want_neurons, rtol=1e-4, atol=1e-6)
    assert scores.context.shape == (3, 10, found.predictor_input_size)
    assert all(p.requires_grad for p in model.parameters())  # the hooks restore the weights' flags


def test_per_token_scores_sum_to_the_sample_scores():
    model, found = small_model("llama"), structure("llama")
    input_ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.ones_like(input_ids)
    with CriterionHooks(model, found) as hooks:
        per_sample = hooks.score(input_ids, loss_mask, "plainact")
        per_token = hooks.score(input_ids, loss_mask, "plainact", per_token=True)
    assert per_token.heads.shape == (2, 8, found.num_layers, 4)
    assert per_token.neurons.shape == (2, 8, found.num_layers, 192)
    torch.testing.assert_close(per_token.heads.sum(1), per_sample.heads)
    torch.testing.assert_close(per_token.neurons.sum(1), per_sample.neurons)


def test_samples_do_not_mix():
    """A sample's scores do not depend on the other samples of the batch."""
    model, found = small_model("opt"), structure("opt")
    input_ids = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones_like(input_ids)
    with CriterionHooks(model, found) as hooks:
        together = hooks.score(input_ids, loss_mask, "plainact")
        alone = hooks.score(input_ids[1:2], loss_mask[1:2], "plainact")
    torch.testing.assert_close(together.heads[1:2], alone.heads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(together.neurons[1:2], alone.neurons, rtol=1e-4, atol=1e-7)


def test_unknown_criterion():
    with CriterionHooks(small_model("gpt2"), structure("gpt2")) as hooks, pytest.raises(ValueError, match="plainact"):
        hooks.score(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), "taylor")
