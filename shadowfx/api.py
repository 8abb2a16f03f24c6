"""The public entry points."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import get_args

import torch
from torch import nn

from shadowfx.capture import CapturedDecoder, capture, max_positions
from shadowfx.compact import store_input_major, store_whole_weights_on_huge_pages
from shadowfx.passes.base import run_passes
from shadowfx.passes.cleanup import Cleanup
from shadowfx.passes.dense_linears import DenseLinears
from shadowfx.passes.discover_structure import discover_structure
from shadowfx.passes.gathered_weight_outputs import GatheredWeightOutputs
from shadowfx.passes.graph import editable_module
from shadowfx.passes.insert_layerwise import InsertLayerwisePredictor
from shadowfx.passes.insert_shadow import InsertShadowPredictor
from shadowfx.passes.logit_positions import LogitPositions
from shadowfx.passes.pregathered_weights import PregatheredWeights
from shadowfx.passes.selection_inputs import AddSelectionInputs
from shadowfx.passes.sparsify_attention import SparsifyAttention
from shadowfx.passes.sparsify_mlp import SparsifyMLP
from shadowfx.predictor import LayerwisePredictor, PredictorError, Scores, SparseShape, StaticScores, load_predictor
from shadowfx.runtimes.pytorch import (
    PREFILLS,
    Granularity,
    Prefill,
    RewriteReport,
    RewrittenGraphs,
    Runtime,
    SparseDecoder,
    SparseGraphs,
)
from shadowfx.selection import (
    BATCH_SELECTIONS,
    BatchSelection,
    Scope,
    Selector,
    SparsityConfig,
    SparsityWarning,
    planned_sparsity,
    require_layerwise_scope,
)
from shadowfx.structure import DecoderStructure, StructureError, check_fingerprint
from shadowfx.verify import verify_rewrite

GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)
RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)


def discover(model: nn.Module) -> DecoderStructure:
    """Capture ``model``'s prefill graph and describe its layers, heads and MLPs."""
    return discover_structure(capture(model))


