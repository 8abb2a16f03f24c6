"""The ``shadowfx`` ONNX domain: one node type per custom op, with a registered schema and a FunctionProto body.

An exported graph keeps every shadowfx op as one named node of the ``shadowfx`` domain (version 1), so a native
kernel library can implement it; each file also carries, per node type, a FunctionProto made of standard ONNX ops,
which stock onnxruntime inlines at load. A body is built for the variant the file uses (which optional inputs are
present, the activation, how the selection is given), so it needs no run-time branching; all nodes of one type in a
file are the same variant, since every later layer of a decoder has the same shape.

The bodies follow the eager reference implementations in :mod:`shadowfx.ops` (empty slots, fully masked rows,
float32 scores). ``selection`` says how a node's units are chosen: ``rows`` (an index tensor ``[B, k]``, the weights
gathered by it), ``tokens`` (``[B, S, k]``, full weights, a keep mask per token) or ``pregathered`` (no indices;
the weights are a prompt's kept units per batch row, ``[B, n, ...]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_ir
import onnxscript
import torch
from onnx import TensorProto, helper
from onnx.defs import OpSchema
from onnxscript.function_libs.torch_lib.ops.nn import aten_linear

DOMAIN = "shadowfx"
DOMAIN_VERSION = 1
OPSET = 20  # the standard opset of exported graphs and of the bodies (Gelu with `approximate` needs 20)

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_MASKS = ["tensor(bool)", *_FLOATS]


class OnnxExportError(ValueError):
    """A graph the ONNX export cannot write faithfully; the message says what and what to do instead."""


@dataclass(frozen=True)
class _Input:
    name: str
    type: str  # a type-constraint name
    optional: bool = False


def _inputs(*spec: str) -> tuple[_Input, ...]:
    """``"name:T"`` required, ``"name:T?"`` optional."""
    parsed = []
    for item in spec:
        name, kind = item.split(":")
        parsed.append(_Input(name, kind.rstrip("?"), kind.endswith("?")))
    return tuple(parsed)


_STRING, _INT, _FLOAT = OpSchema.AttrType.STRING, OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT


@dataclass(frozen=True)
class NodeType:
    """One node type of the domain: its inputs, outputs, attributes and the torch op it stands for."""

    name: str
    torch_op: object
    inputs: tuple[_Input, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, OpSchema.AttrType]
    doc: str
    referenced: tuple[str, ...] = ()  # attributes the body reads from the node, so nodes may differ in them
    variadic: bool = False  # one output per layer (the ``layers`` attribute), named ``<output>_<i>`` in the body

    def schema(self) -> OpSchema:
        option = OpSchema.FormalParameterOption
        return OpSchema(
            self.name, DOMAIN, DOMAIN_VERSION, doc=self.doc,
            inputs=[OpSchema.FormalParameter(i.name, i.type, param_option=option.Optional if i.optional
                                             else option.Single) for i in self.inputs],
            outputs=[OpSchema.FormalParameter(name, "I" if name == "indices" else "T",
                                              param_option=option.Variadic if self.variadic else option.Single)
                     for name in self.outputs],
            type_constraints=[("T", _FLOATS, "activations and weights"), ("I", ["tensor(int64)"], "unit indices"),
                              ("M", _MASKS, "attention mask: bool, True = attend, or float, added to the scores"),
                              ("N", _FLOATS, "scale of a per-head norm (float32 where the model computes it so)")],
            attributes=[OpSchema.Attribute(name, kind, "") for name, kind in self.attributes.items()],
        )


_ATTENTION_INPUTS = _inputs(
    "hidden:T", "q_weight:T", "q_bias:T?", "k_weight:T", "k_bias:T?", "v_weight:T", "v_bias:T?", "o_weight:T",
    "o_bias:T?", "kv_head_idx:I?", "cos:T?", "sin:T?", "attention_mask:M?", "past_key:T?", "past_value:T?",
    "q_norm:N?", "k_norm:N?", "alibi_slopes:N?")
_ATTENTION_ATTRIBUTES = {"num_heads": _INT, "num_kv_heads": _INT, "head_dim": _INT, "scaling": _FLOAT,
                         "norm_eps": _FLOAT, "softcap": _FLOAT, "mask_kind": _STRING,
                         "rotary_interleaved": _INT, "selection": _STRING}
_ops = torch.ops.shadowfx

NODE_TYPES: dict[str, NodeType] = {t.name: t for t in (
    NodeType("GatheredMLP", _ops.gathered_mlp.default,
             _inputs("x:T", "up_weight:T", "up_bias:T?", "gate_weight:T?", "gate_bias:T?", "down_weight:T",
                     "down_bias:T?", "neuron_idx:I?"),
             ("y",), {"activation": _STRING, "selection": _STRING},
             "shadowfx::gathered_mlp: the MLP on the selected intermediate neurons"),
    NodeType("GatheredAttention", _ops.gathered_attention.default, _ATTENTION_INPUTS, ("out", "key", "value"),
             _ATTENTION_ATTRIBUTES, "shadowfx::gathered_attention: self-attention on the selected KV groups"),
    NodeType("TokenSparseAttention", _ops.token_sparse_attention.default, _ATTENTION_INPUTS,
             ("out", "key", "value"), _ATTENTION_ATTRIBUTES,
             "shadowfx::token_sparse_attention: self-attention with a selection of KV groups per token"),
    NodeType("TopkIndices", _ops.topk_indices.default, _inputs("scores:T"), ("indices",), {"k": _INT},
             "shadowfx::topk_indices: the k largest scores' indices, ascending (the selection)", referenced=("k",)),
    NodeType("GlobalTopkIndices", _ops.global_topk_indices.default, _inputs("scores:T"), ("indices",),
             {"budget": _INT, "minimum": _INT, "layers": _INT},
             "shadowfx::global_topk_indices: per layer the kept units of a budget ranked across layers (the "
             "selection at scope 'global'); one output per layer, widths set by the scores",
             referenced=("budget", "minimum"), variadic=True),
    NodeType("ShadowMLP", _ops.shadow_mlp.default, _inputs("x:T", "w1:T", "b1:T", "w2:T", "b2:T"), ("y",), {},
             "shadowfx::shadow_mlp: a shadow predictor's MLP on the min-max scaled input"),
    NodeType("KeptRows", _ops.kept_rows.default, _inputs("source:T", "rows:I"), ("kept",), {},
             "shadowfx::kept_rows: source [N, ...] at rows [B, n], the index N giving zeros (a prompt's kept "
             "weight rows, gathered once)"),
    NodeType("KeptCols", _ops.kept_cols.default, _inputs("source:T", "cols:I"), ("kept",), {},
             "shadowfx::kept_cols: the columns cols [B, n] of source [M, N] as [B, M, n], the index N giving zeros "
             "(an output projection's kept inputs, gathered once)"),
    # the projections of a per-token attention body: no torch op of their own
    NodeType("KeptRowsLinear", None, _inputs("x:T", "weight:T", "bias:T?", "rows:I"), ("y",), {},
             "y[b, s, j] = x[b, s] . weight[rows[b, s, j]] + bias[rows[b, s, j]] for x [B, S, E], weight [N, E], "
             "rows [B, S, k]; the index N gives 0 (the kept rows of each token)"),
    NodeType("KeptColsLinear", None, _inputs("h:T", "weight:T", "bias:T?", "cols:I"), ("y",), {},
             "y[b, s] = sum_j h[b, s, j] * weight[:, cols[b, s, j]] + bias for h [B, S, k], weight [E, N], "
             "cols [B, S, k] distinct within each token; the index N adds nothing (the kept inputs of each token)"),
)}


def register_schemas() -> None:
    """Register the domain's schemas with onnx (the exporter and the full checker need them); idempotent."""
    for node_type in NODE_TYPES.values():
        if not onnx.defs.has(node_type.name, DOMAIN):
            onnx.defs.register_schema(node_type.schema())


