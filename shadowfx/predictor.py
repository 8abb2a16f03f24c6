"""Shadow predictors: from layer 0's attention context to head and neuron scores for every later layer.

Any ``nn.Module`` that maps the context ``[B, E]`` to :class:`Scores` and carries the ``fingerprint`` of the model it
was made for can drive :func:`shadowfx.transform`. :class:`ShadowPredictor` is ShadowLLM's: the input is min-max
scaled per sample, then one MLP predicts all layers' head scores and another all layers' neuron scores (optionally
one score per block of contiguous neurons). Scores are higher for more important units; only their order within
(scope "per_layer") or across (scope "global") layers matters.

Two more kinds share the file format (a JSON config per kind and granularity, naming its safetensors weights file):
:class:`LayerwisePredictor` (the DejaVu-style baseline: small MLPs per layer, each reading that layer's own attention
or MLP input as the layer runs) and :class:`StaticScores` (input-independent scores). All three drive
:func:`shadowfx.transform`; :func:`save_predictor` and :func:`load_predictor` handle all three.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple, TypeVar, get_args

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from shadowfx.files import atomic_write, atomic_write_text
from shadowfx.ops import minmax_scale
from shadowfx.structure import DecoderStructure, check_fingerprint

T = TypeVar("T")


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


PredictorKind = Literal["shadowllm", "dejavu", "static"]
KINDS: tuple[PredictorKind, ...] = get_args(PredictorKind)


def seeded(seed: int, build: Callable[[], T]) -> T:
    """``build()`` with parameters drawn from ``seed``, leaving the global generator as it was."""
    with torch.random.fork_rng(devices=[]):  # modules are built on the CPU; other devices' generators stay untouched
        torch.manual_seed(seed)
        return build()


# ---- files shared by every kind ------------------------------------------------------------------------------------
# A directory holds any number of predictors, one per kind and granularity, and names one of them the default (what
# transform(model) loads). Each predictor is one unit: a JSON config (``shadow_predictor.<kind>.<granularity>.json``)
# that names its weights file by content (``shadow_predictor.<kind>.<granularity>.<sha256 prefix>.safetensors``) and
# records the file's sha256. The weights are written first under a new name, then the config is replaced in one step,
# then the default, then weights no config names are removed: a crash at any point leaves complete predictors.
DEFAULT_PREDICTOR = "shadow_predictor.json"  # {"default": {"kind": ..., "granularity": ...}}


@dataclass(frozen=True, order=True)
class SavedPredictor:
    """One predictor in a directory, named by its kind and the granularity it was trained for."""

    kind: str
    granularity: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS or not self.granularity.isalpha():  # both become parts of file names
            raise PredictorError(f"a saved predictor needs a kind among {', '.join(KINDS)} and a granularity of "
                                 f"letters (prompt, token), got {self.kind!r} and {self.granularity!r}")

    def __str__(self) -> str:
        return f"{self.kind}/{self.granularity}"

    @property
    def stem(self) -> str:
        return f"shadow_predictor.{self.kind}.{self.granularity}"

    @property
    def config_name(self) -> str:
        return f"{self.stem}.json"

    def weights_name(self, digest: str) -> str:
        return f"{self.stem}.{digest[:16]}.safetensors"


def saved_predictors(directory: str | Path) -> list[SavedPredictor]:
    """The predictors saved in ``directory``, sorted."""
    found = []
    for path in Path(directory).glob("shadow_predictor.*.*.json"):
        parts = path.name.split(".")
        if len(parts) == 4 and parts[1] in KINDS and parts[2].isalpha():
            found.append(SavedPredictor(parts[1], parts[2]))
    return sorted(found)


def default_predictor(directory: str | Path) -> SavedPredictor | None:
    """The predictor ``transform(model)`` loads from ``directory``; None when none is named."""
    path = Path(directory) / DEFAULT_PREDICTOR
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())["default"]
        return SavedPredictor(str(entry["kind"]), str(entry["granularity"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PredictorError(f"{path} does not name a default predictor ({type(error).__name__}: {error}; one "
                             "written by an older shadowfx holds a whole predictor); train the predictor again "
                             "with shadowfx train, or save it with save_predictor(module, directory)") from error


def _listing(saved: list[SavedPredictor], default: SavedPredictor | None) -> str:
    return ", ".join(f"{p} (default)" if p == default else str(p) for p in saved) or "none"


def _write_files(directory: Path, unit: SavedPredictor, config: dict, tensors: dict[str, torch.Tensor], *,
                 default: bool | None, dtype: torch.dtype | None) -> Path:
    def stored(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    data = save_tensors({k: stored(v.detach()).contiguous() for k, v in tensors.items()})
    digest = hashlib.sha256(data).hexdigest()
    weights = atomic_write(directory / unit.weights_name(digest), lambda temporary: temporary.write_bytes(data))
    meta = atomic_write_text(directory / unit.config_name, json.dumps(
        config | {"granularity": unit.granularity, "weights": {"file": weights.name, "sha256": digest}}, indent=2))
    if default is None:  # the first predictor saved in a directory becomes its default
        try:
            default = default_predictor(directory) not in saved_predictors(directory)
        except PredictorError:  # an unreadable (older) default file is replaced
            default = True
    if default:
        atomic_write_text(directory / DEFAULT_PREDICTOR, json.dumps({"default": vars(unit)}, indent=2))
    for stale in directory.glob(f"{unit.stem}.*.safetensors"):
        if stale != weights:
            stale.unlink(missing_ok=True)
    return meta


def _choose(directory: Path, kind: str | None, granularity: str | None) -> SavedPredictor:
    """The saved predictor of ``kind`` and ``granularity`` (either may be None: any); the default where several or
    none is asked for."""
    if kind is not None and kind not in KINDS:
        raise PredictorError(f"unknown predictor kind {kind!r}; expected one of {', '.join(KINDS)}")
    saved = saved_predictors(directory)
    default = default_predictor(directory)
    wanted = [p for p in saved if kind in (None, p.kind) and granularity in (None, p.granularity)]
    if default in wanted:
        return default
    asked = "/".join((kind or "*", granularity or "*"))
    if (kind, granularity) != (None, None) and len(wanted) == 1:
        return wanted[0]
    if not saved:
        problem = f"no shadow predictor in {directory}"
    elif (kind, granularity) == (None, None):
        problem = (f"{directory} names no default shadow predictor" if default is None
                   else f"the default shadow predictor of {directory}, {default}, is not there")
    elif not wanted:
        problem = f"{directory} holds no {asked} shadow predictor"
    else:
        problem = f"{directory} holds several {asked} shadow predictors and none of them is the default"
    raise PredictorError(
        f"{problem} (it holds: {_listing(saved, default)}); "
        + ("pick one with load_predictor(directory, structure, kind=..., granularity=...), or make one the default "
           "with shadowfx train --default" if saved else
           "pass predictor=... to transform(), or train one there with shadowfx train --out, or save one with "
           "save_predictor(module, directory)"))


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PredictorError(f"{path} is not a readable shadow predictor config: {error}; save the predictor "
                             "again") from error
    if not isinstance(config, dict):
        raise PredictorError(f"{path} is not a readable shadow predictor config: not a JSON object; save the "
                             "predictor again")
    return config


def _read_weights(directory: Path, meta: Path, config: dict) -> dict[str, torch.Tensor]:
    """The tensors of the weights file ``config`` names, refused unless its sha256 is the one recorded."""
    record = config.get("weights")
    if not isinstance(record, dict) or not isinstance(record.get("file"), str) or "sha256" not in record:
        raise PredictorError(f"{meta} names no weights file with its sha256 (saved by an older shadowfx?); save the "
                             "predictor again (shadowfx train, or save_predictor)")
    path = directory / Path(record["file"]).name
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PredictorError(f"cannot read the predictor weights {path}: {error.strerror or error}; save the "
                             "predictor again") from error
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise PredictorError(f"the predictor weights {path} do not match the sha256 recorded in {meta} (the file was "
                             "changed or damaged after saving); save the predictor again")
    try:
        return load_tensors(data)
    except SafetensorError as error:
        raise PredictorError(f"{path} is not a readable safetensors file ({error}); save the predictor again") \
            from error


class _PredictorFiles(nn.Module):
    """Files shared by the predictor kinds: ``config()`` and ``from_config`` are each kind's only description of
    itself on disk; ``save`` and ``load`` are the same for all.

    ``granularity`` is the one the predictor was trained for ("prompt" or "token", set by training); it names the
    predictor's files beside its kind.
    """

    kind: ClassVar[PredictorKind]
    granularity: str = "prompt"

    def config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> _PredictorFiles:
        """An untrained module of the size ``config`` describes (its weights are loaded after)."""
        raise NotImplementedError

    def save(self, directory: str | Path, *, default: bool | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write the predictor into ``directory`` (next to the checkpoint by convention) under its kind and
        granularity, replacing only a predictor of the same kind and granularity; returns the config path.

        ``default`` makes it the one ``transform(model)`` loads (None: only if the directory names no default yet).
        ``dtype`` stores the weights in another dtype (float16 halves the files); loading casts them to the
        module's own dtype (float32), so what is loaded is the stored, rounded weights.
        """
        return _write_files(Path(directory), SavedPredictor(self.kind, self.granularity), self.config(),
                            self.state_dict(), default=default, dtype=dtype)

    @classmethod
    def load(cls, directory: str | Path, structure: DecoderStructure, *, granularity: str | None = None) -> nn.Module:
        """Load the predictor of this kind saved in ``directory`` (the default one where several are); refuse one
        made for another model."""
        return load_predictor(directory, structure, kind=cls.kind, granularity=granularity)


