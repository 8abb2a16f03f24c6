"""The native kernel library of the shadowfx ONNX domain (shadowfx.ort_kernels): registered, onnxruntime runs its
GatheredMLP kernel in place of the node's function body (the profiles show the node, not the body's ops), with the
body's results; without it, or where it cannot be built, the bodies run and give the same logits."""

from __future__ import annotations

import collections
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

import shadowfx
import shadowfx.runtimes.onnx as onnx_runtime
from shadowfx.onnx_export import export_onnx
from shadowfx.onnx_ops import DOMAIN, DOMAIN_VERSION, OPSET, function_for, functions_for
from shadowfx.ort_kernels import KernelPrerequisiteMissing, kernel_library
from shadowfx.predictor import ShadowPredictor
from shadowfx.runtimes.onnx import OnnxDecoder, OnnxLoadError

from conftest import huge_page_kib, needs_huge_pages, padded_batch, small_model, structure

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(tempfile.mkdtemp(prefix="shadowfx-onnx-kernels-tests-"))


@pytest.fixture(scope="module", autouse=True)
def remove_exports():
    yield
    shutil.rmtree(ROOT, ignore_errors=True)


@pytest.fixture(scope="module")
def library() -> Path:
    try:
        return kernel_library()
    except KernelPrerequisiteMissing as error:  # no compiler, or the headers cannot be fetched (no network)
        pytest.skip(str(error))


