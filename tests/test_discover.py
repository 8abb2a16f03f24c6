"""DecoderStructure is found from the graph, for every family, and refuses what it cannot rewrite."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim
from transformers import AutoModelForCausalLM, BertConfig

import shadowfx
from shadowfx.capture import CapturedDecoder, PrefillStep
from shadowfx.families import build_small
from shadowfx.passes.discover_structure import discover_structure
from shadowfx.structure import (
    DecoderStructure,
    FingerprintMismatch,
    LayerStructure,
    StructureError,
    check_fingerprint,
)
from conftest import captured, structure
from plain_decoder import PlainDecoder

# What each small family must be discovered as: (heads, kv heads, mlp kind, activation, fused qkv, rotary).
EXPECTED = {
    "opt": (4, 4, "plain", "relu", False, False),
    "llama": (4, 2, "gated", "silu", False, True),
    "gpt2": (4, 4, "plain", "gelu_tanh", True, False),
    "mistral": (4, 2, "gated", "silu", False, True),
    "qwen2": (4, 2, "gated", "silu", False, True),
}


def test_structure_per_family(family, attn):
    found = structure(family, attn)
    heads, kv_heads, kind, activation, fused, rotary = EXPECTED[family]
    assert found.num_layers == 3
    assert found.hidden_size == 64 and found.vocab_size == 512
    graph_nodes = {n.name: n for n in captured(family, attn).graph.nodes}
    for layer in found.layers:
        attention, mlp = layer.attention, layer.mlp
        assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (heads, kv_heads, 16)
        assert attention.fused_qkv is fused
        assert (attention.rotary is not None) is rotary
        assert attention.core == attn
        assert attention.scaling == pytest.approx(16 ** -0.5)
        assert (mlp.kind, mlp.activation) == (kind, activation)
        assert mlp.intermediate_size == (256 if kind == "plain" else 192)
        assert (mlp.gate is not None) is (kind == "gated")
        for name in (attention.context_node, attention.core_node, mlp.intermediate_node, attention.q.node,
                     attention.o.node, mlp.down.node):
            assert name in graph_nodes
        context = graph_nodes[attention.context_node].meta["val"]
        assert context.shape[-1] == heads * 16  # [B, S, H * D]: the per-head context before the output projection
        intermediate = graph_nodes[mlp.intermediate_node].meta["val"]
        assert intermediate.shape[-1] == mlp.intermediate_size
        assert layer.module.endswith(f".{layer.index}")
        assert attention.module.startswith(layer.module + ".")
    assert found.predictor_input_node == found.layers[0].attention.context_node


def test_fused_qkv_rows_partition_the_projection():
    attention = structure("gpt2").layers[1].attention
    assert attention.q.module == attention.k.module == attention.v.module
    assert (attention.q.rows, attention.k.rows, attention.v.rows) == ((0, 64), (64, 128), (128, 192))
    assert attention.q.weight_layout == "in_out"


def test_parameter_names_exist_in_the_model(family):
    found = structure(family)
    params = dict(build_small(family).named_parameters())
    for layer in found.layers:
        for projection in (layer.attention.q, layer.attention.k, layer.attention.v, layer.attention.o,
                           layer.mlp.up, layer.mlp.down) + ((layer.mlp.gate,) if layer.mlp.gate else ()):
            weight = params[projection.weight]
            assert weight.shape == ((projection.out_features, projection.in_features)
                                    if projection.weight_layout == "out_in"
                                    else (projection.in_features, projection.out_features))
            assert projection.bias is None or projection.bias in params


def test_layer_count_follows_the_config():
    found = shadowfx.discover(build_small("llama", num_layers=5))
    assert found.num_layers == 5
    assert [layer.index for layer in found.layers] == [0, 1, 2, 3, 4]


def test_plain_module_is_discovered():
    torch.manual_seed(0)
    found = shadowfx.discover(PlainDecoder(layers=4).eval())
    assert found.num_layers == 4 and found.layers_module == "blocks"
    layer = found.layers[2]
    assert (layer.attention.num_heads, layer.attention.num_kv_heads, layer.attention.head_dim) == (4, 4, 8)
    assert layer.attention.q.module == "blocks.2.query" and layer.attention.o.module == "blocks.2.out"
    assert (layer.mlp.kind, layer.mlp.activation, layer.mlp.intermediate_size) == ("plain", "gelu", 96)
    assert (found.embedding, found.position_embedding, found.final_norm, found.lm_head.module) == (
        "tokens", "positions", "norm", "head")


def test_json_round_trip_and_tamper_check(family, tmp_path):
    found = structure(family)
    path = tmp_path / "structure.json"
    found.save(path)
    assert DecoderStructure.load(path) == found
    data = found.to_dict()
    data["layers"][1]["attention"]["num_heads"] = 99
    with pytest.raises(ValueError, match="fingerprint does not match"):
        DecoderStructure.from_dict(data)


def test_fingerprint_ignores_attention_kernel_but_not_weights():
    assert structure("llama", "sdpa").fingerprint == structure("llama", "eager").fingerprint
    other_weights = shadowfx.discover(build_small("llama", seed=1))
    assert other_weights.fingerprint != structure("llama").fingerprint
    with pytest.raises(FingerprintMismatch, match="re-run calibration"):
        check_fingerprint(structure("llama").fingerprint, other_weights, what="this predictor")
    check_fingerprint(structure("llama").fingerprint, structure("llama", "eager"), what="this predictor")


# Fields naming a node the layer computes itself (each layer has its own); mask and rotary nodes are shared.
_OWN_NODE_FIELDS = {"node", "core_node", "context_node", "intermediate_node"}


def described_apart_from_its_place(layer: LayerStructure) -> dict:
    """The layer's description without what places it: its index, its own nodes, and its module path (which
    prefixes every module and parameter name in it)."""

    def unplaced(value):
        if isinstance(value, dict):
            return {key: unplaced(item) for key, item in value.items() if key not in _OWN_NODE_FIELDS | {"index"}}
        if isinstance(value, str) and (value == layer.module or value.startswith(layer.module + ".")):
            return "<layer>" + value[len(layer.module):]
        return value

    return unplaced(dataclasses.asdict(layer))


def test_config_only_model_on_meta_device():
    config = build_small("qwen2").config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).eval()
    found = shadowfx.discover(model)
    assert found.weights_digest is None
    for layer in found.layers[1:]:
        assert layer.attention.q.node != found.layers[0].attention.q.node
        assert described_apart_from_its_place(layer) == described_apart_from_its_place(found.layers[0])
    assert [l.attention.num_kv_heads for l in found.layers] == [2, 2, 2]


@pytest.mark.parametrize("step", ["prefill_cache", "decode"])
def test_every_step_describes_the_same_model(family, step):
    other = discover_structure(captured(family, "sdpa", step))
    assert other.fingerprint == structure(family).fingerprint
    assert [l.attention.num_kv_heads for l in other.layers] == [l.attention.num_kv_heads for l in structure(family).layers]


class _ThreeLayerMLP(nn.Module):
    """An MLP the passes do not know (two hidden projections in series)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_unrecognised_mlp_names_layer_and_part():
    torch.manual_seed(0)
    model = PlainDecoder(layers=3).eval()
    model.blocks[1].expand = nn.Sequential(model.blocks[1].expand, nn.ReLU(), nn.Linear(96, 96))
    with pytest.raises(StructureError, match=r"layer blocks\.1: .*MLP"):
        shadowfx.discover(model)


