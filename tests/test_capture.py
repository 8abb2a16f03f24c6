"""The captured graphs compute exactly what the model computes."""

from __future__ import annotations

import pytest
import torch

from shadowfx.capture import CaptureError, DecodeStep, PrefillStep, capture
from conftest import captured, padded_batch, small_model
from plain_decoder import PlainDecoder

SHAPES = [(1, 1), (1, 7), (2, 9), (4, 16)]


@pytest.mark.parametrize("batch,length", SHAPES)
def test_prefill_graph_equals_eager(family, attn, batch, length):
    model = small_model(family, attn)
    input_ids, attention_mask = padded_batch(batch, length, model.config.vocab_size, seed=batch * 100 + length)
    with torch.no_grad():
        eager = PrefillStep(model)(input_ids, attention_mask)
        graph = captured(family, attn)(input_ids, attention_mask)
    assert graph.shape == (batch, length, model.config.vocab_size)
    torch.testing.assert_close(graph, eager, rtol=0, atol=1e-5)


def test_prefill_uses_generate_positions_with_left_padding(family):
    """A left-padded row gives the same logits for its real tokens as the unpadded sequence alone."""
    model = small_model(family)
    input_ids, attention_mask = padded_batch(3, 10, model.config.vocab_size, seed=7)
    with torch.no_grad():
        batch_logits = captured(family)(input_ids, attention_mask)
        alone = captured(family)(input_ids[2:, 4:], attention_mask[2:, 4:])
    torch.testing.assert_close(batch_logits[2:, 4:], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,past", [(1, 3), (2, 9), (3, 16)])
def test_decode_graph_equals_eager_and_recompute(family, attn, batch, past):
    model = small_model(family, attn)
    vocab = model.config.vocab_size
    input_ids, attention_mask = padded_batch(batch, past, vocab, seed=past)
    next_ids = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(past + 1))
    full_mask = torch.cat([attention_mask, torch.ones(batch, 1, dtype=attention_mask.dtype)], dim=1)
    step = DecodeStep(model)
    with torch.no_grad():
        _, keys, values = step(input_ids, attention_mask, (), ())
        eager_logits, eager_keys, eager_values = step(next_ids, full_mask, keys, values)
        logits, new_keys, new_values = captured(family, attn, "decode")(next_ids, full_mask, keys, values)
        recomputed = PrefillStep(model)(torch.cat([input_ids, next_ids], dim=1), full_mask)
    assert len(new_keys) == len(new_values) == model.config.num_hidden_layers
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5)
    for got, want in zip(new_keys + new_values, eager_keys + eager_values):
        assert got.shape[2] == past + 1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, -1], recomputed[:, -1], rtol=1e-4, atol=1e-4)


def test_plain_module_captures():
    torch.manual_seed(0)
    model = PlainDecoder().eval()
    graph = capture(model)
    for batch, length in [(1, 4), (3, 11), (2, 20)]:
        input_ids, attention_mask = padded_batch(batch, length, 128, seed=length)
        with torch.no_grad():
            torch.testing.assert_close(graph(input_ids, attention_mask), model(input_ids, attention_mask),
                                       rtol=0, atol=1e-5)


def test_decode_needs_a_cache_argument():
    with pytest.raises(CaptureError, match="no KV cache argument"):
        capture(PlainDecoder().eval(), step="decode")


def test_bad_step_and_example_sizes():
    model = small_model("opt")
    with pytest.raises(ValueError, match="step must be"):
        capture(model, step="generate")
    with pytest.raises(ValueError, match="example_batch"):
        capture(model, example_batch=1)


def test_a_model_in_the_same_state_is_exported_once(monkeypatch):
    """Capturing again reuses the export while the model's tensors, code, hooks and config are what they were; new
    values in the same tensors are read by the graph, a hook or a new dtype exports again."""
    from shadowfx.families import build_small

    exports = []
    export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *args, **kwargs: exports.append(1) or export(*args, **kwargs))
    model = build_small("llama", num_layers=2)
    first = capture(model)
    assert capture(model).program is first.program and len(exports) == 1
    capture(model, step="prefill_cache")
    assert len(exports) == 2

    input_ids, mask = padded_batch(2, 5, model.config.vocab_size, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    torch.testing.assert_close(capture(model)(input_ids, mask), PrefillStep(model)(input_ids, mask))
    assert len(exports) == 2
    handle = model.lm_head.register_forward_hook(lambda module, args, output: output * 0)
    assert capture(model)(input_ids, mask).abs().max() == 0 and len(exports) == 3
    handle.remove()
    model.double()
    assert capture(model)(input_ids, mask).dtype == torch.float64 and len(exports) == 4
