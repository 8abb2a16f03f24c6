"""``DecoderStructure``: the one description of a decoder that every shadowfx stage reads.

It is found from the captured graph by ``shadowfx.passes.discover_structure`` and says, per layer, where the
attention and MLP parameters are, how many heads and KV heads there are, what the MLP computes, and which graph
nodes carry the per-head attention context (the predictor's input at layer 0) and the MLP intermediate. Module and
parameter names are relative to the user's model (``model.layers.3.mlp.up_proj``); node names refer to the prefill
graph it was discovered from.

The ``fingerprint`` covers the architecture, a strided sample of every weight and the weights' dtype in separate parts
(:class:`Fingerprint`), so a predictor or trace made for one checkpoint is refused by another, and one made for the
same checkpoint in another dtype is accepted with a warning (see :func:`check_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from shadowfx.files import atomic_write_text

FORMAT_VERSION = 1

MLPKind = Literal["plain", "gated"]
AttentionCore = Literal["sdpa", "eager"]


class StructureError(ValueError):
    """The captured graph does not have a shape the passes can rewrite."""


class FingerprintMismatch(ValueError):
    """An artifact (predictor, traces) was made for another model."""


@dataclass(frozen=True)
class Projection:
    """A linear map ``y = x W^T + b`` held by one module.

    ``weight_layout`` is ``"out_in"`` for ``nn.Linear`` and ``"in_out"`` for GPT-2's ``Conv1D``; ``rows`` selects
    the slice of output features that belongs to this role when one module computes several (a fused QKV). With
    ``blocks`` ``(count, stride)`` the role's features are that slice repeated every ``stride`` features, ``count``
    times: a fused QKV whose heads are interleaved (GPT-NeoX lays out ``[q, k, v]`` of each head in turn).
    """

    module: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    weight_layout: Literal["out_in", "in_out"]
    node: str
    rows: tuple[int, int] | None = None
    blocks: tuple[int, int] | None = None

    @property
    def width(self) -> int:
        """Output features of this role (the slice width, times the blocks, for a fused projection)."""
        if self.rows is None:
            return self.out_features
        return (self.rows[1] - self.rows[0]) * (self.blocks[0] if self.blocks else 1)

    def feature_rows(self, features: torch.Tensor) -> torch.Tensor:
        """The rows of the module's weight that hold the role's output ``features`` (any shape of indices)."""
        if self.rows is None:
            return features
        if self.blocks is None:
            return features + self.rows[0]
        block = self.rows[1] - self.rows[0]
        return self.rows[0] + torch.div(features, block, rounding_mode="floor") * self.blocks[1] + features % block


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding as the graph applies it: ``rotate_half`` (the halves of the rotated dims as the
    pairs), or on interleaved pairs of neighbouring dims (GPT-J, Cohere)."""

    cos_node: str
    sin_node: str
    rotary_dim: int
    interleaved: bool = False
    # cos/sin built [B, 1, S, rot] or [B, S, 1, rot] in the layer: the axis of the heads they broadcast over
    heads_axis: int | None = None


@dataclass(frozen=True)
class HeadNorm:
    """An RMSNorm of each query (or key) head over its ``head_dim`` features, before the rotary embedding (Qwen3,
    Gemma 3): ``x * rsqrt(mean(x^2) + eps) * scale`` in float32. ``node`` multiplies by the scale, its argument
    ``scale_arg`` (the weight, or Gemma's ``1 + weight``)."""

    weight: str
    eps: float
    node: str
    scale_arg: int


@dataclass(frozen=True)
class AttentionStructure:
    module: str
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    core: AttentionCore
    core_node: str
    mask_node: str | None
    context_node: str
    rotary: Rotary | None
    q_norm: HeadNorm | None = None
    k_norm: HeadNorm | None = None
    # mask_node is a boolean mask of the blocked scores, filled with this value (else it is added, or True = attend)
    mask_fill: float | None = None
    # ALiBi: each query head's scores get slope * key position (read from a run of the model, see recognise_alibi)
    alibi_slopes: tuple[float, ...] | None = None
    # the scaled scores are capped as softcap * tanh(scores / softcap) before the mask (Gemma 2)
    softcap: float | None = None

    @property
    def fused_qkv(self) -> bool:
        return self.q.module == self.k.module == self.v.module

    @property
    def kv_group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class MLPStructure:
    kind: MLPKind
    up: Projection
    gate: Projection | None
    down: Projection
    activation: str
    intermediate_size: int
    intermediate_node: str


@dataclass(frozen=True)
class LayerStructure:
    index: int
    module: str
    attention: AttentionStructure
    mlp: MLPStructure