# ---- torch -> ONNX: each op becomes one opaque node ------------------------------------------------------------------

_OPSET = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _selection_mode(indices: object, weight: object, what: str) -> str:
    if indices is None:
        if len(weight.shape) != 3:
            raise OnnxExportError(f"{what}: pre-gathered weights shared by the batch rows are not exported; the export "
                                  "gathers a prompt's weights per batch row, [B, n, ...]")
        return "pregathered"
    mode = {2: "rows", 3: "tokens"}.get(len(indices.shape))
    if mode is None:
        raise OnnxExportError(f"{what}: a selection shared by the batch, [k], is not exported; give one per row")
    return mode


def _translate_mlp(x, up_weight, up_bias, gate_weight, gate_bias, down_weight, down_bias, neuron_idx, activation):
    return _OPSET.GatheredMLP(x, up_weight, up_bias, gate_weight, gate_bias, down_weight, down_bias, neuron_idx,
                              activation=activation,
                              selection=_selection_mode(neuron_idx, up_weight, "gathered_mlp"))


def _attention_translation(name: str) -> Callable:
    def translate(hidden, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, kv_head_idx, cos,
                  sin, attention_mask, past_key, past_value, num_heads, num_kv_heads, head_dim, scaling,
                  q_norm=None, k_norm=None, norm_eps=0.0, alibi_slopes=None, softcap=0.0,
                  rotary_interleaved=False):
        if attention_mask is None:
            raise OnnxExportError(f"{name}: the attention has no mask (the op's causal default), which the export "
                                  "does not write; the transformed graphs of Hugging Face models always pass one")
        return getattr(_OPSET, name)(
            hidden, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, kv_head_idx, cos, sin,
            attention_mask, past_key, past_value, q_norm, k_norm, alibi_slopes, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, scaling=scaling, norm_eps=norm_eps, softcap=softcap,
            mask_kind="bool" if attention_mask.dtype == onnx_ir.DataType.BOOL else "additive",
            rotary_interleaved=int(rotary_interleaved),
            selection=_selection_mode(kv_head_idx, k_weight, name))
    return translate


