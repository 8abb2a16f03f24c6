"""Tests of the shadowfx:: custom ops against independently written dense references and real HF modules.

The references compute every neuron/head densely and zero the unselected ones (the contract in shadowfx/ops.py);
they use plain torch, torch SDPA and transformers' own activations and RoPE, never the op's helpers.
"""

from types import SimpleNamespace
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from shadowfx import ops

ACTIVATIONS = ["relu", "silu", "gelu", "gelu_tanh", "quick_gelu"]
# transformers' implementations of the same activations, as independent references
HF_ACTIVATION = {
    "relu": "relu",
    "silu": "silu",
    "gelu": "gelu_python",
    "gelu_tanh": "gelu_new",
    "quick_gelu": "quick_gelu",
}
# (atol, rtol) of the op in a dtype against a float64 reference computed from the same (rounded) inputs
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-2, 5e-2)}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def random_selection(n: int, k: int, batch: Optional[int]) -> Tensor:
    """k distinct indices in [0, n), in random order: [k] shared, or [batch, k] different per row."""
    if batch is None:
        return torch.randperm(n)[:k]
    return torch.stack([torch.randperm(n)[:k] for _ in range(batch)])


def keep_mask(idx: Tensor, n: int, batch: int) -> Tensor:
    """[batch, n] float64, 1 where selected."""
    rows = idx.expand(batch, -1) if idx.dim() == 1 else idx
    return torch.zeros(batch, n, dtype=torch.float64).scatter_(1, rows, 1.0)


def close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------------------ MLP


def dense_mlp_reference(
    x: Tensor,
    up_weight: Tensor,
    up_bias: Optional[Tensor],
    gate_weight: Optional[Tensor],
    gate_bias: Optional[Tensor],
    down_weight: Tensor,
    down_bias: Optional[Tensor],
    neuron_idx: Tensor,
    activation: str,
) -> Tensor:
    """Dense MLP in float64 with the unselected intermediate neurons zeroed."""
    x, up_weight, down_weight = x.double(), up_weight.double(), down_weight.double()
    up_bias, gate_weight, gate_bias, down_bias = (
        None if t is None else t.double() for t in (up_bias, gate_weight, gate_bias, down_bias)
    )
    act = ACT2FN[HF_ACTIVATION[activation]]
    up = F.linear(x, up_weight, up_bias)
    h = act(up) if gate_weight is None else act(F.linear(x, gate_weight, gate_bias)) * up
    h = h * keep_mask(neuron_idx, up_weight.shape[0], x.shape[0])[:, None, :]
    return F.linear(h, down_weight, down_bias)


def random_mlp(embed: int, ffn: int, gated: bool, bias: bool, dtype: torch.dtype) -> dict[str, Optional[Tensor]]:
    def rand(*shape: int) -> Tensor:
        return (torch.randn(*shape) * shape[-1] ** -0.5).to(dtype)

    return {
        "up_weight": rand(ffn, embed),
        "up_bias": rand(ffn) if bias else None,
        "gate_weight": rand(ffn, embed) if gated else None,
        "gate_bias": rand(ffn) if gated and bias else None,
        "down_weight": rand(embed, ffn),
        "down_bias": rand(embed) if bias else None,
    }


MLP_SHAPES = [(1, 1, 8, 16, 1), (3, 5, 16, 40, 7), (2, 4, 12, 24, 24)]  # (B, S, E, F, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gathered_mlp_matches_masked_dense(
    activation: str, gated: bool, bias: bool, per_row: bool, dtype: torch.dtype
) -> None:
    for batch, seq, embed, ffn, k in MLP_SHAPES:
        weights = random_mlp(embed, ffn, gated, bias, dtype)
        x = torch.randn(batch, seq, embed).to(dtype)
        idx = random_selection(ffn, k, batch if per_row else None)
        out = ops.gathered_mlp(x, **weights, neuron_idx=idx, activation=activation)
        assert out.shape == x.shape and out.dtype == dtype
        close(out, dense_mlp_reference(x, **weights, neuron_idx=idx, activation=activation), dtype)


