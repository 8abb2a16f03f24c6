"""The ``shadowfx::`` custom ops: gathered sparse MLP, gathered sparse attention and top-k selection.

Each op is a ``torch.library.custom_op`` with a fake implementation, so ``torch.export`` and ``torch.compile`` keep
it as one opaque node. The eager implementations here are the reference semantics; a faster kernel registered later
under the same name must match them.

Conventions (the contract):

- Weights are in ``nn.Linear`` layout ``[out_features, in_features]``; biases are optional. GPT-2's ``Conv1D``
  weights are ``[in, out]`` and are transposed by the caller.
- Activations are batch-first: ``[B, S, E]``.
- A selection is an int64 index tensor, ``[k]`` (shared by every batch row) or ``[B, k]`` (one per batch row), of
  distinct in-range indices in any order (a returned KV cache lists its heads in selection order);
  ``topk_indices`` returns ascending indices, which keeps weight gathers contiguous.
- ``gathered_mlp`` equals the dense MLP whose unselected intermediate neurons are zeroed before the down projection.
  ``gathered_attention`` equals the dense attention whose unselected query heads' context is zeroed before the
  output projection; selection is by whole KV groups (see ``gathered_attention``). Output biases are always kept.
- Inference only: no autograd formula is registered, so run under ``torch.no_grad()`` / ``torch.inference_mode()``
  (``torch.compile`` with parameters that require grad traces a backward and fails).
"""

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

__all__ = ["ACTIVATIONS", "gathered_attention", "gathered_mlp", "topk_indices"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
}
"""Activation names accepted by ``gathered_mlp``: erf GELU, tanh GELU (GPT-2's ``gelu_new``), x * sigmoid(1.702 x)."""


# Shape checks go through torch._check_value so that, under torch.export with dynamic dims, an equality between
# symbolic sizes becomes a runtime assertion instead of a guard that specializes the dim.


