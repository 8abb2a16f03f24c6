"""Write a transformed model's graphs as ONNX files that stock onnxruntime runs.

A directory holds, per granularity:

* prompt: ``prefill.onnx`` (ids, mask -> logits, KV cache, selection), ``gather.onnx`` (selection -> the prompt's
  kept weights, per batch row, in the order :func:`shadowfx.compact.compact_weights` gives them) and
  ``decode.onnx`` (one token, mask, cache, kept weights -> logits, cache): the kept weights are gathered once per
  prompt and become state that every decode step reads, as in the PyTorch runtime.
* token: ``prefill.onnx`` and ``decode.onnx`` (one token, mask, complete cache -> logits, cache, its selection).

Each graph is the rewritten FX graph re-exported with ``torch.export`` (dynamic batch, sequence and past length)
and translated by ``torch.onnx``; the shadowfx ops, the predictor's MLPs and the selection's top-k become nodes of
the ``shadowfx`` domain with their function bodies (:mod:`shadowfx.onnx_ops`). Weights go to one ``weights.bin``,
each distinct tensor once, which all graphs reference; every file carries the model's fingerprint, the shadowfx
version, the sparsity settings and the structure in ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnx
import torch
from onnx import TensorProto
from onnx.external_data_helper import set_external_data
from torch import nn
from torch.export import Dim

from shadowfx.compact import compact_weights
from shadowfx.onnx_ops import DOMAIN, OnnxExportError, function_for, translation_table
from shadowfx.predictor import ScaledMLP
from shadowfx.runtimes.pytorch import SparseDecoder
from shadowfx.selection import Selection

FORMAT = 1  # the layout of an export directory and its metadata; a reader refuses any other
WEIGHTS_FILE = "weights.bin"
GRAPH_FILES = {"prompt": ("prefill", "gather", "decode"), "token": ("prefill", "decode")}
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


def _placeholder_names(gm: torch.fx.GraphModule) -> list[str]:
    return [node.name for node in gm.graph.nodes if node.op == "placeholder"]


def _selection_names(layers: int) -> list[str]:
    return [f"{kind}_{index}" for kind in ("kv_heads", "neurons") for index in range(1, layers)]


def _cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{index}" for kind in ("keys", "values") for index in range(layers)]


def _example(sparse: SparseDecoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded rows of different lengths: sizes above 1 keep export from specialising them."""
    generator = torch.Generator().manual_seed(0)
    vocab = sparse.model.get_input_embeddings().num_embeddings
    input_ids = torch.randint(0, vocab, (2, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    return input_ids, attention_mask


def _to_onnx(module: nn.Module, args: tuple, dynamic_shapes: tuple, input_names: list[str],
             output_names: list[str]) -> onnx.ModelProto:
    program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False,
                                  prefer_deferred_runtime_asserts_over_guards=True)
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=translation_table(),
                                     input_names=input_names, output_names=output_names, opset_version=20,
                                     optimize=True, verify=False, report=False)
    return onnx_program.model_proto


def _graphs(sparse: SparseDecoder) -> dict[str, onnx.ModelProto]:
    """The ONNX graphs of ``sparse``, by name (see the module docstring)."""
    structure, layers = sparse.structure, sparse.structure.num_layers
    batch, seq, past = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=1)
    input_ids, attention_mask = _example(sparse)
    state = sparse.start(input_ids, attention_mask, decode=False)
    selection = sparse.last_selection
    chosen = [*selection.kv_heads, *selection.neurons]
    selection_out = _selection_names(layers)
    graphs = {}
    with torch.inference_mode(False), torch.no_grad(), _predictor_as_nodes(sparse.predictor):
        graphs["prefill"] = _to_onnx(
            sparse.graphs.prefill, (input_ids, attention_mask), ({0: batch, 1: seq},) * 2,
            ["input_ids", "attention_mask"], ["logits", *_cache_names("present", layers), *selection_out])
        token = input_ids[:, -1:]
        mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        cache = [*state.keys, *state.values]
        cache_shapes = ({0: batch, 2: past},) * len(cache)
        decode_in = ["input_ids", "attention_mask", *_cache_names("past", layers)]
        decode_out = ["logits", *_cache_names("present", layers)]
        step_shapes = ({0: batch}, {0: batch, 1: past + 1}, *cache_shapes)
        if sparse.granularity == "prompt":
            kept = compact_weights(sparse.model, structure, selection, per_row=True).tensors
            gather = _GatherKept(sparse)
            compact_names = [name for name in _placeholder_names(sparse.graphs.decode_pregathered)
                             if name.startswith("compact_")]
            graphs["gather"] = _to_onnx(gather, tuple(chosen), (({0: batch},) * len(chosen),), selection_out,
                                        compact_names)
            graphs["decode"] = _to_onnx(
                sparse.graphs.decode_pregathered, (token, mask, *cache, *kept),
                # per-row tensors lead with the batch; the output biases (1-D) are never per row
                (*step_shapes, *({0: batch} if t.dim() > 1 else None for t in kept)), decode_in + compact_names,
                decode_out)
        else:
            graphs["decode"] = _to_onnx(sparse.graphs.decode, (token, mask, *cache), step_shapes, decode_in,
                                        decode_out + selection_out)
    return graphs


def _add_functions(proto: onnx.ModelProto) -> None:
    by_type: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        if node.domain == DOMAIN:
            by_type.setdefault(node.op_type, []).append(node)
    proto.functions.extend(function_for(nodes) for nodes in by_type.values())


def _metadata(sparse: SparseDecoder, graph: str) -> dict[str, str]:
    return {
        "format": str(FORMAT), "version": shadowfx_version(), "graph": graph, "granularity": sparse.granularity,
        "fingerprint": sparse.structure.fingerprint, "sparsity": json.dumps(asdict(sparse.config)),
        "predictor": getattr(sparse.predictor, "kind", type(sparse.predictor).__name__),
        "structure": sparse.structure.to_json(indent=None), "max_positions": json.dumps(sparse.max_positions),
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


def export_onnx(sparse: SparseDecoder, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write the ONNX graphs of ``sparse`` (from :func:`shadowfx.transform`) into ``directory``; returns it.

    Supported: both granularities, every predictor kind, ``scope="per_layer"``, sdpa attention. The directory is
    written beside the target and moved into place, so a failed export leaves nothing half written.
    """
    if sparse.config.scope != "per_layer":
        raise OnnxExportError("the ONNX export supports scope='per_layer' only: at scope='global' each layer's "
                              "selection width depends on the scores, which the export does not write yet; "
                              "transform with scope='per_layer'")
    if sparse.granularity == "prompt" and sparse.graphs.decode_pregathered is None:
        raise OnnxExportError("the transformed model has no pre-gathered decode graph to export")
    target = Path(directory)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not overwrite)):
        raise OnnxExportError(f"{target} exists and is not an empty directory; choose another or pass "
                              "overwrite=True")
    graphs = _graphs(sparse)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        weights = _SharedWeights(staging / WEIGHTS_FILE)
        try:
            for name, proto in graphs.items():
                _add_functions(proto)
                onnx.helper.set_model_props(proto, {METADATA_PREFIX + k: v for k, v in _metadata(sparse, name).items()})
                weights.externalise(proto)
                onnx.save(proto, staging / f"{name}.onnx")
        finally:
            weights.close()
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
