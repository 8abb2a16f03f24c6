"""`shadowfx.transform`: graph equivalence against the dense model and an independent hook-based reference."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import shadowfx
from shadowfx import native
import shadowfx.compact
import shadowfx.onnx_export
import shadowfx.runtimes.pytorch
from shadowfx.capture import PrefillStep
from shadowfx.families import build_small
from shadowfx.passes.graph import output_node
from shadowfx.predictor import LayerwisePredictor, PredictorError, ShadowPredictor, SparseShape
from shadowfx.runtimes.pytorch import InputError
from shadowfx.selection import SparsityError, full_selection
from shadowfx.structure import FingerprintMismatch
from torch._inductor.utils import run_and_get_code

from conftest import padded_batch, small_model, structure
from shadowfx.masked_reference import LayerwiseMaskedReference, MaskedReference

gathered_mlp = torch.ops.shadowfx.gathered_mlp.default
gathered_attention = torch.ops.shadowfx.gathered_attention.default
dense_cores = {torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten.softmax.int}


@functools.cache
def predictor(family: str) -> ShadowPredictor:
    return ShadowPredictor.for_structure(structure(family), hidden=32, seed=1)


@functools.cache
def transformed(family: str, sparsity: float, scope: str = "global", attn: str = "sdpa"):
    return shadowfx.transform(small_model(family, attn), predictor(family), sparsity=sparsity, scope=scope)


def reference_selection(sparse) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    chosen = sparse.last_selection
    return ({i + 1: t for i, t in enumerate(chosen.kv_heads)}, {i + 1: t for i, t in enumerate(chosen.neurons)})


def test_sparsity_zero_equals_dense(family, attn):
    model = small_model(family, attn)
    sparse = transformed(family, 0.0, attn=attn)
    for batch, length in [(1, 6), (3, 11)]:
        input_ids, attention_mask = padded_batch(batch, length, 512, seed=length)
        with torch.no_grad():
            dense = PrefillStep(model)(input_ids, attention_mask)
        torch.testing.assert_close(sparse(input_ids, attention_mask), dense, rtol=0, atol=1e-5)
    effective = sparse.effective_sparsity()
    assert effective.heads == effective.neurons == effective.weight_bytes == effective.kv_bytes == 0


@pytest.mark.parametrize("granularity", ["prompt", "token"])
def test_sparsity_zero_generates_like_hf(family, granularity):
    model = small_model(family)
    input_ids, attention_mask = padded_batch(3, 7, 512, seed=3)
    sparse = (transformed(family, 0.0) if granularity == "prompt"
              else shadowfx.transform(model, predictor(family), sparsity=0.0, granularity="token"))
    ours = sparse.generate(input_ids, attention_mask, max_new_tokens=6)
    hf = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                        pad_token_id=model.generation_config.eos_token_id or 0)
    assert torch.equal(ours, hf)


@pytest.mark.parametrize("granularity", ["prompt", "token"])
def test_sparsity_zero_runs_no_predictor_and_copies_no_weight(family, granularity):
    """Every unit kept: no score can change the selection, so the predictor does not run, the prefill is the
    model's own graph (no sparse op, no selection made: every unit is the selection), the decode reads the model's
    own weights (views, no copy), and no DynamicCache copy or autograd-only node is left in the graphs."""
    model = small_model(family)
    shadow = ShadowPredictor.for_structure(structure(family), hidden=32, seed=1)
    sparse = shadowfx.transform(model, shadow, sparsity=0.0, granularity=granularity)
    calls = []
    hook = shadow.register_forward_hook(lambda *_: calls.append(1))
    try:
        input_ids, attention_mask = padded_batch(1, 7, 512, seed=5)
        ours = sparse.generate(input_ids, attention_mask, max_new_tokens=4, eos_token_id=[])
    finally:
        hook.remove()
    hf = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, eos_token_id=None,
                        pad_token_id=0)
    assert torch.equal(ours, hf) and calls == []
    assert sparse.last_decode_path == ("pregathered" if granularity == "prompt" else "per_token")
    assert sparse.last_gathered_bytes == 0
    assert sparse.graphs.prefill_gathering is None and not sparse.prefill_selects
    prefill_ops = {str(node.target) for graph in (sparse.graphs.prefill, sparse.graphs.prefill_next)
                   for node in graph.graph.nodes if str(node.target).startswith("shadowfx.")}
    assert prefill_ops <= {"shadowfx.dense_linear.default"}  # the LM head of a generation's start on the native GEMV
    sparse.start(*padded_batch(2, 5, 512, seed=6), decode=False)
    every = full_selection(structure(family), 2, tokens=5 if granularity == "token" else None)
    for kept, expected in zip((*sparse.last_selection.kv_heads, *sparse.last_selection.neurons),
                              (*every.kv_heads, *every.neurons)):
        assert torch.equal(kept, expected)
    for graph in (sparse.graphs.prefill, sparse.graphs.decode, sparse.graphs.decode_pregathered):
        if graph is not None:
            assert not [node for node in graph.graph.nodes
                        if node.target in (torch.ops.aten.detach_.default, torch.ops.aten.lift_fresh_copy.default)]


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_half_sparsity_equals_masked_reference(family, attn, scope):
    model = small_model(family, attn)
    sparse = transformed(family, 0.5, scope, attn)
    input_ids, attention_mask = padded_batch(3, 10, 512, seed=11)
    logits = sparse(input_ids, attention_mask)
    with MaskedReference(model, structure(family)) as reference:
        reference.set_selection(*reference_selection(sparse))
        expected = reference.logits(input_ids, attention_mask)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, PrefillStep(model)(input_ids, attention_mask), atol=1e-3)


def test_rows_get_their_own_selection(family):
    sparse = transformed(family, 0.5)
    input_ids, attention_mask = padded_batch(4, 9, 512, seed=5)
    sparse(input_ids, attention_mask)
    chosen = sparse.last_selection
    stacked = torch.cat([torch.cat(chosen.kv_heads, -1), torch.cat(chosen.neurons, -1)], -1)
    assert len({tuple(row.tolist()) for row in stacked}) > 1


def test_decode_with_cache_equals_reference_and_recompute(family):
    model = small_model(family)
    sparse = transformed(family, 0.5)
    input_ids, attention_mask = padded_batch(3, 8, 512, seed=21)
    tokens, logits = sparse.generate(input_ids, attention_mask, max_new_tokens=5, eos_token_id=[],
                                     return_logits=True)
    with MaskedReference(model, structure(family)) as reference:
        reference.set_selection(*reference_selection(sparse))
        expected_tokens, expected_logits = reference.generate_greedy(input_ids, attention_mask, 5, return_logits=True)
        recomputed = reference.logits_recomputed(tokens[:, :-1], attention_mask)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, recomputed[:, input_ids.shape[1] - 1:], rtol=1e-4, atol=1e-4)


def test_rewrite_counts_are_exact(family):
    sparse = transformed(family, 0.5)
    later = structure(family).num_layers - 1
    counts = sparse.rewrites.counts()
    assert counts["prefill"]["insert_shadow"] == 1
    assert counts["prefill"]["sparsify_mlp"] == counts["prefill"]["sparsify_attention"] == later
    assert counts["decode"]["sparsify_mlp"] == counts["decode"]["sparsify_attention"] == later
    assert counts["decode"]["selection_inputs"] == 2 * later
    for graph, predictors in ((sparse.graphs.prefill, 1), (sparse.graphs.decode, 0)):
        targets = [n.target for n in graph.graph.nodes]
        assert targets.count(gathered_mlp) == later and targets.count(gathered_attention) == later
        assert targets.count("shadow_predictor") == predictors
        assert sum(t in dense_cores for t in targets) == 1  # only layer 0 keeps its dense attention
        graph.graph.lint()
    assert len(output_node(sparse.graphs.prefill).args[0]) == 1 + 2 * structure(family).num_layers + 2 * later
    assert counts["prefill_gathering"]["gathered_weight_outputs"] == 2 * later  # both sparse ops of a layer
    assert counts["decode_pregathered"]["pregathered_weights"] == 2 * later
    assert counts["prefill_next"]["logit_positions"] == 1
    # the decode steps' dense projections (layer 0's nn.Linear ones, the LM head) run as dense_linear; GPT-2's
    # Conv1D ones stay addmm
    first = structure(family).layers[0]
    linear = {p.node for p in (first.attention.q, first.attention.k, first.attention.v, first.attention.o,
                               first.mlp.up, first.mlp.gate, first.mlp.down)
              if p is not None and p.weight_layout == "out_in"}
    routed = {0: len(linear), -1: 1} if linear else {-1: 1}
    assert sparse.rewrites.graphs["prefill_next"]["dense_linears"].per_layer == {-1: 1}  # its one-position LM head
    for graph in ("decode", "decode_pregathered"):
        assert sparse.rewrites.graphs[graph]["dense_linears"].per_layer == routed
        targets = [n.target for n in getattr(sparse.graphs, graph).graph.nodes]
        assert targets.count(torch.ops.shadowfx.dense_linear.default) == sum(routed.values())
        assert torch.ops.aten.linear.default not in targets


def test_prefill_gathers_the_decode_weights_once(family, monkeypatch):
    """At batch 1 the prefill returns the kept weights it computed on, exactly as compact_weights gathers them per
    row, and nothing is gathered after it; the generation equals the one that gathers after the prefill."""
    sparse = transformed(family, 0.5)
    model, later = small_model(family), structure(family).num_layers - 1
    input_ids, attention_mask = padded_batch(1, 9, 512, seed=41)
    every = sparse.graphs.prefill(input_ids, attention_mask)
    plain = sparse.graphs.prefill_next(input_ids, attention_mask)
    outputs = sparse.graphs.prefill_gathering(input_ids, attention_mask)
    settled = 1 + 2 * structure(family).num_layers + 2 * later  # logits, cache, selection
    # the start's graphs compute the last position's logits only, and everything else as the full prefill does
    assert plain[0].shape == (1, 1, every[0].shape[-1])
    torch.testing.assert_close(plain[0], every[0][:, -1:], rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(plain[1:], every[1:], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(outputs[:settled], plain, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    sparse.start(input_ids, attention_mask, decode=False)
    expected = shadowfx.compact.compact_weights(model, sparse.structure, sparse.last_selection, per_row=True)
    kept = outputs[settled:]
    assert len(kept) == len(expected.tensors)
    for tensor, want, layout in zip(kept, expected.tensors, expected.layout):
        assert torch.equal(tensor, want), layout

    with monkeypatch.context() as patch:
        patch.setattr(shadowfx.compact._Gather, "take", lambda self: pytest.fail("gathered after the prefill"))
        tokens, logits = sparse.generate(input_ids, attention_mask, max_new_tokens=4, eos_token_id=[],
                                         return_logits=True)
    assert sparse.last_decode_path == "pregathered" and sparse.last_gathered_bytes == expected.gathered_bytes
    default_limit = sparse.max_gathered_bytes
    try:
        sparse.max_gathered_bytes = default_limit - 1  # one copy of every weight no longer fits: gathered after
        after_tokens, after_logits = sparse.generate(input_ids, attention_mask, max_new_tokens=4, eos_token_id=[],
                                                     return_logits=True)
        # gathered after the prefill, kept rows in one run are views of the weights, not copies
        after = shadowfx.compact.compact_weights(model, sparse.structure, sparse.last_selection)
        assert sparse.last_decode_path == "pregathered" and sparse.last_gathered_bytes == after.gathered_bytes
    finally:
        sparse.max_gathered_bytes = default_limit
    assert torch.equal(tokens, after_tokens)
    torch.testing.assert_close(logits, after_logits, rtol=1e-5, atol=1e-5)


def test_token_graphs_have_a_predictor_in_every_step():
    sparse = token_transformed("mistral")
    later = structure("mistral").num_layers - 1
    for graph in (sparse.graphs.prefill, sparse.graphs.decode):
        targets = [n.target for n in graph.graph.nodes]
        assert targets.count("shadow_predictor") == 1 and targets.count("shadow_selector") == 1
        assert targets.count(gathered_mlp) == later
        assert targets.count(torch.ops.shadowfx.token_sparse_attention.default) == later
        assert targets.count(gathered_attention) == 0
    assert sparse.graphs.decode_pregathered is None


def test_kv_cache_of_later_layers_holds_only_kept_heads():
    sparse = transformed("llama", 0.5, "per_layer")
    input_ids, attention_mask = padded_batch(2, 6, 512, seed=2)
    sparse(input_ids, attention_mask)
    outputs = sparse.graphs.prefill(input_ids, attention_mask)
    layers = structure("llama").num_layers
    keys = outputs[1:1 + layers]
    assert keys[0].shape[1] == 2 and all(k.shape[1] == 1 for k in keys[1:])
    effective = sparse.effective_sparsity()
    assert effective.kv_bytes == pytest.approx(1 - (2 + 1 + 1) / 6)
    assert [layer.kv_heads_kept for layer in effective.layers] == [2, 1, 1]
    assert [layer.neurons_kept for layer in effective.layers] == [192, 96, 96]


def test_separate_head_and_neuron_sparsity():
    sparse = shadowfx.transform(small_model("opt"), predictor("opt"), heads_sparsity=0.75, neurons_sparsity=0.25,
                                scope="per_layer")
    sparse(*padded_batch(1, 5, 512, seed=0))
    effective = sparse.effective_sparsity()
    assert [layer.heads_kept for layer in effective.layers] == [4, 1, 1]
    assert [layer.neurons_kept for layer in effective.layers] == [256, 192, 192]


def test_compile_runtime_equals_eager():
    model = small_model("llama")
    eager = transformed("llama", 0.5, "per_layer")
    compiled = shadowfx.transform(model, predictor("llama"), sparsity=0.5, scope="per_layer", runtime="compile")
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=4)
    with torch.inference_mode():
        logits, code = run_and_get_code(compiled, input_ids, attention_mask)
    torch.testing.assert_close(logits, eager(input_ids, attention_mask), rtol=1e-5, atol=1e-5)
    generated = "\n".join(code)
    assert "shadowfx.gathered_mlp" in generated and "shadowfx.gathered_attention" in generated
    assert torch.equal(compiled.generate(input_ids, attention_mask, max_new_tokens=3),
                       eager.generate(input_ids, attention_mask, max_new_tokens=3))


@pytest.mark.parametrize("granularity", ["prompt", "token"])
def test_auto_runtime_times_what_a_generation_runs_and_keeps_the_faster(granularity, monkeypatch):
    # the times are set here, so that both choices are made whatever this machine measures: each graph still runs
    # once both ways (compiling it), and the graphs timed first, third, ... are faster eager, the others compiled
    calls = []

    def fixed_times(eager, compiled, seconds, least, most, warmup):
        eager(), compiled()
        calls.append(None)
        return (1.0, 2.0, 0.5) if len(calls) % 2 else (2.0, 1.0, 2.0)

    monkeypatch.setattr(shadowfx.runtimes.pytorch, "alternating_within", fixed_times)
    eager = shadowfx.transform(small_model("llama"), predictor("llama"), sparsity=0.5, scope="per_layer",
                               granularity=granularity)
    auto = shadowfx.transform(small_model("llama"), predictor("llama"), sparsity=0.5, scope="per_layer",
                              granularity=granularity, runtime="auto")
    # a batch of one's generation: per prompt, the prefill gathers (the default bound fits one copy)
    timed = ({"prefill", "prefill_gathering", "decode_pregathered", "decode"} if granularity == "prompt"
             else {"prefill", "prefill_next", "decode"})
    assert set(auto.runtime_timings) == timed
    assert [auto.graph_runtimes[name] for name in auto.runtime_timings] == ["eager", "compile", "eager", "compile"][
        :len(timed)]
    assert set(auto.graph_runtimes) == {name for name, graph in vars(auto.graphs).items() if graph is not None}
    for name, chosen in auto.graph_runtimes.items():
        timing = auto.runtime_timings.get(name)
        assert chosen == ("eager" if timing is None else "compile" if timing.speedup > 1.03 else "eager")
        assert timing is None or min(timing.eager_s, timing.compile_s) > 0
        assert isinstance(auto._runs[name], torch._dynamo.eval_frame.OptimizedModule) == (chosen == "compile")
    assert set(eager.graph_runtimes.values()) == {"eager"} and eager.runtime_timings == {}
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=4)
    torch.testing.assert_close(auto(input_ids, attention_mask), eager(input_ids, attention_mask), rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(auto.generate(input_ids, attention_mask, max_new_tokens=3),
                       eager.generate(input_ids, attention_mask, max_new_tokens=3))


def test_every_unit_kept_plans_the_views_of_the_weights_once():
    model = copy.deepcopy(small_model("llama"))  # .to() converts in place
    sparse = shadowfx.transform(model, predictor("llama"), sparsity=0.0)
    input_ids, attention_mask = padded_batch(1, 5, 512, seed=3)

    def kept_weights() -> list[torch.Tensor]:
        state = sparse.start(input_ids, attention_mask)
        assert sparse.last_decode_path == "pregathered" and sparse.last_gathered_bytes == 0
        return state.inputs

    def storages() -> set[int]:
        return {p.untyped_storage().data_ptr() for p in model.parameters()}

    first = kept_weights()
    assert kept_weights() is first  # the same views, not planned again
    assert {t.untyped_storage().data_ptr() for t in first} <= storages()  # of the model's own weights
    sparse.double()
    converted = kept_weights()
    assert converted is not first and {t.dtype for t in converted} == {torch.float64}
    assert {t.untyped_storage().data_ptr() for t in converted} <= storages()


def test_sampling_is_reproducible_and_within_top_k():
    sparse = transformed("qwen2", 0.5)
    input_ids, attention_mask = padded_batch(2, 5, 512, seed=9)
    first = sparse.generate(input_ids, attention_mask, max_new_tokens=4, do_sample=True, top_k=5, top_p=0.9,
                            generator=torch.Generator().manual_seed(0), eos_token_id=[])
    second = sparse.generate(input_ids, attention_mask, max_new_tokens=4, do_sample=True, top_k=5, top_p=0.9,
                             generator=torch.Generator().manual_seed(0), eos_token_id=[])
    assert torch.equal(first, second) and first.shape == (2, 9)
    logits = sparse(first[:, :-1], torch.cat([attention_mask, torch.ones(2, 3, dtype=torch.long)], 1))
    top5 = logits[:, -1].topk(5).indices
    assert all(first[row, -1] in top5[row] for row in range(2))


# ---- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, "0.5", True])
def test_bad_sparsity_is_refused_before_any_work(value):
    with pytest.raises(SparsityError, match=r"in \[0, 1\)"):
        shadowfx.transform(small_model("opt"), predictor("opt"), sparsity=value)


def test_bad_scope_granularity_runtime():
    with pytest.raises(SparsityError, match="scope"):
        shadowfx.transform(small_model("opt"), predictor("opt"), scope="layerwise")
    with pytest.raises(ValueError, match="granularity"):
        shadowfx.transform(small_model("opt"), predictor("opt"), granularity="sentence")
    with pytest.raises(ValueError, match="runtime"):
        shadowfx.transform(small_model("opt"), predictor("opt"), runtime="tensorrt")


def test_predictor_for_another_model_is_refused():
    with pytest.raises(FingerprintMismatch, match="re-run calibration"):
        shadowfx.transform(small_model("llama"), predictor("mistral"))


def test_predictor_with_wrong_output_shape_is_refused():
    class WrongShape(torch.nn.Module):
        fingerprint = structure("opt").fingerprint

        def forward(self, context):
            return torch.zeros(1, 2, 3), torch.zeros(1, 2, 256)

    with pytest.raises(PredictorError, match="needs"):
        shadowfx.transform(small_model("opt"), WrongShape())


def test_missing_predictor_says_how_to_make_one(tmp_path):
    with pytest.raises(PredictorError, match="pass predictor="):
        shadowfx.transform(small_model("opt"))
    build = build_small("gpt2")
    build.save_pretrained(tmp_path)
    loaded = type(build).from_pretrained(tmp_path).eval()
    with pytest.raises(PredictorError, match="no shadow predictor in"):
        shadowfx.transform(loaded)
    ShadowPredictor.for_structure(shadowfx.discover(loaded), hidden=16).save(tmp_path)
    sparse = shadowfx.transform(loaded, sparsity=0.5)
    assert sparse(*padded_batch(1, 4, 512, seed=1)).shape == (1, 4, 512)


def test_model_the_passes_cannot_rewrite_is_refused():
    model = build_small("llama")
    model.model.layers[1].mlp.act_fn = torch.nn.Softplus()
    with pytest.raises(shadowfx.StructureError, match=r"layer model\.layers\.1: unrecognised MLP activation"):
        shadowfx.transform(model, predictor("llama"))


def test_bad_inputs_at_call_time():
    sparse = transformed("gpt2", 0.5)
    with pytest.raises(InputError, match="empty batch"):
        sparse(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(InputError, match="left-padded"):
        sparse(torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    with pytest.raises(InputError, match="exceed the model's 256 positions"):
        sparse.generate(torch.ones(1, 250, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(InputError, match="integer tensor"):
        sparse(torch.ones(2, 4))


# ---- decode paths and token granularity -------------------------------------------------------------------------------
def test_pregathered_decode_equals_gather_per_call(family):
    """The fast path (weights gathered once per prompt) and the bounded-memory path give the same tokens/logits."""
    input_ids, attention_mask = padded_batch(3, 8, 512, seed=31)
    sparse = transformed(family, 0.5)
    default_limit = sparse.max_gathered_bytes
    try:
        sparse.max_gathered_bytes = 1 << 40
        tokens, logits = sparse.generate(input_ids, attention_mask, max_new_tokens=4, eos_token_id=[],
                                         return_logits=True)
        assert sparse.last_decode_path == "pregathered" and sparse.last_gathered_bytes > default_limit
        sparse.max_gathered_bytes = 0
        slow_tokens, slow_logits = sparse.generate(input_ids, attention_mask, max_new_tokens=4, eos_token_id=[],
                                                   return_logits=True)
        assert sparse.last_decode_path == "gather_per_call" and sparse.last_gathered_bytes == 0
    finally:
        sparse.max_gathered_bytes = default_limit
    assert torch.equal(tokens, slow_tokens)  # 3 rows x half the weights: over the default limit
    torch.testing.assert_close(logits, slow_logits, rtol=1e-5, atol=1e-5)


def test_max_gathered_bytes_is_checked_before_anything_is_copied(monkeypatch):
    sparse = transformed("llama", 0.5)
    input_ids, attention_mask = padded_batch(1, 6, 512, seed=8)
    sparse.start(input_ids, attention_mask)
    compact = shadowfx.compact.compact_weights(small_model("llama"), sparse.structure, sparse.last_selection)
    needed = compact.gathered_bytes
    assert sparse.last_decode_path == "pregathered" and needed > 0

    def no_copy(self):
        raise AssertionError("a weight was gathered beyond max_gathered_bytes")

    monkeypatch.setattr(shadowfx.compact._Gather, "take", no_copy)
    default_limit = sparse.max_gathered_bytes
    try:
        sparse.max_gathered_bytes = needed - 1
        sparse.start(input_ids, attention_mask)
        assert sparse.last_decode_path == "gather_per_call" and sparse.last_gathered_bytes == 0
    finally:
        sparse.max_gathered_bytes = default_limit


def test_shared_selection_gathers_one_copy():
    sparse = transformed("llama", 0.5)
    input_ids, attention_mask = padded_batch(1, 6, 512, seed=8)
    sparse.start(input_ids, attention_mask)
    single = sparse.last_gathered_bytes
    effective = sparse.effective_sparsity()
    kept_layer_bytes = sum(layer.weight_bytes_kept for layer in effective.layers[1:])
    assert single == kept_layer_bytes  # the prefill copied every kept weight of its row
    sparse.start(input_ids.expand(3, -1), attention_mask.expand(3, -1))
    # identical rows share one compact copy (of which kept rows in one run are views, not copies)
    shared = shadowfx.compact.compact_weights(small_model("llama"), sparse.structure, sparse.last_selection)
    assert shared.per_row == {"kv_heads": False, "neurons": False}
    assert 0 < sparse.last_gathered_bytes == shared.gathered_bytes <= single


@functools.cache
def token_transformed(family: str, scope: str = "per_layer"):
    return shadowfx.transform(small_model(family), predictor(family), sparsity=0.5, scope=scope, granularity="token")


def _per_token_selection(chosen) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    return ({i + 1: t for i, t in enumerate(chosen.kv_heads)}, {i + 1: t for i, t in enumerate(chosen.neurons)})


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_token_granularity_prefill_equals_masked_reference(family, scope):
    model = small_model(family)
    sparse = token_transformed(family, scope)
    input_ids, attention_mask = padded_batch(2, 9, 512, seed=41)
    logits = sparse(input_ids, attention_mask)
    chosen = sparse.last_selection
    assert chosen.kv_heads[0].shape[:2] == (2, 9)  # one selection per token
    with MaskedReference(model, structure(family)) as reference:
        reference.set_selection(*_per_token_selection(chosen))
        expected = reference.logits(input_ids, attention_mask)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@functools.cache
def block_token_transformed(family: str):
    block_predictor = ShadowPredictor.for_structure(structure(family), hidden=32, neuron_block=8, seed=1)
    return shadowfx.transform(small_model(family), block_predictor, sparsity=0.5, scope="per_layer",
                              granularity="token")


@pytest.mark.skipif(bool(native.missing_tools()), reason="no C++ compiler or ninja to build the kernels")
def test_token_granularity_prefill_of_neuron_blocks_computes_the_kept_units_only(family, native_calls):
    """A block-scoring predictor's per-token prefill runs each later layer's q and o projections and its MLP by the
    native tiles, which compute only each token's kept heads and neurons, and still equals the masked model."""
    sparse = block_token_transformed(family)
    input_ids, attention_mask = padded_batch(2, 9, 512, seed=44)
    native_calls.update(gather_rows=0, gather_cols=0)
    logits = sparse(input_ids, attention_mask)
    assert native_calls["gather_cols"] == 2 * (structure(family).num_layers - 1)  # o and down
    with MaskedReference(small_model(family), structure(family)) as reference:
        reference.set_selection(*_per_token_selection(sparse.last_selection))
        expected = reference.logits(input_ids, attention_mask)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_token_granularity_decode_equals_recompute(family):
    """Decode with the complete cache, a new selection every token, equals a masked recompute of the sequence."""
    model = small_model(family)
    sparse = token_transformed(family)
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=43)
    state = sparse.start(input_ids, attention_mask)
    kv_heads, neurons = [list(sparse.last_selection.kv_heads)], [list(sparse.last_selection.neurons)]
    layers = structure(family).num_layers
    tokens, step_logits = input_ids, []
    for _ in range(3):
        next_token = state.logits.argmax(-1)
        tokens = torch.cat([tokens, next_token[:, None]], 1)
        step_logits.append(sparse.step(state, next_token))
        kv_heads.append(list(sparse.last_selection.kv_heads))
        neurons.append(list(sparse.last_selection.neurons))
    assert all(k.shape[1] == structure(family).layers[1].attention.num_kv_heads for k in state.keys)
    assert len(state.keys) == layers
    full_mask = torch.cat([attention_mask, torch.ones(2, 3, dtype=torch.long)], 1)
    with MaskedReference(model, structure(family)) as reference:
        reference.set_selection(
            {l + 1: torch.cat([step[l] for step in kv_heads], 1) for l in range(layers - 1)},
            {l + 1: torch.cat([step[l] for step in neurons], 1) for l in range(layers - 1)},
        )
        expected = reference.logits(tokens, full_mask)
    torch.testing.assert_close(torch.stack(step_logits, 1), expected[:, -3:], rtol=1e-4, atol=1e-4)