def _check_tensor(t: Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch._check_value(t.dim() == len(shape), lambda: f"{name} must have {len(shape)} dims, got {tuple(t.shape)}")
    for got, want in zip(t.shape, shape):
        torch._check_value(got == want, lambda: f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    torch._check_value(t.dtype == dtype, lambda: f"{name} must have dtype {dtype}, got {t.dtype}")


def _check_selection(idx: Tensor, name: str, batch: int) -> None:
    torch._check_value(idx.dtype == torch.int64, lambda: f"{name} must be int64, got {idx.dtype}")
    torch._check_value(idx.dim() in (1, 2), lambda: f"{name} must be [k] or [B, k], got shape {tuple(idx.shape)}")
    if idx.dim() == 2:
        torch._check_value(
            idx.shape[0] == batch, lambda: f"{name} is per batch row, [B, k], but has {idx.shape[0]} rows for B={batch}"
        )


def _check_selection_values(idx: Tensor, name: str, size: int) -> None:
    """Data-dependent checks: eager only (a fake tensor has no values)."""
    if idx.numel() == 0:
        return
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= size:
        raise IndexError(f"{name} out of range: values must be in [0, {size}), got values in [{low}, {high}]")
    ordered = idx.sort(dim=-1).values
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise ValueError(f"{name} has repeated indices; a selection must be distinct")


def _linear_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor) -> Tensor:
    """``x @ weight[rows].T + bias[rows]``: only the selected output features; rows [n] or per batch row [B, n]."""
    y = x @ weight[rows].transpose(-1, -2)
    # bias[rows] is [n] or [B, n]; the unsqueeze broadcasts it over the sequence dim in both cases
    return y if bias is None else y + bias[rows].unsqueeze(-2)


def _linear_cols(x: Tensor, weight: Tensor, bias: Optional[Tensor], cols: Tensor) -> Tensor:
    """``x @ weight[:, cols].T + bias``: x holds only the selected input features."""
    # weight.T[cols] is [n, out] or [B, n, out], so one matmul covers shared and per-row selections
    y = x @ weight.T[cols]
    return y if bias is None else y + bias


def _blocks(idx: Tensor, width: int) -> Tensor:
    """Indices covered by blocks ``idx`` of ``width`` consecutive entries: ``[..., n] -> [..., n * width]``."""
    return (idx.unsqueeze(-1) * width + torch.arange(width, device=idx.device)).flatten(-2)


# ---------------------------------------------------------------------------------------------------------- MLP


def _check_mlp_args(
    x: Tensor,
    up_weight: Tensor,
    up_bias: Optional[Tensor],
    gate_weight: Optional[Tensor],
    gate_bias: Optional[Tensor],
    down_weight: Tensor,
    down_bias: Optional[Tensor],
    neuron_idx: Tensor,
    activation: str,
) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    torch._check_value(x.dim() == 3, lambda: f"x must be [B, S, E], got shape {tuple(x.shape)}")
    torch._check_value(x.is_floating_point(), lambda: f"x must be floating point, got {x.dtype}")
    embed, ffn = x.shape[-1], up_weight.shape[0]
    _check_tensor(up_weight, "up_weight", (ffn, embed), x.dtype)
    _check_tensor(down_weight, "down_weight", (embed, ffn), x.dtype)
    if up_bias is not None:
        _check_tensor(up_bias, "up_bias", (ffn,), x.dtype)
    if gate_weight is not None:
        _check_tensor(gate_weight, "gate_weight", (ffn, embed), x.dtype)
    if gate_bias is not None:
        torch._check_value(gate_weight is not None, lambda: "gate_bias given without gate_weight")
        _check_tensor(gate_bias, "gate_bias", (ffn,), x.dtype)
    if down_bias is not None:
        _check_tensor(down_bias, "down_bias", (embed,), x.dtype)
    _check_selection(neuron_idx, "neuron_idx", x.shape[0])


@custom_op("shadowfx::gathered_mlp", mutates_args=())
def gathered_mlp(
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
    """MLP computed on the selected intermediate neurons only.

    x [B, S, E]; up/gate weight [F, E], bias [F]; down weight [E, F], bias [E]; neuron_idx int64 [k] or [B, k].
    Plain (gate_weight None): h = act(up(x)); gated: h = act(gate(x)) * up(x); out = down(h), all restricted to
    neuron_idx. Returns [B, S, E].
    """
    _check_mlp_args(x, up_weight, up_bias, gate_weight, gate_bias, down_weight, down_bias, neuron_idx, activation)
    _check_selection_values(neuron_idx, "neuron_idx", up_weight.shape[0])
    act = ACTIVATIONS[activation]
    up = _linear_rows(x, up_weight, up_bias, neuron_idx)
    h = act(up) if gate_weight is None else act(_linear_rows(x, gate_weight, gate_bias, neuron_idx)) * up
    return _linear_cols(h, down_weight, down_bias, neuron_idx)


@gathered_mlp.register_fake
def _gathered_mlp_fake(
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
    _check_mlp_args(x, up_weight, up_bias, gate_weight, gate_bias, down_weight, down_bias, neuron_idx, activation)
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------------- attention


def _check_attention_args(
    hidden: Tensor,
    q_weight: Tensor,
    q_bias: Optional[Tensor],
    k_weight: Tensor,
    k_bias: Optional[Tensor],
    v_weight: Tensor,
    v_bias: Optional[Tensor],
    o_weight: Tensor,
    o_bias: Optional[Tensor],
    kv_head_idx: Tensor,
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    attention_mask: Optional[Tensor],
    past_key: Optional[Tensor],
    past_value: Optional[Tensor],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    if min(num_heads, num_kv_heads, head_dim) < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"need num_heads, num_kv_heads, head_dim >= 1 and num_heads divisible by num_kv_heads, got "
            f"{num_heads}, {num_kv_heads}, {head_dim}"
        )
    torch._check_value(hidden.dim() == 3, lambda: f"hidden must be [B, S, E], got shape {tuple(hidden.shape)}")
    torch._check_value(hidden.is_floating_point(), lambda: f"hidden must be floating point, got {hidden.dtype}")
    batch, seq, embed = hidden.shape
    dtype = hidden.dtype
    q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
    for name, weight, bias, out_features in (
        ("q", q_weight, q_bias, q_out),
        ("k", k_weight, k_bias, kv_out),
        ("v", v_weight, v_bias, kv_out),
    ):
        _check_tensor(weight, f"{name}_weight", (out_features, embed), dtype)
        if bias is not None:
            _check_tensor(bias, f"{name}_bias", (out_features,), dtype)
    _check_tensor(o_weight, "o_weight", (embed, q_out), dtype)
    if o_bias is not None:
        _check_tensor(o_bias, "o_bias", (embed,), dtype)
    _check_selection(kv_head_idx, "kv_head_idx", batch)
    kept = kv_head_idx.shape[-1]

    torch._check_value((cos is None) == (sin is None), lambda: "cos and sin must be given together")
    if cos is not None and sin is not None:
        torch._check_value(cos.dim() == 3, lambda: f"cos must be [B, S, rot], got shape {tuple(cos.shape)}")
        rot = cos.shape[-1]
        torch._check_value(
            rot % 2 == 0 and rot <= head_dim, lambda: f"rotary dim {rot} must be even and <= head_dim {head_dim}"
        )
        torch._check_value(cos.shape[0] == 1 or cos.shape[0] == batch, lambda: f"cos batch must be 1 or {batch}")
        for name, t in (("cos", cos), ("sin", sin)):
            _check_tensor(t, name, (cos.shape[0], seq, rot), dtype)

    torch._check_value((past_key is None) == (past_value is None), lambda: "past_key and past_value go together")
    past = 0
    if past_key is not None and past_value is not None:
        past = past_key.shape[2]
        _check_tensor(past_key, "past_key", (batch, kept, past, head_dim), dtype)
        _check_tensor(past_value, "past_value", (batch, kept, past, head_dim), dtype)

    if attention_mask is not None:
        mask = attention_mask
        torch._check_value(
            mask.dtype == torch.bool or mask.is_floating_point(),
            lambda: f"attention_mask must be bool or floating point, got {mask.dtype}",
        )
        torch._check_value(mask.dim() == 4, lambda: f"attention_mask must be 4-D, got shape {tuple(mask.shape)}")
        torch._check_value(mask.shape[0] == 1 or mask.shape[0] == batch, lambda: f"mask batch must be 1 or {batch}")
        _check_tensor(mask, "attention_mask", (mask.shape[0], 1, seq, past + seq), mask.dtype)


def _rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF "rotate_half" RoPE on the first cos.shape[-1] dims of each head; t [B, H, S, D], cos/sin [B, S, rot]."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    x1, x2 = t_rot[..., : rot // 2], t_rot[..., rot // 2 :]
    rotated = t_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, t_pass), dim=-1)


def _additive_mask(attention_mask: Optional[Tensor], seq: int, total: int, device: torch.device) -> Tensor:
    """float32 mask to add to the scores, [B or 1, 1, S, T] (or [S, T] for the causal default)."""
    if attention_mask is None:
        # query i of the new tokens sits at position total - seq + i and sees keys up to it
        allowed = torch.ones(seq, total, dtype=torch.bool, device=device).tril(total - seq)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        return attention_mask.float()
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))