def test_gathered_mlp_all_neurons_equals_dense_and_none_keeps_bias() -> None:
    weights = random_mlp(8, 16, gated=True, bias=True, dtype=torch.float32)
    x = torch.randn(2, 3, 8)
    out = ops.gathered_mlp(x, **weights, neuron_idx=torch.arange(16), activation="silu")
    up = F.linear(x, weights["up_weight"], weights["up_bias"])
    dense = F.linear(F.silu(F.linear(x, weights["gate_weight"], weights["gate_bias"])) * up, weights["down_weight"])
    torch.testing.assert_close(out, dense + weights["down_bias"], atol=1e-5, rtol=1e-5)
    nothing = ops.gathered_mlp(x, **weights, neuron_idx=torch.empty(0, dtype=torch.int64), activation="silu")
    torch.testing.assert_close(nothing, weights["down_bias"].expand(2, 3, 8))


def _mlp_call(**changes: object) -> Callable[[], Tensor]:
    args: dict[str, object] = dict(
        x=torch.randn(2, 3, 8), **random_mlp(8, 16, gated=False, bias=True, dtype=torch.float32),
        neuron_idx=torch.tensor([1, 4, 7]), activation="relu",
    )  # fmt: skip
    args.update(changes)
    return lambda: ops.gathered_mlp(**args)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"activation": "tanh"}, ValueError, "relu, silu, gelu, gelu_tanh, quick_gelu"),
        ({"neuron_idx": torch.tensor([1, 16])}, IndexError, r"out of range.*\[0, 16\)"),
        ({"neuron_idx": torch.tensor([-1, 3])}, IndexError, "out of range"),
        ({"neuron_idx": torch.tensor([[1, 3], [2, 2]])}, ValueError, "repeated"),
        ({"neuron_idx": torch.tensor([1, 3], dtype=torch.int32)}, ValueError, "int64"),
        ({"neuron_idx": torch.zeros(2, 2, 2, dtype=torch.int64)}, ValueError, r"\[k\] or \[B, k\]"),
        ({"neuron_idx": torch.tensor([[1, 3], [2, 4], [0, 5]])}, ValueError, "3 rows for B=2"),
        ({"x": torch.randn(6, 8)}, ValueError, r"\[B, S, E\]"),
        ({"x": torch.randn(2, 3, 8, dtype=torch.float64)}, ValueError, "dtype"),
        ({"down_weight": torch.randn(8, 15)}, ValueError, "down_weight must have shape"),
        ({"gate_bias": torch.randn(16)}, ValueError, "gate_bias given without gate_weight"),
    ],
)
def test_gathered_mlp_errors(changes: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _mlp_call(**changes)()


# ------------------------------------------------------------------------------------------------------ attention


def random_attention(
    embed: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool, dtype: torch.dtype
) -> dict[str, Optional[Tensor]]:
    def rand(*shape: int) -> Tensor:
        return (torch.randn(*shape) * shape[-1] ** -0.5).to(dtype)

    q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
    return {
        "q_weight": rand(q_out, embed),
        "q_bias": rand(q_out) if bias else None,
        "k_weight": rand(kv_out, embed),
        "k_bias": rand(kv_out) if bias else None,
        "v_weight": rand(kv_out, embed),
        "v_bias": rand(kv_out) if bias else None,
        "o_weight": rand(embed, q_out),
        "o_bias": rand(embed) if bias else None,
    }


def rotary(batch: int, start: int, seq: int, rot: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """LLaMA-style cos/sin [batch, seq, rot] for positions start .. start+seq-1."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    freqs = torch.arange(start, start + seq, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).expand(batch, seq, rot)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_reference(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    rot = cos.shape[-1]
    rotated, _ = apply_rotary_pos_emb(t[..., :rot], t[..., :rot], cos, sin)
    return torch.cat((rotated, t[..., rot:]), dim=-1)


def padding_mask(pads: list[int], seq: int, past: int) -> Tensor:
    """bool [B, 1, S, P+S]: causal, and the first pads[b] positions of row b are left padding."""
    total = past + seq
    causal = torch.arange(total)[None, :] <= torch.arange(past, total)[:, None]
    valid = torch.arange(total)[None, :] >= torch.tensor(pads)[:, None]
    return (causal[None] & valid[:, None, :])[:, None]


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The float mask HF builds for eager attention: 0 where attended, the dtype's min elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def dense_attention_reference(
    hidden: Tensor,
    w: dict[str, Optional[Tensor]],
    kv_head_idx: Tensor,
    rope: Optional[tuple[Tensor, Tensor]],
    mask: Optional[Tensor],
    past: Optional[tuple[Tensor, Tensor]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense float64 attention over all heads, unselected query heads' context zeroed before o_proj.

    mask is None (causal) or bool [B or 1, 1, S, P+S]; past holds all KV heads [B, Hkv, P, D].
    Returns (out, key, value) with key/value of all KV heads.
    """
    d = {name: None if t is None else t.double() for name, t in w.items()}
    hidden = hidden.double()
    batch, seq, _ = hidden.shape

    def split(t: Tensor) -> Tensor:
        return t.view(batch, seq, -1, head_dim).transpose(1, 2)

    q = split(F.linear(hidden, d["q_weight"], d["q_bias"]))
    k = split(F.linear(hidden, d["k_weight"], d["k_bias"]))
    v = split(F.linear(hidden, d["v_weight"], d["v_bias"]))
    if rope is not None:
        cos, sin = (t.double() for t in rope)
        q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    if past is not None:
        k, v = torch.cat((past[0].double(), k), dim=2), torch.cat((past[1].double(), v), dim=2)
    total = k.shape[2]
    if mask is None:
        mask = torch.ones(seq, total, dtype=torch.bool).tril(total - seq)
    group = num_heads // num_kv_heads
    context = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), attn_mask=mask, scale=scaling
    )
    keep_q = keep_mask(kv_head_idx, num_kv_heads, batch).repeat_interleave(group, dim=1)
    context = (context * keep_q[:, :, None, None]).transpose(1, 2).reshape(batch, seq, -1)
    return F.linear(context, d["o_weight"], d["o_bias"]), k, v