def test_dense_prefill_computes_the_prompt_as_the_model_and_selects_per_decode_step(family):
    """prefill="dense": the prompt's pass is the model's own graph (no sparse op, nothing selected), its logits and
    cache the dense model's; every decode step then selects its own units, as a masked recompute of the sequence
    with the prompt's positions keeping every unit and each new token its step's selection gives."""
    model = small_model(family)
    sparse = shadowfx.transform(model, predictor(family), sparsity=0.5, scope="per_layer", granularity="token",
                                prefill="dense")
    # the prompt's graph as captured, cleaned of export's assertions and empty-cache copies only
    counts = sparse.rewrites.counts()
    assert sparse.prefill == "dense" and set(counts) == {"prefill", "decode", "prefill_next"}
    assert set(counts["prefill"]) == {"cleanup"} and counts["prefill"]["cleanup"] > 0
    targets = {node.target for graph in (sparse.graphs.prefill, sparse.graphs.prefill_next)
               for node in graph.graph.nodes}
    # no selection and no sparse op; the LM head of a generation's start may run on the native GEMV
    assert {t for t in targets if str(t).startswith("shadowfx.")} <= {torch.ops.shadowfx.dense_linear.default}
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=45)
    with torch.no_grad():
        dense = PrefillStep(model)(input_ids, attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(sparse(input_ids, attention_mask)[real], dense[real], rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="a dense prefill selects nothing"):
        sparse.effective_sparsity()
    state = sparse.start(input_ids, attention_mask)
    torch.testing.assert_close(state.logits, dense[:, -1], rtol=0, atol=1e-5)
    layers = structure(family).layers[1:]
    units = [layer.attention.num_kv_heads for layer in layers], [layer.mlp.intermediate_size for layer in layers]
    # the prompt's positions keep every unit; a step's selection is padded to that width by repeating its first unit
    chosen = [[torch.arange(n).expand(2, 7, n) for n in kind] for kind in units]
    tokens, step_logits = input_ids, []
    for _ in range(3):
        next_token = state.logits.argmax(-1)
        tokens = torch.cat([tokens, next_token[:, None]], 1)
        step_logits.append(sparse.step(state, next_token))
        selection = sparse.last_selection
        for kind, stepped, widths in zip(chosen, (selection.kv_heads, selection.neurons), units):
            for layer, (kept, n) in enumerate(zip(stepped, widths)):
                assert kept.shape[:2] == (2, 1) and kept.shape[2] < n  # this step's own selection
                kind[layer] = torch.cat([kind[layer], torch.cat([kept, kept[..., :1].expand(2, 1, n - kept.shape[2])],
                                                                -1)], 1)
    assert sparse.effective_sparsity().neurons > 0
    with MaskedReference(model, structure(family)) as reference:
        reference.set_selection({l + 1: t for l, t in enumerate(chosen[0])}, {l + 1: t for l, t in enumerate(chosen[1])})
        expected = reference.logits(tokens, torch.cat([attention_mask, torch.ones(2, 3, dtype=torch.long)], 1))
    torch.testing.assert_close(torch.stack(step_logits, 1), expected[:, -3:], rtol=1e-4, atol=1e-4)


def test_dense_prefill_is_refused_per_prompt_and_unknown_prefills_are_named():
    model, chosen = small_model("llama"), predictor("llama")
    with pytest.raises(ValueError, match="prefill='dense' needs granularity='token'"):
        shadowfx.transform(model, chosen, granularity="prompt", prefill="dense")
    with pytest.raises(ValueError, match="prefill must be one of"):
        shadowfx.transform(model, chosen, granularity="token", prefill="half")


def test_token_decode_reads_the_kept_weights_natively(family, native_calls):
    """Per token, the later layers' output projections are stored input-major, every decode step runs each sparse
    op's kept rows and columns through the native kernels, and the generation equals the PyTorch path's."""
    sparse = token_transformed(family)
    model, layers = small_model(family), structure(family).layers
    params = dict(model.named_parameters(remove_duplicate=False))
    for layer in layers[1:]:
        for projection in (layer.attention.o, layer.mlp.down):
            weight = params[projection.weight]
            assert (weight.t() if projection.weight_layout == "out_in" else weight).is_contiguous(), projection.weight
    prompt = padded_batch(2, 6, 512, seed=44)
    with native.use_native_kernels(False):
        expected_tokens, expected_logits = sparse.generate(*prompt, max_new_tokens=4, eos_token_id=[],
                                                           return_logits=True)
    tokens, logits = sparse.generate(*prompt, max_new_tokens=4, eos_token_id=[], return_logits=True)
    steps, gated = 3, layers[1].mlp.gate is not None  # the first new token comes from the prefill
    # the prefill's attention takes the tiles too (q rows, o inputs), its MLP the dense products (neuron by neuron)
    sparse_layers = len(layers) - 1
    assert native_calls == {"gather_rows": (steps * (3 if gated else 2) + 1) * sparse_layers,
                            "gather_cols": (steps * 2 + 1) * sparse_layers}
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(native.kernels() is None, reason="no native kernels to copy with")
def test_whole_weights_move_to_huge_pages_with_their_values(family):
    """The weights a decode step reads whole (layer 0's nn.Linear projections, the LM head, the predictor's
    matrices) get new storage with the same values; nothing else moves."""
    model, found = build_small(family), structure(family)
    shadow = ShadowPredictor.for_structure(found, hidden=32, seed=1)
    named = [*model.named_parameters(), *(("predictor." + n, p) for n, p in shadow.named_parameters())]
    values = {name: p.detach().clone() for name, p in named}
    storage = {name: p.data_ptr() for name, p in named}
    moved = shadowfx.compact.store_whole_weights_on_huge_pages(model, found, shadow)
    first = found.layers[0]
    expected = {p.weight for p in (first.attention.q, first.attention.k, first.attention.v, first.attention.o,
                                   first.mlp.up, first.mlp.gate, first.mlp.down)
                if p is not None and p.weight_layout == "out_in"}
    expected |= {found.lm_head.weight} | {"predictor." + n for n, p in shadow.named_parameters() if p.dim() == 2}
    assert set(moved) == expected and len(moved) == len(expected)
    every = {**dict(model.named_parameters(remove_duplicate=False)),
             **{"predictor." + n: p for n, p in shadow.named_parameters()}}
    moved_ids = {id(every[name]) for name in moved}  # a tied LM head moves its embedding with it
    for name, p in named:
        assert torch.equal(p, values[name]), name
        assert (p.data_ptr() != storage[name]) == (id(p) in moved_ids), name


def test_union_batch_selection_shares_the_heads_and_decodes_on_the_union_of_neurons(family):
    """batch_selection="union": every row keeps the heads of the mean scores, decodes on the union of the rows'
    neurons from one copy of the kept weights, reports the sparsity of the union, and computes exactly that."""
    model = small_model(family)
    sparse = shadowfx.transform(model, predictor(family), sparsity=0.5, scope="per_layer", batch_selection="union")
    input_ids, attention_mask = padded_batch(3, 7, 512, seed=45)
    sparse(input_ids, attention_mask)
    prefill_neurons = sparse.last_selection.neurons
    tokens, logits = sparse.generate(input_ids, attention_mask, max_new_tokens=3, eos_token_id=[],
                                     return_logits=True)
    chosen, later = sparse.last_selection, structure(family).num_layers - 1
    assert sparse.last_decode_path == "pregathered"
    for heads, neurons, own in zip(chosen.kv_heads, chosen.neurons, prefill_neurons):
        assert bool((heads == heads[:1]).all()) and bool((neurons == neurons[:1]).all())  # one set for the batch
        width = structure(family).layers[1].mlp.intermediate_size
        assert set(own[own < width].tolist()) == set(neurons[0].tolist())  # exactly the rows' union
    one_copy = shadowfx.compact.compact_weights(model, sparse.structure, chosen)
    assert one_copy.per_row == {"kv_heads": False, "neurons": False}
    assert sparse.last_gathered_bytes == one_copy.gathered_bytes
    per_row_neurons = 1 - sum(int((n < width).sum()) for n in prefill_neurons) / (3 * later * width)
    assert sparse.effective_sparsity().sparse_layers["neurons"] < per_row_neurons

    # the reference: the prompt with each row's own neurons, the decoded tokens with the union, as per-token masks
    prompt, new = input_ids.shape[1], 2  # the last generated token is not fed back
    sequence = torch.cat([attention_mask, torch.ones(3, new, dtype=attention_mask.dtype)], 1)
    neuron_tokens = {}
    for index, (own, union) in enumerate(zip(prefill_neurons, chosen.neurons), start=1):
        padded = torch.full((3, union.shape[1]), width).scatter(1, torch.arange(own.shape[1]).expand(3, -1), own)
        neuron_tokens[index] = torch.cat([padded[:, None].expand(3, prompt, -1),
                                          union[:, None].expand(3, new, -1)], 1)
    with MaskedReference(model, structure(family)) as reference:
        reference.set_selection({i + 1: h for i, h in enumerate(chosen.kv_heads)}, neuron_tokens)
        expected = reference.logits(tokens[:, :-1], sequence)
    torch.testing.assert_close(logits[:, 1:], expected[:, prompt:], rtol=1e-4, atol=1e-4)


def test_union_batch_selection_is_refused_where_it_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="needs a per-prompt selection by the shadow predictor"):
        shadowfx.transform(small_model("opt"), predictor("opt"), granularity="token", batch_selection="union")
    with pytest.raises(ValueError, match="needs a per-prompt selection by the shadow predictor"):
        shadowfx.transform(small_model("opt"), layerwise_predictor("opt"), scope="per_layer",
                           batch_selection="union")
    with pytest.raises(ValueError, match="batch_selection must be one of"):
        shadowfx.transform(small_model("opt"), predictor("opt"), batch_selection="shared")
    union = shadowfx.transform(small_model("opt"), predictor("opt"), scope="per_layer", batch_selection="union")
    with pytest.raises(shadowfx.onnx_export.OnnxExportError, match="batch_selection='union' is not exported"):
        shadowfx.export_onnx(union, tmp_path / "union")
    assert not (tmp_path / "union").exists()


