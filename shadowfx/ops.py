"""The ``shadowfx::`` custom ops: gathered sparse MLP, gathered and per-token sparse attention, top-k selection.

Each op is a ``torch.library.custom_op`` with a fake implementation, so ``torch.export`` and ``torch.compile`` keep
it as one opaque node. The eager implementations here are the reference semantics; a faster kernel registered later
under the same name must match them.

Conventions (the contract):

- Weights are in ``nn.Linear`` layout ``[out_features, in_features]``; biases are optional. GPT-2's ``Conv1D``
  weights are ``[in, out]`` and are transposed by the caller.
- Activations are batch-first: ``[B, S, E]``.
- A selection is an int64 index tensor, ``[k]`` (shared by every batch row), ``[B, k]`` (one per batch row) or,
  where an op accepts it, ``[B, S, k]`` (one per token), of distinct in-range indices in any order (a returned KV
  cache lists its heads in selection order); ``topk_indices`` returns ascending indices, which keeps weight gathers
  contiguous. The index equal to the unit count (``F`` neurons, ``H_kv`` KV groups) is the empty slot: it keeps
  nothing and may repeat. Rows (tokens) that keep fewer units than the widest row of their batch are padded with
  it, so every row computes exactly its own selection in a rectangular tensor.
- Three ways to apply a selection:

  - gathered (one selection per prompt): the full weights and a ``[k]`` / ``[B, k]`` selection; the op gathers the
    selected weight rows/columns at every call.
  - pre-gathered: the selection argument is ``None`` and the weights hold only the selected neurons / KV groups, in
    selection order, shared ``[n, ...]`` or per batch row ``[B, n, ...]`` (the output biases of ``down`` / ``o``
    are never per row). The caller gathers them once per prompt and every decode step runs on the compact weights.
    Calling with weights gathered by a selection and ``None`` equals calling with the full weights and that
    selection. The selection size may change from call to call; the ops infer it from the weights.
  - per token (DejaVu-style): the full weights and a ``[B, S, k]`` selection, every token its own.
    ``gathered_mlp`` takes it directly; attention goes through ``token_sparse_attention``, which keeps the KV cache
    complete (every KV head of every token), since a later token may select a group that an earlier one skipped.

- ``gathered_mlp`` equals the dense MLP whose unselected intermediate neurons are zeroed (per token for a
  ``[B, S, k]`` selection) before the down projection. ``gathered_attention`` and ``token_sparse_attention`` equal
  the dense attention whose unselected query heads' context is zeroed (per token for the latter) before the output
  projection; selection is by whole KV groups (see ``gathered_attention``). Output biases are always kept.
- Inference only: no autograd formula is registered, so run under ``torch.no_grad()`` / ``torch.inference_mode()``
  (``torch.compile`` with parameters that require grad traces a backward and fails).
"""

import inspect
import math
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import CustomOpDef, custom_op

from shadowfx import native

__all__ = [
    "ACTIVATIONS", "dense_linear", "gathered_attention", "gathered_mlp", "global_topk_indices", "kept_cols",
    "kept_rows", "minmax_scale", "shadow_mlp",
    "token_sparse_attention", "topk_indices",
]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
    "relu2": lambda t: torch.relu(t).square(),
}
"""Activation names accepted by ``gathered_mlp``: erf GELU, tanh GELU (GPT-2's ``gelu_new``), x * sigmoid(1.702 x),
and squared ReLU (Primer; Nemotron, Arcee)."""


def _check(condition: object, message: Callable[[], str]) -> None:
    """ValueError(message()) unless ``condition``. A symbolic condition (under torch.export with dynamic dims) goes
    through torch._check_value, so that an equality between symbolic sizes becomes a runtime assertion instead of a
    guard that specializes the dim; a plain bool is checked here, since torch._check_value costs about 15 us a call
    and an op makes dozens of checks per decode step."""
    if condition is True:
        return
    if condition is False:
        raise ValueError(message())
    torch._check_value(condition, message)