def session_options(profile: Path | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return options


def executed_ops(session: ort.InferenceSession) -> collections.Counter:
    """How many times each op type ran in ``session`` (profiling on), from its profile's node events."""
    events = json.loads(Path(session.end_profiling()).read_text())
    return collections.Counter(event["args"]["op_name"] for event in events
                               if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"))


# ---- one GatheredMLP node: the kernel against its function body -------------------------------------------------

BATCH, SEQ, EMBED, UNITS, KEPT = 2, 3, 8, 10, 4


def mlp_model(selection: str, gated: bool, activation: str, elem_type: int = TensorProto.FLOAT, *,
              size: tuple[int, ...] = (BATCH, SEQ, EMBED, UNITS, KEPT), neuron_idx: np.ndarray | None = None,
              constant_down: bool = False):
    """A graph of one GatheredMLP node with its function body, and random inputs: ``size`` (batch, seq, embed, units,
    kept), ``neuron_idx`` given or random with empty slots (index units) and repeated units; the down weight an
    input, or with ``constant_down`` an initializer."""
    batch, seq, embed, units, kept = size
    names = ["x", "up_weight", "up_bias", "gate_weight" if gated else "", "gate_bias" if gated else "",
             "down_weight", "down_bias", "" if selection == "pregathered" else "neuron_idx"]
    lead = [batch] if selection == "pregathered" else []
    shapes = {"x": [batch, seq, embed], "up_weight": lead + [units, embed], "up_bias": lead + [units],
              "gate_weight": lead + [units, embed], "gate_bias": lead + [units], "down_weight": lead + [embed, units],
              "down_bias": [embed], "neuron_idx": [batch, kept] if selection == "rows" else [batch, seq, kept]}
    rng = np.random.default_rng(0)
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    feeds = {name: rng.standard_normal(shapes[name]).astype(dtype) for name in names if name and name != "neuron_idx"}
    if "neuron_idx" in names:
        feeds["neuron_idx"] = rng.integers(0, units + 1, shapes["neuron_idx"]) if neuron_idx is None else neuron_idx
    initializers = [helper.make_tensor("down_weight", elem_type, shapes["down_weight"],
                                       feeds.pop("down_weight").tobytes(), raw=True)] if constant_down else []
    node = helper.make_node("GatheredMLP", names, ["y"], domain=DOMAIN, activation=activation, selection=selection)
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64 if name == "neuron_idx" else elem_type,
                                            shapes[name]) for name in names if name in feeds]
    graph = helper.make_graph([node], "gathered_mlp", inputs, [helper.make_tensor_value_info("y", elem_type, None)],
                              initializer=initializers)
    model = helper.make_model(graph, functions=[function_for([node])],
                              opset_imports=[helper.make_opsetid("", OPSET),
                                             helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    return model, feeds


def run_once(model: onnx.ModelProto, feeds: dict, tmp_path: Path, kernels: Path | None, threads: int = 1):
    """The node's output and the op types that ran, with the kernel library registered or not."""
    options = session_options(tmp_path / "profile")
    options.intra_op_num_threads = threads
    if kernels is not None:
        options.register_custom_ops_library(str(kernels))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    return outputs, executed_ops(session)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("selection", ["rows", "tokens", "pregathered"])
def test_kernel_runs_instead_of_the_body_and_matches_it(library, tmp_path, selection, gated):
    for activation in ("relu", "gelu", "gelu_tanh", "silu", "quick_gelu", "relu2"):
        model, feeds = mlp_model(selection, gated, activation)
        (native,), native_ops = run_once(model, feeds, tmp_path, library)
        (body,), body_ops = run_once(model, feeds, tmp_path, None)
        assert native_ops == {"GatheredMLP": 1}, activation
        assert "GatheredMLP" not in body_ops and body_ops, activation  # the body was inlined
        np.testing.assert_allclose(native, body, rtol=1e-5, atol=1e-5, err_msg=activation)


@pytest.mark.parametrize("selection", ["rows", "tokens", "tokens_repeating_a_unit", "pregathered"])
@pytest.mark.parametrize("down", ["input", "initializer"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_of_many_tokens_and_blocks_matches_the_body(library, tmp_path, selection, down, threads):
    """Shapes the shared kernels' register tiles take (several tokens keeping blocks of 4 consecutive units, columns
    in tiles of 64 and a tail), empty slots, a down weight given as an input (read as it is) or an initializer
    (copied input-major when the session makes the kernel), a token naming a unit twice (counted once), 1 and 2
    threads."""
    batch, seq, embed, units, block, kept_blocks = 2, 9, 80, 96, 4, 12
    rng = np.random.default_rng(1)
    rows = batch if selection == "rows" else batch * seq
    blocks = np.sort(np.stack([rng.permutation(units // block)[:kept_blocks] for _ in range(rows)]), axis=-1)
    idx = (blocks[..., None] * block + np.arange(block)).reshape(rows, -1)
    idx[1, -block:] = units  # a token keeping a block less, padded with the empty slot
    if selection == "tokens_repeating_a_unit":
        idx[2, 1] = idx[2, 0]
    idx = idx.reshape(batch, -1, idx.shape[-1]) if selection != "rows" else idx
    kind = "tokens" if selection.startswith("tokens") else selection
    model, feeds = mlp_model(kind, True, "silu", size=(batch, seq, embed, units, idx.shape[-1]), neuron_idx=idx,
                             constant_down=down == "initializer" and kind != "pregathered")
    (native,), native_ops = run_once(model, feeds, tmp_path, library, threads)
    (body,), _ = run_once(model, feeds, tmp_path, None, threads)
    assert native_ops == {"GatheredMLP": 1}
    # unscaled random weights make outputs in the hundreds: float32 sums in another order differ by their rounding
    np.testing.assert_allclose(native, body, rtol=1e-4, atol=1e-5 * np.abs(body).max())


def test_other_node_types_keep_their_bodies(library, tmp_path):
    model, feeds = mlp_model("rows", True, "silu")
    topk = helper.make_node("TopkIndices", ["x"], ["top"], domain=DOMAIN, k=2)  # no kernel in the library
    model.graph.node.append(topk)
    model.graph.output.append(helper.make_tensor_value_info("top", TensorProto.INT64, None))
    model.functions.append(function_for([topk]))
    native, native_ops = run_once(model, feeds, tmp_path, library)
    body, _ = run_once(model, feeds, tmp_path, None)
    assert native_ops == {"GatheredMLP": 1, "TopK": 2}
    np.testing.assert_allclose(native[0], body[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(native[1], body[1])


def test_float16_node_runs_the_float32_kernel_between_casts(library, tmp_path):
    # the library declares the schema's float16 type, so the file still loads; onnxruntime's CPU provider casts
    model, feeds = mlp_model("rows", True, "silu", TensorProto.FLOAT16)
    (native,), native_ops = run_once(model, feeds, tmp_path, library)
    (body,), _ = run_once(model, feeds, tmp_path, None)
    assert native.dtype == np.float16 and native_ops["GatheredMLP"] == 1
    in_float32 = {name: array.astype(np.float32) if array.dtype == np.float16 else array
                  for name, array in feeds.items()}
    (exact,), _ = run_once(mlp_model("rows", True, "silu")[0], in_float32, tmp_path, None)
    np.testing.assert_allclose(native.astype(np.float32), exact, rtol=2e-3, atol=1e-3)  # the output's rounding
    np.testing.assert_allclose(native, body, rtol=1e-2, atol=5e-2)  # the body rounds every op to float16


def test_kernel_refuses_an_index_past_the_empty_slot(library, tmp_path):
    model, feeds = mlp_model("rows", False, "relu")
    feeds["neuron_idx"][0, 0] = UNITS + 1
    with pytest.raises(InvalidArgument, match=r"neuron_idx holds 11, outside \[0, 10\]"):
        run_once(model, feeds, tmp_path, library)


# ---- TokenSparseAttention: a per-token attention node --------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, WIDTH = 6, 3, 8, 20  # two query heads per KV group


def attention_model(seq: int, past: int, options: set[str], *, mask_kind: str, o_constant: bool,
                    kv_head_idx: np.ndarray | None = None):
    """One TokenSparseAttention node with its body and random values for a batch of 2: each token keeps 2 of the 3
    KV groups (one token an empty slot instead of its second), ``past`` cached positions, and the options: "bias"
    (every projection's), "rope" (on 4 of 8 dims of each head; with "interleaved" on neighbouring pairs), "norms"
    (per-head q/k norms), "alibi", "softcap". The mask is causal, row 0 left-padded by one position (under a bool
    mask its first query then attends to nothing), as a bool or an HF-style finite float mask."""
    rng = np.random.default_rng(seq * 10 + past)
    batch, total = 2, past + seq
    if kv_head_idx is None:
        kv_head_idx = np.sort(np.stack([rng.permutation(KV_HEADS)[:2] for _ in range(batch * seq)]), -1)
        kv_head_idx = kv_head_idx.reshape(batch, seq, 2)
        kv_head_idx[1, -1, 1] = KV_HEADS
    values = {"hidden": [batch, seq, WIDTH], "q_weight": [HEADS * HEAD_DIM, WIDTH],
              "k_weight": [KV_HEADS * HEAD_DIM, WIDTH], "v_weight": [KV_HEADS * HEAD_DIM, WIDTH],
              "o_weight": [WIDTH, HEADS * HEAD_DIM]}
    if "bias" in options:
        values |= {"q_bias": [HEADS * HEAD_DIM], "k_bias": [KV_HEADS * HEAD_DIM], "v_bias": [KV_HEADS * HEAD_DIM],
                   "o_bias": [WIDTH]}
    if past:
        values |= {"past_key": [batch, KV_HEADS, past, HEAD_DIM], "past_value": [batch, KV_HEADS, past, HEAD_DIM]}
    if "norms" in options:
        values |= {"q_norm": [HEAD_DIM], "k_norm": [HEAD_DIM]}
    if "alibi" in options:
        values["alibi_slopes"] = [HEADS]
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in values.items()}
    if "rope" in options:
        angles = rng.uniform(0, 6, (1, seq, 4)).astype(np.float32)
        feeds["cos"], feeds["sin"] = np.cos(angles), np.sin(angles)
    allowed = np.tril(np.ones((seq, total), dtype=bool), past)[None, None].repeat(batch, 0)
    allowed[0, :, :, 0] = False
    feeds["attention_mask"] = allowed if mask_kind == "bool" else np.where(allowed, 0, -3.4e38).astype(np.float32)
    feeds["kv_head_idx"] = kv_head_idx
    names = ["hidden", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "o_weight", "o_bias",
             "kv_head_idx", "cos", "sin", "attention_mask", "past_key", "past_value", "q_norm", "k_norm",
             "alibi_slopes"]
    node = helper.make_node(
        "TokenSparseAttention", [name if name in feeds else "" for name in names], ["out", "key", "value"],
        domain=DOMAIN, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, scaling=HEAD_DIM ** -0.5,
        norm_eps=1e-6, softcap=5.0 if "softcap" in options else 0.0, mask_kind=mask_kind,
        rotary_interleaved=int("interleaved" in options), selection="tokens")
    initializers = []
    if o_constant:
        o_weight = feeds.pop("o_weight")
        initializers.append(helper.make_tensor("o_weight", TensorProto.FLOAT, o_weight.shape, o_weight.tobytes(),
                                               raw=True))
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
              for name, array in feeds.items()]
    graph = helper.make_graph([node], "attention", inputs, [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                                                            for name in ("out", "key", "value")],
                              initializer=initializers)
    model = helper.make_model(graph, functions=functions_for([node]),
                              opset_imports=[helper.make_opsetid("", OPSET),
                                             helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    return model, feeds


@pytest.mark.parametrize("seq, past, options, mask_kind", [
    (1, 5, {"bias", "rope"}, "bool"),  # a decode step
    (5, 0, {"rope", "interleaved", "norms"}, "bool"),  # a prefill
    (3, 4, {"alibi", "softcap", "bias"}, "additive"),
    (4, 2, set(), "additive"),
], ids=["decode", "prefill-norms-interleaved", "alibi-softcap", "plain"])
@pytest.mark.parametrize("o_constant", [False, True], ids=["o-input", "o-initializer"])
def test_attention_kernel_runs_instead_of_the_body_and_matches_it(library, tmp_path, seq, past, options, mask_kind,
                                                                  o_constant):
    """Every option of the node against its body: the kept heads' q and o, K/V of every group after the past,
    per-head norms, RoPE (halves or neighbours, partial), ALiBi, soft cap, bool or float masks, an empty slot and a
    query with nothing to attend to; the o weight an input or an initializer (copied input-major)."""
    model, feeds = attention_model(seq, past, options, mask_kind=mask_kind, o_constant=o_constant)
    native, native_ops = run_once(model, feeds, tmp_path, library, threads=2 if o_constant else 1)
    body, body_ops = run_once(model, feeds, tmp_path, None)
    assert native_ops == {"TokenSparseAttention": 1} and "TokenSparseAttention" not in body_ops
    assert native[1].shape == (2, KV_HEADS, past + seq, HEAD_DIM)
    for got, want in zip(native, body, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_attention_kernel_refuses_a_group_kept_twice_and_an_index_past_the_empty_slot(library, tmp_path):
    for index, message in ((np.array([[[1, 1]]]), "a token's kv_head_idx names one KV group twice"),
                           (np.array([[[0, 4]]]), r"index 4 is outside \[0, 3\] \(3 is the empty slot\)")):
        model, feeds = attention_model(1, 2, set(), mask_kind="bool", o_constant=False,
                                       kv_head_idx=index.repeat(2, 0))
        with pytest.raises(InvalidArgument, match=f"shadowfx TokenSparseAttention: {message}"):
            run_once(model, feeds, tmp_path, library)


# ---- KeptRows and KeptCols: a prompt's one-time gather ------------------------------------------------------------

def kept_model(op_type: str, source_shape: list[int], elem_type: int):
    node = helper.make_node(op_type, ["source", "indices"], ["kept"], domain=DOMAIN)
    graph = helper.make_graph([node], op_type, [helper.make_tensor_value_info("source", elem_type, source_shape),
                                                helper.make_tensor_value_info("indices", TensorProto.INT64, None)],
                              [helper.make_tensor_value_info("kept", elem_type, None)])
    return helper.make_model(graph, functions=[function_for([node])],
                             opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op_type, source_shape", [("KeptRows", [12, 5]), ("KeptRows", [12]), ("KeptCols", [5, 12])],
                         ids=["rows", "bias", "cols"])
def test_kept_weight_kernels_run_instead_of_the_bodies_and_match_them(library, tmp_path, op_type, source_shape,
                                                                       elem_type):
    """Runs of consecutive indices (a neuron block), scattered ones and empty slots (index 12: zeros), per batch row."""
    rng = np.random.default_rng(1)
    source = rng.standard_normal(source_shape).astype(helper.tensor_dtype_to_np_dtype(elem_type))
    indices = np.array([[0, 1, 2, 3, 7, 12, 12], [11, 4, 5, 6, 9, 10, 12]], dtype=np.int64)
    feeds = {"source": source, "indices": indices}
    model = kept_model(op_type, source_shape, elem_type)
    (native,), native_ops = run_once(model, feeds, tmp_path, library)
    (body,), body_ops = run_once(model, feeds, tmp_path, None)
    padded = np.concatenate([source, np.zeros_like(source[:1] if op_type == "KeptRows" else source[:, :1])],
                            axis=0 if op_type == "KeptRows" else 1)
    want = padded[indices] if op_type == "KeptRows" else np.moveaxis(padded[:, indices], 0, 1)
    assert native_ops == {op_type: 1} and op_type not in body_ops and body_ops
    np.testing.assert_array_equal(native, want)
    np.testing.assert_array_equal(body, want)
    # the empty slots are written, not left as the buffer was: a second run reuses the first one's output memory
    options = session_options()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"source": source, "indices": np.minimum(indices, 11)})
    np.testing.assert_array_equal(session.run(None, feeds)[0], want)


@needs_huge_pages
@pytest.mark.parametrize("op_type", ["KeptRows", "KeptCols"])
def test_kept_weights_sit_on_huge_pages(library, op_type):
    """The decode graph reads a prompt's kept weights every step: the kernels advise their output (onnxruntime's
    memory) to use huge pages before writing it, and the system grants them."""
    options = session_options()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(kept_model(op_type, [2048, 2048], TensorProto.FLOAT).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_cpu_input("source", np.ones((2048, 2048), np.float32))
    binding.bind_cpu_input("indices", np.arange(0, 2048, 2, dtype=np.int64)[None])  # 8 MB kept
    binding.bind_output("kept", "cpu")
    session.run_with_iobinding(binding)
    kept = binding.get_outputs()[0]
    assert huge_page_kib(kept.data_ptr(), 8 << 20) >= 4 << 10


def test_kept_weight_kernels_refuse_an_index_past_the_empty_slot(library, tmp_path):
    feeds = {"source": np.zeros((4, 3), np.float32), "indices": np.array([[0, 5]], dtype=np.int64)}
    with pytest.raises(InvalidArgument, match=r"shadowfx KeptRows: index 5 is outside \[0, 4\]"):
        run_once(kept_model("KeptRows", [4, 3], TensorProto.FLOAT), feeds, tmp_path, library)


# ---- an exported model: with the library, without it, and "auto" ---------------------------------------------------

# per prompt: rows in prefill, pregathered in decode (opt: relu, plain); per token: tokens (llama: silu, gated)
CASES = [("opt", "prompt"), ("llama", "token")]


def exported(family: str, granularity: str):
    directory = ROOT / f"{family}-{granularity}"
    predictor = ShadowPredictor.for_structure(structure(family), hidden=32, seed=1)
    sparse = shadowfx.transform(small_model(family), predictor, sparsity=0.5, scope="per_layer",
                                granularity=granularity)
    if not directory.exists():
        export_onnx(sparse, directory)
    return sparse, directory


def graph_nodes(directory: Path, graph: str, *op_types: str) -> int:
    proto = onnx.load(str(directory / f"{graph}.onnx"), load_external_data=False)
    return sum(node.op_type in op_types for node in proto.graph.node)


def mlp_nodes(directory: Path, graph: str) -> int:
    return graph_nodes(directory, graph, "GatheredMLP")


def per_token_attention_nodes(directory: Path, graph: str) -> int:
    """The per-token attention nodes (selection "tokens"), which the library's kernel runs."""
    proto = onnx.load(str(directory / f"{graph}.onnx"), load_external_data=False)
    return sum(node.op_type in ("GatheredAttention", "TokenSparseAttention") and any(
        a.name == "selection" and a.s == b"tokens" for a in node.attribute) for node in proto.graph.node)


@pytest.mark.parametrize("family, granularity", CASES)
def test_exported_model_runs_the_kernel_and_the_bodies_give_the_same_logits(library, tmp_path, family,
                                                                             granularity):
    sparse, directory = exported(family, granularity)
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=3)
    real = attention_mask.bool()  # padding positions attend to nothing; their values are arbitrary
    want = sparse(input_ids, attention_mask)
    want_tokens, want_logits = sparse.generate(input_ids, attention_mask, max_new_tokens=3, return_logits=True)
    results = {}
    for kernels in (library, None):
        onnx_model = OnnxDecoder(directory, session_options=session_options(tmp_path / str(kernels is None)),
                                 kernels=kernels)
        assert onnx_model.kernels == kernels
        # the gather graph copies natively either way
        assert onnx_model.gather_kernels == (library if granularity == "prompt" else kernels)
        logits = onnx_model(input_ids, attention_mask)
        tokens, generated = onnx_model.generate(input_ids, attention_mask, max_new_tokens=3, return_logits=True)
        torch.testing.assert_close(logits[real], want[real], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(generated, want_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(tokens, want_tokens)
        results[kernels] = logits, generated
        for graph, session in onnx_model.sessions.items():
            ran = executed_ops(session)
            # prefill runs twice (the call and generate's start), decode once per new token after the first
            runs = {"prefill": 2, "decode": 2}.get(graph, 0)
            assert ran["GatheredMLP"] == (mlp_nodes(directory, graph) * runs if kernels else 0), graph
            attention = per_token_attention_nodes(directory, graph) * runs if kernels else 0
            assert ran["TokenSparseAttention"] == attention, graph  # the node itself, not its body
            assert bool(attention) == (kernels is not None and granularity == "token" and graph != "gather")
            if kernels:  # the body's projections never run
                assert ran["KeptRowsLinear"] == ran["KeptColsLinear"] == 0, graph
            if graph == "gather":  # once, in generate's start
                copies = graph_nodes(directory, graph, "KeptRows", "KeptCols")
                assert copies and ran["KeptRows"] + ran["KeptCols"] == copies
    (native_logits, native_generated), (body_logits, body_generated) = results.values()
    torch.testing.assert_close(native_logits[real], body_logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(native_generated, body_generated, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["opt-eager", "qwen3", "gemma2", "mpt", "gptj", "phi"])
def test_per_token_exports_of_every_attention_variant_run_the_attention_kernel(library, tmp_path, model_type):
    """The attention kernel on real model classes, per token: OPT under eager attention (a float mask, biases),
    per-head norms (Qwen3), soft cap (Gemma 2), ALiBi (MPT), interleaved rotary (GPT-J), partial rotary (Phi); the
    logits and generation of the PyTorch runtime."""
    from shadowfx.family_matrix import build

    model = small_model("opt", "eager") if model_type == "opt-eager" else build(model_type)
    predictor = ShadowPredictor.for_structure(shadowfx.discover(model), hidden=32, seed=1)
    sparse = shadowfx.transform(model, predictor, sparsity=0.5, scope="per_layer", granularity="token")
    directory = export_onnx(sparse, tmp_path / model_type)
    onnx_model = OnnxDecoder(directory, session_options=session_options(tmp_path / "profile"), kernels=library)
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=2)
    real = attention_mask.bool()
    torch.testing.assert_close(onnx_model(input_ids, attention_mask)[real], sparse(input_ids, attention_mask)[real],
                               rtol=1e-4, atol=1e-4)
    tokens, logits = onnx_model.generate(input_ids, attention_mask, max_new_tokens=3, return_logits=True)
    want_tokens, want_logits = sparse.generate(input_ids, attention_mask, max_new_tokens=3, return_logits=True)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, want_tokens)
    layers = sparse.structure.num_layers - 1
    assert executed_ops(onnx_model.sessions["decode"])["TokenSparseAttention"] == 2 * layers  # two steps


def test_one_session_options_serves_several_decoders_and_is_left_as_it_was(library, tmp_path):
    sparse, directory = exported("opt", "prompt")
    options = session_options(tmp_path / "shared")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # not the default
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # carried to the kernels' sessions

    def settings() -> dict:
        return {name: getattr(options, name) for name, attribute in vars(type(options)).items()
                if isinstance(attribute, property)}

    before = settings()
    input_ids, attention_mask = padded_batch(2, 7, 512, seed=5)
    real = attention_mask.bool()
    want = sparse(input_ids, attention_mask)
    want_tokens = sparse.generate(input_ids, attention_mask, max_new_tokens=2)
    for kernels in (library, library, None):
        onnx_model = OnnxDecoder(directory, session_options=options, kernels=kernels)
        torch.testing.assert_close(onnx_model(input_ids, attention_mask)[real], want[real], rtol=1e-4, atol=1e-4)
        assert torch.equal(onnx_model.generate(input_ids, attention_mask, max_new_tokens=2), want_tokens)
        prefill = onnx_model.sessions["prefill"]
        assert prefill.get_session_options().graph_optimization_level == options.graph_optimization_level
        assert prefill.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
        # prefill ran twice (the call and generate's start): with the kernels, in every decoder given them
        ran = executed_ops(prefill)["GatheredMLP"]
        assert ran == (2 * mlp_nodes(directory, "prefill") if onnx_model.kernels else 0)
    assert settings() == before
    # no library was registered on the caller's object: a session made with it runs the function bodies
    model, feeds = mlp_model("rows", False, "relu")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    ran = executed_ops(session)
    assert "GatheredMLP" not in ran and ran


def test_auto_uses_the_built_library(library):
    _, directory = exported("opt", "prompt")
    assert OnnxDecoder(directory, session_options=session_options(), kernels="auto").kernels == library


def test_auto_falls_back_to_the_bodies_when_the_library_cannot_be_built(monkeypatch, caplog):
    sparse, directory = exported("opt", "prompt")

    tries = []

    def unbuildable():
        tries.append(1)
        raise KernelPrerequisiteMissing("g++ is not on PATH")

    monkeypatch.setattr(onnx_runtime, "kernel_library", unbuildable)
    with caplog.at_level(logging.WARNING, logger=onnx_runtime.__name__):
        onnx_model = OnnxDecoder(directory, session_options=session_options(), kernels="auto")
    assert onnx_model.kernels is None and onnx_model.gather_kernels is None
    assert "no shadowfx kernel library (g++ is not on PATH); onnxruntime runs the function bodies" in caplog.text
    assert len(tries) == 1 and caplog.text.count("no shadowfx kernel library") == 1  # looked for once, said once
    input_ids, attention_mask = padded_batch(1, 5, 512, seed=4)
    torch.testing.assert_close(onnx_model(input_ids, attention_mask), sparse(input_ids, attention_mask),
                               rtol=1e-4, atol=1e-4)


def test_a_library_onnxruntime_cannot_load_is_refused(tmp_path):
    _, directory = exported("opt", "prompt")
    missing = tmp_path / "libmissing.so"
    with pytest.raises(OnnxLoadError, match="cannot load the kernel library .*libmissing.so"):
        OnnxDecoder(directory, session_options=session_options(), kernels=missing)


def test_a_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ there
    with pytest.raises(KernelPrerequisiteMissing, match="g\\+\\+ is not on PATH"):
        kernel_library(tmp_path / "cache")