@dataclass(frozen=True)
class DecoderStructure:
    model_class: str
    model_type: str
    hidden_size: int
    vocab_size: int
    layers_module: str
    layers: tuple[LayerStructure, ...]
    embedding: str
    position_embedding: str | None
    final_norm: str | None
    lm_head: Projection
    weights_digest: str | None
    fingerprint: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def predictor_input_node(self) -> str:
        """Node carrying layer 0's attention context before its output projection: the shadow predictor's input."""
        return self.layers[0].attention.context_node

    @property
    def predictor_input_size(self) -> int:
        return self.layers[0].attention.o.in_features

    # ---- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderStructure:
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"DecoderStructure format version {version!r} is not {FORMAT_VERSION}; re-run discovery")
        data["layers"] = tuple(_layer_from_dict(layer) for layer in data["layers"])
        data["lm_head"] = _projection_from_dict(data["lm_head"])
        structure = cls(**data)
        if structure.fingerprint != compute_fingerprint(structure):
            raise ValueError("DecoderStructure fingerprint does not match its contents; the file was edited or damaged")
        return structure

    @classmethod
    def from_json(cls, text: str) -> DecoderStructure:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> DecoderStructure:
        return cls.from_json(Path(path).read_text())

    # ---- human summary -------------------------------------------------------------------------------------------
    def summary(self) -> str:
        lines = [
            f"{self.model_class} ({self.model_type}): {self.num_layers} layers, hidden {self.hidden_size}, "
            f"vocab {self.vocab_size}",
            f"  fingerprint {self.fingerprint}  weights "
            + (f"sampled, {Fingerprint.parse(self.fingerprint, what='this structure').dtype}" if self.weights_digest
               else "none (config only)"),
            f"  embedding {self.embedding}"
            + (f", positions {self.position_embedding}" if self.position_embedding else "")
            + (f", final norm {self.final_norm}" if self.final_norm else "")
            + f", lm_head {self.lm_head.module}",
            f"  predictor input: {self.layers_module}.0 attention context ({self.predictor_input_size} features, "
            f"node {self.predictor_input_node})",
            "  layer  attention                                             mlp",
        ]
        for layer in self.layers:
            a, m = layer.attention, layer.mlp
            qkv = "fused qkv" if a.fused_qkv else "q/k/v"
            rope = " rope" if a.rotary else ""
            lines.append(
                f"  {layer.index:5d}  {a.num_heads:3d} heads / {a.num_kv_heads:3d} kv x {a.head_dim:4d} "
                f"{qkv:9s} {a.core:5s}{rope:5s}  "
                f"{m.kind:5s} {m.activation:10s} {m.intermediate_size:6d} neurons"
            )
        return "\n".join(lines)


def _projection_from_dict(data: dict[str, Any]) -> Projection:
    pairs = {key: tuple(data[key]) for key in ("rows", "blocks") if data.get(key) is not None}
    return Projection(**{**data, **pairs})


def _layer_from_dict(data: dict[str, Any]) -> LayerStructure:
    attn = dict(data["attention"])
    for role in ("q", "k", "v", "o"):
        attn[role] = _projection_from_dict(attn[role])
    attn["rotary"] = Rotary(**attn["rotary"]) if attn.get("rotary") else None
    for norm in ("q_norm", "k_norm"):
        attn[norm] = HeadNorm(**attn[norm]) if attn.get(norm) else None
    attn["alibi_slopes"] = tuple(attn["alibi_slopes"]) if attn.get("alibi_slopes") else None
    mlp = dict(data["mlp"])
    for role in ("up", "down"):
        mlp[role] = _projection_from_dict(mlp[role])
    mlp["gate"] = _projection_from_dict(mlp["gate"]) if mlp.get("gate") else None
    return LayerStructure(
        index=data["index"],
        module=data["module"],
        attention=AttentionStructure(**attn),
        mlp=MLPStructure(**mlp),
    )


# Graph-specific fields (node names, the attention kernel chosen) do not change what a predictor means for a model;
# the weight digest has its own parts in the fingerprint.
_CAPTURE_ONLY_FIELDS = {"node", "core", "core_node", "mask_node", "mask_fill", "context_node", "intermediate_node",
                        "cos_node", "sin_node", "heads_axis", "fingerprint", "weights_digest"}


# Fields added after predictors were saved, with their defaults: absent there, they leave the architecture hash as
# it was.
_OMITTED_AT_DEFAULT = {"q_norm": None, "k_norm": None, "alibi_slopes": None, "softcap": None, "interleaved": False,
                       "blocks": None}


def _architecture_view(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _architecture_view(v) for k, v in sorted(value.items())
                if k not in _CAPTURE_ONLY_FIELDS and not (k in _OMITTED_AT_DEFAULT and v == _OMITTED_AT_DEFAULT[k])}
    if isinstance(value, (list, tuple)):
        return [_architecture_view(v) for v in value]
    return value


FINGERPRINT_HEX = 16  # hex digits kept of each sha256: 64 bits tell models apart
CONFIG_ONLY = "config-only"