def _check_tensor(t: Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _check(t.dim() == len(shape), lambda: f"{name} must have {len(shape)} dims, got {tuple(t.shape)}")
    for got, want in zip(t.shape, shape):
        _check(got == want, lambda: f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _check(t.dtype == dtype, lambda: f"{name} must have dtype {dtype}, got {t.dtype}")


_SELECTION_SHAPES = {1: "[k]", 2: "[B, k]", 3: "[B, S, k]"}


def _check_selection(
    idx: Tensor, name: str, batch: int, seq: Optional[int] = None, dims: tuple[int, ...] = (1, 2)
) -> None:
    """A selection of one of the ranks ``dims``: [k] shared, [B, k] per batch row, [B, S, k] per token (give seq)."""
    _check(idx.dtype == torch.int64, lambda: f"{name} must be int64, got {idx.dtype}")
    shapes = " or ".join(_SELECTION_SHAPES[d] for d in dims)
    _check(idx.dim() in dims, lambda: f"{name} must be {shapes}, got shape {tuple(idx.shape)}")
    if idx.dim() == 2:
        _check(
            idx.shape[0] == batch, lambda: f"{name} is per batch row, [B, k], but has {idx.shape[0]} rows for B={batch}"
        )
    elif idx.dim() == 3:
        _check(
            idx.shape[0] == batch, lambda: f"{name} is per token, [B, S, k], but has {idx.shape[0]} rows for B={batch}"
        )
        _check(
            idx.shape[1] == seq, lambda: f"{name} is per token, [B, S, k], but has {idx.shape[1]} tokens for S={seq}"
        )


def _check_lead(weight: Tensor, name: str, shapes: str, batch: int) -> tuple[int, ...]:
    """Pre-gathered weight ``weight``, shared [n, m] or per batch row [B, n, m]: its leading dims, () or (B,)."""
    _check(weight.dim() in (2, 3), lambda: f"{name} must be {shapes}, got shape {tuple(weight.shape)}")
    if weight.dim() == 2:
        return ()
    _check(
        weight.shape[0] == batch, lambda: f"{name} is per batch row but has {weight.shape[0]} rows for B={batch}"
    )
    return (batch,)


class _SelectionFacts(NamedTuple):
    """What an op reads from a checked selection's values."""

    every: bool  # every row (and token) keeps every unit
    run: Optional[slice]  # the ascending run of units that every row keeps, whose weights are a view
    empty: bool  # some slot is the empty slot
    units_per_run: float  # the mean length of the rows' runs of consecutive units


def _check_selection_values(idx: Tensor, name: str, size: int) -> _SelectionFacts:
    """Data-dependent checks: eager only (a fake tensor has no values). Values must lie in [0, size] (``size`` is the
    empty slot) and be distinct within each row (and token)."""
    if idx.numel() == 0:
        return _SelectionFacts(every=False, run=None, empty=False, units_per_run=0.0)
    # rows repeated by broadcasting (a stride of 0: every row or token given the same units) are looked at once, and
    # a run shared by every row is a view for all of them
    idx = idx[tuple(slice(0, 1) if idx.stride(dim) == 0 else slice(None) for dim in range(idx.dim() - 1))]
    low, high, repeated, every, run_start, runs = native.inspect_selection(idx, size) or _inspect_selection(idx, size)
    if low < 0 or high > size:
        raise IndexError(f"{name} out of range: values must be in [0, {size}) or the empty slot {size}, got values "
                         f"in [{low}, {high}]")
    if repeated:
        raise ValueError(f"{name} has repeated indices; a selection must be distinct")
    run = None if run_start < 0 else slice(run_start, run_start + idx.shape[-1])
    return _SelectionFacts(every=every, run=run, empty=high == size, units_per_run=idx.numel() / runs)


def _inspect_selection(idx: Tensor, size: int) -> tuple[int, int, bool, bool, int, int]:
    """native.inspect_selection with tensor ops, for where the kernels do not run."""
    low, high = (int(v) for v in idx.aminmax())
    if low < 0 or high > size:
        return low, high, False, False, -1, 0
    # how often each unit (and the empty slot, last) is selected: one pass, where a sort of a prefill's per-token
    # selections [B, S, k] costs more than the layer's projections
    ones = torch.ones((), dtype=torch.int32, device=idx.device).expand(idx.shape)
    counts = torch.zeros((*idx.shape[:-1], size + 1), dtype=torch.int32, device=idx.device).scatter_add_(-1, idx, ones)
    repeated = bool((counts[..., :size] > 1).any())
    run = contiguous_run(idx.flatten(), size) if idx.numel() == idx.shape[-1] and high < size else None
    runs = 0 if repeated else idx.numel() // idx.shape[-1] + int((idx[..., 1:] != idx[..., :-1] + 1).sum())
    every = not repeated and idx.shape[-1] == size and high < size
    return low, high, repeated, every, -1 if run is None else run[0], runs


def _keep_mask(idx: Tensor, size: int) -> Tensor:
    """bool [..., size], True at the selected indices ``idx`` [..., k] along the last dim (empty slots keep none)."""
    return idx.new_zeros((*idx.shape[:-1], size + 1), dtype=torch.bool).scatter(-1, idx, True)[..., :size]


def _empty_slots(idx: Tensor, size: int, has_empty: bool) -> tuple[Tensor, Optional[Tensor]]:
    """A gathering selection with its empty slots pointed at a real unit, and where they are (None unless
    ``has_empty``: the selection has some).

    The pointed-at unit is computed in the empty slot, and the caller zeroes that slot's contribution."""
    return (idx.clamp(max=size - 1), idx == size) if has_empty else (idx, None)


def _shared(units: Optional[Tensor]) -> Optional[Tensor]:
    """A per-row selection [1, n] of a batch of one as the shared [n]: the same rows, gathered without a batch dim."""
    return units[0] if units is not None and units.dim() == 2 and units.shape[0] == 1 else units


def contiguous_run(rows: Tensor, size: int) -> Optional[tuple[int, int]]:
    """(start, length) when the shared selection ``rows`` [n] is the ascending run start..start+n-1 of rows below
    ``size`` (every unit, at sparsity 0), whose weights are a view, not a copy; None otherwise (per-row selections,
    gaps, empty slots)."""
    if rows.dim() != 1 or rows.numel() == 0:
        return None
    start, length = int(rows[0]), rows.numel()
    if start + length > size or not torch.equal(rows, torch.arange(start, start + length, device=rows.device)):
        return None
    return start, length


def take_rows(weight: Tensor, rows: Tensor, empty_slot: bool = False) -> Tensor:
    """``weight[rows]`` for rows [n] or [B, n] of weight [out, in]: one contiguous copy per row (index_select),
    where advanced indexing of a 2-D index copies element by element; natively where it can (into huge
    pages). ``empty_slot``: the row index ``out`` is the empty slot, and gives a row of zeros."""
    flat = rows.flatten()
    if native.copies(weight, flat):
        return native.copy_rows(weight, flat).unflatten(0, rows.shape)
    size = weight.shape[0]
    taken = weight.index_select(0, flat.clamp(max=size - 1) if empty_slot else flat).unflatten(0, rows.shape)
    # the empty slot's mask broadcast over the rows' other dims (none for a bias)
    return taken.masked_fill((rows == size).view(*rows.shape, *[1] * (weight.dim() - 1)), 0) if empty_slot else taken


def _input_major(weight: Tensor) -> bool:
    """Whether ``weight`` [out, in] is the transpose of a contiguous [in, out]."""
    return not weight.is_contiguous() and weight.t().is_contiguous()


def take_cols(weight: Tensor, cols: Tensor, empty_slot: bool = False) -> Tensor:
    """The columns ``cols`` [n] or [B, n] of weight [out, in]: [out, n], or per batch row [B, out, n] (a view whose
    rows are contiguous runs of n); with ``empty_slot``, the column index ``in`` gives a column of zeros. Columns
    are gathered in the order the weight is stored: along its rows, or, for an input-major weight (the transpose of
    a contiguous [in, out]), as rows of that transpose; the other way round reads it with a stride, several times
    slower. The result keeps the weight's layout."""
    if _input_major(weight):
        return take_rows(weight.t(), cols, empty_slot).transpose(-1, -2)  # [.., n, out] -> [.., out, n]
    size = weight.shape[1]
    flat = cols.flatten()
    taken = weight.index_select(1, flat.clamp(max=size - 1) if empty_slot else flat)
    taken = taken if cols.dim() == 1 else taken.unflatten(1, cols.shape).movedim(1, 0)
    return taken.masked_fill((cols == size).unsqueeze(-2), 0) if empty_slot else taken


def _unit_slice(units: slice, width: int) -> slice:
    """The rows owned by a run of units of ``width`` consecutive rows each (``unit_rows`` of a run)."""
    return slice(units.start * width, units.stop * width)


def _linear_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor | slice | None) -> Tensor:
    """``x @ weight[rows].T + bias[rows]``: only the selected output features; rows [n] or per batch row [B, n], or
    a run of rows (a view of the weight).

    rows None: every row of weight [out, in] or per batch row [B, out, in], bias [out] or [B, out].
    """
    if isinstance(rows, slice):
        weight, bias = weight[rows], None if bias is None else bias[rows]
    elif rows is not None:
        rows = _shared(rows)
        weight, bias = take_rows(weight, rows), None if bias is None else bias[rows]
    elif weight.dim() == 3 and weight.shape[0] == 1:  # pre-gathered for a batch of one: one matmul, not a batch
        weight, bias = weight[0], None if bias is None else bias[0]
    if weight.dim() == 2 and x.shape[:-1].numel() == 1 and native.applies(x.reshape(1, 1, -1), weight):
        # one token (a batch of one's decode step): the native kernel streams the weight faster than F.linear
        return native.gemv(x.reshape(1, -1), weight, bias).view(*x.shape[:-1], -1)
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    # x @ [B, in, out] is one batched matmul per row; the bias [B, out] is unsqueezed to broadcast over the sequence
    y = x @ weight.transpose(-1, -2)
    return y if bias is None else y + bias.unsqueeze(-2)


def _linear_cols(x: Tensor, weight: Tensor, bias: Optional[Tensor], cols: Tensor | slice | None) -> Tensor:
    """``x @ weight[:, cols].T + bias``: x holds only the selected input features (cols as in ``_linear_rows``).

    cols None: x holds every input feature of weight [out, in] or per batch row [B, out, in]; bias is [out].
    """
    if isinstance(cols, slice):
        weight = weight[:, cols]
    elif cols is not None:
        weight = take_cols(weight, _shared(cols))
    elif weight.dim() == 3 and weight.shape[0] == 1:
        weight = weight[0]
    if weight.dim() == 2 and x.shape[:-1].numel() == 1 and _input_major(weight) and \
            native.applies(x.reshape(1, 1, -1), weight):
        # one token on input-major weights (a gathered copy's o / down): the native kernel adds the weight's rows
        return native.gemv_input_major(x.reshape(1, -1), weight, bias).view(*x.shape[:-1], -1)
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    y = x @ weight.transpose(-1, -2)
    return y if bias is None else y + bias


def _native_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Optional[Tensor]) -> Tensor:
    """``_linear_rows`` of a decode step x [B, 1, E] with rows [B, n], by the native kernel."""
    if rows is None:
        return _linear_rows(x, weight, bias, None)
    return native.gather_rows(x[:, 0], weight, bias, rows).unsqueeze(1)