def _translate_topk(scores, k):
    return _OPSET.TopkIndices(scores, k=k)


def _translate_global_topk(scores, budget, minimum):
    layers = scores.shape[1]
    return _OPSET.GlobalTopkIndices(scores, budget=budget, minimum=minimum, layers=layers, _num_outputs=layers)


def _translate_shadow_mlp(x, w1, b1, w2, b2):
    return _OPSET.ShadowMLP(x, w1, b1, w2, b2)


def _translate_kept_rows(source, rows):
    return _OPSET.KeptRows(source, rows)


def _translate_kept_cols(source, cols):
    return _OPSET.KeptCols(source, cols)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: every shadowfx op to its opaque node, except
    ``dense_linear``."""
    register_schemas()
    translations = {"GatheredMLP": _translate_mlp, "GatheredAttention": _attention_translation("GatheredAttention"),
                    "TokenSparseAttention": _attention_translation("TokenSparseAttention"),
                    "TopkIndices": _translate_topk, "GlobalTopkIndices": _translate_global_topk,
                    "ShadowMLP": _translate_shadow_mlp, "KeptRows": _translate_kept_rows,
                    "KeptCols": _translate_kept_cols}
    # dense_linear is aten.linear with a native decode kernel: written as the standard nodes a dense export has
    return {**{NODE_TYPES[name].torch_op: fn for name, fn in translations.items()},
            _ops.dense_linear.default: aten_linear}


# ---- function bodies -------------------------------------------------------------------------------------------------

class _Body:
    """Nodes of a function body; each call adds one and returns its output name(s)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def __call__(self, op_type: str, *inputs: str, outputs: int = 1, **attributes: object) -> str | list[str]:
        names = [f"t{len(self.nodes)}_{i}" for i in range(outputs)]
        # a node type of this domain in a body is one more function of the model (or the library's kernel)
        domain = DOMAIN if op_type in NODE_TYPES else ""
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain, **attributes))
        return names[0] if outputs == 1 else names

    def ints(self, *values: int) -> str:
        return self("Constant", value=helper.make_tensor("", TensorProto.INT64, [len(values)], list(values)))

    def int_attribute(self, name: str) -> str:
        """The node's int attribute ``name`` as a [1] tensor."""
        reference = helper.make_attribute_ref("value_int", onnx.AttributeProto.INT)
        reference.ref_attr_name = name
        constant = helper.make_node("Constant", [], [f"t{len(self.nodes)}_0"])
        constant.attribute.append(reference)
        self.nodes.append(constant)
        return self("Reshape", constant.output[0], self.ints(1))

    def scalar(self, value: float, like: str) -> str:
        """A scalar of ``like``'s dtype."""
        return self("CastLike", self("Constant", value_float=value), like)

    def dims(self, t: str, start: int, end: int) -> str:
        return self("Shape", t, start=start, end=end)

    def flag_mask(self, indices: str, units: str) -> str:
        """bool [..., N], True at ``indices`` [..., k] (the empty slot N keeps nothing); ``units`` is N as [1]."""
        size = self("Concat", self.dims(indices, 0, -1), self("Add", units, self.ints(1)), axis=0)
        empty = self("ConstantOfShape", size, value=helper.make_tensor("", TensorProto.BOOL, [1], [False]))
        true = self("Expand", self("Constant", value=helper.make_tensor("", TensorProto.BOOL, [], [True])),
                    self("Shape", indices))
        flags = self("ScatterElements", empty, indices, true, axis=-1)
        return self("Slice", flags, self.ints(0), units, self.ints(-1))

    def linear_rows(self, x: str, weight: str, bias: str, rows: str | None, per_row: bool) -> str:
        """x @ weight[rows].T + bias[rows]: rows [B, n] gathers per batch row; per_row weights are [B, n, E]."""
        if rows is not None:
            weight, bias = self("Gather", weight, rows, axis=0), bias and self("Gather", bias, rows, axis=0)
            per_row = True
        y = self("MatMul", x, self("Transpose", weight, perm=[0, 2, 1] if per_row else [1, 0]))
        return y if not bias else self("Add", y, self("Unsqueeze", bias, self.ints(1)) if per_row else bias)

    def linear_cols(self, h: str, weight: str, bias: str, cols: str | None, per_row: bool) -> str:
        """h @ weight[:, cols].T + bias, h holding only the selected input features of weight [E, in]."""
        if cols is not None:
            transposed = self("Gather", self("Transpose", weight, perm=[1, 0]), cols, axis=0)
        else:
            transposed = self("Transpose", weight, perm=[0, 2, 1] if per_row else [1, 0])
        y = self("MatMul", h, transposed)
        return self("Add", y, bias) if bias else y

    def activation(self, name: str, t: str) -> str:
        if name == "relu":
            return self("Relu", t)
        if name == "relu2":
            relu = self("Relu", t)
            return self("Mul", relu, relu)
        if name in ("gelu", "gelu_tanh"):
            return self("Gelu", t, approximate="tanh" if name == "gelu_tanh" else "none")
        scale = {"silu": 1.0, "quick_gelu": 1.702}.get(name)
        if scale is None:
            raise OnnxExportError(f"no ONNX body for activation {name!r}")
        return self("Mul", t, self("Sigmoid", t if scale == 1.0 else self("Mul", t, self.scalar(scale, t))))

    def unit_rows(self, units: str, width: int) -> str:
        """[..., n] units of ``width`` consecutive rows each -> their rows [..., n * width] (shadowfx.ops.unit_rows)."""
        offsets = self("Constant", value=helper.make_tensor("", TensorProto.INT64, [width], list(range(width))))
        rows = self("Add", self("Mul", self("Unsqueeze", units, self.ints(-1)), self.ints(width)), offsets)
        return self("Reshape", rows, self("Concat", self("Shape", units, end=-1), self.ints(-1), axis=0))

    def with_zero_slot(self, t: str) -> str:
        """t [..., N] with a zero at N: [..., N + 1], where an empty slot's index points."""
        return self("Concat", t, self("Expand", self.scalar(0.0, t),
                                      self("Concat", self("Shape", t, end=-1), self.ints(1), axis=0)), axis=-1)