def test_token_granularity_keeps_the_complete_cache_and_reports_it():
    sparse = token_transformed("qwen2")
    tokens = sparse.generate(*padded_batch(2, 5, 512, seed=6), max_new_tokens=3, eos_token_id=[])
    assert tokens.shape == (2, 8) and sparse.last_decode_path == "per_token"
    effective = sparse.effective_sparsity()
    assert effective.kv_bytes == 0 and effective.heads > 0 and effective.neurons > 0


def test_block_predictor_keeps_whole_neuron_blocks():
    block_predictor = ShadowPredictor(predictor("llama").shape, structure("llama").fingerprint, hidden=16,
                                      neuron_block=8)
    sparse = shadowfx.transform(small_model("llama"), block_predictor, sparsity=0.5, scope="per_layer")
    sparse(*padded_batch(2, 6, 512, seed=12))
    for neurons in sparse.last_selection.neurons:
        blocks = neurons.unflatten(-1, (-1, 8))
        assert torch.equal(blocks - blocks[..., :1], torch.arange(8).expand_as(blocks))  # contiguous runs of 8
        assert bool((blocks[..., 0] % 8 == 0).all())
    assert [layer.neurons_kept for layer in sparse.effective_sparsity().layers] == [192, 96, 96]


# ---- layerwise (DejaVu-style) predictor --------------------------------------------------------------------------------
@functools.cache
def layerwise_predictor(family: str) -> LayerwisePredictor:
    return LayerwisePredictor.for_structure(structure(family), hidden=32, seed=2)