@dataclass(frozen=True)
class Fingerprint:
    """The parts of a fingerprint, ``<architecture>.<values>.<signs>.<dtype>`` (``<architecture>.config-only`` for a
    model without weights).

    ``values`` hashes a strided sample of every weight as held, so it changes with the dtype; ``signs`` hashes the
    signs of the same sample, which no cast between float dtypes changes (rounding keeps the sign, and an underflow
    keeps a signed zero). So the same checkpoint in float32, float16 and bfloat16 has one architecture and one
    ``signs``, and a predictor made in one dtype is recognised in another.
    """

    architecture: str | None  # None when not known yet: the weights are read before the graph is captured
    values: str | None  # None: a model built from a config, on the meta device
    signs: str | None
    dtype: str | None

    def __str__(self) -> str:
        weights = CONFIG_ONLY if self.values is None else f"{self.values}.{self.signs}.{self.dtype}"
        return f"{self.architecture}.{weights}"

    @classmethod
    def parse(cls, text: str, *, what: str) -> Fingerprint:
        parts = text.split(".") if isinstance(text, str) else []
        if len(parts) == 2 and parts[1] == CONFIG_ONLY:
            return cls(parts[0], None, None, None)
        if len(parts) == 4:
            return cls(*parts)
        raise FingerprintMismatch(f"{what} carries a fingerprint {text!r} of a form this shadowfx does not write "
                                  "(made by an older version?); re-run calibration and predictor training for this "
                                  "model")

    @classmethod
    def of(cls, architecture: str | None, digest: str | None) -> Fingerprint:
        """From the architecture hash and a :func:`weights_digest`."""
        if digest is None:
            return cls(architecture, None, None, None)
        dtype, values, signs = digest.split(":")
        return cls(architecture, values[:FINGERPRINT_HEX], signs[:FINGERPRINT_HEX], dtype)

    @classmethod
    def of_weights(cls, model: nn.Module) -> Fingerprint:
        """The weights' part of the fingerprint, read from ``model`` before its graph is captured."""
        return cls.of(None, weights_digest(model))

    def differences(self, other: Fingerprint) -> list[str]:
        """What tells ``self`` from ``other``: "architecture" (when both know it), "weights", "dtype"."""
        found = []
        if None not in (self.architecture, other.architecture) and self.architecture != other.architecture:
            found.append("architecture")
        if (self.values is None) != (other.values is None) or (
                self.values is not None and (self.values != other.values if self.dtype == other.dtype
                                             else self.signs != other.signs)):
            found.append("weights")
        if None not in (self.dtype, other.dtype) and self.dtype != other.dtype:
            found.append("dtype")
        return found


def compute_fingerprint(structure: DecoderStructure) -> str:
    """The :class:`Fingerprint` string: sha256 of the architecture (without capture-specific node names), then the
    parts of the weight digest."""
    view = _architecture_view({f.name: getattr(structure, f.name) for f in fields(structure)} | {
        "layers": [asdict(layer) for layer in structure.layers],
        "lm_head": asdict(structure.lm_head),
    })
    architecture = hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:FINGERPRINT_HEX]
    return str(Fingerprint.of(architecture, structure.weights_digest))


def weights_digest(model: nn.Module, samples_per_tensor: int = 4096) -> str | None:
    """``<dtype>:<values>:<signs>``: the floating dtypes of the weights (``+``-joined when mixed), the sha256 of each
    tensor's name, shape, dtype and an evenly strided sample of its values, and the sha256 of the same samples'
    names, shapes and signs (the part no change of dtype alters).

    Sampling keeps this cheap on billion-parameter models while any retrained or fine-tuned checkpoint changes it.
    Returns None for a model on the meta device (built from a config only).
    """
    values, signs = hashlib.sha256(), hashlib.sha256()
    dtypes = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:
            return None
        if tensor.is_floating_point():
            dtypes.add(str(tensor.dtype).removeprefix("torch."))
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride].to("cpu", torch.float32).contiguous()
        values.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        values.update(sample.numpy().tobytes())
        signs.update(f"{name}:{tuple(tensor.shape)}".encode())
        signs.update(sample.signbit().numpy().tobytes())
    return f"{'+'.join(sorted(dtypes)) or 'none'}:{values.hexdigest()}:{signs.hexdigest()}"


class DtypeWarning(UserWarning):
    """An artifact made for the same model (architecture and weights) held in another dtype."""


def check_fingerprint(expected: str, structure: DecoderStructure, *, what: str) -> None:
    """Raise :class:`FingerprintMismatch` when ``what`` was made for a model other than ``structure``'s, naming what
    differs; warn (:class:`DtypeWarning`) when only the dtype does."""
    made = Fingerprint.parse(expected, what=what)
    here = Fingerprint.parse(structure.fingerprint, what="this model")
    differences = made.differences(here)
    if {"architecture", "weights"} & set(differences):
        other = " and ".join({"architecture": "another architecture", "weights": "other weights",
                              "dtype": f"another dtype ({made.dtype}, not {here.dtype})"}[d] for d in differences)
        raise FingerprintMismatch(
            f"{what} was made for a model with {other} (fingerprint {expected}; this {structure.model_class} with "
            f"{structure.num_layers} layers has {structure.fingerprint}); re-run calibration and predictor training "
            "for this model"
        )
    if differences:
        warnings.warn(f"{what} was made with the model in {made.dtype}; this model holds its weights in {here.dtype} "
                      "(same architecture and weights), so it is used as it is; for scores fitted to this dtype, "
                      f"calibrate and train with --dtype {here.dtype}", DtypeWarning, stacklevel=2)