class ScaledMLP(nn.Sequential):
    """``E -> hidden -> outputs`` on the min-max scaled input: one output of a :class:`ShadowPredictor`, or one layer's
    predictor in a :class:`LayerwisePredictor` (exported as one ``shadowfx::shadow_mlp`` node)."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(minmax_scale(x.float()).to(self[0].weight.dtype))


class ShadowPredictor(_PredictorFiles):
    """ShadowLLM's predictor: ``E -> hidden -> (L-1)*H`` for heads and ``E -> hidden -> (L-1)*F/b`` for neurons.

    With ``neuron_block`` b > 1 the neuron MLP scores blocks of b contiguous neurons (a b-times smaller output layer,
    trained on the block means of the targets); ``forward`` still returns one score per neuron, each block's score
    repeated over its neurons.
    """

    kind = "shadowllm"

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
        self.heads = ScaledMLP(shape.input_size, hidden, shape.sparse_layers * shape.num_heads)
        self.neurons = ScaledMLP(shape.input_size, hidden, shape.sparse_layers * self.neuron_blocks)

    @property
    def neuron_blocks(self) -> int:
        """Neuron scores predicted per layer: F / neuron_block."""
        return self.shape.intermediate_size // self.neuron_block

    @classmethod
    def for_structure(cls, structure: DecoderStructure, *, hidden: int = 1024, neuron_block: int = 1,
                      seed: int = 0) -> ShadowPredictor:
        """An untrained predictor with the output layout of ``structure`` (training comes from calibration)."""
        shape = SparseShape.of(structure)
        return seeded(seed, lambda: cls(shape, structure.fingerprint, hidden=hidden, neuron_block=neuron_block))

    def head_scores(self, context: torch.Tensor) -> torch.Tensor:
        """Head scores ``[B, L - 1, H]`` from the raw context ``[B, E]``."""
        return self.heads(context).view(context.shape[0], self.shape.sparse_layers,
                                                      self.shape.num_heads)

    def block_scores(self, context: torch.Tensor) -> torch.Tensor:
        """Neuron-block scores ``[B, L - 1, F / neuron_block]`` (per neuron when neuron_block is 1)."""
        return self.neurons(context).view(context.shape[0], self.shape.sparse_layers,
                                                        self.neuron_blocks)

    def forward(self, context: torch.Tensor) -> Scores:
        batch = context.shape[0]
        neurons = self.neurons(context).view(batch, self.shape.sparse_layers, self.neuron_blocks)
        if self.neuron_block > 1:
            neurons = neurons.repeat_interleave(self.neuron_block, dim=-1)
        return Scores(heads=self.heads(context).view(batch, self.shape.sparse_layers, self.shape.num_heads),
                      neurons=neurons)

    # ---- files ---------------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"kind": self.kind, "fingerprint": self.fingerprint, "hidden": self.hidden,
                "neuron_block": self.neuron_block, "shape": vars(self.shape)}

    @classmethod
    def from_config(cls, config: dict) -> ShadowPredictor:
        return cls(SparseShape(**config["shape"]), str(config["fingerprint"]), hidden=int(config["hidden"]),
                   neuron_block=int(config["neuron_block"]))


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

    kind = "dejavu"

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
        return seeded(seed, lambda: cls(shape, structure.fingerprint, hidden=hidden))

    def _score_layers(self, mlps: nn.ModuleList, layer_inputs: torch.Tensor, what: str) -> torch.Tensor:
        want = (self.shape.sparse_layers + 1, self.shape.input_size)
        if layer_inputs.dim() != 3 or tuple(layer_inputs.shape[1:]) != want:
            raise PredictorError(f"a layerwise (DejaVu-style) predictor reads every layer's {what} input "
                                 f"[B, {want[0]}, {want[1]}], got shape {tuple(layer_inputs.shape)}")
        return torch.stack([mlp(layer_inputs[:, i + 1]) for i, mlp in enumerate(mlps)], 1)

    def head_scores(self, attention_inputs: torch.Tensor) -> torch.Tensor:
        """Head scores ``[B, L - 1, H]`` from every layer's attention input ``[B, L, E]``."""
        return self._score_layers(self.heads, attention_inputs, "attention")

    def block_scores(self, mlp_inputs: torch.Tensor) -> torch.Tensor:
        """Neuron scores ``[B, L - 1, F]`` from every layer's MLP input ``[B, L, E]`` (named like ShadowPredictor's;
        a layerwise predictor has no blocks)."""
        return self._score_layers(self.neurons, mlp_inputs, "MLP")

    def forward(self, attention_inputs: torch.Tensor, mlp_inputs: torch.Tensor) -> Scores:
        return Scores(heads=self.head_scores(attention_inputs), neurons=self.block_scores(mlp_inputs))

    def config(self) -> dict:
        return {"kind": self.kind, "fingerprint": self.fingerprint, "hidden": self.hidden, "shape": vars(self.shape)}

    @classmethod
    def from_config(cls, config: dict) -> LayerwisePredictor:
        return cls(SparseShape(**config["shape"]), str(config["fingerprint"]), hidden=int(config["hidden"]))