def _native_cols(x: Tensor, weight: Tensor, bias: Optional[Tensor], cols: Tensor) -> Tensor:
    """``_linear_cols`` of a decode step x [B, 1, n] with cols [B, n], by the native kernel."""
    return native.gather_cols(x[:, 0], weight, bias, cols).unsqueeze(1)


def _decode_selection(idx: Tensor, batch: int) -> Tensor:
    """A decode step's selection, [k], [B, k] or [B, 1, k], as one [B, k] per batch row."""
    return idx.expand(batch, -1) if idx.dim() == 1 else idx[:, 0] if idx.dim() == 3 else idx


def unit_rows(units: Tensor, width: int) -> Tensor:
    """Rows owned by units of ``width`` consecutive rows each (a KV group's q rows, a neuron block):
    ``[..., n] -> [..., n * width]``, ascending for ascending units."""
    return (units.unsqueeze(-1) * width + torch.arange(width, device=units.device)).flatten(-2)


_Args = TypeVar("_Args", bound=tuple)


def _define_op(
    name: str,
    args: type[_Args],
    returns: object,
    kernel: Callable[[_Args], object],
    fake: Callable[[_Args], object],
    **annotations: object,
) -> CustomOpDef:
    """The custom op ``shadowfx::name``, returning ``returns``, whose arguments are the fields of the NamedTuple
    ``args`` with their annotations (or, by name, those in ``annotations``); the eager ``kernel`` and the ``fake``
    take them as one ``args``."""
    # custom_op infers the schema from the kernel's signature, set here to the NamedTuple's fields: so one NamedTuple
    # is the signature of the op, of its kernel and fake, and of its checks
    fields = inspect.signature(args).parameters.values()
    signature = inspect.Signature(
        [field.replace(annotation=annotations.get(field.name, field.annotation)) for field in fields],
        return_annotation=returns,
    )

    def eager(*values: object) -> object:
        return kernel(args(*values))

    eager.__signature__ = signature  # type: ignore[attr-defined]
    op = custom_op(f"shadowfx::{name}", eager, mutates_args=())
    op.register_fake(lambda *values: fake(args(*values)))
    return op


# ---------------------------------------------------------------------------------------------------------- MLP


class _MLPArgs(NamedTuple):
    """The arguments of ``gathered_mlp``, in order."""

    x: Tensor
    up_weight: Tensor
    up_bias: Optional[Tensor]
    gate_weight: Optional[Tensor]
    gate_bias: Optional[Tensor]
    down_weight: Tensor
    down_bias: Optional[Tensor]
    neuron_idx: Optional[Tensor]
    activation: str


def _check_mlp_args(a: _MLPArgs) -> None:
    if a.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {a.activation!r}; valid: {', '.join(ACTIVATIONS)}")
    x = a.x
    _check(x.dim() == 3, lambda: f"x must be [B, S, E], got shape {tuple(x.shape)}")
    _check(x.is_floating_point(), lambda: f"x must be floating point, got {x.dtype}")
    batch, seq, embed = x.shape
    lead: tuple[int, ...] = ()  # the leading dims of every weight and of the up/gate biases: () or (B,)
    if a.neuron_idx is None:  # pre-gathered: the weights are the kept neurons, F' of them
        lead = _check_lead(a.up_weight, "up_weight", "[F', E] or, per batch row, [B, F', E]", batch)
    else:
        _check_selection(a.neuron_idx, "neuron_idx", batch, seq, dims=(1, 2, 3))
    ffn = a.up_weight.shape[-2]
    _check_tensor(a.up_weight, "up_weight", (*lead, ffn, embed), x.dtype)
    _check_tensor(a.down_weight, "down_weight", (*lead, embed, ffn), x.dtype)
    if a.up_bias is not None:
        _check_tensor(a.up_bias, "up_bias", (*lead, ffn), x.dtype)
    if a.gate_weight is not None:
        _check_tensor(a.gate_weight, "gate_weight", (*lead, ffn, embed), x.dtype)
    if a.gate_bias is not None:
        _check(a.gate_weight is not None, lambda: "gate_bias given without gate_weight")
        _check_tensor(a.gate_bias, "gate_bias", (*lead, ffn), x.dtype)
    if a.down_bias is not None:
        _check_tensor(a.down_bias, "down_bias", (embed,), x.dtype)


