"""Write a transformed model's graphs (or a dense model's, to compare with) as ONNX files that stock onnxruntime
runs.

A directory holds, per granularity:

* prompt: ``prefill.onnx`` (ids, mask, logit positions -> logits, KV cache, selection), ``gather.onnx``
  (selection -> the prompt's kept weights, per batch row, in the order :func:`shadowfx.compact.compact_weights`
  gives them) and ``decode.onnx`` (one token, mask, cache, kept weights -> logits, cache): the kept weights are
  gathered once per prompt and become state that every decode step reads, as in the PyTorch runtime.
* token: ``prefill.onnx`` and ``decode.onnx`` (one token, mask, complete cache -> logits, cache, its selection).
  A model transformed with ``prefill="dense"`` has the dense model's prefill (no selection output).
* every unit kept (sparsity 0), either granularity: the prefill is the dense model's too, and the runtime gives the
  gather graph every unit.
* dense (a model that was not transformed, the baseline): ``prefill.onnx`` and ``decode.onnx`` as captured.

Every prefill takes ``logit_positions`` (int64 ``[P]``, :mod:`shadowfx.passes.logit_positions`) and returns those
positions' logits, ``[B, P, V]``: all of them for a forward, the last for a generation's start, from one session.
(A model whose LM head reads its input flattened to ``[B*T, E]`` would take no such input, and its prefill would
return every position's logits; the families the tests build all take it.)

Each graph is the rewritten FX graph re-exported with ``torch.export`` (dynamic batch, sequence and past length)
and translated by ``torch.onnx``; the shadowfx ops, the predictor's MLPs and the selection's top-k become nodes of
the ``shadowfx`` domain with their function bodies (:mod:`shadowfx.onnx_ops`). Weights go to one ``weights.bin``,
each distinct tensor once, which all graphs reference; every file carries the model's fingerprint, the shadowfx
version, the sparsity settings and the structure in ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data
from onnxscript.rewriter._matcher import SimplePatternMatcher
from torch import nn
from torch.export import Dim
from tqdm import tqdm

from shadowfx.capture import capture, max_positions
from shadowfx.compact import CompactTensor, CompactWeights, compact_weights
from shadowfx.files import atomic_write_directory
from shadowfx.onnx_ops import DOMAIN, NODE_TYPES, OnnxExportError, functions_for, translation_table
from shadowfx.passes.base import run_passes
from shadowfx.passes.discover_structure import discover_structure
from shadowfx.passes.graph import editable_module
from shadowfx.passes.logit_positions import INPUT_NAME as LOGIT_POSITIONS
from shadowfx.passes.logit_positions import LogitPositions
from shadowfx.predictor import ScaledMLP
from shadowfx.runtimes.pytorch import SparseDecoder
from shadowfx.selection import Selection
from shadowfx.structure import DecoderStructure

FORMAT = 3  # the layout of an export directory and its metadata; a reader refuses any other
# (2: the prefill's logit_positions input; 3: the "prefill" metadata, "dense" where the prompt selects nothing)
WEIGHTS_FILE = "weights.bin"
DENSE = "dense"  # the granularity an export of the model as it is names
GRAPH_FILES = {"prompt": ("prefill", "gather", "decode"), "token": ("prefill", "decode"), DENSE: ("prefill", "decode")}
METADATA_PREFIX = "shadowfx."
_INLINE_BYTES = 1024  # smaller tensors (shape constants, scalars) stay inside the graph
_ALIGN = 64


def shadowfx_version() -> str:
    try:
        return version("shadowfx")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


class _ShadowMLPNode(nn.Module):
    """A predictor MLP as one ``shadowfx::shadow_mlp`` call, so that it exports as one node."""

    def __init__(self, mlp: ScaledMLP) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, last = self.mlp[0], self.mlp[2]
        return torch.ops.shadowfx.shadow_mlp(x, first.weight, first.bias, last.weight, last.bias)


@contextlib.contextmanager
def _predictor_as_nodes(predictor: nn.Module) -> Iterator[None]:
    """Within the block, the predictor's MLPs run as shadowfx::shadow_mlp (the predictor is put back after)."""
    swapped = [(parent, name, child) for parent in predictor.modules()
               for name, child in parent.named_children() if isinstance(child, ScaledMLP)]
    for parent, name, child in swapped:
        setattr(parent, name, _ShadowMLPNode(child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class _GatherKept(nn.Module):
    """The one-time gather of a prompt's kept weights, per batch row: the selection in, the compact tensors out."""

    def __init__(self, sparse: SparseDecoder) -> None:
        super().__init__()
        self.model = sparse.model
        self.structure = sparse.structure

    def forward(self, *chosen: torch.Tensor) -> tuple[torch.Tensor, ...]:
        later = len(chosen) // 2
        selection = Selection(kv_heads=chosen[:later], neurons=chosen[later:])
        return tuple(compact_weights(self.model, self.structure, selection, per_row=True).tensors)


class _Dense:
    """A model's dense prefill and decode as captured, in the shape of a transformed model's export."""

    def __init__(self, model: nn.Module) -> None:
        model.eval()
        self.prefill = capture(model, step="prefill_cache")
        self.structure = discover_structure(self.prefill)
        self.model = model
        self.max_positions = max_positions(model)

    def graphs(self, progress: tqdm) -> Iterator[tuple[str, onnx.ModelProto]]:
        """The dense graphs by name, one at a time (a large model's graphs are not held in memory together)."""
        layers = self.structure.num_layers
        batch, seq, past = _length_dims(self.model)
        input_ids, attention_mask = _example(self.model)
        prefill = editable_module(self.prefill.program)
        with torch.inference_mode(False), torch.no_grad():
            cache = list(prefill(input_ids, attention_mask)[1:])
            exported = _prefill_with_positions(prefill, self.structure, input_ids, attention_mask, batch, seq,
                                               shared=False)
            del prefill
            yield "prefill", _to_onnx(progress, *exported, ["logits", *_cache_names("present", layers)])
            del exported
            decode = editable_module(capture(self.model, step="decode").program)
            step, step_shapes = _step_example(input_ids, attention_mask, cache, batch, past)
            yield "decode", _to_onnx(progress, decode, step, tuple(step_shapes),
                                     ["input_ids", "attention_mask", *_cache_names("past", layers)],
                                     ["logits", *_cache_names("present", layers)])


def _prefill_with_positions(prefill: torch.fx.GraphModule, structure: DecoderStructure, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor, batch: Dim, seq: Dim, *, shared: bool,
                            ) -> tuple[torch.fx.GraphModule, tuple, tuple, list[str]]:
    """``prefill`` with the ``logit_positions`` input where its LM head allows, and what exporting it takes: the
    example inputs, their dynamic shapes and their names. A ``shared`` graph (a transformed model's, which it still
    runs) is copied first; another is edited in place."""
    if shared:
        prefill = torch.fx.GraphModule(prefill, copy.deepcopy(prefill.graph))
    args, shapes, names = (input_ids, attention_mask), ({0: batch, 1: seq},) * 2, ["input_ids", "attention_mask"]
    if run_passes(prefill, [LogitPositions(structure, "input")])["logit_positions"].total:
        # three positions: a size that no other example dim has (1 and 2 would be specialised or tied to the batch)
        args += (torch.arange(input_ids.shape[1] - 3, input_ids.shape[1]),)
        shapes += ({0: Dim("positions", min=1)},)
        names.append(LOGIT_POSITIONS)
    return prefill, args, shapes, names


def _length_dims(model: nn.Module) -> tuple[Dim, Dim, Dim]:
    """The batch, sequence and past-length dims of the graphs, the lengths bounded by the model's positions (a model
    that slices a table of them, as MPT's ALiBi does, makes the export prove the bound)."""
    limit = max_positions(model)
    if limit is None:
        return Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=1)
    return Dim("batch", min=1), Dim("seq", min=1, max=limit), Dim("past", min=1, max=limit - 1)


def _placeholder_names(gm: torch.fx.GraphModule) -> list[str]:
    return [node.name for node in gm.graph.nodes if node.op == "placeholder"]


def _selection_names(layers: int) -> list[str]:
    return [f"{kind}_{index}" for kind in ("kv_heads", "neurons") for index in range(1, layers)]


def _cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{index}" for kind in ("keys", "values") for index in range(layers)]


def _step_example(input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: list[torch.Tensor], batch: Dim,
                  past: Dim) -> tuple[tuple[torch.Tensor, ...], list[dict]]:
    """A decode step's example inputs after the prompt ``input_ids`` (each row's last token, the mask one position
    longer, the prompt's cache) and their dynamic shapes, a list whose dicts a caller may add sizes to."""
    mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    shapes = [{0: batch}, {0: batch, 1: past + 1}, *({0: batch, 2: past} for _ in cache)]
    return (input_ids[:, -1:], mask, *cache), shapes


def _selection_dims(sparse: SparseDecoder) -> dict[str, Dim]:
    """At scope "global" each later layer keeps as many units as its scores earn: one dynamic size per layer and
    kind (per layer every layer keeps the configured count, and the sizes stay fixed)."""
    if sparse.config.scope != "global":
        return {}
    dims = {}
    for layer in sparse.structure.layers[1:]:
        for kind, units in (("kv_heads", layer.attention.num_kv_heads), ("neurons", layer.mlp.intermediate_size)):
            if units > 1:  # a single unit is always kept: its size is fixed
                dims[f"{kind}_{layer.index}"] = Dim(f"{kind}_{layer.index}", min=1, max=units)
    return dims


def _example_selection(sparse: SparseDecoder, selection: Selection) -> Selection:
    """The selection the gather and decode graphs are traced with: the prompt's own, except at scope "global",
    where a layer's width may be 1, which export would fix as a constant; there every layer keeps all its units
    but one (all of two), for both rows."""
    if sparse.config.scope != "global":
        return selection

    def kept(units: int) -> torch.Tensor:
        return torch.arange(units - 1 if units > 2 else units).expand(selection.batch, -1)

    later = sparse.structure.layers[1:]
    return Selection(kv_heads=tuple(kept(layer.attention.num_kv_heads) for layer in later),
                     neurons=tuple(kept(layer.mlp.intermediate_size) for layer in later))


def _example_compact(sparse: SparseDecoder, selection: Selection) -> CompactWeights:
    """Row 0's kept weights, gathered once (shared), for the decode graph's example (see :func:`_example_kept`)."""
    first = Selection(kv_heads=tuple(t[:1] for t in selection.kv_heads),
                      neurons=tuple(t[:1] for t in selection.neurons))
    return compact_weights(sparse.model, sparse.structure, first, per_row=False)


def _example_kept(compact: CompactWeights, batch: int) -> list[torch.Tensor]:
    """The decode graph's example kept weights: row 0's (``compact``) shown to every one of ``batch`` rows as a
    view, so a large model is not copied once per example row; output biases stay whole, never per row."""
    return [t if layout.shared else t.unsqueeze(0).expand(batch, *t.shape)
            for layout, t in zip(compact.layout, compact.tensors, strict=True)]


def _compact_shapes(layout: list[CompactTensor], selection_dims: dict[str, Dim], batch: Dim) -> list:
    """The dynamic shapes of the decode graph's compact weights (``layout``, in order): batch rows lead, except the
    output biases (1-D, never per row); at scope "global" the kept rows follow their layer's selection size
    (``selection_dims``, of :func:`_selection_dims`)."""
    shapes = []
    for tensor in layout:
        if tensor.shared:
            shapes.append(None)
            continue
        shape = {0: batch}
        size = selection_dims.get(f"{tensor.selection}_{tensor.layer}")
        if size is not None:
            shape[1 + tensor.axis] = size if tensor.unit_rows == 1 else tensor.unit_rows * size
        shapes.append(shape)
    return shapes


def _example(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded rows of different lengths: sizes above 1 keep export from specialising them."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    input_ids = torch.randint(0, vocab, (2, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    return input_ids, attention_mask


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's per-step messages (and its optimiser's notes on pass-through weights) off the console;
    the export shows its own progress, one step per graph."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch's own pytree use inside export; nothing the caller can act on
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _to_onnx(progress: tqdm, module: nn.Module, args: tuple, dynamic_shapes: tuple, input_names: list[str],
             output_names: list[str]) -> onnx.ModelProto:
    with _quiet_exporter():
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False,
                                      prefer_deferred_runtime_asserts_over_guards=True)
        onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=translation_table(),
                                         input_names=input_names, output_names=output_names, opset_version=20,
                                         optimize=True, verify=False, report=False, verbose=False)
    proto = onnx_program.model_proto
    del onnx_program
    _release_matched_graph()
    progress.update()
    return proto


