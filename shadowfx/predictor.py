"""Shadow predictors: from layer 0's attention context to head and neuron scores for every later layer.

Any ``nn.Module`` that maps the context ``[B, E]`` to :class:`Scores` and carries the ``fingerprint`` of the model it
was made for can drive :func:`shadowfx.transform`. :class:`ShadowPredictor` is ShadowLLM's: the input is min-max
scaled per sample, then one MLP predicts all layers' head scores and another all layers' neuron scores (optionally
one score per block of contiguous neurons). Scores are higher for more important units; only their order within
(scope "per_layer") or across (scope "global") layers matters.

Two more kinds share the file format (``shadow_predictor.{safetensors,json}`` with a ``kind`` field in the JSON):
:class:`LayerwisePredictor` (the DejaVu-style baseline: small MLPs per layer, each reading that layer's own attention
or MLP input as the layer runs) and :class:`StaticScores` (input-independent scores). All three drive
:func:`shadowfx.transform`; :func:`save_predictor` and :func:`load_predictor` handle all three.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shadowfx.structure import DecoderStructure, check_fingerprint

PREDICTOR_WEIGHTS = "shadow_predictor.safetensors"
PREDICTOR_CONFIG = "shadow_predictor.json"


class Scores(NamedTuple):
    """Importance of query heads ``[B, L - 1, H]`` and MLP neurons ``[B, L - 1, F]`` of layers 1..L-1."""

    heads: torch.Tensor
    neurons: torch.Tensor


class PredictorError(ValueError):
    """A predictor that cannot be used with this model, or none where one is needed."""


@dataclass(frozen=True)
class SparseShape:
    """The per-layer widths a predictor scores, read from a DecoderStructure (layers 1..L-1)."""

    input_size: int
    sparse_layers: int
    num_heads: int
    intermediate_size: int

    @classmethod
    def of(cls, structure: DecoderStructure) -> SparseShape:
        later = structure.layers[1:]
        if not later:
            raise PredictorError(f"{structure.model_class} has one layer; layer 0 stays dense, so nothing can be sparse")
        heads = {layer.attention.num_heads for layer in later}
        widths = {layer.mlp.intermediate_size for layer in later}
        if len(heads) != 1 or len(widths) != 1:
            raise PredictorError(f"layers 1..{structure.num_layers - 1} differ in heads {sorted(heads)} or MLP widths "
                                 f"{sorted(widths)}; one predictor output layout needs them equal")
        return cls(structure.predictor_input_size, len(later), heads.pop(), widths.pop())

    @classmethod
    def layerwise(cls, structure: DecoderStructure) -> SparseShape:
        """The shape of a layerwise predictor, which reads the layers' hidden inputs (width E) instead."""
        return replace(cls.of(structure), input_size=structure.hidden_size)


def minmax_scale(context: torch.Tensor) -> torch.Tensor:
    """Scale each row to [0, 1] (ShadowLLM's input normalisation); a constant row maps to zeros."""
    low = context.amin(dim=-1, keepdim=True)
    span = context.amax(dim=-1, keepdim=True) - low
    return (context - low) / torch.where(span > 0, span, torch.ones_like(span))


KINDS = ("shadowllm", "dejavu", "static")


# ---- files shared by every kind ------------------------------------------------------------------------------------
def _write_files(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the weights and the JSON config; each goes to a temporary name first, so a crash leaves the old pair."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, meta = directory / PREDICTOR_WEIGHTS, directory / PREDICTOR_CONFIG
    tmp_weights, tmp_meta = (path.with_name(path.name + ".tmp") for path in (weights, meta))
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp_weights))
    tmp_meta.write_text(json.dumps(config, indent=2))
    tmp_weights.replace(weights)
    tmp_meta.replace(meta)
    return weights


def _read_config(directory: Path) -> dict:
    meta = directory / PREDICTOR_CONFIG
    if not meta.is_file():
        raise PredictorError(
            f"no shadow predictor in {directory} (expected {PREDICTOR_CONFIG} and {PREDICTOR_WEIGHTS}); pass "
            "predictor=... to transform(), or save one there with ShadowPredictor.save(directory)"
        )
    try:
        config = json.loads(meta.read_text())
    except (OSError, ValueError) as error:
        raise PredictorError(f"{meta} is not a readable shadow predictor config: {error}") from error
    if not isinstance(config, dict):
        raise PredictorError(f"{meta} is not a readable shadow predictor config: not a JSON object")
    return config