def _gathered_mlp(a: _MLPArgs) -> Tensor:
    _check_mlp_args(a)
    neuron_idx, ffn = a.neuron_idx, a.up_weight.shape[0]
    facts = None if neuron_idx is None else _check_selection_values(neuron_idx, "neuron_idx", ffn)
    act = ACTIVATIONS[a.activation]
    per_token = neuron_idx is not None and neuron_idx.dim() == 3
    weights = [w for w in (a.up_weight, a.gate_weight, a.down_weight) if w is not None]
    if per_token and facts is not None and _token_tiles(a.x, neuron_idx, facts, a.down_weight, weights):
        return _token_tiled_mlp(a, act)
    # a decode step reads its selection's rows/cols natively (the kernels skip the empty slot); otherwise a [k] /
    # [B, k] selection gathers weight rows/cols, and pre-gathered weights (None) and per token use them whole
    fused = neuron_idx is not None and native.applies(a.x, *weights)
    rows: Tensor | slice | None = None
    empty: Optional[Tensor] = None
    if fused:
        rows = _decode_selection(neuron_idx, a.x.shape[0])
    elif not per_token and facts is not None:
        rows, empty = (facts.run, None) if facts.run is not None else _empty_slots(neuron_idx, ffn, facts.empty)
    project = _native_rows if fused else _linear_rows
    up = project(a.x, a.up_weight, a.up_bias, rows)
    h = act(up) if a.gate_weight is None else act(project(a.x, a.gate_weight, a.gate_bias, rows)) * up
    if empty is not None:
        h = h.where(~empty.unsqueeze(-2), 0)  # [k] or [B, k] over the sequence dim
    if per_token and not fused and facts is not None and not facts.every:
        # The dense intermediate times each token's 0/1 keep mask (as a where, so that an inf in a dropped neuron
        # cannot become NaN). Exact, and for prefill-sized S cheaper than per-token weight gathers, which would copy
        # [B, S, k, E] per projection; a decode step reads the kept rows/cols natively instead. A selection of
        # every neuron has nothing to mask.
        h = h.where(_keep_mask(neuron_idx, ffn), 0)
    finish = _native_cols if fused else _linear_cols
    return finish(h, a.down_weight, a.down_bias, rows)


TOKEN_TILES_MAX_KEPT, TOKEN_TILES_MIN_RUN = 0.75, 4.0
"""A prefill's per-token MLP computes only each token's kept neurons by the native tiles where it keeps at most
TOKEN_TILES_MAX_KEPT of them, in runs of at least TOKEN_TILES_MIN_RUN consecutive neurons on average (a
block-scoring predictor's blocks, which the tiles read 4 rows by 4 tokens at a time); elsewhere it computes every
neuron and masks, F.linear's dense products being faster. Its attention does the same for the q rows and o inputs
of at most TOKEN_TILES_MAX_KEPT of the KV groups (a group's rows are one run). On the OPT-1.3B MLP (128 tokens, 2
threads, blocks of 16) the tiles took 0.57x the dense time at half the neurons, 0.91x at 0.75 and 1.09x at 0.875;
neuron by neuron, 1.12x at half."""


def _token_tiles(x: Tensor, neuron_idx: Tensor, facts: _SelectionFacts, down_weight: Tensor,
                 weights: list[Tensor]) -> bool:
    """Whether a per-token selection over several tokens runs by the native tiles (``_token_tiled_mlp``)."""
    if facts.every or neuron_idx.shape[-1] > TOKEN_TILES_MAX_KEPT * down_weight.shape[-1]:
        return False
    return facts.units_per_run >= TOKEN_TILES_MIN_RUN and _input_major(down_weight) and native.tiles(x, *weights)


def _token_tiled_mlp(a: _MLPArgs, act: Callable[[Tensor], Tensor]) -> Tensor:
    """``gathered_mlp`` with a per-token selection [B, S, k] by the native kernels: each projection computes only the
    neurons each token keeps, [B * S, k], a tile of weight rows by tokens at a time."""
    tokens = a.neuron_idx.reshape(-1, a.neuron_idx.shape[-1]).contiguous()
    plan = native.plan(tokens, a.up_weight.shape[0])  # one sort of the selection for the three projections
    x = a.x.reshape(-1, a.x.shape[-1])
    up = native.gather_rows(x, a.up_weight, a.up_bias, tokens, plan)
    gate = None if a.gate_weight is None else native.gather_rows(x, a.gate_weight, a.gate_bias, tokens, plan)
    h = act(up) if gate is None else act(gate) * up
    return native.gather_cols(h, a.down_weight, a.down_bias, tokens, plan).view(a.x.shape)


def _gathered_mlp_fake(a: _MLPArgs) -> Tensor:
    _check_mlp_args(a)
    return a.x.new_empty(a.x.shape)


gathered_mlp = _define_op("gathered_mlp", _MLPArgs, Tensor, _gathered_mlp, _gathered_mlp_fake)
"""MLP computed on the selected intermediate neurons only.

x [B, S, E]; up/gate weight [F, E], bias [F]; down weight [E, F], bias [E]; neuron_idx int64 [k] or [B, k].
Plain (gate_weight None): h = act(up(x)); gated: h = act(gate(x)) * up(x); out = down(h), all restricted to
neuron_idx. Returns [B, S, E].

neuron_idx None (pre-gathered): the weights are the kept neurons: up/gate weight [F', E] or per batch row [B, F', E],
their biases [F'] or [B, F'], down weight [E, F'] or [B, E, F'], down bias [E]; all of them are computed, nothing is
gathered. neuron_idx [B, S, k] (per token): full weights, and each token keeps its own k neurons.
"""


# ---------------------------------------------------------------------------------------------------- attention


class _AttentionArgs(NamedTuple):
    """The arguments of ``gathered_attention`` and ``token_sparse_attention``, in order (the latter requires
    kv_head_idx)."""

    hidden: Tensor
    q_weight: Tensor
    q_bias: Optional[Tensor]
    k_weight: Tensor
    k_bias: Optional[Tensor]
    v_weight: Tensor
    v_bias: Optional[Tensor]
    o_weight: Tensor
    o_bias: Optional[Tensor]
    kv_head_idx: Optional[Tensor]
    cos: Optional[Tensor]
    sin: Optional[Tensor]
    attention_mask: Optional[Tensor]
    past_key: Optional[Tensor]
    past_value: Optional[Tensor]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    q_norm: Optional[Tensor] = None
    k_norm: Optional[Tensor] = None
    norm_eps: float = 0.0
    alibi_slopes: Optional[Tensor] = None
    softcap: float = 0.0
    rotary_interleaved: bool = False


_AttentionResult = tuple[Tensor, Tensor, Tensor]  # (out, key, value)