def _release_matched_graph() -> None:
    """Let go of the graph that onnxscript's optimiser matched last. Its rewrite rules are module-level objects whose
    matchers keep the last graph, match and node they saw (onnxscript 0.7), and that graph's constants are the
    exported module's own parameters: without this, one exported graph and the whole model stay in memory after
    ``export_onnx`` returns and the caller has dropped them."""
    for matcher in (o for o in gc.get_objects() if isinstance(o, SimplePatternMatcher)):
        if hasattr(matcher, "_graph"):  # it has matched (the attribute is made by its first match)
            matcher._graph = matcher._tracer = None
            matcher._init_match(verbose=0)  # a fresh, empty match result and no current node


def _graphs(sparse: SparseDecoder, progress: tqdm) -> Iterator[tuple[str, onnx.ModelProto]]:
    """The ONNX graphs of ``sparse`` by name (see the module docstring), one at a time."""
    layers = sparse.structure.num_layers
    batch, seq, past = _length_dims(sparse.model)
    input_ids, attention_mask = _example(sparse.model)
    state = sparse.start(input_ids, attention_mask, decode=False)
    selection_out = _selection_names(layers)
    with torch.inference_mode(False), torch.no_grad(), _predictor_as_nodes(sparse.predictor):
        exported = _prefill_with_positions(sparse.graphs.prefill, sparse.structure, input_ids, attention_mask, batch,
                                           seq, shared=True)
        yield "prefill", _to_onnx(progress, *exported, ["logits", *_cache_names("present", layers),
                                                        *(selection_out if sparse.prefill_selects else [])])
        del exported
        cache = [*state.keys, *state.values]
        decode_in = ["input_ids", "attention_mask", *_cache_names("past", layers)]
        decode_out = ["logits", *_cache_names("present", layers)]
        if sparse.granularity == "token":
            step, step_shapes = _step_example(input_ids, attention_mask, cache, batch, past)
            yield "decode", _to_onnx(progress, sparse.graphs.decode, step, tuple(step_shapes), decode_in,
                                     decode_out + selection_out)
            return
        selection = _example_selection(sparse, sparse.last_selection)
        chosen = [*selection.kv_heads, *selection.neurons]
        compact_names = [name for name in _placeholder_names(sparse.graphs.decode_pregathered)
                         if name.startswith("compact_")]
        compact = _example_compact(sparse, selection)
        if compact_names != [f"compact_{t.layer}_{t.role}" for t in compact.layout]:
            raise OnnxExportError("the pre-gathered decode graph's weight inputs are not the tensors compact_weights "
                                  "gives, in its order; transform the model again with this shadowfx")
        kept = _example_kept(compact, selection.batch)
        widths = _selection_dims(sparse)
        if widths:  # the cache of a later layer holds its kept KV groups: as many as the example selection's
            for position, heads in enumerate(selection.kv_heads, start=1):
                for offset in (0, layers):
                    past_tensor = cache[offset + position]
                    cache[offset + position] = past_tensor.new_zeros(past_tensor.shape[0], heads.shape[1],
                                                                     *past_tensor.shape[2:])
        step, step_shapes = _step_example(input_ids, attention_mask, cache, batch, past)
        for position in range(1, layers):
            if f"kv_heads_{position}" in widths:
                for offset in (0, layers):
                    step_shapes[2 + offset + position][1] = widths[f"kv_heads_{position}"]
        selection_shapes = tuple({0: batch, **({1: widths[name]} if name in widths else {})}
                                 for name in selection_out)
        yield "gather", _to_onnx(progress, _GatherKept(sparse), tuple(chosen), (selection_shapes,), selection_out,
                                 compact_names)
        yield "decode", _to_onnx(
            progress, sparse.graphs.decode_pregathered, (*step, *kept),
            (*step_shapes, *_compact_shapes(compact.layout, widths, batch)), decode_in + compact_names,
            decode_out)