def _mlp_body(body: _Body, present: set[str], attributes: dict) -> list[str]:
    def given(name: str) -> str:
        return name if name in present else ""

    mode = attributes["selection"]
    per_row = mode == "pregathered"
    rows = empty = None
    if mode == "rows":
        units = body.dims("up_weight", 0, 1)
        rows = body("Min", "neuron_idx", body("Sub", units, body.ints(1)))
        empty = body("Equal", "neuron_idx", units)
    up = body.linear_rows("x", "up_weight", given("up_bias"), rows, per_row)
    if "gate_weight" in present:
        gate = body.linear_rows("x", "gate_weight", given("gate_bias"), rows, per_row)
        h = body("Mul", body.activation(attributes["activation"], gate), up)
    else:
        h = body.activation(attributes["activation"], up)
    zero = body.scalar(0.0, h)
    if empty is not None:
        h = body("Where", body("Unsqueeze", empty, body.ints(1)), zero, h)
    if mode == "tokens":
        h = body("Where", body.flag_mask("neuron_idx", body.dims("up_weight", 0, 1)), h, zero)
    return [body.linear_cols(h, "down_weight", given("down_bias"), rows, per_row)]


def _rope(body: _Body, t: str, interleaved: bool) -> str:
    """RoPE on the first rot dims of each head, pairing the halves (rotate_half) or neighbouring dims
    (``interleaved``): t [B, n, S, D], cos/sin [B or 1, S, rot]."""
    rot = body.dims("cos", 2, 3)
    end, last = body.ints(2 ** 62), body.ints(3)
    rotating, passing = body("Slice", t, body.ints(0), rot, last), body("Slice", t, rot, end, last)
    cos, sin = (body("Unsqueeze", name, body.ints(1)) for name in ("cos", "sin"))
    if interleaved:
        even, odd = (body("Unsqueeze", body("Slice", rotating, body.ints(start), end, last, body.ints(2)),
                          body.ints(-1)) for start in (0, 1))
        turned = body("Reshape", body("Concat", body("Neg", odd), even, axis=-1), body.ints(0, 0, 0, -1))
    else:
        half = body("Div", rot, body.ints(2))
        x1, x2 = body("Slice", rotating, body.ints(0), half, last), body("Slice", rotating, half, end, last)
        turned = body("Concat", body("Neg", x2), x1, axis=-1)
    rotated = body("Add", body("Mul", rotating, cos), body("Mul", turned, sin))
    return body("Concat", rotated, passing, axis=-1)