def _attend(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], scaling: float) -> Tensor:
    """softmax(q k^T * scaling + mask) v with q [B, g*r, S, D] and k/v [B, g, T, D]; returns [B, S, g*r*D]."""
    kv_heads, seq, total = k.shape[1], q.shape[2], k.shape[2]
    # query head i uses kv head i // r (HF repeat_kv); grouping q as [B, g, r, S, D] lets k/v broadcast, not copy
    q = q.unflatten(1, (kv_heads, -1))
    k, v = k.unsqueeze(2), v.unsqueeze(2)
    mask = _additive_mask(attention_mask, seq, total, q.device)
    if mask.dim() == 4:
        mask = mask.unsqueeze(2)  # [B, 1, S, T] -> [B, 1, 1, S, T], broadcast over g and r
    # scores and softmax in float32, as HF eager attention does for half-precision inputs
    scores = (q @ k.transpose(-1, -2)).float() * scaling + mask
    probs = torch.softmax(scores, dim=-1)
    # a query that may attend to nothing (a left-padding row under a bool mask) gets zero context, as torch SDPA
    # gives, instead of the NaN of 0/0
    probs = probs.masked_fill(scores.amax(dim=-1, keepdim=True) == float("-inf"), 0.0)
    context = probs.to(v.dtype) @ v  # [B, g, r, S, D]
    return context.flatten(1, 2).transpose(1, 2).flatten(2)