def _unpack_layer_outputs(proto: onnx.ModelProto) -> None:
    """Give each GlobalTopkIndices node its per-layer outputs. The exporter writes an op returning a list as one
    sequence value read by SequenceAt nodes; the node type has one output per layer instead (no sequence type, which
    the shadowfx schemas and kernels do not take), so those reads become the node's outputs."""
    graph = proto.graph
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            constants[node.output[0]] = node.attribute[0].t
    for node in [n for n in graph.node if n.domain == DOMAIN and NODE_TYPES[n.op_type].variadic]:
        sequence = node.output[0]
        layers = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "layers")
        readers = [n for n in graph.node if sequence in n.input]
        if any(n.op_type != "SequenceAt" or n.input[1] not in constants for n in readers):
            raise OnnxExportError(f"{node.op_type} {node.name}: its outputs are read other than one layer at a time; "
                                  "the export cannot give them as per-layer outputs")
        outputs = [f"{sequence}_{layer}" for layer in range(layers)]
        for reader in readers:
            outputs[int(numpy_helper.to_array(constants[reader.input[1]]))] = reader.output[0]
            graph.node.remove(reader)
        node.output[:] = outputs
        for info in [v for v in graph.value_info if v.name == sequence]:
            graph.value_info.remove(info)
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in read]:  # the positions the reads took
        graph.initializer.remove(tensor)