def _head_norm(body: _Body, t: str, scale: str, eps: float) -> str:
    """RMSNorm of each head over its D features in float32, times ``scale`` [D]: t [B, n, S, D]."""
    x = body("Cast", t, to=TensorProto.FLOAT)
    mean = body("ReduceMean", body("Mul", x, x), body.ints(-1), keepdims=1)
    normalised = body("Mul", x, body("Reciprocal", body("Sqrt", body("Add", mean, body("Constant", value_float=eps)))))
    return body("CastLike", body("Mul", normalised, body("Cast", scale, to=TensorProto.FLOAT)), t)


def _alibi_bias(body: _Body, key: str, kept: str | None, group: int, per_row: bool) -> str:
    """slope * key position, float32, to add to scores [B, g, r, S, T]: the slopes of every head [Hq] (by ``kept``
    [B, g] when given), or pre-gathered per row [B, g*r]."""
    slopes = body("Cast", "alibi_slopes", to=TensorProto.FLOAT)
    if per_row:
        slopes = body("Reshape", slopes, body.ints(0, -1, group))  # [B, g, r]
    else:
        slopes = body("Reshape", slopes, body.ints(-1, group))  # [Hkv, r]
        if kept is not None:
            slopes = body("Gather", slopes, kept, axis=0)  # [B, g, r]
    total = body("Squeeze", body.dims(key, 2, 3), body.ints(0))
    positions = body("Cast", body("Range", body("Constant", value_int=0), total, body("Constant", value_int=1)),
                     to=TensorProto.FLOAT)
    return body("Mul", body("Unsqueeze", slopes, body.ints(-1, -2)), positions)


