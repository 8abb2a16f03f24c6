"""Families transformers ships: supported exactly, or refused with the reason; never transformed and different."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import shadowfx
from shadowfx import family_matrix
from shadowfx.capture import PrefillStep
from shadowfx.cli import main
from shadowfx.masked_reference import MaskedReference
from shadowfx.passes import discover_structure as discovery
from shadowfx.predictor import ShadowPredictor
from shadowfx.structure import StructureError
from shadowfx.verify import RewriteMismatch

from conftest import padded_batch

# A spread of the recorded outcomes, cheap enough for every CI run, beside the families test_transform covers: plain,
# gated and squared-ReLU MLPs, a fused gate/up, fused QKV taken apart by slices and by nested splits (multi-query),
# interleaved rotary with cos/sin from outside the layers (Cohere), and the refusals of a norm across heads, a
# bidirectional encoder and a scores matmul fused with its bias. The families whose support rests on a transform of
# their own are transformed, with its check against dense, by the tests that prove it: per-head norms (Qwen3,
# Gemma 3), ALiBi (MPT), soft-capped scores (Gemma 2) and GPT-J's rotary in test_onnx's carried head transforms,
# GPT-NeoX's interleaved fused QKV below.
FAST = ("biogpt", "gemma", "arcee", "phi3", "gpt_bigcode", "olmo2", "cohere", "bert", "bloom")


@functools.cache
def recorded() -> dict[str, family_matrix.FamilyResult]:
    return family_matrix.load_results()


@pytest.mark.parametrize("model_type", FAST)
def test_family_keeps_its_recorded_outcome(model_type):
    result = family_matrix.check(model_type)
    assert result.outcome != "differs", result.detail
    assert result.outcome == recorded()[model_type].outcome, result.detail


def test_the_recorded_matrix_has_no_family_that_differs_and_covers_the_mapping():
    results = recorded()
    assert not [r for r in results.values() if r.outcome == "differs"]
    assert set(family_matrix.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) <= set(results)


def test_query_key_norms_across_heads_are_refused_by_discovery():
    with pytest.raises(StructureError, match=r"normalises over 64 features .* not over each head's 16"):
        shadowfx.discover(family_matrix.build("olmo2"))


def test_query_key_norms_after_the_rotary_embedding_are_refused_by_discovery():
    with pytest.raises(StructureError, match="normalises each head after the rotary embedding"):
        shadowfx.discover(family_matrix.build("nanochat"))


@pytest.mark.parametrize("model_type,interleaved,heads_axis", [("llama", False, None), ("cohere", True, None),
                                                               ("gptj", True, 2)])
def test_the_rotary_pairing_and_layout_are_read(model_type, interleaved, heads_axis):
    rotary = shadowfx.discover(family_matrix.build(model_type)).layers[1].attention.rotary
    assert (rotary.interleaved, rotary.heads_axis) == (interleaved, heads_axis)


def test_a_rotary_embedding_of_another_pattern_is_refused_by_discovery():
    with pytest.raises(StructureError, match="rotary embedding other than on halves or interleaved pairs"):
        shadowfx.discover(family_matrix.build("ernie4_5"))


def test_routed_experts_beside_a_shared_expert_are_refused_by_discovery():
    """GLM-4 MoE's shared expert looks like a gated MLP; sparsifying it alone would leave the routed experts dense."""
    with pytest.raises(StructureError, match=r"layer model.layers.1: .*routed experts \(model.layers.1.mlp.experts\)"):
        shadowfx.discover(family_matrix.build("glm4_moe"))


def test_a_router_softmax_is_named_as_such():
    with pytest.raises(StructureError, match=r"the softmax in model.layers.0.mlp.gate is outside the attention, as a "
                                             r"mixture-of-experts router's is"):
        shadowfx.discover(family_matrix.build("mixtral"))


def test_a_norm_after_the_gated_multiply_is_refused_by_discovery():
    with pytest.raises(StructureError, match="between the gated MLP's multiply and its down projection"):
        shadowfx.discover(family_matrix.build("bitnet"))


def test_the_final_norm_is_the_one_nearest_the_head_whichever_step_is_captured():
    """ModernBERT's head holds a norm of its own after the model's: discovery names the same one from every graph
    (a predictor discovered on one is accepted by the transform of the other)."""
    from shadowfx.capture import capture

    model = family_matrix.build("modernbert-decoder")
    structures = [discovery.discover_structure(capture(model, step=step)) for step in ("prefill", "prefill_cache")]
    assert {s.final_norm for s in structures} == {"lm_head.norm"}
    assert structures[0].fingerprint == structures[1].fingerprint


def test_the_self_check_catches_what_discovery_lets_through(monkeypatch):
    """With discovery's proof switched off, olmo2's query/key norms are dropped by the rewrite: transform's own
    check (of the rewrite with every unit kept) names the first layer and the keys, and without the check the model
    silently differs: at sparsity 0 the prompt runs as captured, and the decode steps, rewritten, differ."""
    monkeypatch.setattr(discovery, "require_carried", lambda *args: None)
    monkeypatch.setattr(discovery, "head_norm", lambda *args: (None, set()))
    model = family_matrix.build("olmo2")
    predictor = ShadowPredictor.for_structure(shadowfx.discover(model), hidden=16, seed=1)
    with pytest.raises(RewriteMismatch, match="layer 1 computes other attention keys"):
        shadowfx.transform(model, predictor, sparsity=0.5)
    unchecked = shadowfx.transform(model, predictor, sparsity=0.0, verify=False)
    input_ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    state = unchecked.start(input_ids, mask)
    next_token = state.logits.argmax(-1)
    stepped = unchecked.step(state, next_token)
    sequence = torch.cat([input_ids, next_token[:, None]], 1)
    with torch.no_grad():
        assert not torch.allclose(stepped, PrefillStep(model)(sequence, torch.ones_like(sequence))[:, -1], atol=1e-3)