@custom_op("shadowfx::gathered_attention", mutates_args=())
def gathered_attention(
    hidden: Tensor,
    q_weight: Tensor,
    q_bias: Optional[Tensor],
    k_weight: Tensor,
    k_bias: Optional[Tensor],
    v_weight: Tensor,
    v_bias: Optional[Tensor],
    o_weight: Tensor,
    o_bias: Optional[Tensor],
    kv_head_idx: Tensor,
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    attention_mask: Optional[Tensor],
    past_key: Optional[Tensor],
    past_value: Optional[Tensor],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Self-attention computed on the selected KV groups only. Returns (out [B, S, E], key, value [B, g, P+S, D]).

    hidden [B, S, E]; q_weight [Hq*D, E]; k/v_weight [Hkv*D, E]; o_weight [E, Hq*D]; biases optional.
    kv_head_idx int64 [g] or [B, g] picks KV heads; the kept query heads are all query heads of those groups (query
    head h uses KV head h // (Hq // Hkv)), so for MHA it is plain head selection. cos/sin [B or 1, S, rot] apply
    RoPE (rotate_half convention) to the first rot dims of each head of q and k. past_key/past_value
    [B, g, P, D] hold the kept heads' cache and come before the new keys. attention_mask: None (causal),
    bool [B or 1, 1, S, P+S] (True = attend) or float additive of the same shape. A query with no key to attend
    to (left padding) gets zero context under a bool or -inf mask, as torch SDPA gives, and the uniform average of
    HF's finite float mask otherwise; never NaN. Scores and softmax are float32. The returned key/value are the
    present cache of the kept KV heads (key after RoPE).
    """
    _check_attention_args(
        hidden, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, kv_head_idx,
        cos, sin, attention_mask, past_key, past_value, num_heads, num_kv_heads, head_dim,
    )  # fmt: skip
    _check_selection_values(kv_head_idx, "kv_head_idx", num_kv_heads)
    # a KV head j owns query heads j*r .. j*r + r-1, whose q rows are one block of r * head_dim
    q_rows = _blocks(kv_head_idx, num_heads // num_kv_heads * head_dim)
    kv_rows = _blocks(kv_head_idx, head_dim)

    def heads(t: Tensor) -> Tensor:  # [B, S, n*D] -> [B, n, S, D]
        return t.unflatten(-1, (-1, head_dim)).transpose(1, 2)

    q = heads(_linear_rows(hidden, q_weight, q_bias, q_rows))
    key = heads(_linear_rows(hidden, k_weight, k_bias, kv_rows))
    value = heads(_linear_rows(hidden, v_weight, v_bias, kv_rows))
    if cos is not None and sin is not None:
        q, key = _rope(q, cos, sin), _rope(key, cos, sin)
    if past_key is not None and past_value is not None:
        key, value = torch.cat((past_key, key), dim=2), torch.cat((past_value, value), dim=2)
    out = _linear_cols(_attend(q, key, value, attention_mask, scaling), o_weight, o_bias, q_rows)
    # contiguous, like the fake outputs (the no-cache key/value are transposed views otherwise)
    return out, key.contiguous(), value.contiguous()


@gathered_attention.register_fake
def _gathered_attention_fake(
    hidden: Tensor,
    q_weight: Tensor,
    q_bias: Optional[Tensor],
    k_weight: Tensor,
    k_bias: Optional[Tensor],
    v_weight: Tensor,
    v_bias: Optional[Tensor],
    o_weight: Tensor,
    o_bias: Optional[Tensor],
    kv_head_idx: Tensor,
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    attention_mask: Optional[Tensor],
    past_key: Optional[Tensor],
    past_value: Optional[Tensor],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_attention_args(
        hidden, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, kv_head_idx,
        cos, sin, attention_mask, past_key, past_value, num_heads, num_kv_heads, head_dim,
    )  # fmt: skip
    batch, seq, _ = hidden.shape
    total = seq if past_key is None else past_key.shape[2] + seq
    cache_shape = (batch, kv_head_idx.shape[-1], total, head_dim)
    return hidden.new_empty(hidden.shape), hidden.new_empty(cache_shape), hidden.new_empty(cache_shape)


# -------------------------------------------------------------------------------------------------------- top-k


def _check_topk_args(scores: Tensor, k: int) -> None:
    torch._check_value(scores.dim() >= 1, lambda: "scores must have at least one dim")
    torch._check_value(scores.is_floating_point(), lambda: f"scores must be floating point, got {scores.dtype}")
    torch._check_value(k >= 1, lambda: f"k must be >= 1, got {k}")
    torch._check_value(k <= scores.shape[-1], lambda: f"k={k} exceeds the last dim of scores, {scores.shape[-1]}")


@custom_op("shadowfx::topk_indices", mutates_args=())
def topk_indices(scores: Tensor, k: int) -> Tensor:
    """int64 [..., k] indices of the k largest scores along the last dim, ascending; ties go to the lower index."""
    _check_topk_args(scores, k)
    # a stable descending sort keeps equal scores in index order, which makes the tie-break deterministic
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


@topk_indices.register_fake
def _topk_indices_fake(scores: Tensor, k: int) -> Tensor:
    _check_topk_args(scores, k)
    return scores.new_empty((*scores.shape[:-1], k), dtype=torch.int64)
