"""Run a directory written by :func:`shadowfx.export_onnx` in onnxruntime, with the PyTorch runtime's ``generate``.

Per prompt: the prefill gives the logits, the KV cache and the selection; the gather graph turns the selection into
the prompt's kept weights once; every decode step reads them. The KV cache and the kept weights stay onnxruntime
values bound through IOBinding, so a decode step copies in only the new token and the mask, and copies out only the
logits. Per token the decode graph selects again at every step and the cache stays complete. A dense export (the
model as it is, the baseline) runs its prefill and decode the same way, with no selection.

Before any session is made, the directory is checked: every graph file is there, parses, carries shadowfx metadata of
this export format and the same model fingerprint (that of the model given, when one is), names a weights file that
is there and long enough, and has a function body for every ``shadowfx`` node unless a kernel library for the domain
is given. Each problem is one :class:`OnnxLoadError` that names it and the fix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from shadowfx.onnx_export import FORMAT, GRAPH_FILES, LOGIT_POSITIONS, METADATA_PREFIX
from shadowfx.onnx_ops import DOMAIN
from shadowfx.ort_kernels import KernelBuildError, kernel_library
from shadowfx.runtimes.pytorch import PREFILLS, DecodePath, GenerationLoop, Granularity, InputError, Prefill
from shadowfx.selection import Selection, SparsityConfig, attention_and_mlp_bytes, per_row_copy_bytes
from shadowfx.structure import DecoderStructure, check_fingerprint

logger = logging.getLogger(__name__)


ELEMENT_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(double)": 8}
"""Bytes of one element of an onnxruntime tensor type (the float types a model's weights come in)."""


class OnnxLoadError(ValueError):
    """A directory that is not a usable shadowfx ONNX export for this model."""


def _read_graph(path: Path, kernels: bool) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The graph file without its weights, and its shadowfx metadata, checked (see the module docstring)."""
    if not path.is_file():
        raise OnnxLoadError(f"{path} is missing: the directory is not a complete shadowfx export; export it again "
                            "(shadowfx export MODEL_DIR --out DIR)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise OnnxLoadError(f"{path} is not a readable ONNX file (truncated or damaged: {error}); export it "
                            "again") from error
    metadata = {p.key[len(METADATA_PREFIX):]: p.value for p in proto.metadata_props
                if p.key.startswith(METADATA_PREFIX)}
    if "format" not in metadata:
        raise OnnxLoadError(f"{path} carries no shadowfx metadata: it was not written by shadowfx.export_onnx; "
                            "export the transformed model with it")
    if metadata["format"] != str(FORMAT):
        raise OnnxLoadError(f"{path} is export format {metadata['format']} (shadowfx {metadata.get('version')}), "
                            f"this shadowfx reads format {FORMAT}; export the model again with this version")
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            _check_external(path, ExternalDataInfo(tensor))
    used = {node.op_type for node in proto.graph.node if node.domain == DOMAIN}
    bodies = {function.name for function in proto.functions if function.domain == DOMAIN}
    if used - bodies and not kernels:
        raise OnnxLoadError(f"{path} has {DOMAIN} nodes without a function body: {', '.join(sorted(used - bodies))}; "
                            "the file was altered after export: export it again, or pass kernels= a library that "
                            f"implements the {DOMAIN} domain")
    return proto, metadata


def _check_external(graph: Path, info: ExternalDataInfo) -> None:
    data = (graph.parent / info.location).resolve()
    if data.parent != graph.parent.resolve():
        raise OnnxLoadError(f"{graph} reads weights from {info.location}, outside its directory; export it again")
    if not data.is_file():
        raise OnnxLoadError(f"{data} is missing: {graph.name} keeps its weights there; copy the whole export "
                            "directory, or export it again")
    if data.stat().st_size < info.offset + info.length:
        raise OnnxLoadError(f"{data} is truncated ({data.stat().st_size} bytes, {graph.name} reads up to "
                            f"{info.offset + info.length}); copy it again or export again")


def _kernel_library(kernels: str | Path | None) -> Path | None:
    """The kernel library ``kernels`` names; ``"auto"``: the built one, or None (the bodies) where it cannot be."""
    if kernels != "auto":
        return None if kernels is None else Path(kernels)
    try:
        return kernel_library()
    except KernelBuildError as error:
        logger.warning("no shadowfx kernel library (%s); onnxruntime runs the function bodies", error)
        return None


CARRIED_CONFIG_ENTRIES = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning",
                          "session.disable_prepacking", "session.set_denormal_as_zero")
"""The session config entries a decoder's sessions with the kernel library take from the caller's options: how the
threads wait and how the products run (onnxruntime lists no entries, so the known ones are asked for by name)."""


def _with_library(options: ort.SessionOptions | None, library: Path) -> ort.SessionOptions:
    """A new SessionOptions with ``library`` registered, carrying every setting of ``options`` that onnxruntime
    exposes as an attribute (threads, graph optimisation level, execution mode and order, profiling, logging, memory
    arena and patterns, deterministic compute); ``options`` itself is left as it is.

    onnxruntime's SessionOptions cannot be copied (it does not pickle) and cannot list what its methods set: of the
    session config entries, those of :data:`CARRIED_CONFIG_ENTRIES` carry over where set; the others, added
    initializers, free-dimension overrides, providers and custom op libraries registered on ``options`` do not.
    Registering on the caller's object instead would change it for its other uses (sessions made with it later would
    run the kernels), and a second decoder given it with kernels would fail (onnxruntime refuses a session whose
    options register the domain twice).
    """
    fresh = ort.SessionOptions()
    if options is not None:
        for name, attribute in vars(type(options)).items():
            if isinstance(attribute, property) and attribute.fset is not None:
                value = getattr(options, name)
                if value != getattr(fresh, name):
                    setattr(fresh, name, value)
        for key in CARRIED_CONFIG_ENTRIES:
            try:
                value = options.get_session_config_entry(key)
            except RuntimeError:  # not set
                continue
            fresh.add_session_config_entry(key, value)
    try:
        fresh.register_custom_ops_library(str(library))
    except Exception as error:  # onnxruntime raises its own exception types, not one base class
        raise OnnxLoadError(f"onnxruntime cannot load the kernel library {library}: {error}; give the "
                            "library shadowfx.ort_kernels.kernel_library() builds, or kernels=None") from error
    return fresh


@dataclass
class OnnxDecodeState:
    """A generation in progress: next-token logits [B, V], the mask, and the onnxruntime values decoding reads."""

    logits: torch.Tensor
    mask: torch.Tensor
    cache: list[ort.OrtValue]
    kept: list[ort.OrtValue]  # per prompt: the kept weights, gathered once


class OnnxDecoder(GenerationLoop):
    """The graphs of an export directory in onnxruntime sessions: ``__call__`` for logits, ``generate`` as
    :meth:`shadowfx.runtimes.pytorch.SparseDecoder.generate`.

    ``structure``: refuse a directory made for another model (its fingerprint is compared). ``session_options``
    and ``providers`` go to every session as given, except that with ``kernels`` the sessions get a new
    SessionOptions carrying the library and the attribute settings of ``session_options`` (not those made by its
    methods, such as config entries, which onnxruntime cannot read back; see :func:`_with_library`): the caller's
    object is never changed, and may be given to any number of decoders. ``kernels``: a native kernel library for
    the ``shadowfx`` domain, registered in every session: onnxruntime then runs its kernel for each node type it
    implements, the function bodies for the rest. ``"auto"``: the library :func:`shadowfx.ort_kernels.kernel_library`
    builds, or, where it cannot be built, the function bodies alone (with a logged warning saying why).
    ``self.kernels`` is the library in use, or None. The gather graph of a per-prompt export, which only copies a
    prompt's kept weights (``KeptRows``, ``KeptCols``), gets the library even without ``kernels``: the built one, as
    ``"auto"`` would (``self.gather_kernels``; None: the bodies). ``max_gathered_bytes`` bounds a per-prompt
    generation's copies of the kept weights, one per batch row (default: twice the size of the later layers'
    weights, so that two rows fit at any sparsity); a batch beyond it is refused, since the export has no decode
    that reads the full weights instead.
    """

    def __init__(self, directory: str | Path, *, structure: DecoderStructure | None = None,
                 session_options: ort.SessionOptions | None = None, providers: list | None = None,
                 kernels: str | Path | None = None, generation_config: object = None,
                 max_gathered_bytes: int | None = None) -> None:
        requested, kernels = kernels, _kernel_library(kernels)
        self.kernels = kernels
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise OnnxLoadError(f"{self.directory} is not a directory; give the folder shadowfx export wrote")
        probe = self.directory / "prefill.onnx"
        _, metadata = _read_graph(probe, kernels is not None)
        granularity = metadata.get("granularity")
        if granularity not in GRAPH_FILES:
            raise OnnxLoadError(f"{probe} names granularity {granularity!r}; export it again")
        self.granularity: Granularity | Literal["dense"] = granularity  # type: ignore[assignment]
        if metadata.get("prefill") not in PREFILLS:
            raise OnnxLoadError(f"{probe} names prefill {metadata.get('prefill')!r}; export it again")
        self.prefill: Prefill = metadata["prefill"]  # type: ignore[assignment]
        graphs = {name: _read_graph(self.directory / f"{name}.onnx", kernels is not None)[1]
                  for name in GRAPH_FILES[granularity]}
        fingerprints = {meta["fingerprint"] for meta in graphs.values()}
        if len(fingerprints) != 1:
            raise OnnxLoadError(f"the graphs in {self.directory} were exported from different models; export the "
                                "directory again from one")
        self.fingerprint = fingerprints.pop()
        if structure is not None:
            check_fingerprint(self.fingerprint, structure, what=f"the ONNX export in {self.directory}")
        self.structure = DecoderStructure.from_json(metadata["structure"])
        sparsity = json.loads(metadata["sparsity"])
        self.config = SparsityConfig(**sparsity) if sparsity is not None else None  # None: a dense export
        self.max_positions = json.loads(metadata["max_positions"])
        self.generation_config = generation_config
        options = _with_library(session_options, kernels) if kernels is not None else (
            session_options or ort.SessionOptions())
        graph_options = dict.fromkeys(graphs, options)
        self.gather_kernels = kernels
        if requested is None and "gather" in graphs:
            # the gather graph holds only the kept-weight copies, whose kernels are always the faster path ("auto"
            # has looked for the library already)
            self.gather_kernels = _kernel_library("auto")
            if self.gather_kernels is not None:
                graph_options["gather"] = _with_library(session_options, self.gather_kernels)
        self.sessions = {}
        for name in graphs:
            try:
                self.sessions[name] = ort.InferenceSession(str(self.directory / f"{name}.onnx"), graph_options[name],
                                                           providers=providers or ["CPUExecutionProvider"])
            except Exception as error:  # onnxruntime raises its own exception types, not one base class
                raise OnnxLoadError(f"onnxruntime cannot load {self.directory / name}.onnx: {error}") from error
        self.element_bytes = ELEMENT_BYTES[self.sessions["prefill"].get_outputs()[0].type]  # logits: the model's dtype
        self._takes_positions = LOGIT_POSITIONS in {i.name for i in self.sessions["prefill"].get_inputs()}
        if max_gathered_bytes is not None and max_gathered_bytes < 0:
            raise ValueError(f"max_gathered_bytes must be >= 0, got {max_gathered_bytes}")
        later_layers = sum(sum(attention_and_mlp_bytes(self.structure, layer, self.element_bytes))
                           for layer in self.structure.layers[1:])
        self.max_gathered_bytes = max_gathered_bytes if max_gathered_bytes is not None else 2 * later_layers
        self.batch_selection = "per_row"  # the only one exported
        self.last_selection: Selection | None = None
        self.last_decode_path: DecodePath | None = None
        self.last_gathered_bytes = 0  # bytes of the kept weights the last start gathered

    # ---- running -----------------------------------------------------------------------------------------------------
    def _run(self, graph: str, arrays: dict[str, np.ndarray], values: dict[str, ort.OrtValue]) -> list[ort.OrtValue]:
        session = self.sessions[graph]
        binding = session.io_binding()
        for name, array in arrays.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        for output in session.get_outputs():
            binding.bind_output(output.name, "cpu")
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _selection(self, chosen: list[ort.OrtValue]) -> Selection:
        later = len(chosen) // 2
        tensors = tuple(torch.from_numpy(value.numpy()) for value in chosen)
        return Selection(kv_heads=tensors[:later], neurons=tensors[later:])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._prefill(input_ids, self._check(input_ids, attention_mask), every_position=True)[0]

    def _prefill(self, input_ids: torch.Tensor, mask: torch.Tensor,
                 every_position: bool) -> tuple[torch.Tensor, list, list]:
        """The prefill's logits (of every position, or of the last where the export takes ``logit_positions``),
        KV cache and selection."""
        arrays = {"input_ids": input_ids.long().numpy(), "attention_mask": mask.long().numpy()}
        if self._takes_positions:
            seq = input_ids.shape[1]
            arrays[LOGIT_POSITIONS] = np.arange(0 if every_position else seq - 1, seq, dtype=np.int64)
        outputs = self._run("prefill", arrays, {})
        layers = self.structure.num_layers
        cache, chosen = outputs[1:1 + 2 * layers], outputs[1 + 2 * layers:]
        self.last_selection = self._selection(chosen) if chosen else None
        if not chosen and self.config is not None and self.config.keeps_every_unit:
            # every unit kept: the prefill is the model's own graph, which selects nothing; the selection is every unit
            self.last_selection = self._every_unit(input_ids)
            if self.granularity == "prompt":  # what the gather graph takes
                chosen = [ort.OrtValue.ortvalue_from_numpy(units.contiguous().numpy())
                          for units in (*self.last_selection.kv_heads, *self.last_selection.neurons)]
        return torch.from_numpy(outputs[0].numpy()), cache, chosen

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, decode: bool = True,
              new_tokens: int = 0) -> OnnxDecodeState:
        """Prefill the prompt; per prompt (and ``decode``) also gather its kept weights once."""
        mask = self._check(input_ids, attention_mask, new_tokens)
        logits, cache, chosen = self._prefill(input_ids, mask, every_position=False)
        kept = []
        if decode and self.granularity == "prompt":
            # one copy per row, and no decode graph that reads the full weights to fall back on: refused up front
            needed = per_row_copy_bytes(self.structure, self.last_selection, self.element_bytes)
            if needed > self.max_gathered_bytes:
                raise InputError(f"a batch of {input_ids.shape[0]} rows would gather {needed / 1e9:.3g} GB of kept "
                                 f"weights (one copy per row), more than max_gathered_bytes "
                                 f"({self.max_gathered_bytes / 1e9:.3g} GB; by default twice the later layers' "
                                 "weights): decode fewer rows at a time, or give OnnxDecoder a larger "
                                 "max_gathered_bytes")
            names = [i.name for i in self.sessions["gather"].get_inputs()]
            kept = self._run("gather", {}, dict(zip(names, chosen)))
            self.last_decode_path = "pregathered"
            # every gathered tensor leads with the batch axis; the output biases, kept whole, are the 1-D ones
            self.last_gathered_bytes = sum(int(np.prod(value.shape())) * ELEMENT_BYTES[value.data_type()]
                                           for value in kept if len(value.shape()) > 1)
        elif decode and self.granularity == "token":
            self.last_decode_path, self.last_gathered_bytes = "per_token", 0
        return OnnxDecodeState(logits[:, -1], mask, cache, kept)

    def step(self, state: OnnxDecodeState, next_token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``[B]``; returns (and keeps in ``state``) the logits for the token after it."""
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        names = [i.name for i in self.sessions["decode"].get_inputs()][2:]
        outputs = self._run("decode", {"input_ids": next_token[:, None].long().numpy(),
                                       "attention_mask": state.mask.long().numpy()},
                            dict(zip(names, state.cache + state.kept)))
        layers = self.structure.num_layers
        state.cache = outputs[1:1 + 2 * layers]
        if len(outputs) > 1 + 2 * layers:
            self.last_selection = self._selection(outputs[1 + 2 * layers:])
        state.logits = torch.from_numpy(outputs[0].numpy())[:, -1]
        return state.logits

