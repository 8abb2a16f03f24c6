"""ONNX export and the onnxruntime runtime: the same logits and tokens as the PyTorch transformed model, the expected
shadowfx nodes in every file, and a clear refusal of every damaged or foreign directory."""

from __future__ import annotations

import functools
import gc
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
import pytest
import torch

import shadowfx
from shadowfx.families import FAMILIES, build_small
from shadowfx.onnx_export import GRAPH_FILES, LOGIT_POSITIONS, WEIGHTS_FILE, export_onnx
from shadowfx.onnx_ops import DOMAIN
from shadowfx.capture import positions_from_mask
from shadowfx.cli import main
from shadowfx.predictor import LayerwisePredictor, ShadowPredictor, StaticScores, load_predictor, save_predictor
from shadowfx.runtimes.onnx import OnnxDecoder, OnnxLoadError
from shadowfx.runtimes.pytorch import InputError, layer_weight_bytes
from shadowfx.selection import per_row_copy_bytes
from shadowfx.structure import FingerprintMismatch

from conftest import padded_batch, small_model, structure

PREDICTORS = {
    "shadowllm": lambda family: ShadowPredictor.for_structure(structure(family), hidden=32, seed=1),
    "dejavu": lambda family: LayerwisePredictor.for_structure(structure(family), hidden=32, seed=1),
    "static": lambda family: StaticScores.random(structure(family), seed=1),
}
# An export takes 20-30 s on the 2-core machine, so the default run covers both granularities, both scopes, all
# predictor kinds and both sparsities in five cases; SHADOWFX_ONNX_MATRIX=1 runs every family x granularity x
# sparsity x kind at per-layer scope, and every family x granularity at global scope (the layerwise kind ranks one
# layer at a time, so it has no global scope).
CASES = [("opt", "prompt", 0.5, "shadowllm", "per_layer"), ("llama", "token", 0.5, "dejavu", "per_layer"),
         ("qwen2", "token", 0.0, "static", "per_layer"), ("mistral", "prompt", 0.0, "shadowllm", "per_layer"),
         ("llama", "prompt", 0.5, "shadowllm", "global"),
         ("gpt2", "token", 0.5, "static", "global")]
if os.environ.get("SHADOWFX_ONNX_MATRIX") == "1":
    CASES = [(family, granularity, sparsity, kind, "per_layer") for family in FAMILIES
             for granularity in ("prompt", "token") for sparsity in (0.0, 0.5) for kind in PREDICTORS]
    CASES += [(family, granularity, 0.5, kind, "global") for family in FAMILIES for granularity in ("prompt", "token")
              for kind in ("shadowllm", "static")]
ROOT = Path(tempfile.mkdtemp(prefix="shadowfx-onnx-tests-"))


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    shutil.rmtree(ROOT, ignore_errors=True)


def exported(family: str, granularity: str, sparsity: float, kind: str, scope: str = "per_layer"):
    return _exported(family, granularity, sparsity, kind, scope)  # one cache entry whether scope is given or not


@functools.cache
def _exported(family: str, granularity: str, sparsity: float, kind: str, scope: str):
    sparse = shadowfx.transform(small_model(family), PREDICTORS[kind](family), sparsity=sparsity, scope=scope,
                                granularity=granularity)
    directory = export_onnx(sparse, ROOT / f"{family}-{granularity}-{sparsity}-{kind}-{scope}")
    return sparse, directory


def runtime(directory: Path, **options) -> OnnxDecoder:
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = 1
    return OnnxDecoder(directory, session_options=session_options, **options)


def expected_nodes(layers: int, granularity: str, kind: str, scope: str, graph: str,
                   sparsity: float) -> dict[str, int]:
    later = layers - 1
    if graph == "gather":  # the kept rows of q/k/v/up(/gate) and their biases; the kept inputs of o and down
        return {"KeptCols": 2 * later}
    sparse_ops = {"GatheredMLP": later,
                  "TokenSparseAttention" if granularity == "token" else "GatheredAttention": later}
    if graph == "decode" and granularity == "prompt":
        return sparse_ops
    if sparsity == 0.0:  # every unit kept: the prefill is the model's own graph, no predictor runs, nothing is ranked
        return {} if graph == "prefill" else sparse_ops
    predictor = {"shadowllm": 2, "dejavu": 2 * later, "static": 0}[kind]
    selection = {"GlobalTopkIndices": 2} if scope == "global" else {"TopkIndices": 2 * later}
    return {**sparse_ops, **selection, **({"ShadowMLP": predictor} if predictor else {})}