def test_a_soft_cap_of_the_scores_is_read_and_dropping_it_is_caught(monkeypatch):
    """Gemma 2 caps its scaled scores as c * tanh(x / c): discovery reads c and the scale; with the cap's recogniser
    made to miss the tanh, the self-check refuses the rewrite."""
    from shadowfx.passes import recognise_core

    model = family_matrix.build("gemma2")
    attention = shadowfx.discover(model).layers[1].attention
    assert attention.softcap == pytest.approx(model.config.attn_logit_softcapping) == 0.01
    assert attention.scaling == pytest.approx(model.config.query_pre_attn_scalar ** -0.5)
    monkeypatch.setattr(recognise_core, "_CAP_OPS", set())
    monkeypatch.setattr(recognise_core, "_SCORE_OPS", recognise_core._SCORE_OPS | {torch.ops.aten.tanh.default})
    model = family_matrix.build("gemma2")  # discovery's result is kept with the model it read
    uncapped = shadowfx.discover(model)
    assert uncapped.layers[1].attention.softcap is None
    predictor = ShadowPredictor.for_structure(uncapped, hidden=16, seed=1)
    with pytest.raises(RewriteMismatch, match="the rewritten layer 2 computes other attention keys"):
        shadowfx.transform(model, predictor, sparsity=0.0)


def test_small_config_shrinks_and_keeps_token_ids_in_the_vocabulary():
    config = family_matrix.small_config("opt")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (3, 64, 512)
    assert all(getattr(config, name) is None or getattr(config, name) < 512 for name in ("pad_token_id", "eos_token_id"))


def test_table_and_moved_outcomes():
    results = [family_matrix.FamilyResult("a", "A", "supported", "ok"),
               family_matrix.FamilyResult("b", "B", "refused", "no | because")]
    text = family_matrix.table(results)
    assert "1 supported, 1 refused, 0 not built, 0 differs" in text
    assert "| refused | b | B | no \\| because |" in text
    expected = {"a": family_matrix.FamilyResult("a", "A", "refused", "x")}
    assert family_matrix.moved(results, expected) == ["a: refused -> supported", "b: new -> refused"]
    assert family_matrix.moved(results, {}) == []


def test_families_command_fails_when_an_outcome_moved_and_records_with_update(tmp_path, capsys):
    results = tmp_path / "families.json"
    family_matrix.save_results([family_matrix.FamilyResult("olmo2", "Olmo2ForCausalLM", "supported", "")], results)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- families:start -->\nold\n<!-- families:end -->\nafter\n")
    assert main(["families", "--only", "olmo2", "--results", str(results)]) == 1
    assert "olmo2: supported -> refused" in capsys.readouterr().out
    assert main(["families", "--only", "olmo2", "--results", str(results), "--update", "--readme", str(readme)]) == 0
    assert json.loads(results.read_text())["families"][0]["outcome"] == "refused"
    text = readme.read_text()
    assert "old" not in text and "| refused | olmo2 |" in text and text.endswith("after\n")
    assert main(["families", "--only", "no_such_family"]) == 2


def test_fused_qkv_with_interleaved_heads_is_read_and_decodes_like_the_reference():
    """GPT-NeoX's fused QKV holds [q, k, v] of each head in turn: each role's rows repeat every head (4 heads of 16
    here). At 0.5 the decode with weights gathered once per prompt, the decode gathering at every call and the masked
    hook reference give the same tokens and logits, which equal a recompute of the whole sequence."""
    model = family_matrix.build("gpt_neox")
    found = shadowfx.discover(model)
    attention = found.layers[1].attention
    assert [(p.rows, p.blocks) for p in (attention.q, attention.k, attention.v)] == [
        ((0, 16), (4, 48)), ((16, 32), (4, 48)), ((32, 48), (4, 48))]
    assert attention.q.feature_rows(torch.tensor([0, 15, 16, 63])).tolist() == [0, 15, 48, 159]
    sparse = shadowfx.transform(model, ShadowPredictor.for_structure(found, hidden=16, seed=2), sparsity=0.5,
                                scope="per_layer")
    input_ids, attention_mask = padded_batch(3, 8, found.vocab_size, seed=5)
    runs = {}
    for path, limit in (("pregathered", 1 << 40), ("gather_per_call", 0)):
        sparse.max_gathered_bytes = limit
        runs[path] = sparse.generate(input_ids, attention_mask, max_new_tokens=4, eos_token_id=[], return_logits=True)
        assert sparse.last_decode_path == path
    with MaskedReference(model, found) as reference:
        chosen = sparse.last_selection
        reference.set_selection({i + 1: t for i, t in enumerate(chosen.kv_heads)},
                                {i + 1: t for i, t in enumerate(chosen.neurons)})
        tokens, logits = reference.generate_greedy(input_ids, attention_mask, 4, return_logits=True)
        recomputed = reference.logits_recomputed(tokens[:, :-1], attention_mask)
    for ours, our_logits in runs.values():
        assert torch.equal(ours, tokens)
        torch.testing.assert_close(our_logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, recomputed[:, input_ids.shape[1] - 1:], rtol=1e-4, atol=1e-4)