def _attention_body(body: _Body, present: set[str], attributes: dict) -> list[str]:
    def given(name: str) -> str:
        return name if name in present else ""

    mode = attributes["selection"]
    kv_heads, head_dim = attributes["num_kv_heads"], attributes["head_dim"]
    group = attributes["num_heads"] // kv_heads
    per_row = mode == "pregathered"
    q_rows = kv_rows = empty = token_q_rows = None
    if mode == "rows":
        kept = body("Min", "kv_head_idx", body.ints(kv_heads - 1))
        empty = body("Equal", "kv_head_idx", body.ints(kv_heads))
        q_rows, kv_rows = body.unit_rows(kept, group * head_dim), body.unit_rows(kept, head_dim)
    q_width = attributes["num_heads"] * head_dim
    if mode == "tokens":
        # each token's kept heads' q rows [B, S, k * r * D]; an empty slot's rows all become the empty row N
        token_q_rows = body("Min", body.unit_rows("kv_head_idx", group * head_dim), body.ints(q_width))

    def heads(t: str) -> str:  # [B, S, n*D] -> [B, n, S, D]
        return body("Transpose", body("Reshape", t, body.ints(0, 0, -1, head_dim)), perm=[0, 2, 1, 3])

    if token_q_rows is None:
        q = heads(body.linear_rows("hidden", "q_weight", given("q_bias"), q_rows, per_row))
    else:
        # the kept heads' q (the other heads' zero, their context unread), in the places of every head's q
        kept_q = body("KeptRowsLinear", "hidden", "q_weight", given("q_bias"), token_q_rows)
        zeros = body("Expand", body.scalar(0.0, kept_q), body("Concat", body.dims("hidden", 0, 2),
                                                               body.ints(q_width + 1), axis=0))  # and the empty row
        placed = body("ScatterElements", zeros, token_q_rows, kept_q, axis=-1)
        q = heads(body("Slice", placed, body.ints(0), body.ints(q_width), body.ints(-1)))
    key = heads(body.linear_rows("hidden", "k_weight", given("k_bias"), kv_rows, per_row))
    value = heads(body.linear_rows("hidden", "v_weight", given("v_bias"), kv_rows, per_row))
    if "q_norm" in present:
        q = _head_norm(body, q, "q_norm", attributes["norm_eps"])
    if "k_norm" in present:
        key = _head_norm(body, key, "k_norm", attributes["norm_eps"])
    if "cos" in present:
        interleaved = bool(attributes["rotary_interleaved"])
        q, key = _rope(body, q, interleaved), _rope(body, key, interleaved)
    if "past_key" in present:
        key, value = body("Concat", "past_key", key, axis=2), body("Concat", "past_value", value, axis=2)
    # query head i uses KV head i // r: q as [B, g, r, S, D] against k/v as [B, g, 1, T, D]
    grouped = body("Reshape", q, body("Concat", body.dims(q, 0, 1), body.ints(-1, group), body.dims(q, 2, 4),
                                      axis=0))
    k5, v5 = (body("Unsqueeze", t, body.ints(2)) for t in (key, value))
    scores = body("Cast", body("MatMul", grouped, body("Transpose", k5, perm=[0, 1, 2, 4, 3])), to=TensorProto.FLOAT)
    scores = body("Mul", scores, body("Constant", value_float=attributes["scaling"]))
    if attributes["softcap"]:
        cap = body("Constant", value_float=attributes["softcap"])
        scores = body("Mul", body("Tanh", body("Div", scores, cap)), cap)
    if "alibi_slopes" in present:
        scores = body("Add", scores, _alibi_bias(body, key, kept if mode == "rows" else None, group, per_row))
    blocked = body("Constant", value_float=float("-inf"))
    if attributes["mask_kind"] == "bool":
        additive = body("Where", "attention_mask", body("Constant", value_float=0.0), blocked)
    else:  # HF eager attention's float mask, whose blocked scores are finite
        additive = body("Cast", "attention_mask", to=TensorProto.FLOAT)
    scores = body("Add", scores, body("Unsqueeze", additive, body.ints(2)))  # over g and r
    probs = body("Softmax", scores, axis=-1)
    if attributes["mask_kind"] == "bool":
        # a query with nothing to attend to (left padding) gets zero context, not the NaN of 0/0
        nothing = body("Equal", body("ReduceMax", scores, body.ints(-1), keepdims=1), blocked)
        probs = body("Where", nothing, body("Constant", value_float=0.0), probs)
    context = body("MatMul", body("CastLike", probs, v5), v5)  # [B, g, r, S, D]
    context = body("Reshape", context, body("Concat", body.dims(context, 0, 1), body.ints(-1),
                                            body.dims(context, 3, 5), axis=0))
    context = body("Reshape", body("Transpose", context, perm=[0, 2, 1, 3]), body.ints(0, 0, -1))
    if token_q_rows is not None:  # the o projection of each token's kept heads' context
        # an empty slot's value is never read (KeptColsLinear skips its index): any in-range index serves
        kept_context = body("GatherElements", context, body("Min", token_q_rows, body.ints(q_width - 1)), axis=-1)
        out = body("KeptColsLinear", kept_context, "o_weight", given("o_bias"), token_q_rows)
        return [out, key, value]
    if empty is not None:
        by_group = body("Reshape", context, body.ints(0, 0, -1, group * head_dim))
        by_group = body("Where", body("Unsqueeze", empty, body.ints(1, 3)), body.scalar(0.0, context), by_group)
        context = body("Reshape", by_group, body.ints(0, 0, -1))
    out = body.linear_cols(context, "o_weight", given("o_bias"), q_rows, per_row)
    return [out, key, value]