def kept_flags(indices: torch.Tensor, units: int) -> torch.Tensor:
    """[..., k] kept units (the empty slot ``units`` pads) -> bool [..., units]: the selection whatever its padding."""
    flags = torch.zeros(*indices.shape[:-1], units + 1, dtype=torch.bool)
    return flags.scatter_(-1, indices, True)[..., :units]


def assert_logit_positions(onnx_model: OnnxDecoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill session computes the logits of the positions it is given, and a generation's start gives it the
    last one only."""
    session = onnx_model.sessions["prefill"]
    assert LOGIT_POSITIONS in [i.name for i in session.get_inputs()]
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=5)
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    every = session.run(["logits"], {**feeds, LOGIT_POSITIONS: np.arange(7)})[0]
    some = session.run(["logits"], {**feeds, LOGIT_POSITIONS: np.array([6, 2])})[0]
    assert every.shape[:2] == (2, 7) and some.shape[:2] == (2, 2)
    np.testing.assert_allclose(some, every[:, [6, 2]], rtol=1e-5, atol=1e-5)
    calls = []
    run = onnx_model._run
    monkeypatch.setattr(onnx_model, "_run", lambda graph, arrays, values: calls.append(arrays) or run(graph, arrays,
                                                                                                      values))
    state = onnx_model.start(input_ids, attention_mask, decode=False)
    monkeypatch.undo()
    assert [call[LOGIT_POSITIONS].tolist() for call in calls] == [[6]]
    np.testing.assert_allclose(state.logits.numpy(), every[:, 6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, granularity, sparsity, kind, scope", CASES)
def test_onnxruntime_matches_pytorch(family, granularity, sparsity, kind, scope, monkeypatch):
    sparse, directory = exported(family, granularity, sparsity, kind, scope)
    for graph in GRAPH_FILES[granularity]:
        path = directory / f"{graph}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        counts: dict[str, int] = {}
        for node in proto.graph.node:
            if node.domain == DOMAIN:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if graph == "gather":  # the export merges equal biases (a random model's are zero), and their gathers
            assert counts.pop("KeptRows") >= sum(4 + (layer.mlp.gate is not None) for layer in sparse.structure.layers[1:])
        assert counts == expected_nodes(sparse.structure.num_layers, granularity, kind, scope, graph, sparsity), graph
    onnx_model = runtime(directory, structure=sparse.structure)
    assert_logit_positions(onnx_model, monkeypatch)
    for batch in (1, 2):
        input_ids, attention_mask = padded_batch(batch, 7, 512, seed=batch)
        real = attention_mask.bool()  # padding positions attend to nothing; their values are arbitrary
        torch.testing.assert_close(onnx_model(input_ids, attention_mask)[real],
                                   sparse(input_ids, attention_mask)[real], rtol=1e-4, atol=1e-4)
        got, want = onnx_model.last_selection, sparse.last_selection
        later = sparse.structure.layers[1:]
        units = [layer.attention.num_kv_heads for layer in later] + [layer.mlp.intermediate_size for layer in later]
        for a, b, n in zip(got.kv_heads + got.neurons, want.kv_heads + want.neurons, units):
            if granularity == "token":  # a padding token's selection is arbitrary, and so is the padding it adds
                a, b = a[real], b[real]
            assert torch.equal(kept_flags(a, n), kept_flags(b, n))
        tokens, logits = onnx_model.generate(input_ids, attention_mask, max_new_tokens=4, return_logits=True)
        want_tokens, want_logits = sparse.generate(input_ids, attention_mask, max_new_tokens=4, return_logits=True)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(tokens, want_tokens)


def test_a_dense_prefill_exports_the_models_prefill_and_a_selecting_decode(tmp_path):
    """prefill="dense": prefill.onnx is the model's (no shadowfx node, no selection output), the decode selects per
    token, and onnxruntime generates what PyTorch does; the runtime reads the prefill kind from the metadata."""
    sparse = shadowfx.transform(small_model("qwen2"), PREDICTORS["shadowllm"]("qwen2"), sparsity=0.5,
                                scope="per_layer", granularity="token", prefill="dense")
    directory = export_onnx(sparse, tmp_path / "dense-prefill")
    prefill = onnx.load(str(directory / "prefill.onnx"), load_external_data=False)
    assert not [node for node in prefill.graph.node if node.domain == DOMAIN]
    assert [o.name for o in prefill.graph.output] == ["logits"] + [
        f"present_{kind}_{i}" for kind in ("keys", "values") for i in range(sparse.structure.num_layers)]
    onnx_model = runtime(directory, structure=sparse.structure)
    assert onnx_model.prefill == "dense" and onnx_model.granularity == "token"
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=6)
    real = attention_mask.bool()
    torch.testing.assert_close(onnx_model(input_ids, attention_mask)[real], sparse(input_ids, attention_mask)[real],
                               rtol=1e-4, atol=1e-4)
    assert onnx_model.last_selection is None
    tokens, logits = onnx_model.generate(input_ids, attention_mask, max_new_tokens=4, return_logits=True)
    want_tokens, want_logits = sparse.generate(input_ids, attention_mask, max_new_tokens=4, return_logits=True)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, want_tokens)
    assert [t.shape[:2] for t in onnx_model.last_selection.neurons] == [(2, 1)] * (sparse.structure.num_layers - 1)


def test_weights_are_stored_once():
    sparse, directory = exported("opt", "prompt", 0.5, "shadowllm")
    parameter_bytes = sum(p.numel() * p.element_size() for p in sparse.model.parameters())
    stored = (directory / WEIGHTS_FILE).stat().st_size
    referenced = 0
    for graph in GRAPH_FILES["prompt"]:
        proto = onnx.load(str(directory / f"{graph}.onnx"), load_external_data=False)
        referenced += sum(ExternalDataInfo(t).length for t in proto.graph.initializer if uses_external_data(t))
        assert max(len(t.raw_data) for t in proto.graph.initializer) < 1024  # only small constants stay inline
    # prefill reads every weight, the gather graph the later layers', decode the rest: stored once, the file is the
    # size of one model (plus the predictor and the weights the exporter folded into another layout)
    assert stored < 0.7 * referenced
    assert stored < 1.5 * parameter_bytes


def test_a_batch_whose_copies_exceed_max_gathered_bytes_is_refused_up_front():
    sparse, directory = exported("llama", "prompt", 0.5, "shadowllm")
    input_ids, attention_mask = padded_batch(2, 6, 512, seed=8)
    onnx_model = runtime(directory)
    onnx_model.start(input_ids, attention_mask)  # by default, two rows fit
    # no biases in a Llama: what the gather wrote is what the selection's slots come to
    needed = per_row_copy_bytes(onnx_model.structure, onnx_model.last_selection, onnx_model.element_bytes)
    assert onnx_model.last_gathered_bytes == needed > 0
    assert onnx_model.max_gathered_bytes == 2 * layer_weight_bytes(sparse.structure, sparse.model) >= needed
    bounded = runtime(directory, max_gathered_bytes=needed - 1)
    with pytest.raises(InputError, match=r"a batch of 2 rows would gather .* more than max_gathered_bytes"):
        bounded.start(input_ids, attention_mask)
    assert bounded.last_decode_path is None
    bounded.start(input_ids[1:], attention_mask[1:])  # one row fits
    assert bounded.last_decode_path == "pregathered"
    with pytest.raises(ValueError, match="max_gathered_bytes must be >= 0"):
        runtime(directory, max_gathered_bytes=-1)


def test_sampling_and_eos_follow_the_pytorch_runtime():
    sparse, directory = exported("opt", "prompt", 0.5, "shadowllm")
    onnx_model = runtime(directory)
    input_ids, attention_mask = padded_batch(2, 6, 512, seed=5)
    greedy = sparse.generate(input_ids, attention_mask, max_new_tokens=5)
    eos = int(greedy[0, 7])  # row 0's second new token ends it there
    kwargs = dict(max_new_tokens=5, eos_token_id=eos, pad_token_id=3)
    assert torch.equal(onnx_model.generate(input_ids, attention_mask, **kwargs),
                       sparse.generate(input_ids, attention_mask, **kwargs))
    sampled = [model.generate(input_ids, attention_mask, max_new_tokens=5, do_sample=True, top_k=20, top_p=0.9,
                              generator=torch.Generator().manual_seed(7)) for model in (onnx_model, sparse)]
    assert torch.equal(*sampled)


@pytest.fixture
def copy_of_export(tmp_path):
    _, directory = exported("opt", "prompt", 0.5, "shadowllm")
    return Path(shutil.copytree(directory, tmp_path / "export"))


def test_another_models_structure_is_refused(copy_of_export):
    with pytest.raises(FingerprintMismatch):
        runtime(copy_of_export, structure=structure("llama"))


def test_missing_function_bodies_are_refused(copy_of_export):
    path = copy_of_export / "prefill.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    del proto.functions[:]
    onnx.save(proto, str(path))
    with pytest.raises(OnnxLoadError, match="GatheredAttention, GatheredMLP, ShadowMLP, TopkIndices"):
        runtime(copy_of_export)


def test_truncated_foreign_and_incompatible_files_are_refused(copy_of_export):
    prefill = copy_of_export / "prefill.onnx"
    original = prefill.read_bytes()
    prefill.write_bytes(original[: len(original) // 2])
    with pytest.raises(OnnxLoadError, match="not a readable ONNX file"):
        runtime(copy_of_export)
    proto = onnx.load_from_string(original)
    del proto.metadata_props[:]
    onnx.save(proto, str(prefill))
    with pytest.raises(OnnxLoadError, match="no shadowfx metadata"):
        runtime(copy_of_export)
    onnx.helper.set_model_props(proto, {"shadowfx.format": "0"})
    onnx.save(proto, str(prefill))
    with pytest.raises(OnnxLoadError, match="format 0"):
        runtime(copy_of_export)


def test_missing_or_truncated_weights_are_refused(copy_of_export):
    weights = copy_of_export / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(OnnxLoadError, match="truncated"):
        runtime(copy_of_export)
    weights.unlink()
    with pytest.raises(OnnxLoadError, match=f"{WEIGHTS_FILE} is missing"):
        runtime(copy_of_export)
    weights.write_bytes(data)
    (copy_of_export / "gather.onnx").unlink()
    with pytest.raises(OnnxLoadError, match="gather.onnx is missing"):
        runtime(copy_of_export)


def test_the_export_command_writes_what_the_runtime_loads(tmp_path, capsys):
    model_dir = tmp_path / "gpt2"
    model = small_model("gpt2")
    model.save_pretrained(model_dir)
    save_predictor(StaticScores.random(structure("gpt2"), seed=2), model_dir)
    out = tmp_path / "onnx"
    assert main(["export", str(model_dir), "--out", str(out), "--sparsity", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "static predictor per prompt, scope per_layer: skips 50% of the KV groups" in printed
    input_ids, attention_mask = padded_batch(2, 6, 512, seed=4)
    sparse = shadowfx.transform(model, load_predictor(model_dir, structure("gpt2")), sparsity=0.5,
                                scope="per_layer")
    expected = sparse(input_ids, attention_mask)
    with torch.inference_mode():
        got = torch.as_tensor(runtime(out, structure=structure("gpt2"))(input_ids, attention_mask))
    torch.testing.assert_close(got[attention_mask.bool()], expected[attention_mask.bool()], rtol=1e-4, atol=1e-4)
    assert main(["export", str(model_dir), "--out", str(out)]) == 2  # not empty, and no --overwrite
    assert "overwrite" in capsys.readouterr().err
    assert main(["export", str(model_dir), "--out", str(tmp_path / "bad"), "--sparsity", "1.5"]) == 2
    assert "sparsity" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["export", str(model_dir), "--out", str(tmp_path / "bad"), "--prefill", "dense"]) == 2
    assert "prefill='dense' needs granularity='token'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_dense_export_equals_the_model(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "llama"
    model = small_model("llama")
    model.save_pretrained(model_dir)
    out = tmp_path / "dense"
    assert main(["export", str(model_dir), "--out", str(out), "--dense"]) == 0
    assert "dense (no predictor, no sparsity)" in capsys.readouterr().out
    for graph in GRAPH_FILES["dense"]:
        onnx.checker.check_model(str(out / f"{graph}.onnx"), full_check=True)
        proto = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        assert not [node for node in proto.graph.node if node.domain == DOMAIN]
    dense = runtime(out, structure=structure("llama"))
    assert dense.granularity == "dense" and dense.config is None
    assert_logit_positions(dense, monkeypatch)
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=3)
    real = attention_mask.bool()
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=positions_from_mask(attention_mask)).logits
        want_tokens = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                                     pad_token_id=0)
    torch.testing.assert_close(dense(input_ids, attention_mask)[real], want[real], rtol=1e-4, atol=1e-4)
    assert dense.last_selection is None
    assert torch.equal(dense.generate(input_ids, attention_mask, max_new_tokens=4), want_tokens)


def test_an_export_whose_head_takes_no_positions_computes_every_position(tmp_path, monkeypatch):
    """An LM head whose input is not [B, T, E] (one that reads it flattened) gets no ``logit_positions`` input: the
    runtime then reads every position's logits, and a generation starts from the last one."""
    import shadowfx.passes.logit_positions as logit_positions_pass

    monkeypatch.setattr(logit_positions_pass, "shape", lambda node: (1, 1))  # the head's input looks flattened
    model_dir, out = tmp_path / "llama", tmp_path / "dense"
    model = small_model("llama")
    model.save_pretrained(model_dir)
    assert main(["export", str(model_dir), "--out", str(out), "--dense"]) == 0
    dense = runtime(out, structure=structure("llama"))
    assert LOGIT_POSITIONS not in [i.name for i in dense.sessions["prefill"].get_inputs()]
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=4)
    real = attention_mask.bool()
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=positions_from_mask(attention_mask)).logits
    torch.testing.assert_close(dense(input_ids, attention_mask)[real], want[real], rtol=1e-4, atol=1e-4)
    state = dense.start(input_ids, attention_mask, decode=False)
    torch.testing.assert_close(state.logits, want[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type,granularity", [("qwen3", "prompt"), ("gemma3_text", "token"), ("mpt", "prompt"),
                                                    ("gemma2", "prompt"), ("gptj", "prompt")])