class StaticScores(_PredictorFiles):
    """Scores that ignore the input: an aggregate criterion, a random ranking, or the mean of a predictor's targets.

    Plugs into :func:`shadowfx.transform` like any predictor, so static selection is compared on equal terms.
    """

    kind = "static"

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
        return {"kind": self.kind, "fingerprint": self.fingerprint,
                "shape": {"sparse_layers": layers, "num_heads": heads,
                          "intermediate_size": self.neuron_scores.shape[1]}}

    @classmethod
    def from_config(cls, config: dict) -> StaticScores:
        shape = config["shape"]
        layers = int(shape["sparse_layers"])
        return cls(torch.zeros(layers, int(shape["num_heads"])), torch.zeros(layers, int(shape["intermediate_size"])),
                   str(config["fingerprint"]))


PREDICTOR_CLASSES: dict[PredictorKind, type[_PredictorFiles]] = {
    cls.kind: cls for cls in (ShadowPredictor, LayerwisePredictor, StaticScores)}


def save_predictor(module: nn.Module, directory: str | Path, *, default: bool | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Save any of the three kinds into ``directory`` (see :meth:`ShadowPredictor.save`)."""
    if not isinstance(module, _PredictorFiles):
        raise PredictorError(f"cannot save a {type(module).__name__}; save_predictor handles ShadowPredictor, "
                             "LayerwisePredictor and StaticScores")
    return module.save(directory, default=default, dtype=dtype)


def load_predictor(directory: str | Path, structure: DecoderStructure, *, kind: str | None = None,
                   granularity: str | None = None) -> nn.Module:
    """Load a predictor saved in ``directory``: the default one, or the one of ``kind`` and ``granularity`` (either
    may be left out where only one matches). Refuse one made for another model
    (:class:`~shadowfx.structure.FingerprintMismatch`) or whose weights are not the ones its config records."""
    directory = Path(directory)
    unit = _choose(directory, kind, granularity)
    meta = directory / unit.config_name
    config = _read_config(meta)
    if (config.get("kind"), config.get("granularity")) != (unit.kind, unit.granularity):
        raise PredictorError(f"{meta} describes a {config.get('kind')}/{config.get('granularity')} predictor, not "
                             f"the {unit} its name says (edited or renamed?); save the predictor again")
    try:
        module = PREDICTOR_CLASSES[unit.kind].from_config(config)
    except (ValueError, KeyError, TypeError) as error:
        raise PredictorError(f"{meta} is not a readable {unit.kind} predictor config: {type(error).__name__}: "
                             f"{error}; save the predictor again") from error
    module.granularity = unit.granularity
    check_fingerprint(module.fingerprint, structure, what=f"the {unit} predictor in {directory}")
    try:
        module.load_state_dict(_read_weights(directory, meta, config))
    except RuntimeError as error:  # tensors of other names or shapes than the config describes
        raise PredictorError(f"the weights of the {unit} predictor in {directory} do not fit its config: {error}; "
                             "save the predictor again") from error
    return module.eval()