def checkpoint_directory(model: nn.Module) -> Path | None:
    """The local directory ``model`` was loaded from, where its predictors are saved; None if it has none."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    return Path(name) if name and Path(name).is_dir() else None


def _resolve_predictor(model: nn.Module, predictor: nn.Module | None, structure: DecoderStructure) -> nn.Module:
    if predictor is None:
        directory = checkpoint_directory(model)
        if directory is None:
            raise PredictorError(
                "no predictor given, and the model was not loaded from a local directory where one could be saved; "
                "pass predictor=... (e.g. ShadowPredictor.for_structure(shadowfx.discover(model)) for an untrained "
                "one), or save a trained predictor next to the checkpoint"
            )
        return load_predictor(directory, structure)
    fingerprint = getattr(predictor, "fingerprint", None)
    if not isinstance(fingerprint, str):
        raise PredictorError("the predictor carries no `fingerprint` of the model it was made for; set "
                             "predictor.fingerprint = shadowfx.discover(model).fingerprint when building it")
    check_fingerprint(fingerprint, structure, what="the predictor")
    if isinstance(predictor, LayerwisePredictor):
        expected = SparseShape.layerwise(structure)
        if predictor.shape != expected:
            raise PredictorError(f"the layerwise predictor scores {predictor.shape}, but this model needs {expected}")
        return predictor
    expected = SparseShape.of(structure)
    with torch.inference_mode():
        probe = predictor(torch.zeros(1, expected.input_size, dtype=next(model.parameters()).dtype))
    if not isinstance(probe, tuple) or len(probe) != 2:
        raise PredictorError("the predictor must return (head_scores, neuron_scores)")
    heads, neurons = Scores(*probe)
    want = ((1, expected.sparse_layers, expected.num_heads), (1, expected.sparse_layers, expected.intermediate_size))
    if (tuple(heads.shape), tuple(neurons.shape)) != want:
        raise PredictorError(f"the predictor returns scores of shapes {tuple(heads.shape)} and {tuple(neurons.shape)}, "
                             f"but this model needs {want[0]} and {want[1]} (layers 1..L-1)")
    return predictor


def _require_all(report: dict, structure: DecoderStructure, graph: str) -> None:
    later = structure.num_layers - 1
    for name in ("sparsify_mlp", "sparsify_attention"):
        if report[name].total != later:
            raise StructureError(f"{name} rewrote {report[name].total} of {later} layers in the {graph} graph; "
                                 "refusing a half-sparsified model")


def _warn_unreachable(structure: DecoderStructure, config: SparsityConfig) -> None:
    """Say once, at transform, where the structure cannot give the requested sparsity, and what it gives instead."""
    later = structure.layers[1]
    block = config.neuron_block
    units = {"heads": f"{later.attention.num_kv_heads} KV groups, at least {config.min_kv_heads} kept",
             "neurons": (f"{later.mlp.intermediate_size // block} blocks of {block} neurons" if block > 1
                         else f"{later.mlp.intermediate_size} neurons")
             + f", at least {config.min_neuron_fraction:.3g} of them kept"}
    for kind, fractions in planned_sparsity(structure, config).items():
        # a difference under half a percent is the rounding of a budget to whole units
        if abs(fractions["achieved"] - fractions["requested"]) > 0.005:
            warnings.warn(f"{kind} sparsity {fractions['requested']:g} cannot be applied to "
                          f"{structure.num_layers - 1} sparse layers of {units[kind]} per layer "
                          f"(scope {config.scope!r}); applying {fractions['achieved']:.4g} instead",
                          SparsityWarning, stacklevel=3)


def transform(
    model: nn.Module,
    predictor: nn.Module | None = None,
    *,
    sparsity: float = 0.5,
    heads_sparsity: float | None = None,
    neurons_sparsity: float | None = None,
    scope: Scope = "global",
    granularity: Granularity | None = None,
    runtime: Runtime = "eager",
    max_gathered_bytes: int | None = None,
    batch_selection: BatchSelection = "per_row",
    prefill: Prefill = "sparse",
    verify: bool = True,
) -> SparseDecoder:
    """Rewrite ``model`` so that a shadow predictor picks the heads and neurons each later layer computes.

    ``sparsity`` is the fraction of KV-head groups and MLP neurons of layers 1..L-1 to skip (``heads_sparsity`` and
    ``neurons_sparsity`` override it per kind); layer 0 stays dense. ``scope`` ranks units across layers ("global")
    or within each layer ("per_layer"; a layerwise predictor needs it). ``granularity`` "prompt" selects once per
    sequence (the KV cache of later layers keeps only the kept heads, and decoding reuses weights gathered once);
    "token" selects for every token (the KV cache stays complete); by default, the one the predictor was trained for
    (a predictor's ``granularity``), else "prompt". ``max_gathered_bytes`` bounds the per-prompt gathered weights (default: the size
    of the later layers' weights); beyond it decoding gathers on every step instead. ``batch_selection`` "per_row"
    (the default) lets every row of a batch keep its own units, independent of the others; "union" (per prompt,
    with the shadow predictor) keeps one set for the batch, so that one copy of the kept weights serves every row:
    the KV heads of the rows' mean head scores, and, for decoding, the union of the neurons the rows kept (the
    reported sparsity is what the union keeps). ``prefill`` "dense" (per token only) computes a prompt with every
    head and neuron, as DejaVu's and TEAL's runtimes do, and selects from the first decode step on: the first token
    comes as fast as the dense model's, the KV cache of the prompt is the dense model's, and only the generated
    tokens are sparse (calling the module, a pass over a prompt, is then dense too); "sparse" (the default) selects
    for every prompt token as well. With ``predictor=None`` the
    predictor saved next to the checkpoint is loaded. ``verify`` (on by default; a prefill on a 2 x 9 probe batch)
    checks that the rewrite with every unit kept equals the model, and raises :class:`RewriteMismatch` if not.

    ``runtime`` "eager" runs the rewritten graphs as they are, "compile" through ``torch.compile``, and "auto" times
    each graph a generation of a batch of one runs both ways on a probe (a random 64-token prompt and its decode
    step, after compiling each: tens of seconds on a small model, minutes on a large one) and runs the compiled one
    where it is faster by more than 3% (``COMPILE_MARGIN``; a tie goes to eager, which never recompiles); the
    module's ``graph_runtimes`` says which each graph runs, and ``runtime_timings`` what the probe measured.

    With every unit kept (sparsity 0 for heads and neurons) the predictor does not run, since no score could change
    the selection, and a pass over a prompt (the prefill) is the model's own graph, the selection being every unit;
    the rewritten layers run in the decode steps, reading the model's own weights without a copy.

    The later layers' attention-output and MLP-down weights of ``model`` are stored input-major in place (the same
    values, laid out so that a kept input's weights are one contiguous run, as the gathers and decode kernels read
    them). On CPU, the weights every decode step reads whole (layer 0's projections, the LM head, the predictor's
    matrices) move to memory backed by huge pages, also in place and with the same values, where the native GEMV
    reads them faster.
    """
    config = SparsityConfig.from_arguments(sparsity, heads_sparsity, neurons_sparsity, scope)
    if granularity not in (*GRANULARITIES, None):
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if prefill not in PREFILLS:
        raise ValueError(f"prefill must be one of {PREFILLS}, got {prefill!r}")
    if max_gathered_bytes is not None and max_gathered_bytes < 0:
        raise ValueError(f"max_gathered_bytes must be >= 0, got {max_gathered_bytes}")
    model.eval()
    prefill_capture = capture(model, step="prefill_cache")
    structure = discover_structure(prefill_capture)
    predictor = _resolve_predictor(model, predictor, structure).eval()
    if isinstance(predictor, LayerwisePredictor):
        require_layerwise_scope(config)  # here too, since at sparsity 0 static scores stand in for it
    # a block-scoring predictor's neurons are kept in whole blocks, so the gathers stay contiguous
    config = replace(config, neuron_block=getattr(predictor, "neuron_block", 1))
    _warn_unreachable(structure, config)
    if granularity is None:
        trained_for = getattr(predictor, "granularity", None)
        granularity = trained_for if trained_for in GRANULARITIES else "prompt"
    if batch_selection not in BATCH_SELECTIONS:
        raise ValueError(f"batch_selection must be one of {BATCH_SELECTIONS}, got {batch_selection!r}")
    if batch_selection == "union" and (granularity != "prompt" or isinstance(predictor, LayerwisePredictor)):
        raise ValueError("batch_selection='union' needs a per-prompt selection by the shadow predictor (a per-token or "
                         "layerwise selection changes as it decodes); use batch_selection='per_row'")
    if prefill == "dense" and granularity != "token":
        raise ValueError("prefill='dense' needs granularity='token': per prompt the prefill is where the selection "
                         "is made and the later layers' KV cache keeps only the kept heads; use granularity='token' "
                         "(the prompt dense, every generated token selecting its own units) or prefill='sparse'")
    build = partial(_rewrite, model, predictor, config, granularity == "token", verify,
                    shared_heads=batch_selection == "union", dense_prefill=prefill == "dense")
    return SparseDecoder(model, predictor, config, build, build(prefill_capture), granularity=granularity,
                         runtime=runtime, max_positions=max_positions(model), max_gathered_bytes=max_gathered_bytes,
                         batch_selection=batch_selection, prefill=prefill)


def _rewrite(model: nn.Module, predictor: nn.Module, config: SparsityConfig, per_token: bool, verify: bool,
             prefill_capture: CapturedDecoder | None = None, *, shared_heads: bool = False,
             dense_prefill: bool = False) -> RewrittenGraphs:
    """Capture ``model`` (as it is now: its dtype and device are baked into the graphs) and run the passes; with
    ``dense_prefill``, or with every unit kept, the prefill graphs stay as captured (the decode graphs are rewritten
    alone)."""
    prefill_capture = prefill_capture or capture(model, step="prefill_cache")
    structure = discover_structure(prefill_capture)
    store_input_major(model, structure)  # the graphs hold the model's own parameters, so they see the layout
    # every unit kept: no scores can change the selection, so static ones stand in for the predictor, which
    # would cost every decode step its bytes for nothing (the rewritten layers still run)
    scorer = StaticScores.random(structure, seed=0) if config.keeps_every_unit else predictor
    store_whole_weights_on_huge_pages(model, structure, scorer)

    def insert_predictor(graph_structure: DecoderStructure) -> InsertShadowPredictor | InsertLayerwisePredictor:
        # one predictor at layer 0 (ShadowLLM, static scores), or one per later layer (DejaVu-style; its selectors
        # refuse a global scope, before the decode graph is captured)
        if isinstance(scorer, LayerwisePredictor):
            return InsertLayerwisePredictor(graph_structure, scorer, config, per_token=per_token)
        return InsertShadowPredictor(graph_structure, scorer, Selector(structure, config, shared_heads),
                                     per_token=per_token)

    def rewrite_prefill(shadow: InsertShadowPredictor | InsertLayerwisePredictor) -> tuple[nn.Module, dict]:
        prefill = editable_module(prefill_capture.program)
        return prefill, run_passes(prefill, [
            shadow,
            SparsifyMLP(structure),
            SparsifyAttention(structure, cache=True, per_token=per_token),
            Cleanup(structure),
        ])

    reports = {}
    if verify:
        # every unit kept: the shared selection of static scores keeps the check independent of the predictor
        keep_all = replace(config, heads=0.0, neurons=0.0, scope="per_layer", neuron_block=1)
        everything = StaticScores.random(structure, seed=0)
        dense_rewrite, _ = rewrite_prefill(InsertShadowPredictor(structure, everything, Selector(structure, keep_all),
                                                                 per_token=per_token))
        verify_rewrite(prefill_capture, structure, dense_rewrite)
    # every unit kept, the prefill has nothing to select: it runs as captured, without the rewritten ops' own work
    # (the rewrite with every unit kept is what ``verify`` compares with it)
    dense_prefill = dense_prefill or config.keeps_every_unit
    if dense_prefill:
        prefill = editable_module(prefill_capture.program)
        # without export's assertions and the copies of each layer's cache onto an empty one (as in the rewritten)
        cleaned = run_passes(prefill, [Cleanup(structure)])
    else:
        prefill, reports["prefill"] = rewrite_prefill(insert_predictor(structure))
    decode_capture = capture(model, step="decode")
    decode_structure = discover_structure(decode_capture)
    decode = editable_module(decode_capture.program)
    select_inputs = insert_predictor(decode_structure) if per_token else AddSelectionInputs(decode_structure)
    reports["decode"] = run_passes(decode, [
        select_inputs,
        SparsifyMLP(decode_structure),
        SparsifyAttention(decode_structure, cache=True, per_token=per_token),
        Cleanup(decode_structure),
        DenseLinears(decode_structure),
    ])
    decode_pregathered = prefill_gathering = None
    if not per_token:
        decode_pregathered = editable_module(decode_capture.program)
        reports["decode_pregathered"] = run_passes(decode_pregathered, [
            AddSelectionInputs(decode_structure),
            SparsifyMLP(decode_structure),
            SparsifyAttention(decode_structure, cache=True),
            PregatheredWeights(decode_structure),
            Cleanup(decode_structure),
            DenseLinears(decode_structure),
        ])
    for graph, report in reports.items():
        _require_all(report, structure, graph)
    if dense_prefill:
        reports["prefill"] = cleaned
    # the prefill's graph again, on the same parameters, for a generation's start: the next token's logits
    prefill_next = torch.fx.GraphModule(prefill, copy.deepcopy(prefill.graph))
    reports["prefill_next"] = run_passes(prefill_next, [LogitPositions(structure, "last"),
                                                        DenseLinears(structure, only={structure.lm_head.node})])
    if not per_token and not dense_prefill:
        # and one that also returns the weights it gathers
        prefill_gathering = torch.fx.GraphModule(prefill_next, copy.deepcopy(prefill_next.graph))
        reports["prefill_gathering"] = run_passes(prefill_gathering, [GatheredWeightOutputs(structure),
                                                                      Cleanup(structure)])
    graphs = SparseGraphs(prefill, prefill_next, prefill_gathering, decode, decode_pregathered)
    return RewrittenGraphs(structure, graphs, RewriteReport(reports))