def _check_attention_args(a: _AttentionArgs, per_token: bool) -> int:
    """Shape checks of both attention ops; returns the number of KV heads of the cache (past and present)."""
    num_heads, num_kv_heads, head_dim = a.num_heads, a.num_kv_heads, a.head_dim
    if min(num_heads, num_kv_heads, head_dim) < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"need num_heads, num_kv_heads, head_dim >= 1 and num_heads divisible by num_kv_heads, got "
            f"{num_heads}, {num_kv_heads}, {head_dim}"
        )
    if not (math.isfinite(a.softcap) and a.softcap >= 0):
        raise ValueError(f"softcap must be 0 (none) or a positive finite cap of the scores, got {a.softcap}")
    hidden = a.hidden
    _check(hidden.dim() == 3, lambda: f"hidden must be [B, S, E], got shape {tuple(hidden.shape)}")
    _check(hidden.is_floating_point(), lambda: f"hidden must be floating point, got {hidden.dtype}")
    batch, seq, embed = hidden.shape
    dtype = hidden.dtype
    lead: tuple[int, ...] = ()  # the leading dims of every weight and of the q/k/v biases: () or (B,)
    if a.kv_head_idx is None:
        # pre-gathered: the weights hold the kept KV groups only, as many as k_weight has heads (the count may
        # change from call to call, so it comes from the weights, not from an argument)
        lead = _check_lead(a.k_weight, "k_weight", "[g*D, E] or, per batch row, [B, g*D, E]", batch)
        kv_out = a.k_weight.shape[-2]
        _check(
            kv_out % head_dim == 0, lambda: f"k_weight has {kv_out} rows, not a multiple of head_dim {head_dim}"
        )
        cache_heads = kv_out // head_dim
        q_out = cache_heads * (num_heads // num_kv_heads) * head_dim
    else:
        if per_token:
            _check_selection(a.kv_head_idx, "kv_head_idx", batch, seq, dims=(3,))
            cache_heads = num_kv_heads  # the complete cache
        else:
            _check_selection(a.kv_head_idx, "kv_head_idx", batch)
            cache_heads = a.kv_head_idx.shape[-1]
        q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
    for name, weight, bias, out_features in (
        ("q", a.q_weight, a.q_bias, q_out),
        ("k", a.k_weight, a.k_bias, kv_out),
        ("v", a.v_weight, a.v_bias, kv_out),
    ):
        _check_tensor(weight, f"{name}_weight", (*lead, out_features, embed), dtype)
        if bias is not None:
            _check_tensor(bias, f"{name}_bias", (*lead, out_features), dtype)
    _check_tensor(a.o_weight, "o_weight", (*lead, embed, q_out), dtype)
    if a.o_bias is not None:
        _check_tensor(a.o_bias, "o_bias", (embed,), dtype)

    cos, sin = a.cos, a.sin
    _check((cos is None) == (sin is None), lambda: "cos and sin must be given together")
    if cos is not None and sin is not None:
        _check(cos.dim() == 3, lambda: f"cos must be [B, S, rot], got shape {tuple(cos.shape)}")
        rot = cos.shape[-1]
        _check(
            rot % 2 == 0 and rot <= head_dim, lambda: f"rotary dim {rot} must be even and <= head_dim {head_dim}"
        )
        _check(cos.shape[0] == 1 or cos.shape[0] == batch, lambda: f"cos batch must be 1 or {batch}")
        for name, t in (("cos", cos), ("sin", sin)):
            _check_tensor(t, name, (cos.shape[0], seq, rot), dtype)

    if a.alibi_slopes is not None:
        # one slope per query head: of every head with an index, of the kept groups' heads when pre-gathered
        heads = q_out // head_dim
        _check_tensor(a.alibi_slopes, "alibi_slopes", (*lead, heads), a.alibi_slopes.dtype)
        _check(a.alibi_slopes.is_floating_point(),
                           lambda: f"alibi_slopes must be floating point, got {a.alibi_slopes.dtype}")

    for name, norm in (("q_norm", a.q_norm), ("k_norm", a.k_norm)):
        if norm is not None:
            _check(norm.dim() == 1 and norm.shape[0] == head_dim and norm.is_floating_point(),
                               lambda: f"{name} must be a float [head_dim={head_dim}], got {norm.dtype} "
                                       f"{tuple(norm.shape)}")

    past_key, past_value = a.past_key, a.past_value
    _check((past_key is None) == (past_value is None), lambda: "past_key and past_value go together")
    past = 0
    if past_key is not None and past_value is not None:
        past = past_key.shape[2]
        _check_tensor(past_key, "past_key", (batch, cache_heads, past, head_dim), dtype)
        _check_tensor(past_value, "past_value", (batch, cache_heads, past, head_dim), dtype)

    if a.attention_mask is not None:
        mask = a.attention_mask
        _check(
            mask.dtype == torch.bool or mask.is_floating_point(),
            lambda: f"attention_mask must be bool or floating point, got {mask.dtype}",
        )
        _check(mask.dim() == 4, lambda: f"attention_mask must be 4-D, got shape {tuple(mask.shape)}")
        _check(mask.shape[0] == 1 or mask.shape[0] == batch, lambda: f"mask batch must be 1 or {batch}")
        _check_tensor(mask, "attention_mask", (mask.shape[0], 1, seq, past + seq), mask.dtype)
    return cache_heads


def _head_norm(t: Tensor, scale: Optional[Tensor], eps: float) -> Tensor:
    """RMSNorm of each head over its D features in float32, times ``scale`` [D]; t [B, H, S, D]."""
    if scale is None:
        return t
    x = t.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale.float()).to(t.dtype)