@functools.cache
def layerwise_transformed(family: str, granularity: str = "prompt", sparsity: float = 0.5):
    return shadowfx.transform(small_model(family), layerwise_predictor(family), sparsity=sparsity, scope="per_layer",
                              granularity=granularity)


def layerwise_reference(family: str, granularity: str) -> LayerwiseMaskedReference:
    found = structure(family)
    later = found.layers[1]
    return LayerwiseMaskedReference(small_model(family), found, layerwise_predictor(family),
                                    kv_heads_kept=later.attention.num_kv_heads // 2,
                                    neurons_kept=later.mlp.intermediate_size // 2, per_token=granularity == "token")


def test_layerwise_sparsity_zero_equals_dense(family):
    input_ids, attention_mask = padded_batch(3, 9, 512, seed=51)
    with torch.no_grad():
        dense = PrefillStep(small_model(family))(input_ids, attention_mask)
    for granularity in ("prompt", "token"):
        logits = layerwise_transformed(family, granularity, 0.0)(input_ids, attention_mask)
        torch.testing.assert_close(logits, dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("granularity", ["prompt", "token"])
def test_layerwise_generation_equals_reference_selecting_as_it_runs(family, granularity):
    """Each later layer is scored from the sparse model's own states; an eager model whose hooks select the same
    way, prompt (frozen after prefill) or token by token, gives the same logits and tokens."""
    sparse = layerwise_transformed(family, granularity)
    input_ids, attention_mask = padded_batch(3, 8, 512, seed=53)
    prefill = sparse(input_ids, attention_mask)
    tokens, logits = sparse.generate(input_ids, attention_mask, max_new_tokens=4, eos_token_id=[],
                                     return_logits=True)
    with layerwise_reference(family, granularity) as reference:
        expected_prefill = reference.logits(input_ids, attention_mask)
        reference.clear()
        expected_tokens, expected_logits = reference.generate_greedy(input_ids, attention_mask, 4, return_logits=True)
    torch.testing.assert_close(prefill, expected_prefill, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(prefill, PrefillStep(small_model(family))(input_ids, attention_mask), atol=1e-3)


def test_layerwise_rewrite_counts_are_exact(family):
    later = structure(family).num_layers - 1
    per_prompt, per_token = layerwise_transformed(family), layerwise_transformed(family, "token")
    assert per_prompt.rewrites.counts()["prefill"]["insert_layerwise"] == 2 * later
    assert "insert_layerwise" not in per_prompt.rewrites.counts()["decode"]
    assert per_token.rewrites.counts()["decode"]["insert_layerwise"] == 2 * later
    for graph, predictors in ((per_prompt.graphs.prefill, 2 * later), (per_prompt.graphs.decode, 0),
                              (per_token.graphs.prefill, 2 * later), (per_token.graphs.decode, 2 * later)):
        targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_module"]
        assert sum(t.startswith("shadow_predictor.") for t in targets) == predictors
        assert sum(t in ("shadow_head_selector", "shadow_neuron_selector") for t in targets) == predictors
        graph.graph.lint()


def test_layerwise_compile_equals_eager():
    eager = layerwise_transformed("qwen2", "token")
    compiled = shadowfx.transform(small_model("qwen2"), layerwise_predictor("qwen2"), sparsity=0.5,
                                  scope="per_layer", granularity="token", runtime="compile")
    input_ids, attention_mask = padded_batch(2, 6, 512, seed=57)
    torch.testing.assert_close(compiled(input_ids, attention_mask), eager(input_ids, attention_mask),
                               rtol=1e-4, atol=1e-4)


def test_layerwise_needs_per_layer_scope_and_the_right_shape():
    with pytest.raises(SparsityError, match="scope='per_layer'"):
        shadowfx.transform(small_model("llama"), layerwise_predictor("llama"), sparsity=0.5)
    found = structure("llama")
    shape = SparseShape.layerwise(found)
    narrow = LayerwisePredictor(SparseShape(shape.input_size, shape.sparse_layers, shape.num_heads, 128),
                                found.fingerprint, hidden=8)
    with pytest.raises(PredictorError, match="needs"):
        shadowfx.transform(small_model("llama"), narrow, scope="per_layer")
    with pytest.raises(FingerprintMismatch):
        shadowfx.transform(small_model("llama"), layerwise_predictor("mistral"), scope="per_layer")


@pytest.mark.parametrize("kind", ["shadowllm", "dejavu"])
def test_to_dtype_rebuilds_the_graphs_and_runs_in_that_dtype(kind, one_thread):
    model = copy.deepcopy(small_model("llama"))  # .to() converts in place
    chosen = (ShadowPredictor.for_structure(structure("llama"), hidden=16) if kind == "shadowllm"
              else LayerwisePredictor.for_structure(structure("llama"), hidden=16))
    sparse = shadowfx.transform(model, chosen, sparsity=0.5, scope="per_layer")
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=6)
    full = sparse(input_ids, attention_mask)
    assert sparse.to(torch.bfloat16) is sparse
    assert {p.dtype for p in sparse.parameters()} == {torch.bfloat16}
    half = sparse(input_ids, attention_mask)
    assert half.dtype == torch.bfloat16
    with MaskedReference(model, structure("llama")) as reference:
        reference.set_selection(*reference_selection(sparse))
        expected = reference.logits(input_ids, attention_mask)
    torch.testing.assert_close(half, expected, rtol=5e-2, atol=5e-2)
    tokens = sparse.generate(input_ids, attention_mask, max_new_tokens=3)
    assert tokens.shape == (2, 10) and sparse.effective_sparsity().sparse_layers["heads"] == 0.5
    back = sparse.float()(input_ids, attention_mask)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, full, rtol=0.1, atol=0.1)  # the weights went through bf16 rounding
