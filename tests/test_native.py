"""The native decode kernels (shadowfx/native.py): the raw kernels against plain float64 arithmetic, and every
sparse op's decode step through them against the same op on its PyTorch path, on random shapes, fp32 and bf16,
shared / per-row / per-token selections with empty slots, both weight layouts and one and two threads."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from shadowfx import native, ops

from conftest import huge_page_kib, needs_huge_pages

# skipped only where the build's tools are missing; a build that fails with them present fails the tests
pytestmark = pytest.mark.skipif(bool(native.missing_tools()), reason="no C++ compiler or ninja to build the kernels")

# (atol, rtol) against float64 (raw kernels) or against the PyTorch path (ops), which rounds differently in bf16
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def selection(units: int, kept: int, tokens: int, empty_every: int = 2) -> Tensor:
    """[tokens, kept] distinct random units per token, every ``empty_every``-th token's last slot the empty slot."""
    rows = torch.stack([torch.randperm(units)[:kept] for _ in range(tokens)])
    rows[::empty_every, -1] = units
    return rows


def close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------- raw kernels


@DTYPES
@pytest.mark.parametrize("tokens, embed, units, kept", [(1, 37, 50, 13), (3, 64, 128, 64), (4, 300, 17, 17)])
def test_gather_rows_equals_float64(tokens: int, embed: int, units: int, kept: int, dtype: torch.dtype,
                                    threads: int) -> None:
    x, weight, bias = torch.randn(tokens, embed), torch.randn(units, embed), torch.randn(units)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    rows = selection(units, kept, tokens)
    out = native.gather_rows(x, weight, bias, rows)
    kept_rows = rows.clamp(max=units - 1)
    expected = torch.einsum("tke,te->tk", weight.double()[kept_rows], x.double()) + bias.double()[kept_rows]
    expected[rows == units] = 0
    assert out.shape == (tokens, kept) and out.dtype == dtype
    close(out, expected, dtype)


@DTYPES
@pytest.mark.parametrize("layout", ["out_major", "input_major"])
@pytest.mark.parametrize("tokens, embed, units, kept", [(1, 37, 50, 13), (3, 600, 128, 64), (4, 33, 17, 17)])
def test_gather_cols_equals_float64(tokens: int, embed: int, units: int, kept: int, layout: str,
                                    dtype: torch.dtype, threads: int) -> None:
    h, weight, bias = torch.randn(tokens, kept).to(dtype), torch.randn(embed, units).to(dtype), torch.randn(embed)
    if layout == "input_major":
        weight = native.input_major(weight)
        assert not weight.is_contiguous() and weight.t().is_contiguous()
    cols = selection(units, kept, tokens)
    out = native.gather_cols(h, weight, bias.to(dtype), cols)
    keep = (cols < units).double()
    expected = torch.einsum("tk,etk->te", h.double() * keep, weight.double()[:, cols.clamp(max=units - 1)])
    assert out.shape == (tokens, embed) and out.dtype == dtype
    close(out, expected + bias.to(dtype).double(), dtype)


@DTYPES
@pytest.mark.parametrize("layout", ["out_major", "input_major"])
def test_kernels_of_no_tokens_give_empty_outputs(layout: str, dtype: torch.dtype) -> None:
    weight, rows = torch.randn(16, 8).to(dtype), torch.zeros(0, 4, dtype=torch.long)
    assert native.gather_rows(torch.zeros(0, 8), weight, None, rows).shape == (0, 4)
    down = torch.randn(8, 16).to(dtype)
    down = native.input_major(down) if layout == "input_major" else down
    assert native.gather_cols(torch.zeros(0, 4), down, None, rows).shape == (0, 8)