def _topk_body(body: _Body, present: set[str], attributes: dict) -> list[str]:
    k = body.int_attribute("k")
    # ONNX TopK breaks ties towards the lower index, as the reference's stable sort does
    _, order = body("TopK", "scores", k, outputs=2, axis=-1, largest=1, sorted=1)
    ascending, _ = body("TopK", order, k, outputs=2, axis=-1, largest=0, sorted=1)
    return [ascending]


def _global_topk_body(body: _Body, present: set[str], attributes: dict) -> list[str]:
    scores = body("Cast", "scores", to=TensorProto.FLOAT)  # [R, L, N]
    ones = body("Constant", value_float=1.0)

    def flags(like: str, indices: str) -> str:
        """float [like's shape], 1 at ``indices`` along the last axis."""
        zeros = body("ConstantOfShape", body("Shape", like), value=helper.make_tensor("", TensorProto.FLOAT, [1], [0]))
        return body("ScatterElements", zeros, indices, body("Expand", ones, body("Shape", indices)), axis=-1)

    # ONNX TopK breaks ties towards the lower index, as the reference's stable sorts do
    _, reserved = body("TopK", scores, body.int_attribute("minimum"), outputs=2, axis=-1, largest=1, sorted=1)
    infinity = body("Constant", value_float=float("inf"))
    ranked = body("Reshape", body("Where", body("Cast", flags(scores, reserved), to=TensorProto.BOOL), infinity,
                                  scores), body.ints(0, -1))
    _, order = body("TopK", ranked, body.int_attribute("budget"), outputs=2, axis=-1, largest=1, sorted=1)
    kept = body("Cast", body("Reshape", flags(ranked, order), body("Shape", scores)), to=TensorProto.BOOL)
    units = body.dims(scores, 2, 3)
    slots = body("Range", body("Constant", value_int=0), body("Squeeze", units), body("Constant", value_int=1))
    ascending, _ = body("TopK", body("Where", kept, slots, units), units, outputs=2, axis=-1, largest=0, sorted=1)
    widths = body("ReduceMax", body("ReduceSum", body("Cast", kept, to=TensorProto.INT64), body.ints(-1), keepdims=0),
                  body.ints(0), keepdims=0)
    outputs = []
    for layer in range(attributes["layers"]):
        position = body.ints(layer)
        row = body("Squeeze", body("Gather", ascending, position, axis=1), body.ints(1))
        outputs.append(body("Slice", row, body.ints(0), body("Gather", widths, position), body.ints(1)))
    return outputs


def _shadow_mlp_body(body: _Body, present: set[str], attributes: dict) -> list[str]:
    x = body("Cast", "x", to=TensorProto.FLOAT)
    last = body.ints(-1)
    low = body("ReduceMin", x, last, keepdims=1)
    span = body("Sub", body("ReduceMax", x, last, keepdims=1), low)
    span = body("Where", body("Greater", span, body("Constant", value_float=0.0)), span,
                body("Constant", value_float=1.0))
    scaled = body("CastLike", body("Div", body("Sub", x, low), span), "w1")
    hidden = body("Relu", body("Add", body("MatMul", scaled, body("Transpose", "w1", perm=[1, 0])), "b1"))
    return [body("Add", body("MatMul", hidden, body("Transpose", "w2", perm=[1, 0])), "b2")]


def _kept_rows_body(body: _Body, present: set[str], attributes: dict) -> list[str]:
    units = body.dims("source", 0, 1)
    flat = body("Reshape", "source", body.ints(0, -1))  # [N, W]: a bias gathers as rows of one
    taken = body("Gather", flat, body("Min", "rows", body("Sub", units, body.ints(1))), axis=0)  # [B, n, W]
    empty = body("Unsqueeze", body("Equal", "rows", units), body.ints(2))
    zeroed = body("Where", empty, body.scalar(0.0, "source"), taken)
    return [body("Reshape", zeroed, body("Concat", body("Shape", "rows"), body("Shape", "source", start=1), axis=0))]