def _parse(directory: Path, read):
    """Apply ``read`` to the config, turning a missing or malformed field into a PredictorError."""
    try:
        return read()
    except (ValueError, KeyError, TypeError) as error:
        raise PredictorError(f"{directory / PREDICTOR_CONFIG} is not a readable shadow predictor config: "
                             f"{type(error).__name__}: {error}") from error


def _load_weights(module: nn.Module, directory: Path) -> None:
    try:
        module.load_state_dict(load_file(str(directory / PREDICTOR_WEIGHTS)))
    except (OSError, RuntimeError) as error:
        raise PredictorError(f"cannot read the predictor weights in {directory}: {error}") from error


def _seeded(seed: int, build):
    """Build a module with parameters drawn from ``seed`` without disturbing the global generator."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(generator_state)


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


class _PredictorFiles(nn.Module):
    """``save`` and ``load`` shared by the predictor kinds (``shadow_predictor.{safetensors,json}``, kind in the JSON)."""

    def save(self, directory: str | Path) -> Path:
        """Write ``shadow_predictor.{safetensors,json}`` into ``directory`` (next to the checkpoint by convention)."""
        return _write_files(directory, self.config(), self.state_dict())

    @classmethod
    def load(cls, directory: str | Path, structure: DecoderStructure) -> nn.Module:
        """Load the predictor saved in ``directory``; refuse one of another kind or made for another model."""
        module = load_predictor(directory, structure)
        if not isinstance(module, cls):
            raise PredictorError(f"{directory} holds a {_kind_of(module)!r} predictor, not a {cls.__name__}")
        return module


class ShadowPredictor(_PredictorFiles):
    """ShadowLLM's predictor: ``E -> hidden -> (L-1)*H`` for heads and ``E -> hidden -> (L-1)*F/b`` for neurons.

    With ``neuron_block`` b > 1 the neuron MLP scores blocks of b contiguous neurons (a b-times smaller output layer,
    trained on the block means of the targets); ``forward`` still returns one score per neuron, each block's score
    repeated over its neurons.
    """

    def __init__(self, shape: SparseShape, fingerprint: str, *, hidden: int = 1024, neuron_block: int = 1) -> None:
        super().__init__()
        if hidden < 1:
            raise PredictorError(f"hidden must be >= 1, got {hidden}")
        if neuron_block < 1 or shape.intermediate_size % neuron_block:
            raise PredictorError(f"neuron_block must be a positive divisor of the MLP width "
                                 f"{shape.intermediate_size}, got {neuron_block}")
        self.shape = shape
        self.fingerprint = fingerprint
        self.hidden = hidden
        self.neuron_block = neuron_block
        self.heads = _mlp(shape.input_size, hidden, shape.sparse_layers * shape.num_heads)
        self.neurons = _mlp(shape.input_size, hidden, shape.sparse_layers * self.neuron_blocks)

    @property
    def neuron_blocks(self) -> int:
        """Neuron scores predicted per layer: F / neuron_block."""
        return self.shape.intermediate_size // self.neuron_block

    @classmethod
    def for_structure(cls, structure: DecoderStructure, *, hidden: int = 1024, neuron_block: int = 1,
                      seed: int = 0) -> ShadowPredictor:
        """An untrained predictor with the output layout of ``structure`` (training comes from calibration)."""
        shape = SparseShape.of(structure)
        return _seeded(seed, lambda: cls(shape, structure.fingerprint, hidden=hidden, neuron_block=neuron_block))

    def _scaled(self, context: torch.Tensor) -> torch.Tensor:
        return minmax_scale(context.float()).to(self.heads[0].weight.dtype)

    def head_scores(self, context: torch.Tensor) -> torch.Tensor:
        """Head scores ``[B, L - 1, H]`` from the raw context ``[B, E]``."""
        return self.heads(self._scaled(context)).view(context.shape[0], self.shape.sparse_layers,
                                                      self.shape.num_heads)

    def block_scores(self, context: torch.Tensor) -> torch.Tensor:
        """Neuron-block scores ``[B, L - 1, F / neuron_block]`` (per neuron when neuron_block is 1)."""
        return self.neurons(self._scaled(context)).view(context.shape[0], self.shape.sparse_layers,
                                                        self.neuron_blocks)

    def forward(self, context: torch.Tensor) -> Scores:
        x = self._scaled(context)
        batch = context.shape[0]
        neurons = self.neurons(x).view(batch, self.shape.sparse_layers, self.neuron_blocks)
        if self.neuron_block > 1:
            neurons = neurons.repeat_interleave(self.neuron_block, dim=-1)
        return Scores(heads=self.heads(x).view(batch, self.shape.sparse_layers, self.shape.num_heads),
                      neurons=neurons)

    # ---- files ---------------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"kind": "shadowllm", "fingerprint": self.fingerprint, "hidden": self.hidden,
                "neuron_block": self.neuron_block, "shape": vars(self.shape)}

    @classmethod
    def load(cls, directory: str | Path, structure: DecoderStructure) -> ShadowPredictor:
        """Load the predictor saved in ``directory``; refuse one made for another model."""
        directory = Path(directory)
        config = _read_config(directory)
        kind = config.get("kind", "shadowllm")
        if kind != "shadowllm":
            raise PredictorError(f"{directory} holds a {kind!r} predictor, not a ShadowPredictor; load it with "
                                 "shadowfx.predictor.load_predictor(directory, structure)")
        shape, fingerprint, hidden, block = _parse(directory, lambda: (
            SparseShape(**config["shape"]), str(config["fingerprint"]), int(config["hidden"]),
            int(config.get("neuron_block", 1))))
        check_fingerprint(fingerprint, structure, what=f"the shadow predictor in {directory}")
        predictor = cls(shape, fingerprint, hidden=hidden, neuron_block=block)
        _load_weights(predictor, directory)
        return predictor.eval()


class ScaledMLP(nn.Sequential):
    """``E -> hidden -> outputs`` on the min-max scaled input: one layer's predictor in a :class:`LayerwisePredictor`."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(minmax_scale(x.float()).to(self[0].weight.dtype))


