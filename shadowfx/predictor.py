"""Shadow predictors: from layer 0's attention context to head and neuron scores for every later layer.

Any ``nn.Module`` that maps the context ``[B, E]`` to :class:`Scores` and carries the ``fingerprint`` of the model it
was made for can drive :func:`shadowfx.transform`. :class:`ShadowPredictor` is ShadowLLM's: the input is min-max
scaled per sample, then one MLP predicts all layers' head scores and another all layers' neuron scores. Scores are
higher for more important units; only their order within (scope "per_layer") or across (scope "global") layers
matters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def minmax_scale(context: torch.Tensor) -> torch.Tensor:
    """Scale each row to [0, 1] (ShadowLLM's input normalisation); a constant row maps to zeros."""
    low = context.amin(dim=-1, keepdim=True)
    span = context.amax(dim=-1, keepdim=True) - low
    return (context - low) / torch.where(span > 0, span, torch.ones_like(span))


class ShadowPredictor(nn.Module):
    """ShadowLLM's predictor: ``E -> hidden -> (L-1)*H`` for heads and ``E -> hidden -> (L-1)*F`` for neurons."""

    def __init__(self, shape: SparseShape, fingerprint: str, *, hidden: int = 1024) -> None:
        super().__init__()
        self.shape = shape
        self.fingerprint = fingerprint
        self.hidden = hidden
        self.heads = nn.Sequential(nn.Linear(shape.input_size, hidden), nn.ReLU(),
                                   nn.Linear(hidden, shape.sparse_layers * shape.num_heads))
        self.neurons = nn.Sequential(nn.Linear(shape.input_size, hidden), nn.ReLU(),
                                     nn.Linear(hidden, shape.sparse_layers * shape.intermediate_size))

    @classmethod
    def for_structure(cls, structure: DecoderStructure, *, hidden: int = 1024, seed: int = 0) -> ShadowPredictor:
        """An untrained predictor with the output layout of ``structure`` (training comes from calibration)."""
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return cls(SparseShape.of(structure), structure.fingerprint, hidden=hidden)
        finally:
            torch.random.set_rng_state(generator_state)

    def forward(self, context: torch.Tensor) -> Scores:
        x = minmax_scale(context.float()).to(self.heads[0].weight.dtype)
        batch = context.shape[0]
        return Scores(
            heads=self.heads(x).view(batch, self.shape.sparse_layers, self.shape.num_heads),
            neurons=self.neurons(x).view(batch, self.shape.sparse_layers, self.shape.intermediate_size),
        )

    # ---- files ---------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``shadow_predictor.{safetensors,json}`` into ``directory`` (next to the checkpoint by convention)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"kind": "shadowllm", "fingerprint": self.fingerprint, "hidden": self.hidden,
                  "shape": vars(self.shape)}
        weights, meta = directory / PREDICTOR_WEIGHTS, directory / PREDICTOR_CONFIG
        tmp_weights, tmp_meta = (path.with_name(path.name + ".tmp") for path in (weights, meta))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp_weights))
        tmp_meta.write_text(json.dumps(config, indent=2))
        tmp_weights.replace(weights)
        tmp_meta.replace(meta)
        return weights

    @classmethod
    def load(cls, directory: str | Path, structure: DecoderStructure) -> ShadowPredictor:
        """Load the predictor saved in ``directory``; refuse one made for another model."""
        directory = Path(directory)
        meta = directory / PREDICTOR_CONFIG
        if not meta.is_file():
            raise PredictorError(
                f"no shadow predictor in {directory} (expected {PREDICTOR_CONFIG} and {PREDICTOR_WEIGHTS}); pass "
                "predictor=... to transform(), or save one there with ShadowPredictor.save(directory)"
            )
        try:
            config = json.loads(meta.read_text())
            shape = SparseShape(**config["shape"])
            fingerprint, hidden = config["fingerprint"], int(config["hidden"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PredictorError(f"{meta} is not a readable shadow predictor config: {error}") from error
        check_fingerprint(fingerprint, structure, what=f"the shadow predictor in {directory}")
        predictor = cls(shape, fingerprint, hidden=hidden)
        try:
            predictor.load_state_dict(load_file(str(directory / PREDICTOR_WEIGHTS)))
        except (OSError, RuntimeError) as error:
            raise PredictorError(f"cannot read the predictor weights in {directory}: {error}") from error
        return predictor.eval()