def _rope(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """RoPE on the first cos.shape[-1] dims of each head, t [B, H, S, D], cos/sin [B, S, rot]: pairs of the two
    halves (HF "rotate_half"), or of neighbouring dims when ``interleaved`` (GPT-J's "rotate_every_two")."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    if interleaved:
        turned = torch.stack((-t_rot[..., 1::2], t_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        turned = torch.cat((-t_rot[..., rot // 2 :], t_rot[..., : rot // 2]), dim=-1)
    rotated = t_rot * cos + turned * sin
    return rotated if rot == t.shape[-1] else torch.cat((rotated, t_pass), dim=-1)  # no copy for full rotary


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


def _attend(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], scaling: float, group: int,
            slopes: Optional[Tensor] = None, softcap: float = 0.0) -> Tensor:
    """softmax(cap(q k^T * scaling) + slope * key position + mask) v with q [B, g*r, S, D] and k/v [B, g, T, D],
    r = group, slopes (optional) [g, r] or [B, g, r], cap(x) = softcap * tanh(x / softcap) if softcap else x;
    returns [B, S, g*r*D]."""
    kv_heads, seq, total = k.shape[1], q.shape[2], k.shape[2]
    if slopes is None and not softcap and kv_heads and (attention_mask is None or attention_mask.dtype in (
            torch.bool, q.dtype)):
        # torch's fused attention computes the same (float accumulation for half inputs, zero context for a query
        # with no key) in one call, where the ops below cost a decode step a dozen small kernels per layer
        if attention_mask is None and seq > 1:
            attention_mask = torch.ones(seq, total, dtype=torch.bool, device=q.device).tril(total - seq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scaling,
                                              enable_gqa=group > 1).transpose(1, 2).flatten(2)
    # query head i uses kv head i // r (HF repeat_kv); grouping q as [B, g, r, S, D] lets k/v broadcast, not copy
    # (r given, not inferred, so that g = 0 works)
    q = q.unflatten(1, (kv_heads, group))
    k, v = k.unsqueeze(2), v.unsqueeze(2)
    mask = _additive_mask(attention_mask, seq, total, q.device)
    if mask.dim() == 4:
        mask = mask.unsqueeze(2)  # [B, 1, S, T] -> [B, 1, 1, S, T], broadcast over g and r
    # scores and softmax in float32, as HF eager attention does for half-precision inputs
    scores = (q @ k.transpose(-1, -2)).float() * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask
    if slopes is not None:
        # ALiBi: a bias linear in the key's position. Softmax ignores what a query adds to all of its keys, so any
        # origin of the positions gives the same probabilities (HF's differ by model: key index, distance, ...)
        scores = scores + slopes.float()[..., None, None] * torch.arange(total, device=q.device, dtype=torch.float32)
    probs = torch.softmax(scores, dim=-1)
    # a query that may attend to nothing (a left-padding row under a bool mask) gets zero context, as torch SDPA
    # gives, instead of the NaN of 0/0
    probs = probs.masked_fill(scores.amax(dim=-1, keepdim=True) == float("-inf"), 0.0)
    context = probs.to(v.dtype) @ v  # [B, g, r, S, D]
    return context.flatten(1, 2).transpose(1, 2).flatten(2)


def _take_groups(cache: Tensor, groups: Tensor) -> Tensor:
    """The KV groups ``groups`` [B, g] of each batch row of ``cache`` [B, Hkv, T, D]: [B, g, T, D]."""
    if cache.shape[0] == 1:
        return cache.index_select(1, groups[0])
    return cache[torch.arange(cache.shape[0], device=cache.device).unsqueeze(1), groups]


def _attention(a: _AttentionArgs, per_token: bool) -> _AttentionResult:
    """The eager implementation of both attention ops."""
    _check_attention_args(a, per_token)
    group, head_dim, kv_head_idx = a.num_heads // a.num_kv_heads, a.head_dim, a.kv_head_idx
    q_rows: Tensor | slice | None = None  # pre-gathered or per token: every row
    kv_rows: Tensor | slice | None = None
    empty: Optional[Tensor] = None
    # a decode step with a selection reads the kept q rows and o columns natively (and, per prompt, the kept k/v
    # rows); per token, K/V are computed for every head, and the kept groups' cache is taken for the attention
    fused = kv_head_idx is not None and native.applies(a.hidden, a.q_weight, a.k_weight, a.v_weight, a.o_weight)
    keeps_every_head = False
    if kv_head_idx is not None:
        facts = _check_selection_values(kv_head_idx, "kv_head_idx", a.num_kv_heads)
        keeps_every_head = facts.every
        # a KV head j owns query heads j*r .. j*r + r-1, whose q rows are one block of r * head_dim
        if not fused and not per_token and facts.run is not None:
            kept = facts.run
            q_rows, kv_rows = _unit_slice(kept, group * head_dim), _unit_slice(kept, head_dim)
        elif fused or not per_token:
            selection = _decode_selection(kv_head_idx, a.hidden.shape[0]) if fused else kv_head_idx
            kept, empty = _empty_slots(selection, a.num_kv_heads, facts.empty)
            q_rows = unit_rows(kept, group * head_dim)
            kv_rows = None if per_token else unit_rows(kept, head_dim)
    project = _native_rows if fused else _linear_rows
    # per token over several tokens, the native tiles compute only each token's kept heads' q rows and o inputs
    tiled = per_token and not fused and not keeps_every_head and _head_tiles(a, kv_head_idx)
    token_q_rows = unit_rows(kv_head_idx, group * head_dim).flatten(0, 1) if tiled else None
    q_plan = None if token_q_rows is None else native.plan(token_q_rows, a.q_weight.shape[0])  # shared by q and o

    def heads(t: Tensor) -> Tensor:  # [B, S, n*D] -> [B, n, S, D]
        return t.unflatten(-1, (-1, head_dim)).transpose(1, 2)

    q = heads(project(a.hidden, a.q_weight, a.q_bias, q_rows) if token_q_rows is None else
              _token_tiled_q(a.hidden, a.q_weight, a.q_bias, token_q_rows, q_plan, group * head_dim))
    key = heads(project(a.hidden, a.k_weight, a.k_bias, kv_rows))
    value = heads(project(a.hidden, a.v_weight, a.v_bias, kv_rows))
    q, key = _head_norm(q, a.q_norm, a.norm_eps), _head_norm(key, a.k_norm, a.norm_eps)
    if a.cos is not None and a.sin is not None:
        q, key = _rope(q, a.cos, a.sin, a.rotary_interleaved), _rope(key, a.cos, a.sin, a.rotary_interleaved)
    if a.past_key is not None and a.past_value is not None:
        key, value = torch.cat((a.past_key, key), dim=2), torch.cat((a.past_value, value), dim=2)
    attended_key, attended_value = key, value
    if fused and per_token:  # the complete cache is kept; the attention reads the kept groups of each row
        attended_key, attended_value = _take_groups(key, kept), _take_groups(value, kept)
    slopes = a.alibi_slopes
    if slopes is not None:
        slopes = slopes.unflatten(-1, (-1, group))  # [.., g, r]: the query heads of each KV group
        if kv_head_idx is not None and (fused or not per_token):
            slopes = slopes[kept]
    context = _attend(q, attended_key, attended_value, a.attention_mask, a.scaling, group, slopes, a.softcap)
    if token_q_rows is not None:
        return _token_tiled_o(context, a.o_weight, a.o_bias, token_q_rows, q_plan), key.contiguous(), value.contiguous()
    if per_token and not fused and not keeps_every_head:
        # Reference semantics: q of every head, then each token's unselected heads' context zeroed. The native
        # kernels compute only the kept heads' q rows and o columns in a decode step, and by tiles in a float32
        # prefill; K/V are needed for every head either way.
        keep = _keep_mask(kv_head_idx, a.num_kv_heads).unsqueeze(-1)  # [B, S, Hkv, 1]: one flag per KV group's r*D
        context = context.unflatten(-1, (a.num_kv_heads, -1)).where(keep, 0).flatten(-2)
    if empty is not None:  # an empty slot's query heads add nothing; [g] or [B, g] over the sequence dim
        context = context.unflatten(-1, (empty.shape[-1], -1)).where(~empty[..., None, :, None], 0).flatten(-2)
    out = (_native_cols if fused else _linear_cols)(context, a.o_weight, a.o_bias, q_rows)
    # contiguous, like the fake outputs (the no-cache key/value are transposed views otherwise)
    return out, key.contiguous(), value.contiguous()


def _head_tiles(a: _AttentionArgs, kv_head_idx: Tensor) -> bool:
    """Whether a per-token head selection over several tokens runs its q and o projections by the native tiles (a
    KV group's q rows are one run, so any head selection suits them), keeping at most TOKEN_TILES_MAX_KEPT of the
    groups."""
    if kv_head_idx.shape[-1] > TOKEN_TILES_MAX_KEPT * a.num_kv_heads or not _input_major(a.o_weight):
        return False
    return native.tiles(a.hidden, a.q_weight, a.o_weight)


def _token_tiled_q(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor, plan: Any,
                   group_rows: int) -> Tensor:
    """q [B, S, H*D] of each token's kept heads only (rows [B*S, n], the kept groups' q rows, an empty slot's rows
    past the last; plan: ``native.plan`` of rows), zeros for the others."""
    kept = native.gather_rows(hidden.flatten(0, 1), weight, bias, rows, plan)
    # an empty slot's rows land in the extra group of columns cut off at the end
    q = kept.new_zeros(kept.shape[0], weight.shape[0] + group_rows).scatter_(1, rows, kept)
    return q[:, : weight.shape[0]].view(*hidden.shape[:2], -1)


def _token_tiled_o(context: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor, plan: Any) -> Tensor:
    """The output projection of each token's kept heads' context only (rows and plan as in ``_token_tiled_q``)."""
    flat = context.flatten(0, 1)
    kept = flat.gather(1, rows.clamp(max=flat.shape[1] - 1))  # the empty slot's inputs are skipped by the kernel
    return native.gather_cols(kept, weight, bias, rows, plan).view(*context.shape[:2], -1)


def _attention_fake(a: _AttentionArgs, per_token: bool) -> _AttentionResult:
    cache_heads = _check_attention_args(a, per_token)
    batch, seq, _ = a.hidden.shape
    total = seq
    if a.past_key is not None:
        # past_key's own size rather than the equal k_weight.shape[-2] // head_dim of pre-gathered weights: under
        # torch.export, torch's contiguity check of the output guards a floor-division size != 1 (which would fail
        # for g = 1), while a plain size is assumed != 1 without a guard
        cache_heads, total = a.past_key.shape[1], a.past_key.shape[2] + seq
    cache_shape = (batch, cache_heads, total, a.head_dim)
    return a.hidden.new_empty(a.hidden.shape), a.hidden.new_empty(cache_shape), a.hidden.new_empty(cache_shape)


def _attention_op(name: str, per_token: bool) -> CustomOpDef:
    # per token, kv_head_idx is required: there are no pre-gathered weights per token
    retyped = {"kv_head_idx": Tensor} if per_token else {}
    return _define_op(
        name, _AttentionArgs, _AttentionResult, partial(_attention, per_token=per_token),
        partial(_attention_fake, per_token=per_token), **retyped,
    )  # fmt: skip


gathered_attention = _attention_op("gathered_attention", per_token=False)
"""Self-attention computed on the selected KV groups only. Returns (out [B, S, E], key, value [B, g, P+S, D]).

hidden [B, S, E]; q_weight [Hq*D, E]; k/v_weight [Hkv*D, E]; o_weight [E, Hq*D]; biases optional.
kv_head_idx int64 [g] or [B, g] picks KV heads; the kept query heads are all query heads of those groups (query
head h uses KV head h // (Hq // Hkv)), so for MHA it is plain head selection. cos/sin [B or 1, S, rot] apply
RoPE to the first rot dims of each head of q and k, pairing the two halves (rotate_half) or, with
rotary_interleaved, neighbouring dims (rotate_every_two); before it, q_norm/k_norm [D]
(optional) normalise each head of q/k (RMSNorm with norm_eps, in float32, times the given scale).
alibi_slopes [Hq] (optional) adds slope * key position to each head's scores (ALiBi; any origin of the positions
gives the same softmax, so position = index in the cache). softcap > 0 caps the scaled scores before the mask
and bias as softcap * tanh(scores / softcap) (Gemma 2); 0 leaves them as they are. past_key/past_value
[B, g, P, D] hold the kept heads' cache and come before the new keys. attention_mask: None (causal),
bool [B or 1, 1, S, P+S] (True = attend) or float additive of the same shape. A query with no key to attend
to (left padding) gets zero context under a bool or -inf mask, as torch SDPA gives, and the uniform average of
HF's finite float mask otherwise; never NaN. Scores and softmax are float32. The returned key/value are the
present cache of the kept KV heads (key after RoPE).

kv_head_idx None (pre-gathered): the weights hold the kept KV groups only, g = k_weight.shape[-2] // D of them
(num_heads / num_kv_heads stay the full model's; only their ratio r matters): q_weight [g*r*D, E] or per batch
row [B, g*r*D, E], k/v_weight [g*D, E] or [B, g*D, E], o_weight [E, g*r*D] or [B, E, g*r*D], q/k/v biases
[n] or [B, n], o_bias [E], alibi_slopes [g*r] or [B, g*r]; past_key/past_value [B, g, P, D]. Under torch.export
with g dynamic, give the weights' row counts as dims derived from g's (k/v: D * g, q/o: r * D * g) and pass the
cache: without a cache, the output's g is k_weight.shape[-2] // D, and torch guards that != 1 when traced with
g > 1.
"""

token_sparse_attention = _attention_op("token_sparse_attention", per_token=True)
"""Self-attention with a selection of KV groups per token. Returns (out [B, S, E], key, value [B, Hkv, P+S, D]).

The arguments are gathered_attention's (full weights; RoPE, mask and fully masked rows the same) except:
kv_head_idx int64 [B, S, g] picks each token's g KV groups, and the token keeps the query heads of those;
past_key/past_value [B, Hkv, P, D] are the complete cache, and the returned key/value the complete present
cache: K/V are computed for every KV head of every token, since a later token may select a group that this one
skipped. out equals the dense attention whose unselected query heads' context is zeroed per token before the
output projection (o_bias kept).
"""


# -------------------------------------------------------------------------------------------------------- top-k


def _check_topk_args(scores: Tensor, k: int) -> None:
    _check(scores.dim() >= 1, lambda: "scores must have at least one dim")
    _check(scores.is_floating_point(), lambda: f"scores must be floating point, got {scores.dtype}")
    _check(k >= 1, lambda: f"k must be >= 1, got {k}")
    _check(k <= scores.shape[-1], lambda: f"k={k} exceeds the last dim of scores, {scores.shape[-1]}")


@custom_op("shadowfx::topk_indices", mutates_args=())
def topk_indices(scores: Tensor, k: int) -> Tensor:
    """int64 [..., k] indices of the k largest scores along the last dim, ascending; ties go to the lower index."""
    _check_topk_args(scores, k)
    ranked = native.topk_indices(scores, k)
    if ranked is not None:
        return ranked
    # a stable descending sort keeps equal scores in index order, which makes the tie-break deterministic
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


@topk_indices.register_fake
def _topk_indices_fake(scores: Tensor, k: int) -> Tensor:
    _check_topk_args(scores, k)
    return scores.new_empty((*scores.shape[:-1], k), dtype=torch.int64)


def _check_global_topk_args(scores: Tensor, budget: int, minimum: int) -> None:
    _check(scores.dim() == 3, lambda: f"scores must be [R, L, N], got shape {tuple(scores.shape)}")
    _check(scores.is_floating_point(), lambda: f"scores must be floating point, got {scores.dtype}")
    layers, units = scores.shape[1], scores.shape[2]
    _check(1 <= minimum <= units, lambda: f"minimum must be in [1, {units}], got {minimum}")
    _check(minimum * layers <= budget <= layers * units,
                       lambda: f"budget must be in [{minimum * layers}, {layers * units}], got {budget}")


@custom_op("shadowfx::global_topk_indices", mutates_args=())
def global_topk_indices(scores: Tensor, budget: int, minimum: int) -> list[Tensor]:
    """Rank each row's ``budget`` units across the layers of ``scores`` [R, L, N], after reserving its top ``minimum``
    units of every layer; per layer an int64 [R, w_l] of the kept units, ascending, where ``w_l`` is the most any row
    keeps in that layer and the rows that keep fewer are padded with the empty slot ``N``.

    The widths depend on the scores, so the fake implementation gives them as dynamic sizes. Ties go to the lower
    index (of the layer, then of the flattened layers), as in ``topk_indices``.
    """
    _check_global_topk_args(scores, budget, minimum)
    rows, layers, units = scores.shape
    ranked = native.global_topk_indices(scores, budget, minimum)
    if ranked is not None:
        return ranked
    scores = scores.float()
    by_layer = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    reserved = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, by_layer[..., :minimum], True)
    ranked = scores.masked_fill(reserved, float("inf")).reshape(rows, -1)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    kept = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, order[:, :budget], True).view(scores.shape)
    widths = kept.sum(-1).amax(0).tolist() if rows else [0] * layers
    slots = torch.arange(units, device=scores.device).expand_as(kept)
    # kept units first, ascending; then the empty slot `units` fills what a row does not keep
    indices = slots.masked_fill(~kept, units).sort(dim=-1).values
    return [indices[:, layer, :width].clone() for layer, width in enumerate(widths)]  # outputs may not alias


@global_topk_indices.register_fake
def _global_topk_indices_fake(scores: Tensor, budget: int, minimum: int) -> list[Tensor]:
    _check_global_topk_args(scores, budget, minimum)
    context = torch.library.get_ctx()
    units = scores.shape[2]
    bound = units if isinstance(units, int) else None  # a bound must be a known int, not a symbolic size
    return [scores.new_empty((scores.shape[0], context.new_dynamic_size(max=bound)), dtype=torch.int64)
            for _ in range(scores.shape[1])]


# ------------------------------------------------------------------------------------------------ predictor MLP


def minmax_scale(context: Tensor) -> Tensor:
    """Scale each row to [0, 1] (ShadowLLM's input normalisation); a constant row maps to zeros."""
    low = context.amin(dim=-1, keepdim=True)
    span = context.amax(dim=-1, keepdim=True) - low
    return (context - low) / torch.where(span > 0, span, torch.ones_like(span))


def _check_shadow_mlp_args(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> None:
    _check(x.dim() == 2, lambda: f"x must be [R, E], got shape {tuple(x.shape)}")
    hidden, outputs = w1.shape[0], w2.shape[0]
    _check_tensor(w1, "w1", (hidden, x.shape[1]), w1.dtype)
    _check_tensor(b1, "b1", (hidden,), w1.dtype)
    _check_tensor(w2, "w2", (outputs, hidden), w1.dtype)
    _check_tensor(b2, "b2", (outputs,), w1.dtype)


@custom_op("shadowfx::shadow_mlp", mutates_args=())
def shadow_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """A shadow predictor's MLP, one node in an exported graph: ``relu(s W1^T + b1) W2^T + b2`` where ``s`` is ``x``
    [R, E] min-max scaled per row (in float32, then cast to the weights' dtype). Returns [R, outputs]."""
    _check_shadow_mlp_args(x, w1, b1, w2, b2)
    scaled = minmax_scale(x.float()).to(w1.dtype)
    return _linear_rows(torch.relu(_linear_rows(scaled, w1, b1, None)), w2, b2, None)


@shadow_mlp.register_fake
def _shadow_mlp_fake(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    _check_shadow_mlp_args(x, w1, b1, w2, b2)
    return x.new_empty((x.shape[0], w2.shape[0]), dtype=w1.dtype)


# ----------------------------------------------------------------------------------------------- dense linear


@custom_op("shadowfx::dense_linear", mutates_args=())
def dense_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a projection that no selection touches (layer 0's, the LM head): with one
    token in all, a batch of one's decode step, it runs on the native kernel, which reads the weight faster than
    F.linear does (:func:`shadowfx.native.gemv`)."""
    _check(weight.dim() == 2, lambda: f"weight must be [out, in], got shape {tuple(weight.shape)}")
    return _linear_rows(x, weight, bias, None)


@dense_linear.register_fake
def _dense_linear_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    _check(weight.dim() == 2, lambda: f"weight must be [out, in], got shape {tuple(weight.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ----------------------------------------------------------------------------------------------- kept weights


def _check_kept(source: Tensor, units: Tensor, what: str, axis: int) -> None:
    _check(units.dim() == 2 and units.dtype == torch.int64,
           lambda: f"{what} must be int64 [B, n], got {units.dtype} of shape {tuple(units.shape)}")
    _check(source.dim() > axis, lambda: f"source has no axis {axis}: shape {tuple(source.shape)}")


@custom_op("shadowfx::kept_rows", mutates_args=())
def kept_rows(source: Tensor, rows: Tensor) -> Tensor:
    """``source[rows]`` for source [N, ...] and rows [B, n]: [B, n, ...], where the index N (the empty slot) gives
    zeros. The one-time gather of a prompt's kept weight rows and biases; one node in an exported graph, which a
    native onnxruntime kernel copies."""
    _check_kept(source, rows, "rows", 0)
    return take_rows(source, rows, empty_slot=True)


@kept_rows.register_fake
def _kept_rows_fake(source: Tensor, rows: Tensor) -> Tensor:
    _check_kept(source, rows, "rows", 0)
    return source.new_empty((*rows.shape, *source.shape[1:]))


@custom_op("shadowfx::kept_cols", mutates_args=())
def kept_cols(source: Tensor, cols: Tensor) -> Tensor:
    """The columns ``cols`` [B, n] of source [M, N]: [B, M, n], where the index N gives a column of zeros (an output
    projection's kept inputs). From an input-major source they are copied as its transpose's rows, and the result
    is the transpose of a contiguous [B, n, M]; otherwise it is contiguous."""
    _check_kept(source, cols, "cols", 1)
    taken = take_cols(source, cols, empty_slot=True)
    return taken if _input_major(source) else taken.contiguous()


@kept_cols.register_fake
def _kept_cols_fake(source: Tensor, cols: Tensor) -> Tensor:
    _check_kept(source, cols, "cols", 1)
    if _input_major(source):
        return source.new_empty((*cols.shape, source.shape[0])).transpose(-1, -2)
    return source.new_empty((cols.shape[0], source.shape[0], cols.shape[1]))