def kept_heads(t: Tensor, kv_head_idx: Tensor) -> Tensor:
    """t [B, Hkv, T, D] -> the selected heads, in selection order."""
    rows = kv_head_idx.expand(t.shape[0], -1) if kv_head_idx.dim() == 1 else kv_head_idx
    return torch.stack([t[b, rows[b]] for b in range(t.shape[0])])


HEADS = [(4, 4, 2), (8, 2, 1), (4, 1, 1)]  # (Hq, Hkv, kept KV heads): MHA, GQA, MQA
HEAD_IDS = ["mha", "gqa", "mqa"]
EMBED, HEAD_DIM = 16, 8


def attention_case(
    heads: tuple[int, int, int], batch: int, seq: int, rot: int, bias: bool, per_row: bool, dtype: torch.dtype,
    start: int = 0,
) -> SimpleNamespace:  # fmt: skip
    num_heads, num_kv_heads, kept = heads
    return SimpleNamespace(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        w=random_attention(EMBED, num_heads, num_kv_heads, HEAD_DIM, bias, dtype),
        hidden=torch.randn(batch, seq, EMBED).to(dtype),
        idx=random_selection(num_kv_heads, kept, batch if per_row else None),
        rope=rotary(batch, start, seq, rot, dtype) if rot else None,
    )