def test_unrecognised_activation_is_named():
    model = build_small("llama")
    model.model.layers[2].mlp.act_fn = nn.Softplus()
    with pytest.raises(StructureError, match=r"layer model\.layers\.2: unrecognised MLP activation"):
        shadowfx.discover(model)


class _WeightlessBlock(nn.Module):
    """Causal attention of the states with themselves: no query, key, value or output projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = x[:, None]
        return x + F.scaled_dot_product_attention(states, states, states, is_causal=True)[:, 0]


class _WeightlessDecoder(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.blocks = nn.ModuleList(_WeightlessBlock() for _ in range(2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = F.one_hot(input_ids, self.vocab).float()
        for block in self.blocks:
            x = block(x)
        return x


def test_model_without_parameters_names_layer_and_part():
    model = _WeightlessDecoder(vocab=16).eval()
    input_ids = torch.randint(0, 16, (2, 5))
    dims = {0: Dim("batch", min=1, max=64), 1: Dim("seq", min=1, max=64)}
    # capture() places its example inputs on the model's parameters' device, so this graph is exported here
    program = torch.export.export(PrefillStep(model), (input_ids, torch.ones_like(input_ids)),
                                  dynamic_shapes={"input_ids": dims, "attention_mask": dims}, strict=False)
    with pytest.raises(StructureError, match=r"layer blocks\.0: the attention q input comes from 0 projections "
                                             r"\(none\), expected one"):
        discover_structure(CapturedDecoder(program=program, step="prefill", model=model))


def test_model_without_attention_is_refused():
    class NoAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.layers = nn.ModuleList(_ThreeLayerMLP(8) for _ in range(2))
            self.head = nn.Linear(8, 10)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            x = self.embed(input_ids)
            for layer in self.layers:
                x = x + layer(x)
            return self.head(x)

    with pytest.raises(StructureError, match="no attention found"):
        shadowfx.discover(NoAttention().eval())


def test_bidirectional_model_is_refused():
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    with pytest.raises(StructureError, match="not a causal decoder"):
        shadowfx.discover(AutoModelForCausalLM.from_config(config).eval())