def _kept_cols_body(body: _Body, present: set[str], attributes: dict) -> list[str]:
    units = body.dims("source", 1, 2)
    taken = body("Gather", "source", body("Min", "cols", body("Sub", units, body.ints(1))), axis=1)  # [M, B, n]
    empty = body("Unsqueeze", body("Equal", "cols", units), body.ints(1))  # [B, 1, n]
    return [body("Where", empty, body.scalar(0.0, "source"), body("Transpose", taken, perm=[1, 0, 2]))]


def _kept_rows_linear_body(body: _Body, present: set[str], attributes: dict) -> list[str]:
    every = body("MatMul", "x", body("Transpose", "weight", perm=[1, 0]))  # [B, S, N]: every row's output
    if "bias" in present:
        every = body("Add", every, "bias")
    return [body("GatherElements", body.with_zero_slot(every), "rows", axis=-1)]


def _kept_cols_linear_body(body: _Body, present: set[str], attributes: dict) -> list[str]:
    units = body.dims("weight", 1, 2)
    zeros = body("Expand", body.scalar(0.0, "h"), body("Concat", body.dims("h", 0, 2), units, axis=0))
    placed = body("ScatterElements", body.with_zero_slot(zeros), "cols", "h", axis=-1)  # [B, S, N + 1]
    every = body("Slice", placed, body.ints(0), units, body.ints(-1))
    y = body("MatMul", every, body("Transpose", "weight", perm=[1, 0]))
    return [body("Add", y, "bias") if "bias" in present else y]


_BODIES: dict[str, Callable[[_Body, set[str], dict], list[str]]] = {
    "GatheredMLP": _mlp_body, "GatheredAttention": _attention_body, "TokenSparseAttention": _attention_body,
    "TopkIndices": _topk_body, "GlobalTopkIndices": _global_topk_body, "ShadowMLP": _shadow_mlp_body,
    "KeptRows": _kept_rows_body, "KeptCols": _kept_cols_body, "KeptRowsLinear": _kept_rows_linear_body,
    "KeptColsLinear": _kept_cols_linear_body,
}


def variant(node: onnx.NodeProto) -> tuple:
    """What a node's body depends on: the inputs it is given and its attributes."""
    node_type = NODE_TYPES[node.op_type]
    present = tuple(spec.name for spec, name in zip(node_type.inputs, node.input) if name)
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in node_type.referenced}
    return present, tuple(sorted((k, v.decode() if isinstance(v, bytes) else v) for k, v in values.items()))


def function_for(nodes: list[onnx.NodeProto]) -> onnx.FunctionProto:
    """The FunctionProto of one node type for the nodes of one graph, which must all be the same variant."""
    kinds = {variant(node) for node in nodes}
    op_type = nodes[0].op_type
    if len(kinds) != 1:
        raise OnnxExportError(f"the graph holds {op_type} nodes of {len(kinds)} different shapes; the export writes "
                              "one function body per node type (all later layers must have the same structure)")
    present, attributes = kinds.pop()
    node_type = NODE_TYPES[op_type]
    body = _Body()
    outputs = _BODIES[op_type](body, set(present), dict(attributes))
    names = ([f"{node_type.outputs[0]}_{i}" for i in range(len(outputs))] if node_type.variadic
             else list(node_type.outputs))
    # the function's outputs are the body's last values (each a distinct value a body node makes), renamed to the
    # schema's output names where they are made and read
    renames = dict(zip(outputs, names))
    for node in body.nodes:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    return helper.make_function(
        DOMAIN, op_type, inputs=[spec.name for spec in node_type.inputs], outputs=names,
        nodes=body.nodes, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        attributes=list(node_type.attributes),
    )


def functions_for(nodes: list[onnx.NodeProto]) -> list[onnx.FunctionProto]:
    """The FunctionProtos of the domain's node types among ``nodes``, and of the node types their bodies hold."""
    functions: dict[str, onnx.FunctionProto] = {}
    pending = [node for node in nodes if node.domain == DOMAIN]
    while pending:
        by_type: dict[str, list[onnx.NodeProto]] = {}
        for node in pending:
            by_type.setdefault(node.op_type, []).append(node)
        made = {op_type: function_for(typed) for op_type, typed in by_type.items()}
        functions.update(made)
        pending = [node for function in made.values() for node in function.node
                   if node.domain == DOMAIN and node.op_type not in functions]
    return list(functions.values())