class LayerwisePredictor(_PredictorFiles):
    """The DejaVu-style baseline: per layer l >= 1, ``E -> hidden -> H`` from the input of layer l's attention and
    ``E -> hidden -> F`` from the input of layer l's MLP (each min-max scaled per row).

    The inputs are what DejaVu's predictors read (the attention block's and the MLP block's input; here the
    normalised one that the q and up projections take), so the predictor runs causally inside the sparse model: each
    layer is scored from the states the sparse earlier layers produced, and :func:`shadowfx.transform` places one
    predictor and one selection before each later layer's attention and MLP. (ShadowLLM's accuracy harness fed each
    layer's attention *output* from a dense forward instead, an oracle no sparse model has.) ``forward`` takes every
    layer's inputs ``[B, L, E]`` (layer 0's are ignored), as calibration traces hold them.
    """

    def __init__(self, shape: SparseShape, fingerprint: str, *, hidden: int = 1024) -> None:
        super().__init__()
        if hidden < 1:
            raise PredictorError(f"hidden must be >= 1, got {hidden}")
        self.shape = shape
        self.fingerprint = fingerprint
        self.hidden = hidden
        self.heads = nn.ModuleList(ScaledMLP(shape.input_size, hidden, shape.num_heads)
                                   for _ in range(shape.sparse_layers))
        self.neurons = nn.ModuleList(ScaledMLP(shape.input_size, hidden, shape.intermediate_size)
                                     for _ in range(shape.sparse_layers))

    @classmethod
    def for_structure(cls, structure: DecoderStructure, *, hidden: int = 1024, seed: int = 0) -> LayerwisePredictor:
        shape = SparseShape.layerwise(structure)
        return _seeded(seed, lambda: cls(shape, structure.fingerprint, hidden=hidden))

    def _apply(self, mlps: nn.ModuleList, layer_inputs: torch.Tensor, what: str) -> torch.Tensor:
        want = (self.shape.sparse_layers + 1, self.shape.input_size)
        if layer_inputs.dim() != 3 or tuple(layer_inputs.shape[1:]) != want:
            raise PredictorError(f"a layerwise (DejaVu-style) predictor reads every layer's {what} input "
                                 f"[B, {want[0]}, {want[1]}], got shape {tuple(layer_inputs.shape)}")
        return torch.stack([mlp(layer_inputs[:, i + 1]) for i, mlp in enumerate(mlps)], 1)

    def head_scores(self, attention_inputs: torch.Tensor) -> torch.Tensor:
        """Head scores ``[B, L - 1, H]`` from every layer's attention input ``[B, L, E]``."""
        return self._apply(self.heads, attention_inputs, "attention")

    def block_scores(self, mlp_inputs: torch.Tensor) -> torch.Tensor:
        """Neuron scores ``[B, L - 1, F]`` from every layer's MLP input ``[B, L, E]`` (named like ShadowPredictor's;
        a layerwise predictor has no blocks)."""
        return self._apply(self.neurons, mlp_inputs, "MLP")

    def forward(self, attention_inputs: torch.Tensor, mlp_inputs: torch.Tensor) -> Scores:
        return Scores(heads=self.head_scores(attention_inputs), neurons=self.block_scores(mlp_inputs))

    def config(self) -> dict:
        return {"kind": "dejavu", "fingerprint": self.fingerprint, "hidden": self.hidden, "shape": vars(self.shape)}


