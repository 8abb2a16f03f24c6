"""Each pass counts what it put into the graph, per layer, and refuses a graph it cannot run on with a PassError."""

from __future__ import annotations

import functools

import pytest
from torch.fx import GraphModule

from shadowfx.capture import CapturedDecoder, capture
from shadowfx.passes.base import PassError, run_passes
from shadowfx.passes.cleanup import Cleanup
from shadowfx.passes.discover_structure import discover_structure
from shadowfx.passes.graph import SELECTION_META, editable_module, graph_outputs, selection_nodes
from shadowfx.passes.insert_layerwise import InsertLayerwisePredictor
from shadowfx.passes.insert_shadow import PREDICTOR_ATTR, InsertShadowPredictor
from shadowfx.passes.pregathered_weights import PregatheredWeights
from shadowfx.passes.selection_inputs import AddSelectionInputs
from shadowfx.passes.sparsify_attention import SparsifyAttention
from shadowfx.passes.sparsify_mlp import SparsifyMLP
from shadowfx.predictor import LayerwisePredictor, ShadowPredictor
from shadowfx.selection import Selector, SparsityConfig
from shadowfx.structure import DecoderStructure
from conftest import captured, small_model, structure

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTED_FAMILIES = ("opt", "llama")
PER_LAYER = SparsityConfig.from_arguments(0.5, None, None, "per_layer")


def prefill_graph(family: str) -> GraphModule:
    return editable_module(captured(family).program)


@functools.cache
def decode_capture(family: str) -> tuple[CapturedDecoder, DecoderStructure]:
    decode = captured(family, "sdpa", "decode")
    return decode, discover_structure(decode)


@functools.cache
def two_layer_capture(family: str) -> tuple[CapturedDecoder, DecoderStructure]:
    """A model with one later layer instead of two: every per-layer count must follow it."""
    prefill = capture(small_model(family, num_layers=2))
    return prefill, discover_structure(prefill)


def shadow_pass(found: DecoderStructure) -> InsertShadowPredictor:
    predictor = ShadowPredictor.for_structure(found, hidden=16, seed=0)
    return InsertShadowPredictor(found, predictor, Selector(found, PER_LAYER))


def layerwise_pass(found: DecoderStructure, *, per_token: bool = False) -> InsertLayerwisePredictor:
    return InsertLayerwisePredictor(found, LayerwisePredictor.for_structure(found, hidden=16, seed=0), PER_LAYER,
                                    per_token=per_token)


@pytest.mark.parametrize("family", COUNTED_FAMILIES)
def test_shadow_prefill_counts_are_exact(family):
    found = structure(family)
    gm = prefill_graph(family)
    report = run_passes(gm, [shadow_pass(found), SparsifyMLP(found), SparsifyAttention(found, cache=False),
                             Cleanup(found)])
    assert list(report) == ["insert_shadow", "sparsify_mlp", "sparsify_attention", "cleanup"]
    assert report["insert_shadow"].per_layer == {0: 1} and report["insert_shadow"].modified
    predictors = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == PREDICTOR_ATTR]
    assert len(predictors) == 1
    assert report["sparsify_mlp"].per_layer == report["sparsify_attention"].per_layer == {1: 1, 2: 1}
    assert report["sparsify_mlp"].total == 2
    assert sorted(selection_nodes(gm)) == [("kv_heads", 1), ("kv_heads", 2), ("neurons", 1), ("neurons", 2)]
    assert set(report["cleanup"].per_layer) <= {-1, 0, 1, 2} and report["cleanup"].per_layer[1] > 0


@pytest.mark.parametrize("family", COUNTED_FAMILIES)
@pytest.mark.parametrize("per_token", [False, True])
def test_layerwise_counts_are_exact(family, per_token):
    found = structure(family)
    gm = prefill_graph(family)
    report = run_passes(gm, [layerwise_pass(found, per_token=per_token)])
    assert report["insert_layerwise"].per_layer == {1: 2, 2: 2}
    assert report["insert_layerwise"].total == 4
    selections = [n for n in graph_outputs(gm) if SELECTION_META in n.meta]
    assert [n.meta[SELECTION_META] for n in selections] == [("kv_heads", 1), ("kv_heads", 2), ("neurons", 1),
                                                            ("neurons", 2)]


@pytest.mark.parametrize("family", COUNTED_FAMILIES)
def test_decode_counts_are_exact(family):
    decode, found = decode_capture(family)
    gm = editable_module(decode.program)
    report = run_passes(gm, [AddSelectionInputs(found), SparsifyMLP(found), SparsifyAttention(found, cache=True),
                             PregatheredWeights(found), Cleanup(found)])
    assert report["selection_inputs"].per_layer == {1: 2, 2: 2}
    assert report["pregathered_weights"].per_layer == {1: 2, 2: 2}
    # the selection inputs go once the ops read pre-gathered weights
    assert selection_nodes(gm) == {}
    assert sum(n.op == "placeholder" and n.name.startswith("compact_1_") for n in gm.graph.nodes) > 0


@pytest.mark.parametrize("family", COUNTED_FAMILIES)
def test_counts_follow_the_layers_the_graph_has(family):
    prefill, found = two_layer_capture(family)
    assert found.num_layers == 2
    gm = editable_module(prefill.program)
    assert run_passes(gm, [AddSelectionInputs(found)])["selection_inputs"].per_layer == {1: 2}
    gm = editable_module(prefill.program)
    report = run_passes(gm, [layerwise_pass(found), SparsifyMLP(found)])
    assert report["insert_layerwise"].per_layer == {1: 2}
    assert report["sparsify_mlp"].per_layer == {1: 1}


def test_sparsifying_before_any_selection_names_what_is_missing():
    found = structure("llama")
    with pytest.raises(PassError, match=r"'sparsify_mlp' pass after the following passes: \[\]: sparsify_mlp needs the "
                                        r"neurons selection of layers \[1, 2\].*run insert_shadow, insert_layerwise or "
                                        r"selection_inputs first"):
        run_passes(prefill_graph("llama"), [SparsifyMLP(found)])
    with pytest.raises(PassError, match=r"after the following passes: \['cleanup'\]: sparsify_attention needs the "
                                        r"kv_heads selection of layers \[1, 2\]"):
        run_passes(prefill_graph("llama"), [Cleanup(found), SparsifyAttention(found, cache=False)])


def test_pregathering_before_sparsifying_names_the_missing_ops():
    decode, found = decode_capture("llama")
    # the MLPs are sparse already, so only the attentions are missing
    with pytest.raises(PassError, match=r"pregathered_weights needs the per-prompt sparse ops .*: "
                                        r"shadowfx::gathered_attention of layer 1, shadowfx::gathered_attention of "
                                        r"layer 2; run sparsify_mlp and sparsify_attention"):
        run_passes(editable_module(decode.program), [AddSelectionInputs(found), SparsifyMLP(found),
                                                      PregatheredWeights(found)])


def test_a_second_selection_is_refused():
    found = structure("llama")
    with pytest.raises(PassError, match=r"selection_inputs adds a selection, but the graph already has one"):
        run_passes(prefill_graph("llama"), [shadow_pass(found), AddSelectionInputs(found)])


def test_sparsifying_after_cleanup_names_the_removed_nodes():
    found = structure("llama")
    mlp = found.layers[1].mlp
    with pytest.raises(PassError, match=rf"sparsify_mlp needs nodes the graph does not have: layer 1 MLP up "
                                        rf"\({mlp.up.node}\)"):
        run_passes(prefill_graph("llama"), [shadow_pass(found), SparsifyMLP(found), Cleanup(found),
                                            SparsifyMLP(found)])