def test_carried_head_transforms_run_in_onnxruntime(model_type, granularity, tmp_path):
    """Per-head query/key norms (Qwen3 scales its normalised heads by the weight, Gemma 3 by 1 + weight computed in
    float32), ALiBi (MPT: its slopes gathered with the kept heads per prompt), soft-capped
    scores (Gemma 2) and rotary embedding on interleaved pairs (GPT-J)."""
    from shadowfx.family_matrix import build

    model = build(model_type)
    predictor = ShadowPredictor.for_structure(shadowfx.discover(model), hidden=32, seed=1)
    sparse = shadowfx.transform(model, predictor, sparsity=0.5, scope="per_layer", granularity=granularity)
    attention = sparse.structure.layers[1].attention
    carried = {"mpt": attention.alibi_slopes, "gemma2": attention.softcap,
               "gptj": attention.rotary and attention.rotary.interleaved}.get(model_type, attention.q_norm)
    assert carried
    onnx_model = runtime(export_onnx(sparse, tmp_path / model_type), structure=sparse.structure)
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=2)
    real = attention_mask.bool()
    torch.testing.assert_close(onnx_model(input_ids, attention_mask)[real], sparse(input_ids, attention_mask)[real],
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(onnx_model.generate(input_ids, attention_mask, max_new_tokens=4),
                       sparse.generate(input_ids, attention_mask, max_new_tokens=4))


@pytest.mark.parametrize("granularity", ["prompt", None])
def test_export_keeps_no_reference_to_the_model(granularity, tmp_path):
    """Once export_onnx returns and the caller drops the model, its weights are freed: the exporter's optimiser
    (module-level onnxscript rules) would otherwise hold the last exported graph, and the parameters with it."""
    model = build_small("opt")
    weight = weakref.ref(model.lm_head.weight)
    if granularity is None:
        export_onnx(model, tmp_path / "dense")
    else:
        predictor = ShadowPredictor.for_structure(shadowfx.discover(model), hidden=16, seed=0)
        export_onnx(shadowfx.transform(model, predictor, sparsity=0.5, granularity=granularity), tmp_path / "sparse")
        del predictor
    del model
    gc.collect()
    assert weight() is None