def block_selection(units: int, block: int, kept_blocks: int, tokens: int) -> Tensor:
    """[tokens, kept_blocks * block]: each token keeps its own ``kept_blocks`` blocks of ``block`` consecutive units
    (a block-scoring predictor's neurons), ascending; the last block may be cut short by ``units``, its missing units
    given as the empty slot."""
    blocks = torch.stack([torch.randperm(-(-units // block))[:kept_blocks].sort().values for _ in range(tokens)])
    rows = (blocks.unsqueeze(-1) * block + torch.arange(block)).flatten(-2)
    return rows.clamp(max=units)


@pytest.mark.parametrize("tokens, embed, units, kept", [(37, 70, 100, 6), (9, 256, 256, 4), (5, 16, 40, 3)])
@pytest.mark.parametrize("block", [1, 4, 16])
def test_kernels_of_several_tokens_equal_float64(tokens: int, embed: int, units: int, kept: int, block: int,
                                                 threads: int) -> None:
    """Several tokens in float32 take the register tiles: units in groups the same tokens keep (a block-scoring
    predictor's blocks, cut into tiles of 4 and 16 units), other units one at a time, tiles of fewer than 4 tokens,
    columns left over from the 64-wide tiles, empty slots; checked against plain float64 arithmetic."""
    rows = block_selection(units, block, kept, tokens)
    rows[1, : rows.shape[1] // 2] = units  # a token keeping fewer units, padded with the empty slot
    x, weight, bias = torch.randn(tokens, embed), torch.randn(units, embed), torch.randn(units)
    kept_rows, empty = rows.clamp(max=units - 1), rows == units
    up = native.gather_rows(x, weight, bias, rows)
    expected = torch.einsum("tke,te->tk", weight.double()[kept_rows], x.double()) + bias.double()[kept_rows]
    close(up, expected.masked_fill(empty, 0), torch.float32)
    down = native.input_major(torch.randn(embed, units))
    h = torch.randn(rows.shape)
    out = native.gather_cols(h, down, bias[:1].expand(embed), rows)
    expected = torch.einsum("tk,etk->te", h.double().masked_fill(empty, 0), down.double()[:, kept_rows])
    close(out, expected + bias[0].double(), torch.float32)
    plan = native.plan(rows, units)  # one sort by unit for both kernels: the same sums in the same order
    assert torch.equal(native.gather_rows(x, weight, bias, rows, plan), up)
    assert torch.equal(native.gather_cols(h, down, bias[:1].expand(embed), rows, plan), out)


def test_a_plan_of_another_selection_is_refused() -> None:
    rows = block_selection(64, 4, 4, 6)
    x, weight, down = torch.randn(6, 8), torch.randn(64, 8), native.input_major(torch.randn(8, 64))
    plan = native.plan(rows, 64)
    with pytest.raises(RuntimeError, match="gather_rows: the plan was made for another selection or unit count"):
        native.gather_rows(x, weight, None, rows.clone(), plan)  # equal values, another tensor
    with pytest.raises(RuntimeError, match="gather_cols: the plan was made for another selection or unit count"):
        native.gather_cols(torch.randn(rows.shape), down[:, :63], None, rows.clamp(max=63), native.plan(rows, 63))
    with pytest.raises(RuntimeError, match="gather_rows: the plan was made for another selection or unit count"):
        native.gather_rows(x, weight[:60], None, rows.clamp(max=60), plan)
    with pytest.raises(RuntimeError, match="SelectionPlan: the selection must be an int64 \\[T, k\\]"):
        native.plan(rows.flatten(), 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_copy_rows_equals_index_select_and_zeroes_the_empty_slot(dtype: torch.dtype, threads: int) -> None:
    source = torch.randn(300, 70).mul(100).to(dtype)
    rows = torch.randperm(300)[:123]
    assert torch.equal(native.copy_rows(source, rows), source.index_select(0, rows))
    with_empty = torch.cat([rows, torch.tensor([300, 300])])
    taken = native.copy_rows(source, with_empty)
    assert torch.equal(taken[:123], source[rows]) and not taken[123:].any()
    with pytest.raises(RuntimeError, match="row 301 is out of range for 300 rows"):
        native.copy_rows(source, torch.tensor([0, 301]))


@needs_huge_pages
def test_a_gathered_copy_sits_on_huge_pages() -> None:
    """The decode reads a prompt's copy of its kept weights every step: its buffer is advised to use huge pages
    before it is first written, and the system grants them."""
    native.release_gathered_buffers()
    copy = native.copy_rows(torch.randn(4096, 1024), torch.randperm(4096)[:3000])  # 12 MB
    assert huge_page_kib(copy.data_ptr(), copy.nbytes) >= 8 << 10


def test_freed_copy_buffers_are_reused_up_to_the_limit() -> None:
    source, rows = torch.randn(600, 1000), torch.randperm(600)[:500]  # a 2 MB copy
    try:
        native.release_gathered_buffers()
        first = native.copy_rows(source, rows)
        assert first.data_ptr() % (2 << 20) == 0  # huge-page aligned
        del first
        assert native.kept_buffer_bytes() == 0  # no limit: freed at once
        native.keep_gathered_buffers(4 << 20)
        kept = native.copy_rows(source, rows)
        del kept
        assert native.kept_buffer_bytes() == 2 << 20  # within the limit: kept, rounded to a huge page
        again = native.copy_rows(source, rows.flip(0))
        assert torch.equal(again, source[rows.flip(0)])
        assert native.kept_buffer_bytes() == 0  # taken for the copy
        reused = again.data_ptr()
        smaller = native.copy_rows(source, rows[:10])  # the pool is empty now: a fresh buffer
        assert smaller.data_ptr() != reused
        del again
        assert native.copy_rows(source, rows).data_ptr() == reused
        del smaller
        native.release_gathered_buffers()
        assert native.kept_buffer_bytes() == 0
    finally:
        native.release_gathered_buffers()


@pytest.mark.parametrize("layout", ["out_major", "input_major"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_taken_rows_and_columns_are_the_same_on_both_paths(layout: str, per_row: bool) -> None:
    weight = torch.randn(40, 24)
    weight = native.input_major(weight) if layout == "input_major" else weight
    for take, size in ((ops.take_rows, 40), (ops.take_cols, 24)):
        index = selection(size, 9, 2) if per_row else torch.cat([torch.randperm(size)[:8], torch.tensor([size])])
        fast, reference = both_paths(take, weight, index, True)  # the index `size` is the empty slot: zeros
        assert torch.equal(fast, reference)
        assert fast.is_contiguous() == reference.is_contiguous()


def test_kernels_name_a_bad_selection() -> None:
    module = native.kernels()
    with pytest.raises(RuntimeError, match=r"int64 \[T, k\]"):
        module.gather_rows(torch.randn(2, 4), torch.randn(5, 4), None, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="contiguous"):
        module.gather_cols(torch.randn(1, 2), torch.randn(8, 10)[:, ::2], None, torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("case", ["run", "run_to_the_empty_slot", "per_row", "per_token", "every_unit",
                                  "every_unit_per_token", "blocks_per_token", "repeated", "repeated_in_one_token",
                                  "above", "negative"])
def test_selection_inspection_is_the_same_on_both_paths(case: str) -> None:
    units = 12
    index = {
        "run": torch.arange(3, 9)[None],
        "run_to_the_empty_slot": torch.tensor([9, 10, 11, 12]),
        "per_row": selection(units, 5, 3),
        "per_token": torch.stack([selection(units, 5, 4), selection(units, 5, 4)]),
        "every_unit": torch.randperm(units)[None],
        "every_unit_per_token": torch.stack([torch.randperm(units) for _ in range(6)])[None],
        "blocks_per_token": torch.tensor([[[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 8, 9, 10, 11]]]),
        "repeated": torch.tensor([[1, 2, 3], [4, 5, 4]]),
        "repeated_in_one_token": torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 7]]]),
        "above": torch.tensor([[0, 13]]),
        "negative": torch.tensor([[-1, 2]]),
    }[case]
    inspected = native.inspect_selection(index, units)
    assert inspected == ops._inspect_selection(index, units)
    low, high, repeated, every, run_start, runs = inspected
    assert (low, high) == (int(index.min()), int(index.max()))
    assert repeated == case.startswith("repeated")
    assert every == case.startswith("every_unit")
    assert run_start == (3 if case == "run" else -1)
    # runs of consecutive units: blocks 0 and 2 in one token, 1 and 2 (adjacent, one run) in the other
    assert runs == {"run": 1, "run_to_the_empty_slot": 1, "blocks_per_token": 3}.get(case, 0 if repeated else runs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, k", [((1, 10), 3), ((5, 64), 32), ((2, 3, 100), 99), ((4, 7), 7)])
def test_topk_indices_are_the_same_on_both_paths(shape: tuple[int, ...], k: int, dtype: torch.dtype,
                                                 threads: int) -> None:
    fast, reference = both_paths(ops.topk_indices, tied_scores(*shape).to(dtype), k)
    assert fast.shape == (*shape[:-1], k) and fast.dtype == torch.int64
    assert torch.equal(fast, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, budget, minimum", [((1, 2, 10), 3, 1), ((5, 7, 64), 200, 4), ((3, 3, 30), 90, 2),
                                                    ((4, 4, 9), 8, 2), ((6, 2, 50), 51, 1)])
def test_global_topk_indices_are_the_same_on_both_paths(shape: tuple[int, ...], budget: int, minimum: int,
                                                        dtype: torch.dtype, threads: int) -> None:
    scores = tied_scores(*shape)
    scores[0, -1] = scores[0, 0]  # two layers of equal scores: ties across layers go to the lower layer
    fast, reference = both_paths(ops.global_topk_indices, scores.to(dtype), budget, minimum)
    assert [f.shape for f in fast] == [r.shape for r in reference] and all(f.dtype == torch.int64 for f in fast)
    assert all(torch.equal(f, r) for f, r in zip(fast, reference))
    assert sum(int((f < shape[-1]).sum()) for f in fast) == budget * shape[0]


def tied_scores(*shape: int) -> Tensor:
    """Random scores with ties (which go to the lower index), +0 and -0 (equal), and NaN (above every number)."""
    scores = torch.randn(*shape)
    scores[..., ::3] = scores[..., :1]
    scores.view(-1)[::5] = torch.randint(-2, 3, scores.view(-1)[::5].shape).float()
    scores.view(-1)[1::11] = -0.0
    scores.view(-1)[2::13] = float("nan")
    return scores


# ------------------------------------------------------------------------------------------ ops, native vs PyTorch


def both_paths(op, *args: object, **kwargs: object) -> tuple[object, object]:
    """The op's result on the native path and on the PyTorch path."""
    with native.use_native_kernels(True):
        fast = op(*args, **kwargs)
    with native.use_native_kernels(False):
        reference = op(*args, **kwargs)
    return fast, reference


def decode_selection(kind: str, units: int, kept: int, batch: int) -> Tensor:
    """A decode step's selection: shared [k], per row [B, k] or per token [B, 1, k], empty slots in the latter two."""
    if kind == "shared":
        return torch.randperm(units)[:kept]
    rows = selection(units, kept, batch)
    return rows if kind == "per_row" else rows[:, None]


SELECTIONS = pytest.mark.parametrize("kind", ["shared", "per_row", "per_token"])


def rand(*shape: int, dtype: torch.dtype) -> Tensor:
    return (torch.randn(*shape) * shape[-1] ** -0.5).to(dtype)


@DTYPES
@SELECTIONS
@pytest.mark.parametrize("layout", ["out_major", "input_major"])
@pytest.mark.parametrize("gated, bias, activation", [(False, True, "relu"), (True, False, "silu"),
                                                     (True, True, "gelu_tanh")])
@pytest.mark.parametrize("batch, embed, ffn, kept", [(1, 64, 256, 128), (3, 40, 96, 31)])
def test_mlp_decode_step_equals_the_pytorch_path(batch: int, embed: int, ffn: int, kept: int, gated: bool,
                                                 bias: bool, activation: str, layout: str, kind: str,
                                                 dtype: torch.dtype, native_calls: dict[str, int]) -> None:
    down = rand(embed, ffn, dtype=dtype)
    weights = {
        "up_weight": rand(ffn, embed, dtype=dtype), "up_bias": rand(ffn, dtype=dtype) if bias else None,
        "gate_weight": rand(ffn, embed, dtype=dtype) if gated else None,
        "gate_bias": rand(ffn, dtype=dtype) if gated and bias else None,
        "down_weight": native.input_major(down) if layout == "input_major" else down,
        "down_bias": rand(embed, dtype=dtype) if bias else None,
    }
    x = torch.randn(batch, 1, embed).to(dtype)
    idx = decode_selection(kind, ffn, kept, batch)
    fast, reference = both_paths(ops.gathered_mlp, x, **weights, neuron_idx=idx, activation=activation)
    assert native_calls == {"gather_rows": 2 if gated else 1, "gather_cols": 1}
    close(fast, reference, dtype)


def alibi(num_heads: int) -> Tensor:
    return 2.0 ** (-8.0 * torch.arange(1, num_heads + 1) / num_heads)


def attention_weights(heads: tuple[int, int], embed: int, head_dim: int, bias: bool, dtype: torch.dtype) -> dict:
    """Random q/k/v/o weights (and biases, if ``bias``) of an attention op, o input-major as the runtime stores it."""
    num_heads, num_kv_heads = heads
    q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
    return {
        "q_weight": rand(q_out, embed, dtype=dtype), "q_bias": rand(q_out, dtype=dtype) if bias else None,
        "k_weight": rand(kv_out, embed, dtype=dtype), "k_bias": rand(kv_out, dtype=dtype) if bias else None,
        "v_weight": rand(kv_out, embed, dtype=dtype), "v_bias": rand(kv_out, dtype=dtype) if bias else None,
        "o_weight": native.input_major(rand(embed, q_out, dtype=dtype)), "o_bias": rand(embed, dtype=dtype),
    }


def attention_extras(extras: str, num_heads: int, batch: int, seq: int, head_dim: int, dtype: torch.dtype) -> dict:
    """The optional inputs of an attention op: rotary cos/sin ("rope_bias"), ALiBi slopes and q/k norms
    ("alibi_norms"), or neither ("plain")."""
    found: dict[str, object] = {"cos": None, "sin": None}
    if extras == "rope_bias":
        angles = torch.randn(batch, seq, head_dim)
        found = {"cos": angles.cos().to(dtype), "sin": angles.sin().to(dtype)}
    if extras == "alibi_norms":
        found.update(alibi_slopes=alibi(num_heads), q_norm=torch.rand(head_dim) + 0.5,
                     k_norm=torch.rand(head_dim) + 0.5, norm_eps=1e-6)
    return found


@DTYPES
@SELECTIONS
@pytest.mark.parametrize("heads, kept", [((4, 4), 2), ((8, 2), 1), ((6, 3), 3)], ids=["mha", "gqa", "gqa_all"])
@pytest.mark.parametrize("extras", ["rope_bias", "alibi_norms", "plain"])
def test_attention_decode_step_equals_the_pytorch_path(heads: tuple[int, int], kept: int, extras: str, kind: str,
                                                       dtype: torch.dtype, native_calls: dict[str, int]) -> None:
    num_heads, num_kv_heads = heads
    batch, past, embed, head_dim = 3, 5, 24, 8
    weights = attention_weights(heads, embed, head_dim, extras == "rope_bias", dtype)
    per_token = kind == "per_token"
    cache_heads = num_kv_heads if per_token else kept
    cache = torch.randn(batch, cache_heads, past, head_dim).to(dtype), torch.randn(batch, cache_heads, past,
                                                                                   head_dim).to(dtype)
    mask = torch.ones(batch, 1, 1, past + 1, dtype=torch.bool)
    mask[1, ..., :2] = False  # a left-padded row
    idx = decode_selection(kind, num_kv_heads, kept, batch)
    op = ops.token_sparse_attention if per_token else ops.gathered_attention
    fast, reference = both_paths(
        op, torch.randn(batch, 1, embed).to(dtype), **weights, kv_head_idx=idx, attention_mask=mask,
        past_key=cache[0], past_value=cache[1], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        scaling=head_dim**-0.5, **attention_extras(extras, num_heads, batch, 1, head_dim, dtype))
    # q and o always; k and v too when the cache holds the kept groups only
    assert native_calls == {"gather_rows": 1 if per_token else 3, "gather_cols": 1}
    for got, want in zip(fast, reference):
        assert got.shape == want.shape
        close(got, want, dtype)


@DTYPES
@pytest.mark.parametrize("gated, bias, activation", [(False, True, "relu"), (True, False, "silu")])
@pytest.mark.parametrize("batch, seq, embed, ffn, block, kept_blocks", [(1, 13, 64, 256, 16, 8), (2, 6, 40, 96, 4, 7)])
def test_mlp_prefill_per_token_equals_the_pytorch_path(batch: int, seq: int, embed: int, ffn: int, block: int,
                                                       kept_blocks: int, gated: bool, bias: bool, activation: str,
                                                       dtype: torch.dtype, native_calls: dict[str, int]) -> None:
    """A prefill's per-token selections [B, S, k] (at most TOKEN_TILES_MAX_KEPT of the neurons, an input-major down
    weight) compute only each token's kept neurons natively in float32; in bfloat16 they take the PyTorch path."""
    weights = {
        "up_weight": rand(ffn, embed, dtype=dtype), "up_bias": rand(ffn, dtype=dtype) if bias else None,
        "gate_weight": rand(ffn, embed, dtype=dtype) if gated else None,
        "gate_bias": rand(ffn, dtype=dtype) if gated and bias else None,
        "down_weight": native.input_major(rand(embed, ffn, dtype=dtype)),
        "down_bias": rand(embed, dtype=dtype) if bias else None,
    }
    idx = block_selection(ffn, block, kept_blocks, batch * seq).view(batch, seq, -1)
    assert idx.shape[-1] <= ops.TOKEN_TILES_MAX_KEPT * ffn
    x = torch.randn(batch, seq, embed).to(dtype)
    fast, reference = both_paths(ops.gathered_mlp, x, **weights, neuron_idx=idx, activation=activation)
    tiled = dtype == torch.float32
    assert native_calls == {"gather_rows": (2 if gated else 1) if tiled else 0, "gather_cols": 1 if tiled else 0}
    close(fast, reference, dtype)


@pytest.mark.parametrize("case", ["most_neurons", "out_major_down", "neuron_by_neuron"])
def test_mlp_prefill_per_token_computes_every_neuron_where_that_is_faster(case: str,
                                                                          native_calls: dict[str, int]) -> None:
    """Past TOKEN_TILES_MAX_KEPT of the neurons, with a down weight whose kept columns are not contiguous runs, or
    with neurons chosen one by one (short runs), the dense products and a mask are faster than the tiles."""
    embed, ffn, block = 32, 64, 4
    kept_blocks = int(ops.TOKEN_TILES_MAX_KEPT * ffn) // block + (1 if case == "most_neurons" else -2)
    down = torch.randn(embed, ffn)
    weights = {"up_weight": torch.randn(ffn, embed), "up_bias": None, "gate_weight": None, "gate_bias": None,
               "down_weight": down if case == "out_major_down" else native.input_major(down), "down_bias": None}
    idx = block_selection(ffn, block, kept_blocks, 8).view(2, 4, -1)
    if case == "neuron_by_neuron":
        idx = selection(ffn, idx.shape[-1], 8).view(2, 4, -1)
    fast, reference = both_paths(ops.gathered_mlp, torch.randn(2, 4, embed), **weights, neuron_idx=idx,
                                 activation="relu")
    assert native_calls == {"gather_rows": 0, "gather_cols": 0}
    close(fast, reference, torch.float32)


@DTYPES
@pytest.mark.parametrize("heads, kept", [((4, 4), 2), ((8, 2), 1), ((6, 3), 2)], ids=["mha", "gqa", "gqa3"])
@pytest.mark.parametrize("extras", ["rope_bias", "alibi_norms"])
def test_attention_prefill_per_token_equals_the_pytorch_path(heads: tuple[int, int], kept: int, extras: str,
                                                            dtype: torch.dtype, native_calls: dict[str, int]) -> None:
    """A prefill's per-token head selections compute only each token's kept q rows and o inputs natively in float32
    (K/V of every head, for the complete cache); empty slots keep nothing; in bfloat16 the PyTorch path runs."""
    num_heads, num_kv_heads = heads
    batch, seq, embed, head_dim = 2, 7, 24, 8
    weights = attention_weights(heads, embed, head_dim, extras == "rope_bias", dtype)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril().expand(batch, 1, seq, seq).clone()
    mask[1, ..., :2] = False  # a left-padded row, whose two pad tokens attend to themselves only
    mask[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)
    idx = selection(num_kv_heads, kept, batch * seq, empty_every=3).view(batch, seq, kept)
    fast, reference = both_paths(
        ops.token_sparse_attention, torch.randn(batch, seq, embed).to(dtype), **weights, kv_head_idx=idx,
        attention_mask=mask, past_key=None, past_value=None, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, scaling=head_dim**-0.5, **attention_extras(extras, num_heads, batch, seq, head_dim, dtype))
    tiled = dtype == torch.float32
    assert native_calls == {"gather_rows": int(tiled), "gather_cols": int(tiled)}
    for got, want in zip(fast, reference):
        assert got.shape == want.shape
        close(got, want, dtype)


def test_a_layers_tiled_projections_share_one_plan_of_its_selection(monkeypatch) -> None:
    """The per-token MLP's up, gate and down read one plan of the layer's selection (one sort by unit), and so do
    the attention's q and o."""
    made, given = [], []  # the plans made, the plan each kernel call was given

    def plan(*args, _plan=native.plan):
        made.append(_plan(*args))
        return made[-1]

    monkeypatch.setattr(native, "plan", plan)
    for name in ("gather_rows", "gather_cols"):
        def kernel(*args, _kernel=getattr(native, name)):
            given.append(args[4])
            return _kernel(*args)

        monkeypatch.setattr(native, name, kernel)
    embed, ffn, batch, seq = 32, 64, 2, 5
    idx = block_selection(ffn, 4, 8, batch * seq).view(batch, seq, -1)
    ops.gathered_mlp(torch.randn(batch, seq, embed), rand(ffn, embed, dtype=torch.float32), None,
                     rand(ffn, embed, dtype=torch.float32), None,
                     native.input_major(rand(embed, ffn, dtype=torch.float32)), None, idx, "silu")
    assert len(made) == 1 and given == [made[0]] * 3
    num_heads = num_kv_heads = 4
    heads, head_dim = idx.new_tensor([[0, 2], [1, 3], [0, 4]]).repeat(4, 1)[: batch * seq], 8
    weights = attention_weights((num_heads, num_kv_heads), embed, head_dim, True, torch.float32)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril().expand(batch, 1, seq, seq)
    ops.token_sparse_attention(
        torch.randn(batch, seq, embed), **weights, kv_head_idx=heads.view(batch, seq, 2), attention_mask=mask,
        past_key=None, past_value=None, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        scaling=head_dim**-0.5, **attention_extras("rope_bias", num_heads, batch, seq, head_dim, torch.float32))
    assert len(made) == 2 and given[3:] == [made[1]] * 2


def test_prefill_and_pregathered_steps_take_the_pytorch_path(native_calls: dict[str, int]) -> None:
    embed, ffn = 16, 32
    weights = {"up_weight": torch.randn(ffn, embed), "up_bias": None, "gate_weight": None, "gate_bias": None,
               "down_weight": torch.randn(embed, ffn), "down_bias": None}
    ops.gathered_mlp(torch.randn(2, 4, embed), **weights, neuron_idx=torch.arange(8), activation="relu")
    compact = {**weights, "up_weight": weights["up_weight"][:8], "down_weight": weights["down_weight"][:, :8]}
    ops.gathered_mlp(torch.randn(2, 1, embed), **compact, neuron_idx=None, activation="relu")
    ops.gathered_mlp(torch.randn(2, 1, embed).double(), **{k: None if v is None else v.double()
                                                           for k, v in weights.items()},
                     neuron_idx=torch.arange(8), activation="relu")  # float64: no kernel
    assert native_calls == {"gather_rows": 0, "gather_cols": 0}


@DTYPES
@pytest.mark.parametrize("layout", ["out_major", "input_major"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_a_step_of_one_token_on_gathered_weights_streams_them_natively(gated: bool, layout: str, dtype: torch.dtype,
                                                                       native_calls: dict[str, int]) -> None:
    """A batch of one's decode step on its gathered weights runs the row projections (up, gate) as native GEMVs,
    which compute what F.linear does, and the output projection too where its copy is input-major (as the runtime
    gathers it); otherwise the output projection stays F.linear."""
    embed, kept = 48, 24
    down = rand(1, embed, kept, dtype=dtype)
    compact = {"up_weight": rand(1, kept, embed, dtype=dtype), "up_bias": torch.randn(1, kept).to(dtype),
               "gate_weight": rand(1, kept, embed, dtype=dtype) if gated else None, "gate_bias": None,
               "down_weight": down.transpose(1, 2).contiguous().transpose(1, 2) if layout == "input_major" else down,
               "down_bias": torch.randn(embed).to(dtype)}
    x = torch.randn(1, 1, embed).to(dtype)
    fast = ops.gathered_mlp(x, **compact, neuron_idx=None, activation="silu")
    assert native_calls == {"gather_rows": 2 if gated else 1, "gather_cols": int(layout == "input_major")}
    with native.use_native_kernels(False):
        reference = ops.gathered_mlp(x, **compact, neuron_idx=None, activation="silu")
    assert native_calls["gather_rows"] == (2 if gated else 1)
    close(fast, reference, dtype)


@DTYPES
@pytest.mark.parametrize("lead", [(1, 1), (1,), (2, 1), (1, 5)], ids=["step", "row", "batch2", "prompt5"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_dense_linear_streams_one_token_natively_and_equals_f_linear(lead: tuple, bias: bool, dtype: torch.dtype,
                                                                      native_calls: dict[str, int]) -> None:
    """``dense_linear`` (layer 0, the LM head) computes F.linear; with one token in all it runs the native GEMV."""
    weight = torch.randn(40, 24).to(dtype)
    b = torch.randn(40).to(dtype) if bias else None
    x = torch.randn(*lead, 24).to(dtype)
    out = ops.dense_linear(x, weight, b)
    assert native_calls["gather_rows"] == (1 if x[..., 0].numel() == 1 else 0)
    assert out.shape == (*lead, 40) and out.dtype == dtype
    close(out, torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double()), dtype)


def test_shadow_predictor_of_one_token_streams_its_layers_natively(native_calls: dict[str, int]) -> None:
    """The per-token predictor of a batch of one reads both its layers through the native GEMV."""
    x, w1, b1, w2, b2 = torch.randn(1, 32), torch.randn(16, 32), torch.randn(16), torch.randn(50, 16), torch.randn(50)
    fast = ops.shadow_mlp(x, w1, b1, w2, b2)
    assert native_calls["gather_rows"] == 2
    with native.use_native_kernels(False):
        reference = ops.shadow_mlp(x, w1, b1, w2, b2)
    close(fast, reference, torch.float32)


def test_without_a_compiler_the_ops_warn_once_and_compute_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    x, up, down = torch.randn(2, 1, 16), torch.randn(32, 16), torch.randn(16, 32)
    call = dict(up_weight=up, up_bias=None, gate_weight=None, gate_bias=None, down_weight=down, down_bias=None,
                neuron_idx=torch.tensor([[1, 5, 7], [2, 3, 32]]), activation="relu")
    expected = ops.gathered_mlp(x, **call)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_unavailable", None)
    monkeypatch.setattr(native, "missing_tools", lambda: ["c++", "ninja"])
    with pytest.warns(UserWarning, match=r"could not be built \(c\+\+ and ninja not found\).*PyTorch"):
        first = ops.gathered_mlp(x, **call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls stay quiet
        second = ops.gathered_mlp(x, **call)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_enabled", False)
    assert native.kernels() is None
    assert not native.applies(torch.randn(1, 1, 4), torch.randn(4, 4))