def _metadata(model: SparseDecoder | _Dense, graph: str) -> dict[str, str]:
    sparse = isinstance(model, SparseDecoder)
    return {
        "format": str(FORMAT), "version": shadowfx_version(), "graph": graph,
        "granularity": model.granularity if sparse else DENSE, "prefill": model.prefill if sparse else DENSE,
        "fingerprint": model.structure.fingerprint,
        "sparsity": json.dumps(asdict(model.config) if sparse else None),
        "predictor": getattr(model.predictor, "kind", type(model.predictor).__name__) if sparse else "none",
        "structure": model.structure.to_json(indent=None), "max_positions": json.dumps(model.max_positions),
    }


class _SharedWeights:
    """One file of tensor data that every graph references; a tensor already written is written again never."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("wb")
        self.offsets: dict[bytes, tuple[int, int]] = {}

    def externalise(self, proto: onnx.ModelProto) -> None:
        for tensor in proto.graph.initializer:
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < _INLINE_BYTES:
                continue
            data = tensor.raw_data
            digest = hashlib.blake2b(data, digest_size=20).digest() + len(data).to_bytes(8, "little")
            if digest not in self.offsets:
                self.file.seek(0, 2)
                offset = -(-self.file.tell() // _ALIGN) * _ALIGN
                self.file.seek(offset)
                self.file.write(data)
                self.offsets[digest] = (offset, len(data))
            offset, length = self.offsets[digest]
            set_external_data(tensor, WEIGHTS_FILE, offset=offset, length=length)
            tensor.data_location = TensorProto.EXTERNAL
            tensor.ClearField("raw_data")

    def close(self) -> None:
        self.file.close()


def export_onnx(model: SparseDecoder | nn.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write the ONNX graphs of ``model`` into ``directory``; returns it.

    ``model`` transformed by :func:`shadowfx.transform`: its sparse graphs (both granularities, both scopes, every
    predictor kind, sdpa or eager attention). A Hugging Face model as it is: its dense prefill and decode, the
    baseline that the sparse export is measured against, run by the same runtime. The directory is written beside
    the target and moved into place, so a failed export leaves nothing half written.
    """
    if isinstance(model, SparseDecoder) and model.batch_selection != "per_row":
        raise OnnxExportError(f"batch_selection={model.batch_selection!r} is not exported (its union of the rows' "
                              "neurons is taken between the graphs); transform with batch_selection='per_row' to "
                              "export")
    if isinstance(model, SparseDecoder) and model.granularity == "prompt" and model.graphs.decode_pregathered is None:
        raise OnnxExportError("the transformed model has no pre-gathered decode graph to export")
    target = Path(directory)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not overwrite)):
        raise OnnxExportError(f"{target} exists and is not an empty directory; choose another or pass "
                              "overwrite=True")
    if not isinstance(model, SparseDecoder):
        model = _Dense(model)
    names = GRAPH_FILES[model.granularity if isinstance(model, SparseDecoder) else DENSE]

    def write(staging: Path) -> None:
        weights = _SharedWeights(staging / WEIGHTS_FILE)
        try:
            with tqdm(total=len(names), desc="exporting ONNX graphs", unit="graph") as progress:
                graphs = _graphs(model, progress) if isinstance(model, SparseDecoder) else model.graphs(progress)
                for name, proto in graphs:  # each graph is written (its weights moved to the file) before the next
                    _unpack_layer_outputs(proto)
                    proto.functions.extend(functions_for(list(proto.graph.node)))
                    helper.set_model_props(proto, {METADATA_PREFIX + k: v for k, v in _metadata(model, name).items()})
                    weights.externalise(proto)
                    onnx.save(proto, staging / f"{name}.onnx")
                    del proto
        finally:
            weights.close()

    return atomic_write_directory(target, write)