def run_op(
    c: SimpleNamespace,
    hidden: Tensor,
    rope: Optional[tuple[Tensor, Tensor]],
    mask: Optional[Tensor] = None,
    past: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    cos, sin = rope if rope is not None else (None, None)
    past_key, past_value = past if past is not None else (None, None)
    return ops.gathered_attention(
        hidden, **c.w, kv_head_idx=c.idx, cos=cos, sin=sin, attention_mask=mask, past_key=past_key,
        past_value=past_value, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=HEAD_DIM,
        scaling=HEAD_DIM**-0.5,
    )  # fmt: skip


def run_reference(
    c: SimpleNamespace,
    hidden: Tensor,
    rope: Optional[tuple[Tensor, Tensor]],
    mask: Optional[Tensor] = None,
    past: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return dense_attention_reference(
        hidden, c.w, c.idx, rope, mask, past, c.num_heads, c.num_kv_heads, HEAD_DIM, HEAD_DIM**-0.5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rot", [0, HEAD_DIM, HEAD_DIM // 2], ids=["norope", "rope", "partial_rope"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_gathered_attention_matches_masked_dense(
    heads: tuple[int, int, int], rot: int, bias: bool, per_row: bool, dtype: torch.dtype
) -> None:
    for batch, seq in [(1, 1), (3, 5), (2, 9)]:
        c = attention_case(heads, batch, seq, rot, bias, per_row, dtype)
        out, key, value = run_op(c, c.hidden, c.rope)
        ref_out, ref_key, ref_value = run_reference(c, c.hidden, c.rope)
        assert out.shape == c.hidden.shape and out.dtype == dtype
        assert key.shape == value.shape == (batch, heads[2], seq, HEAD_DIM)
        close(out, ref_out, dtype)
        close(key, kept_heads(ref_key, c.idx), dtype)
        close(value, kept_heads(ref_value, c.idx), dtype)


@pytest.mark.parametrize("past", [0, 4], ids=["prefill", "with_past"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_gathered_attention_left_padding(heads: tuple[int, int, int], past: int) -> None:
    # row 2 is padding up to position 5: all of its new tokens without a past, its first two after 4 past tokens
    batch, seq, pads = 3, 5, [0, 3, 6]
    c = attention_case(heads, batch, seq, HEAD_DIM, bias=True, per_row=True, dtype=torch.float32, start=past)
    bool_mask = padding_mask(pads, seq, past)
    dense_past = (torch.randn(batch, heads[1], past, HEAD_DIM), torch.randn(batch, heads[1], past, HEAD_DIM))
    op_past = (kept_heads(dense_past[0], c.idx), kept_heads(dense_past[1], c.idx)) if past else None
    ref_out, ref_key, _ = run_reference(c, c.hidden, c.rope, bool_mask, dense_past if past else None)

    out, key, _ = run_op(c, c.hidden, c.rope, bool_mask, op_past)
    assert torch.isfinite(out).all()
    close(out, ref_out, torch.float32)  # fully masked rows: zero context, like SDPA, so out == o_bias there
    close(key, kept_heads(ref_key, c.idx), torch.float32)

    float_out, _, _ = run_op(c, c.hidden, c.rope, additive(bool_mask, torch.float32), op_past)
    attends = bool_mask.any(dim=-1)[:, 0]  # [B, S]: rows with at least one key
    assert torch.isfinite(float_out).all()
    close(float_out[attends], ref_out[attends], torch.float32)
    assert not attends.all()  # the case does exercise fully masked rows


@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("rot", [0, HEAD_DIM], ids=["norope", "rope"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_gathered_attention_decode_with_cache_equals_full_sequence(
    heads: tuple[int, int, int], rot: int, new_tokens: int
) -> None:
    prefix = 4
    c = attention_case(heads, 2, prefix + new_tokens, rot, bias=True, per_row=True, dtype=torch.float32)
    full_out, full_key, full_value = run_op(c, c.hidden, c.rope)

    def part(t: Optional[tuple[Tensor, Tensor]], sl: slice) -> Optional[tuple[Tensor, Tensor]]:
        return None if t is None else (t[0][:, sl], t[1][:, sl])

    _, prefix_key, prefix_value = run_op(c, c.hidden[:, :prefix], part(c.rope, slice(None, prefix)))
    out, key, value = run_op(
        c, c.hidden[:, prefix:], part(c.rope, slice(prefix, None)), past=(prefix_key, prefix_value)
    )
    close(out, full_out[:, prefix:], torch.float32)
    close(key, full_key, torch.float32)
    close(value, full_value, torch.float32)


def test_gathered_attention_all_heads_equals_dense() -> None:
    c = attention_case((8, 2, 2), 2, 4, HEAD_DIM, bias=True, per_row=False, dtype=torch.float32)
    c.idx = torch.arange(2)
    out, _, _ = run_op(c, c.hidden, c.rope)
    w = c.w
    q = F.linear(c.hidden, w["q_weight"], w["q_bias"]).view(2, 4, 8, HEAD_DIM).transpose(1, 2)
    k = F.linear(c.hidden, w["k_weight"], w["k_bias"]).view(2, 4, 2, HEAD_DIM).transpose(1, 2)
    v = F.linear(c.hidden, w["v_weight"], w["v_bias"]).view(2, 4, 2, HEAD_DIM).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *c.rope)
    context = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    dense = F.linear(context.transpose(1, 2).reshape(2, 4, -1), w["o_weight"], w["o_bias"])
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def _attention_call(**changes: object) -> Callable[[], tuple[Tensor, Tensor, Tensor]]:
    batch, seq, heads, kv_heads = 2, 3, 4, 2
    args: dict[str, object] = dict(
        hidden=torch.randn(batch, seq, EMBED),
        **random_attention(EMBED, heads, kv_heads, HEAD_DIM, bias=True, dtype=torch.float32),
        kv_head_idx=torch.tensor([1]), cos=None, sin=None, attention_mask=None, past_key=None, past_value=None,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=HEAD_DIM, scaling=1.0,
    )  # fmt: skip
    args.update(changes)
    return lambda: ops.gathered_attention(**args)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"num_heads": 3}, ValueError, "divisible"),
        ({"kv_head_idx": torch.tensor([2])}, IndexError, r"out of range.*\[0, 2\)"),
        ({"kv_head_idx": torch.tensor([[0], [1], [0]])}, ValueError, "3 rows for B=2"),
        ({"k_weight": torch.randn(3 * HEAD_DIM, EMBED)}, ValueError, "k_weight must have shape"),
        ({"attention_mask": torch.ones(2, 1, 3, 4, dtype=torch.bool)}, ValueError, "attention_mask must have shape"),
        ({"attention_mask": torch.ones(2, 1, 3, 3, dtype=torch.int64)}, ValueError, "bool or floating"),
        ({"cos": torch.ones(2, 3, HEAD_DIM)}, ValueError, "together"),
        ({"cos": torch.ones(2, 3, 3), "sin": torch.ones(2, 3, 3)}, ValueError, "even"),
        ({"past_key": torch.ones(2, 2, 4, HEAD_DIM), "past_value": torch.ones(2, 2, 4, HEAD_DIM)}, ValueError,
         "past_key must have shape"),
    ],
)  # fmt: skip
def test_gathered_attention_errors(changes: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _attention_call(**changes)()


# ------------------------------------------------------------------------------------------ real HF modules


def _tiny(arch: str) -> nn.Module:
    common = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch == "opt":
        model = OPTForCausalLM._from_config(
            OPTConfig(**common, ffn_dim=128, word_embed_proj_dim=64), attn_implementation="sdpa"
        )
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    else:
        config_cls, model_cls, kv_heads = {
            "llama": (LlamaConfig, LlamaForCausalLM, 2),
            "mistral": (MistralConfig, MistralForCausalLM, 2),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM, 2),
        }[arch]
        config = config_cls(**common, intermediate_size=128, num_key_value_heads=kv_heads)
        model = model_cls._from_config(config, attn_implementation="sdpa")
    # weights of unit-scale outputs, so the scores are O(1) and the softmax is far from uniform
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return model.eval()


def _layer_parts(arch: str, model: nn.Module) -> SimpleNamespace:
    """Layer 1's attention/MLP weights in nn.Linear layout, the projections that take the head/neuron inputs, and
    calls of the HF modules."""
    if arch == "gpt2":
        layer = model.transformer.h[1]
        attn, mlp = layer.attn, layer.mlp
        q_w, k_w, v_w = attn.c_attn.weight.T.chunk(3, dim=0)  # Conv1D weight is [in, out]
        q_b, k_b, v_b = attn.c_attn.bias.chunk(3)
        return SimpleNamespace(
            attention=dict(q_weight=q_w, q_bias=q_b, k_weight=k_w, k_bias=k_b, v_weight=v_w, v_bias=v_b,
                           o_weight=attn.c_proj.weight.T, o_bias=attn.c_proj.bias),
            heads=(attn.num_heads, attn.num_heads, attn.head_dim), scaling=attn.scaling, rope=False,
            o_proj=attn.c_proj, run_attention=lambda h, mask, rope: attn(h, attention_mask=mask)[0],
            mlp=dict(up_weight=mlp.c_fc.weight.T, up_bias=mlp.c_fc.bias, gate_weight=None, gate_bias=None,
                     down_weight=mlp.c_proj.weight.T, down_bias=mlp.c_proj.bias),
            activation="gelu_tanh", down_proj=mlp.c_proj, run_mlp=mlp,
        )  # fmt: skip
    if arch == "opt":
        layer = model.model.decoder.layers[1]
        attn = layer.self_attn
        return SimpleNamespace(
            attention=dict(q_weight=attn.q_proj.weight, q_bias=attn.q_proj.bias, k_weight=attn.k_proj.weight,
                           k_bias=attn.k_proj.bias, v_weight=attn.v_proj.weight, v_bias=attn.v_proj.bias,
                           o_weight=attn.out_proj.weight, o_bias=attn.out_proj.bias),
            # OPT scales q after q_proj (bias included) and runs SDPA with scale 1: the same as scaling the scores
            heads=(attn.num_heads, attn.num_heads, attn.head_dim), scaling=attn.scaling, rope=False,
            o_proj=attn.out_proj, run_attention=lambda h, mask, rope: attn(h, attention_mask=mask)[0],
            mlp=dict(up_weight=layer.fc1.weight, up_bias=layer.fc1.bias, gate_weight=None, gate_bias=None,
                     down_weight=layer.fc2.weight, down_bias=layer.fc2.bias),
            activation="relu", down_proj=layer.fc2, run_mlp=lambda x: layer.fc2(layer.activation_fn(layer.fc1(x))),
        )  # fmt: skip
    layer = model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    config = model.config

    def linear(m: nn.Linear) -> tuple[Tensor, Optional[Tensor]]:
        return m.weight, m.bias

    (q_w, q_b), (k_w, k_b), (v_w, v_b), (o_w, o_b) = map(linear, (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    return SimpleNamespace(
        attention=dict(q_weight=q_w, q_bias=q_b, k_weight=k_w, k_bias=k_b, v_weight=v_w, v_bias=v_b, o_weight=o_w,
                       o_bias=o_b),
        heads=(config.num_attention_heads, config.num_key_value_heads, attn.head_dim), scaling=attn.scaling,
        rope=True, o_proj=attn.o_proj,
        run_attention=lambda h, mask, rope: attn(h, position_embeddings=rope, attention_mask=mask)[0],
        mlp=dict(up_weight=mlp.up_proj.weight, up_bias=None, gate_weight=mlp.gate_proj.weight, gate_bias=None,
                 down_weight=mlp.down_proj.weight, down_bias=None),
        activation="silu", down_proj=mlp.down_proj, run_mlp=mlp,
    )  # fmt: skip


def _zero_inputs(module: nn.Module, keep: Tensor, width: int) -> torch.utils.hooks.RemovableHandle:
    """Pre-hook zeroing the input features of the unselected blocks: keep [B, blocks] of width features each."""
    features = keep.repeat_interleave(width, dim=1)[:, None, :]
    return module.register_forward_pre_hook(lambda m, args: (args[0] * features.to(args[0].dtype),))


ARCHS = ["opt", "llama", "gpt2", "mistral", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_ops_match_hf_modules(arch: str) -> None:
    model = _tiny(arch)
    parts = _layer_parts(arch, model)
    num_heads, num_kv_heads, head_dim = parts.heads
    batch, seq = 3, 6
    hidden = torch.randn(batch, seq, model.config.hidden_size)
    mask = padding_mask([0, 2, 3], seq, 0)
    rope = model.model.rotary_emb(hidden, torch.arange(seq)[None].expand(batch, seq)) if parts.rope else None
    cos, sin = rope if rope is not None else (None, None)
    group = num_heads // num_kv_heads
    ffn = parts.mlp["up_weight"].shape[0]

    def attention(kv_idx: Tensor) -> Tensor:
        return ops.gathered_attention(
            hidden, **parts.attention, kv_head_idx=kv_idx, cos=cos, sin=sin, attention_mask=mask, past_key=None,
            past_value=None, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scaling=parts.scaling,
        )[0]  # fmt: skip

    def mlp(neuron_idx: Tensor) -> Tensor:
        return ops.gathered_mlp(hidden, **parts.mlp, neuron_idx=neuron_idx, activation=parts.activation)

    with torch.no_grad():
        # everything selected: the untouched modules
        torch.testing.assert_close(
            attention(torch.arange(num_kv_heads)), parts.run_attention(hidden, mask, rope), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(mlp(torch.arange(ffn)), parts.run_mlp(hidden), atol=1e-5, rtol=1e-5)

        kv_idx = random_selection(num_kv_heads, max(1, num_kv_heads // 2), batch)
        handle = _zero_inputs(parts.o_proj, keep_mask(kv_idx, num_kv_heads, batch), group * head_dim)
        expected = parts.run_attention(hidden, mask, rope)
        handle.remove()
        torch.testing.assert_close(attention(kv_idx), expected, atol=1e-5, rtol=1e-5)

        neuron_idx = random_selection(ffn, ffn // 4, batch)
        handle = _zero_inputs(parts.down_proj, keep_mask(neuron_idx, ffn, batch), 1)
        expected = parts.run_mlp(hidden)
        handle.remove()
        torch.testing.assert_close(mlp(neuron_idx), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------- top-k


def test_topk_indices_values_and_order() -> None:
    scores = torch.randn(2, 3, 50)
    idx = ops.topk_indices(scores, 7)
    assert idx.dtype == torch.int64 and idx.shape == (2, 3, 7)
    assert (idx.diff(dim=-1) > 0).all()  # ascending, distinct
    expected = scores.topk(7, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(idx, expected)


def test_topk_indices_ties_go_to_the_lower_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    assert ops.topk_indices(scores, 2).tolist() == [[1, 3], [0, 1]]
    assert ops.topk_indices(scores, 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]
    assert ops.topk_indices(scores, 6).tolist() == [list(range(6))] * 2
    assert ops.topk_indices(torch.tensor([0.5]), 1).tolist() == [0]


@pytest.mark.parametrize(
    "scores, k, match",
    [
        (torch.randn(4, 5), 0, ">= 1"),
        (torch.randn(4, 5), 6, "exceeds"),
        (torch.tensor(1.0), 1, "at least one dim"),
        (torch.arange(5), 2, "floating point"),
    ],
)
def test_topk_indices_errors(scores: Tensor, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.topk_indices(scores, k)


# ------------------------------------------------------------------------------------- opcheck, export, compile


def test_opcheck() -> None:
    mlp = random_mlp(8, 16, gated=True, bias=True, dtype=torch.float32)
    plain = random_mlp(8, 16, gated=False, bias=False, dtype=torch.float32)
    x = torch.randn(2, 3, 8)
    samples: list[tuple[Callable[..., object], tuple[object, ...]]] = [
        (ops.gathered_mlp, (x, *mlp.values(), torch.tensor([0, 5, 9]), "silu")),
        (ops.gathered_mlp, (x, *plain.values(), torch.tensor([[0, 5], [3, 1]]), "gelu_tanh")),
        (ops.topk_indices, (torch.randn(3, 10), 4)),
    ]
    w = random_attention(EMBED, 8, 2, HEAD_DIM, True, torch.float32)
    hidden = torch.randn(2, 3, EMBED)
    cos, sin = rotary(2, 4, 3, HEAD_DIM, torch.float32)
    past = torch.randn(2, 1, 4, HEAD_DIM)
    mask = padding_mask([0, 2], 3, 4)
    for kv_idx, rope, attn_mask, cache in [
        (torch.tensor([1]), (None, None), None, (None, None)),
        (torch.tensor([[1], [0]]), (cos, sin), mask, (past, past.clone())),
        (torch.tensor([[1], [0]]), (cos, sin), additive(mask, torch.float32), (past, past.clone())),
    ]:
        args = (hidden, *w.values(), kv_idx, *rope, attn_mask, *cache, 8, 2, HEAD_DIM, HEAD_DIM**-0.5)
        samples.append((ops.gathered_attention, args))
    for op, args in samples:
        torch.library.opcheck(op, args)


def _count(ep: torch.export.ExportedProgram, op: torch._ops.OpOverload) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target is op)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: Tensor, neuron_idx: Tensor) -> Tensor:
        return ops.gathered_mlp(
            x, self.up.weight, self.up.bias, self.gate.weight, self.gate.bias, self.down.weight, self.down.bias,
            neuron_idx, "silu",
        )  # fmt: skip


def test_export_gathered_mlp_dynamic_batch_and_seq() -> None:
    module, batch, seq = _MLP().eval(), Dim("batch"), Dim("seq")
    ep = torch.export.export(
        module,
        (torch.randn(2, 3, 8), random_selection(32, 8, 2)),
        dynamic_shapes=({0: batch, 1: seq}, {0: batch}),
        strict=False,
    )
    assert _count(ep, torch.ops.shadowfx.gathered_mlp.default) == 1
    x, idx = torch.randn(4, 7, 8), random_selection(32, 8, 4)
    torch.testing.assert_close(ep.module()(x, idx), module(x, idx))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        weights = random_attention(EMBED, 8, 2, HEAD_DIM, bias=True, dtype=torch.float32)
        self.w = nn.ParameterDict({name: nn.Parameter(t) for name, t in weights.items()})

    def forward(
        self,
        hidden: Tensor,
        kv_idx: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Optional[Tensor],
        past_key: Optional[Tensor],
        past_value: Optional[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        w = self.w
        return ops.gathered_attention(
            hidden, w["q_weight"], w["q_bias"], w["k_weight"], w["k_bias"], w["v_weight"], w["v_bias"], w["o_weight"],
            w["o_bias"], kv_idx, cos, sin, mask, past_key, past_value, 8, 2, HEAD_DIM, HEAD_DIM**-0.5,
        )  # fmt: skip


def _attention_inputs(batch: int, seq: int, past: int, masked: bool) -> tuple[Optional[Tensor], ...]:
    cache = torch.randn(batch, 1, past, HEAD_DIM) if past else None
    return (
        torch.randn(batch, seq, EMBED),
        random_selection(2, 1, batch),
        *rotary(batch, past, seq, HEAD_DIM, torch.float32),
        padding_mask(list(range(batch)), seq, 0) if masked else None,
        cache,
        None if cache is None else torch.randn_like(cache),
    )


@pytest.mark.parametrize("past", [0, 3], ids=["prefill_bool_mask", "with_cache"])
def test_export_gathered_attention_dynamic_shapes(past: int) -> None:
    module, batch, seq, past_len = _Attention().eval(), Dim("batch"), Dim("seq"), Dim("past")
    masked = past == 0  # a [B, 1, S, P+S] mask has no Dim expression; the cached case uses the causal default
    dynamic_shapes = (
        {0: batch, 1: seq}, {0: batch}, {0: batch, 1: seq}, {0: batch, 1: seq},
        {0: batch, 2: seq, 3: seq} if masked else None,
        {0: batch, 2: past_len} if past else None,
        {0: batch, 2: past_len} if past else None,
    )  # fmt: skip
    example = _attention_inputs(2, 3, past, masked)
    ep = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
    assert _count(ep, torch.ops.shadowfx.gathered_attention.default) == 1
    second = _attention_inputs(3, 5, past + 2 if past else 0, masked)
    for got, want in zip(ep.module()(*second), module(*second)):
        torch.testing.assert_close(got, want)


def test_export_topk_indices_dynamic_batch() -> None:
    class TopK(nn.Module):
        def forward(self, scores: Tensor) -> Tensor:
            return ops.topk_indices(scores, 3)

    ep = torch.export.export(TopK(), (torch.randn(2, 10),), dynamic_shapes=({0: Dim("batch")},), strict=False)
    assert _count(ep, torch.ops.shadowfx.topk_indices.default) == 1
    scores = torch.randn(5, 10)
    assert torch.equal(ep.module()(scores), ops.topk_indices(scores, 3))


def test_export_rejects_bad_arguments_at_trace_time() -> None:
    class Bad(nn.Module):
        def forward(self, x: Tensor, idx: Tensor) -> Tensor:
            w = torch.ones(16, 8)
            return ops.gathered_mlp(x, w, None, None, None, w.T, None, idx, "swish")

    with pytest.raises(ValueError, match="unknown activation"):
        torch.export.export(Bad(), (torch.randn(2, 3, 8), torch.tensor([1])), strict=False)


@torch.no_grad()  # the ops have no autograd formula; with grad on, compile would trace a backward and fail
def test_compile_gathered_mlp() -> None:
    module = _MLP().eval()
    compiled = torch.compile(module, fullgraph=True)
    for batch, seq in [(2, 3), (3, 1)]:
        x, idx = torch.randn(batch, seq, 8), random_selection(32, 8, batch)
        torch.testing.assert_close(compiled(x, idx), module(x, idx))