class StaticScores(_PredictorFiles):
    """Scores that ignore the input: an aggregate criterion, a random ranking, or the mean of a predictor's targets.

    Plugs into :func:`shadowfx.transform` like any predictor, so static selection is compared on equal terms.
    """

    def __init__(self, heads: torch.Tensor, neurons: torch.Tensor, fingerprint: str) -> None:
        super().__init__()
        if heads.dim() != 2 or neurons.dim() != 2 or heads.shape[0] != neurons.shape[0]:
            raise PredictorError(f"static scores must be heads [L - 1, H] and neurons [L - 1, F], got shapes "
                                 f"{tuple(heads.shape)} and {tuple(neurons.shape)}")
        self.register_buffer("head_scores", heads.detach().float().clone())  # [L - 1, H]
        self.register_buffer("neuron_scores", neurons.detach().float().clone())  # [L - 1, F]
        self.fingerprint = fingerprint

    @classmethod
    def random(cls, structure: DecoderStructure, seed: int) -> StaticScores:
        shape = SparseShape.of(structure)
        generator = torch.Generator().manual_seed(seed)
        return cls(torch.rand(shape.sparse_layers, shape.num_heads, generator=generator),
                   torch.rand(shape.sparse_layers, shape.intermediate_size, generator=generator),
                   structure.fingerprint)

    def forward(self, context: torch.Tensor, *other_inputs: torch.Tensor) -> Scores:
        """The same scores for every row of ``context``; other inputs (a layerwise predictor's) are ignored too."""
        batch = context.shape[0]
        return Scores(self.head_scores.expand(batch, -1, -1), self.neuron_scores.expand(batch, -1, -1))

    def config(self) -> dict:
        layers, heads = self.head_scores.shape
        return {"kind": "static", "fingerprint": self.fingerprint,
                "shape": {"sparse_layers": layers, "num_heads": heads,
                          "intermediate_size": self.neuron_scores.shape[1]}}


def _kind_of(module: nn.Module) -> str:
    if isinstance(module, ShadowPredictor):
        return "shadowllm"
    if isinstance(module, LayerwisePredictor):
        return "dejavu"
    if isinstance(module, StaticScores):
        return "static"
    return type(module).__name__


def save_predictor(module: nn.Module, directory: str | Path) -> Path:
    """Save any of the three kinds into ``directory`` (``shadow_predictor.{safetensors,json}``, kind in the JSON)."""
    if not isinstance(module, _PredictorFiles):
        raise PredictorError(f"cannot save a {type(module).__name__}; save_predictor handles ShadowPredictor, "
                             "LayerwisePredictor and StaticScores")
    return module.save(directory)


def load_predictor(directory: str | Path, structure: DecoderStructure) -> nn.Module:
    """Load the predictor saved in ``directory``, whatever its kind; refuse one made for another model
    (:class:`~shadowfx.structure.FingerprintMismatch`)."""
    directory = Path(directory)
    config = _read_config(directory)
    kind = config.get("kind", "shadowllm")
    if kind == "shadowllm":
        return ShadowPredictor.load(directory, structure)
    if kind not in KINDS:
        raise PredictorError(f"{directory / PREDICTOR_CONFIG} names an unknown predictor kind {kind!r}; "
                             f"expected one of {', '.join(KINDS)}")
    fingerprint = _parse(directory, lambda: str(config["fingerprint"]))
    check_fingerprint(fingerprint, structure, what=f"the {kind} predictor in {directory}")
    if kind == "dejavu":
        shape, hidden = _parse(directory, lambda: (SparseShape(**config["shape"]), int(config["hidden"])))
        module = LayerwisePredictor(shape, fingerprint, hidden=hidden)
    else:
        layers, heads, width = _parse(directory, lambda: (int(config["shape"]["sparse_layers"]),
                                                          int(config["shape"]["num_heads"]),
                                                          int(config["shape"]["intermediate_size"])))
        module = StaticScores(torch.zeros(layers, heads), torch.zeros(layers, width), fingerprint)
    _load_weights(module, directory)
    return module.eval()
