"""Each of discovery's recognisers alone: on aten graphs of small formulas, and on captured families."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from shadowfx.capture import capture
from shadowfx.family_matrix import build
from shadowfx.passes.graph import GraphParameters, owner, projection_of
from shadowfx.passes.recognise_activation import activation_of
from shadowfx.passes.recognise_core import ATTENTION_CORE_OPS, attention_core
from shadowfx.passes.recognise_projections import fused_parts
from shadowfx.structure import StructureError
from conftest import captured


def _computing_nodes(formula) -> set[torch.fx.Node]:
    graph = make_fx(formula)(torch.randn(2, 8)).graph
    return {n for n in graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("formula,name", [
    (lambda x: F.relu(x), "relu"),
    (lambda x: F.relu(x).square(), "relu2"),
    (lambda x: F.relu(x) ** 2, "relu2"),
    (lambda x: F.silu(x), "silu"),
    (lambda x: x * torch.sigmoid(x), "silu"),
    (lambda x: F.gelu(x), "gelu"),
    (lambda x: 0.5 * x * (1 + torch.erf(x / 2 ** 0.5)), "gelu"),
    (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
    (lambda x: 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3))), "gelu_tanh"),
    (lambda x: x * torch.sigmoid(1.702 * x), "quick_gelu"),
])
def test_activation_is_named_from_its_ops(formula, name):
    assert activation_of("L", _computing_nodes(formula)) == name


@pytest.mark.parametrize("formula", [lambda x: x * torch.tanh(F.softplus(x)), lambda x: F.relu(x) ** 3, torch.exp])
def test_an_unknown_activation_is_refused_with_its_ops(formula):
    with pytest.raises(StructureError, match="layer L: unrecognised MLP activation ops"):
        activation_of("L", _computing_nodes(formula))


@functools.cache
def _family_graph(model_type: str):
    program = capture(build(model_type)).program
    return program.graph, GraphParameters.of(program)


def _parts(model_type: str, module: str) -> list[tuple[int, int]]:
    graph, params = _family_graph(model_type)
    (node, projection), = [(n, p) for n in graph.nodes if (p := projection_of(n, params)) and p.module == module]
    return sorted(part.rows for part in fused_parts(node, projection).values())


@pytest.mark.parametrize("model_type,module,rows", [
    ("gpt2", "transformer.h.1.attn.c_attn", [(0, 64), (64, 128), (128, 192)]),  # split of a Conv1D's reshaped output
    ("phi3", "model.layers.1.self_attn.qkv_proj", [(0, 64), (64, 96), (96, 128)]),  # slices, GQA widths
    ("phi3", "model.layers.1.mlp.gate_up_proj", [(0, 128), (128, 256)]),  # chunk in two
    ("gpt_bigcode", "transformer.h.1.attn.c_attn", [(0, 64), (64, 80), (80, 96)]),  # split of an unsqueezed output
    ("llama", "model.layers.1.self_attn.q_proj", []),  # used whole (the rotary's slices of each head are no parts)
    # a chunk of each head's [q, k, v]: rows repeating every head (the blocks: test_family_matrix)
    ("gpt_neox", "gpt_neox.layers.1.attention.query_key_value", [(0, 16), (16, 32), (32, 48)]),
    ("codegen", "transformer.h.1.attn.qkv_proj", [(0, 16), (16, 32), (32, 48)]),  # a split of each block
])
def test_fused_projection_parts(model_type, module, rows):
    assert _parts(model_type, module) == rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_core_reads_sdpa_and_eager_alike(attn):
    graph = captured("llama", attn).graph
    cores = [n for n in graph.nodes if n.op == "call_function" and n.target in ATTENTION_CORE_OPS]
    layer_nodes = {n for n in graph.nodes if owner(n).startswith("model.layers.1.")}
    core = attention_core("model.layers.1", next(c for c in cores if c in layer_nodes), layer_nodes)
    assert core.kind == attn
    head_dim = core.q.meta["val"].shape[-1]
    assert core.scale == pytest.approx(head_dim ** -0.5)
    assert core.mask is not None and core.q.meta["val"].shape[1] == 4


def _mpt_slopes(num_heads: int) -> list[float]:
    """MPT's ALiBi slopes by hand: 2^(-8 i / n) for head i = 1..n (n a power of two)."""
    return [2.0 ** (-8 * i / num_heads) for i in range(1, num_heads + 1)]


def test_alibi_slopes_are_read_from_a_run_of_the_model():
    from shadowfx import discover

    model = build("mpt")
    structure = discover(model)
    num_heads = model.config.n_heads
    assert [layer.attention.alibi_slopes for layer in structure.layers] == [
        pytest.approx(_mpt_slopes(num_heads), rel=1e-6)] * model.config.n_layers
    assert structure.layers[0].attention.mask_fill is not None  # MPT fills the blocked scores instead of adding


def test_a_score_bias_not_linear_in_the_key_position_is_refused(monkeypatch):
    from transformers.models.mpt import modeling_mpt

    from shadowfx import discover

    def squared_positions(num_heads, sequence_length, alibi_bias_max=8, device=None):
        positions = torch.arange(1 - sequence_length, 1, dtype=torch.float32, device=device)
        return (torch.tensor(_mpt_slopes(num_heads), device=device)[:, None, None] * positions ** 2)

    monkeypatch.setattr(modeling_mpt, "build_mpt_alibi_tensor", squared_positions)
    with pytest.raises(StructureError, match=r"layer 0: the per-head bias added to the attention scores .* is not "
                                             r"linear in the key's position"):
        discover(build("mpt"))
