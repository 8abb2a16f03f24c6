"""``shadowfx bench``: the transformed model's speed against the dense model, measured in the same run.

For every setting (granularity, sparsity, batch size, sparse runtime) the dense model and ``shadowfx.transform``'s
model run in alternation on the same prompt (random token ids, or windows of real text for a checkpoint with a
tokenizer): the prefill (the prompt's pass up to the next token's logits,
which the PyTorch runtimes compute for the last position only, as generate does), the time to the first token (the
dense prefill against :meth:`SparseDecoder.start`, which per prompt also gathers the kept weights) and one decode
step with the KV cache. A ratio is the median over the alternated pairs; each setting is measured in ``runs``
independent runs, reported as their median with the range. Next to each decode ratio stands its Amdahl bound: batch
1 decode is bound by the bytes it reads, so the bound is the dense step's bytes over the sparse step's, from the
weight and KV-cache bytes the selection actually skips, with the predictor's bytes added per token (it runs every
step). Also reported: tokens per second, the bytes read per token, the path the decode took and the process's peak
resident memory after the setting (a high-water mark: it only grows over a run).

The models: ``opt-1.3b`` and ``llama-3.2-1b`` (a GQA SwiGLU model of Llama 3.2 1B's shape), both with random weights
and fewer layers with ``layers``, or a local checkpoint (its saved predictor when there is one, else an untrained
predictor of ``predictor_hidden`` units: the speed does not depend on the predictor's training, only on its size).
The predictors: ShadowLLM's one predictor at layer 0, DejaVu's one per later layer, or both, for the cost of each
per token as a ratio measured in the same run.
The dense baseline is the Hugging Face model eager, or compiled with ``torch.compile`` (``dense="compile"``). The
sparse runtime ``"onnx"`` runs the export of each setting in onnxruntime against the dense export in onnxruntime,
each row naming the dense baseline it was measured against; the sparse sessions take shadowfx's kernel library
(``kernels="auto"``; ``onnx_kernels`` says whether it could be built, else the function bodies ran); its time
to the first token is also measured with one export loaded at a time (``first_token_alone``), since the
alternation holds two copies of the weights.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import itertools
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import onnxruntime
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from shadowfx import native
from shadowfx.api import PREFILLS, checkpoint_directory, discover, transform
from shadowfx.capture import positions_from_mask
from shadowfx.data import DataError, read_text
from shadowfx.experiment import domain_texts, spread_windows
from shadowfx.files import atomic_write, atomic_write_text
from shadowfx.loading import load_tokenizer
from shadowfx.onnx_export import export_onnx
from shadowfx.predictor import LayerwisePredictor, ShadowPredictor, load_predictor, saved_predictors
from shadowfx.runtimes.onnx import OnnxDecoder
from shadowfx.selection import SparsityConfig, effective_sparsity, full_selection
from shadowfx.structure import DecoderStructure
from shadowfx.timing import alternating, alternating_within

SHAPES: dict[str, Callable[[], object]] = {
    "opt-1.3b": lambda: OPTConfig(vocab_size=50272, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                                  num_attention_heads=32, word_embed_proj_dim=2048, max_position_embeddings=2048),
    "llama-3.2-1b": lambda: LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                        head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                                        max_position_embeddings=4096),
}
"""Models of these shapes with random weights (``bench(model=<name>)``)."""


@dataclass(frozen=True)
class BenchSettings:
    sparsities: tuple[float, ...] = (0.5,)
    granularities: tuple[str, ...] = ("prompt", "token")
    batches: tuple[int, ...] = (1,)
    runtimes: tuple[str, ...] = ("eager",)  # of the sparse model: "eager", "compile", "auto", "onnx" (onnxruntime)
    dense: str = "eager"
    prompt_tokens: int = 128
    repeats: int = 16
    runs: int = 3
    predictor_hidden: int = 1024
    neuron_block: int = 1
    # "shadowllm": one predictor at layer 0; "dejavu": one per later layer, run as each layer starts
    predictors: tuple[str, ...] = ("shadowllm",)
    scope: str = "per_layer"
    batch_selection: str = "per_row"  # per prompt at batch > 1: "union" keeps one set of units for the batch
    # None: random token ids; "builtin": the built-in corpus's held-out documentation; else a text file: windows of
    # real text, one per batch row, tokenized by the checkpoint's tokenizer (what a trained predictor selects for)
    prompt_text: str | None = None
    # per token: "sparse" selects for the prompt's tokens too; "dense" computes the prompt with every unit and selects
    # from the first decode step on (per prompt the prefill always selects, and runs once, sparse)
    prefills: tuple[str, ...] = ("sparse",)


def shape_model(name: str, layers: int | None = None, seed: int = 0) -> nn.Module:
    """A model of the shape ``name`` (one of :data:`SHAPES`) with random weights, ``layers`` layers if given."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)} (or give a checkpoint directory)")
    config = SHAPES[name]()
    if layers is not None:
        if layers < 2:
            raise ValueError(f"layers must be at least 2 (layer 0 stays dense), got {layers}")
        config.num_hidden_layers = layers
    model_class = OPTForCausalLM if isinstance(config, OPTConfig) else LlamaForCausalLM
    torch.manual_seed(seed)
    return model_class(config).eval()


@dataclass
class DenseState:
    cache: DynamicCache
    mask: torch.Tensor


class DenseDecoder:
    """The Hugging Face model (or its compiled forward) with its KV cache, driven as the sparse runtimes are:
    ``start`` for the prefill that decoding continues, ``step`` for one token per row. The prefill computes the
    last position's logits only, as Hugging Face's generate asks for (``logits_to_keep=1``) where the model takes it."""

    def __init__(self, model: nn.Module, forward: Callable) -> None:
        self.forward = forward
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters \
            else {}

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DenseState:
        outputs = self.forward(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=positions_from_mask(attention_mask), cache=DynamicCache(), use_cache=True,
                               **self.last_logits)
        return DenseState(outputs.cache, attention_mask)

    def step(self, state: DenseState, next_token: torch.Tensor) -> None:
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        self.forward(input_ids=next_token[:, None], attention_mask=state.mask,
                     position_ids=positions_from_mask(state.mask)[:, -1:], cache=state.cache, use_cache=True)


def dense_step_bytes(model: nn.Module, structure: DecoderStructure, batch: int, prompt_tokens: int) -> int:
    """Bytes a dense decode step reads: every layer's weights, the LM head and the prompt's KV cache."""
    element = next(model.parameters()).element_size()
    dense = effective_sparsity(structure, full_selection(structure, 1), SparsityConfig(0.0, 0.0),
                               element_bytes=element, kv_cache_shrinks=True)
    head = structure.lm_head.in_features * structure.lm_head.out_features * element
    kv = sum(2 * layer.attention.num_kv_heads * layer.attention.head_dim for layer in structure.layers)
    return int(sum(layer.weight_bytes for layer in dense.layers)) + head + kv * element * prompt_tokens * batch


def _peak_resident_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux


PREFILL_SECONDS = 3.0


@torch.inference_mode()
def _measure_once(dense, sparse, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int) -> dict:
    """One run of one setting: prefill, time to first token and decode step, dense and sparse in alternation. Both
    are runtimes of one interface: ``start`` (the prefill decoding continues from; per prompt the sparse one also
    gathers the kept weights there, unless ``decode=False``) and ``step``. The prefill is the sparse ``start``
    without the gather; a dense model has none, so its prefill is its first token."""
    # the prefill and the first token get as many pairs as fit in about PREFILL_SECONDS each (a small model's prefill
    # is short and its ratio noisy), at least a quarter of the decode's repeats (3 at least) and at most four times
    least, most = max(3, repeats // 4), 4 * repeats
    dense_prefill, prefill, prefill_speedup = alternating_within(
        lambda: dense.start(input_ids, attention_mask), lambda: sparse.start(input_ids, attention_mask, decode=False),
        PREFILL_SECONDS, least, most, warmup=2)  # the first pair may compile or allocate
    dense_first, first, first_token_ratio = alternating_within(
        lambda: dense.start(input_ids, attention_mask), lambda: sparse.start(input_ids, attention_mask),
        PREFILL_SECONDS, least, most, warmup=1)
    dense_state, state = dense.start(input_ids, attention_mask), sparse.start(input_ids, attention_mask)
    token = input_ids[:, -1]
    dense_step, step, decode_speedup = alternating(lambda: dense.step(dense_state, token),
                                                   lambda: sparse.step(state, token), repeats)
    return {"dense_prefill_s": dense_prefill, "prefill_s": prefill, "prefill_speedup": prefill_speedup,
            "dense_first_token_s": dense_first, "first_token_s": first,
            # the time to first token as a ratio of times (<= 1 is no later than dense), the others as speedups
            "first_token_vs_dense": 1.0 / first_token_ratio,
            "dense_decode_step_s": dense_step, "decode_step_s": step, "decode_speedup": decode_speedup}


def _prompts(model: nn.Module, structure: DecoderStructure, settings: BenchSettings) -> dict[int, torch.Tensor]:
    """Each batch size's prompt [batch, prompt_tokens]: random token ids, or windows spread over real text
    (``settings.prompt_text``), one per row."""
    if settings.prompt_text is None:
        generator = torch.Generator().manual_seed(1)
        return {batch: torch.randint(0, structure.vocab_size, (batch, settings.prompt_tokens), generator=generator)
                for batch in settings.batches}
    directory = checkpoint_directory(model)
    if directory is None:
        raise ValueError("prompts of real text need the model's tokenizer: give a checkpoint directory (the shapes "
                         "have random weights and no tokenizer), or leave out the prompt text")
    builtin = settings.prompt_text == "builtin"
    file_text = None if builtin else read_text(settings.prompt_text)  # a file it cannot read is named first
    tokenizer = load_tokenizer(directory)
    text = domain_texts()["docs"].held_out if builtin else file_text
    prompts = {}
    for batch in settings.batches:
        windows = spread_windows(tokenizer, text, settings.prompt_tokens, batch, "prompt")
        if windows.shape[0] < batch:
            raise DataError(f"the prompt text holds {windows.shape[0]} windows of {settings.prompt_tokens} tokens, "
                            f"fewer than the batch of {batch}: give a longer text or fewer prompt tokens")
        prompts[batch] = windows
    return prompts


PREDICTOR_KINDS = ("shadowllm", "dejavu")


def _predictor_for(model: nn.Module, structure: DecoderStructure, settings: BenchSettings, kind: str,
                   granularity: str) -> nn.Module:
    """The predictor of ``kind`` saved with the checkpoint (the one trained for ``granularity`` when there is one),
    else an untrained one (the same size costs the same time)."""
    if kind not in PREDICTOR_KINDS:
        raise ValueError(f"unknown predictor kind {kind!r}; known: {', '.join(PREDICTOR_KINDS)}")
    directory = checkpoint_directory(model)
    saved = [p for p in saved_predictors(directory) if p.kind == kind] if directory is not None else []
    if saved:
        chosen = next((p for p in saved if p.granularity == granularity), saved[0])
        return load_predictor(directory, structure, kind=kind, granularity=chosen.granularity)
    if kind == "dejavu":
        return LayerwisePredictor.for_structure(structure, hidden=settings.predictor_hidden)
    return ShadowPredictor.for_structure(structure, hidden=settings.predictor_hidden,
                                         neuron_block=settings.neuron_block)


def _kind(predictor: nn.Module) -> str:
    return "dejavu" if isinstance(predictor, LayerwisePredictor) else "shadowllm"


def bench(model: nn.Module, settings: BenchSettings = BenchSettings(), *, predictor: nn.Module | None = None,
          name: str = "", progress: bool = True) -> dict:
    """Every setting of ``settings`` measured on ``model`` against its dense self (see the module docstring), with
    each of ``settings.predictors`` (or with ``predictor`` alone); the results as a JSON-ready dict (``write`` saves
    it with a plot). ``predictor_cost``: where both kinds ran a setting, ShadowLLM's decode speedup over DejaVu's.

    The runtime ``"onnx"`` exports the dense model and every setting into a temporary folder (removed afterwards)
    and times them in onnxruntime after the PyTorch runtimes, against the dense export in onnxruntime. Before
    loading its sessions, ``bench`` drops its own reference to ``model`` and the gathered-weight buffers it kept: pass
    a model nothing else holds (as the CLI does) and its memory is free for onnxruntime's copies of the weights.
    """
    structure = discover(model)
    torch_runtimes = [runtime for runtime in settings.runtimes if runtime != "onnx"]
    results = {"model": name or type(model).__name__, "model_class": type(model).__name__,
               "layers": structure.num_layers, "hidden_size": structure.hidden_size,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "settings": asdict(settings),
               "rows": []}
    prompts = _prompts(model, structure, settings)
    step_bytes = {batch: dense_step_bytes(model, structure, batch, settings.prompt_tokens) for batch in prompts}
    kinds = settings.predictors if predictor is None else (_kind(predictor),)
    unknown = set(settings.prefills) - set(PREFILLS)
    if unknown or not settings.prefills:
        raise ValueError(f"prefills must name some of {PREFILLS}, got {settings.prefills}")
    # per prompt the prefill makes the selection: it runs sparse, whatever the per-token prefills are
    cases = [(granularity, sparsity, kind, prefill) for granularity, sparsity, kind in itertools.product(
        settings.granularities, settings.sparsities, kinds)
        for prefill in (settings.prefills if granularity == "token" else ("sparse",))]

    def record(runs: list[dict], sparse, chosen: nn.Module, batch: int, runtime: str, granularity: str,
               sparsity: float, **details: object) -> dict:
        # a per-prompt selection is made once in the prefill; per token the predictor runs every step (none at
        # sparsity 0, where no score changes what is kept)
        predictor_bytes = sum(p.numel() * p.element_size() for p in chosen.parameters())
        per_step = predictor_bytes if granularity == "token" and not sparse.config.keeps_every_unit else 0
        row = _summarise(runs, sparse, batch=batch, runtime=runtime, granularity=granularity, sparsity=sparsity,
                         prompt_tokens=settings.prompt_tokens, step_bytes=step_bytes[batch], predictor_bytes=per_step)
        row.update(dense="onnx" if runtime == "onnx" else settings.dense, predictor=_kind(chosen),
                   predictor_bytes=predictor_bytes, prefill=sparse.prefill, **details)
        results["rows"].append(row)
        if progress:
            print(_line(row), file=sys.stderr, flush=True)
        return row

    def transformed(granularity: str, sparsity: float, kind: str, prefill: str, runtime: str, batch_selection: str):
        chosen = predictor or _predictor_for(model, structure, settings, kind, granularity)
        union = batch_selection == "union" and granularity == "prompt" and _kind(chosen) == "shadowllm"
        return chosen, transform(model, chosen, sparsity=sparsity, granularity=granularity, scope=settings.scope,
                                 runtime=runtime, batch_selection="union" if union else "per_row", prefill=prefill)

    with contextlib.ExitStack() as cleanup:
        exports = None
        if "onnx" in settings.runtimes:
            exports = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="shadowfx-bench-")))
            _export(model, exports / "dense", progress)  # first: transform changes the layout of some weights
        dense_forward = torch.compile(model, dynamic=True) if settings.dense == "compile" else model
        for batch, input_ids in prompts.items():
            dense = DenseDecoder(model, dense_forward)
            for runtime, (granularity, sparsity, kind, prefill) in itertools.product(torch_runtimes, cases):
                chosen, sparse = transformed(granularity, sparsity, kind, prefill, runtime, settings.batch_selection)
                runs = [_measure_once(dense, sparse, input_ids, torch.ones_like(input_ids), settings.repeats)
                        for _ in range(settings.runs)]
                # which runtime ran each graph ("auto" chooses per graph)
                record(runs, sparse, chosen, batch, runtime, granularity, sparsity,
                       graph_runtimes=sparse.graph_runtimes)
                del sparse
        if exports is None:
            return _finish(results)
        exported = []
        for index, (granularity, sparsity, kind, prefill) in enumerate(cases):
            chosen, sparse = transformed(granularity, sparsity, kind, prefill, "eager", "per_row")  # the one exported
            exported.append((chosen, _export(sparse, exports / f"sparse-{index}", progress)))
            del sparse
        # onnxruntime holds its own copies of the weights: the PyTorch model's memory is freed for them first
        del model, dense_forward, dense, transformed
        torch._dynamo.reset()  # compiled code keeps the model it was compiled for
        gc.collect()
        native.release_gathered_buffers()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        # every session has its own threads, and a pool whose session has just run spins for more work by default,
        # taking the cores from the session that runs next: alternated with the other export, a SmolLM2 decode step
        # took twice its time alone, on either side. Without spinning each session runs as it does alone.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        dense_onnx = OnnxDecoder(exports / "dense", structure=structure, session_options=options)
        measured = []
        for (chosen, directory), (granularity, sparsity, _, _) in zip(exported, cases):
            sparse_onnx = OnnxDecoder(directory, structure=structure, session_options=options, kernels="auto")
            for batch, input_ids in prompts.items():
                runs = [_measure_once(dense_onnx, sparse_onnx, input_ids, torch.ones_like(input_ids),
                                      settings.repeats) for _ in range(settings.runs)]
                measured.append((record(runs, sparse_onnx, chosen, batch, "onnx", granularity, sparsity,
                                        onnx_kernels=sparse_onnx.kernels is not None), directory, input_ids))
            del sparse_onnx
        del dense_onnx
        for row, directory, input_ids in measured:
            row["first_token_alone"] = _first_token_alone(exports / "dense", directory, input_ids, structure, options,
                                                          max(3, settings.repeats // 4))
            if progress:
                alone = row["first_token_alone"]
                print(f"batch {row['batch']} onnx {row['granularity']:6s} {row['sparsity']:.2f} prefill "
                      f"{row['prefill']}: first token with "
                      f"one export loaded at a time {alone['first_token_s']:.3f} s against dense "
                      f"{alone['dense_first_token_s']:.3f} s ({alone['first_token_vs_dense']:.2f}x dense's time)",
                      file=sys.stderr, flush=True)
    return _finish(results)


def _first_token_alone(dense: Path, sparse: Path, input_ids: torch.Tensor, structure: DecoderStructure,
                       options: onnxruntime.SessionOptions, repeats: int) -> dict:
    """onnxruntime's time to the first token with one export's sessions loaded at a time: dense, sparse, then dense
    again, so that drift over the three shows in the dense range. The alternated measurement holds both exports at
    once, and a model near the machine's memory then reads weight pages the system evicted back from disk."""
    mask = torch.ones_like(input_ids)
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for name, directory in (("dense", dense), ("sparse", sparse), ("dense", dense)):
        gc.collect()  # the decoder before this one is gone: one export's sessions in memory
        decoder = OnnxDecoder(directory, structure=structure, session_options=options,
                              kernels="auto" if name == "sparse" else None)
        decoder.start(input_ids, mask)  # the first run of a session allocates and plans
        for _ in range(repeats):
            started = time.perf_counter()
            decoder.start(input_ids, mask)
            times[name].append(time.perf_counter() - started)
        del decoder
    dense_s, sparse_s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    return {"dense_first_token_s": dense_s, "dense_first_token_s_range": [min(times["dense"]), max(times["dense"])],
            "first_token_s": sparse_s, "first_token_s_range": [min(times["sparse"]), max(times["sparse"])],
            "first_token_vs_dense": sparse_s / dense_s}


def _finish(results: dict) -> dict:
    results["predictor_cost"] = _predictor_cost(results["rows"])
    return results


def _export(model, directory: Path, progress: bool) -> Path:
    with contextlib.redirect_stderr(sys.stderr if progress else io.StringIO()):  # export_onnx's progress bar
        return export_onnx(model, directory)


def _predictor_cost(rows: list[dict]) -> list[dict]:
    """For every setting measured with both predictor kinds: ShadowLLM's decode speedup over DejaVu's (each against
    the dense model timed alongside it) and DejaVu's predictor bytes over ShadowLLM's."""
    by_setting: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["batch"], row["runtime"], row["granularity"], row["sparsity"], row["prefill"])
        by_setting.setdefault(key, {})[row["predictor"]] = row
    return [{"batch": batch, "runtime": runtime, "granularity": granularity, "sparsity": sparsity, "prefill": prefill,
             "shadowllm_over_dejavu_decode": kinds["shadowllm"]["decode_speedup"] / kinds["dejavu"]["decode_speedup"],
             "dejavu_over_shadowllm_predictor_bytes": kinds["dejavu"]["predictor_bytes"]
             / kinds["shadowllm"]["predictor_bytes"]}
            for (batch, runtime, granularity, sparsity, prefill), kinds in by_setting.items() if len(kinds) == 2]


def _summarise(runs: list[dict], sparse, *, batch: int, runtime: str, granularity: str, sparsity: float,
               prompt_tokens: int, step_bytes: int, predictor_bytes: int) -> dict:
    """The medians of the runs, their ranges, the bound and the bytes of one setting."""
    row: dict = {"batch": batch, "runtime": runtime, "granularity": granularity, "sparsity": sparsity,
                 "batch_selection": sparse.batch_selection}
    for key in runs[0]:
        values = [run[key] for run in runs]
        row[key] = statistics.median(values)
        row[f"{key}_range"] = [min(values), max(values)]
    effective = sparse.effective_sparsity()
    skipped = effective.weight_bytes_skipped + effective.kv_bytes_per_token_skipped * prompt_tokens * batch
    sparse_bytes = step_bytes - skipped + predictor_bytes
    row.update({
        "decode_path": sparse.last_decode_path, "gathered_bytes": sparse.last_gathered_bytes,
        "heads_skipped": effective.heads, "neurons_skipped": effective.neurons,
        "sparse_layers_skipped": effective.sparse_layers,
        "dense_bytes_per_token": step_bytes / batch, "sparse_bytes_per_token": sparse_bytes / batch,
        "predictor_bytes_per_step": predictor_bytes, "decode_amdahl_bound": step_bytes / sparse_bytes,
        "dense_tokens_per_s": batch / row["dense_decode_step_s"], "tokens_per_s": batch / row["decode_step_s"],
        "peak_resident_bytes": _peak_resident_bytes(),
    })
    row["share_of_bound"] = row["decode_speedup"] / row["decode_amdahl_bound"]
    return row


def _line(row: dict) -> str:
    low, high = row["decode_speedup_range"]
    return (f"batch {row['batch']} {row['runtime']:7s} {row['granularity']:6s} {row['sparsity']:.2f} "
            f"{row['predictor']}{', dense prefill' if row['prefill'] == 'dense' else ''}: decode "
            f"{row['decode_speedup']:.2f}x ({low:.2f}-{high:.2f}; bound {row['decode_amdahl_bound']:.2f}x, "
            f"path {row['decode_path']}), prefill {row['prefill_speedup']:.2f}x, first token "
            f"{row['first_token_vs_dense']:.2f}x dense's time, {row['tokens_per_s']:.1f} tokens/s vs "
            f"{row['dense_tokens_per_s']:.1f}"
            + (f"; compiled: {', '.join(n for n, r in row['graph_runtimes'].items() if r == 'compile') or 'none'}"
               if row["runtime"] == "auto" else ""))


def write(results: dict, out: str | Path) -> tuple[Path, Path]:
    """``bench.json`` and ``bench.png`` in ``out``; returns their paths."""
    out = Path(out)
    json_path = atomic_write_text(out / "bench.json", json.dumps(results, indent=2))
    return json_path, _plot(results, out / "bench.png")


def _plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [f"B{r['batch']} {r['runtime']}\n{r['granularity']} {r['sparsity']:.2f}\n{r['predictor']}"
              + ("\ndense prefill" if r["prefill"] == "dense" else "") for r in rows]
    x = list(range(len(rows)))
    figure, axis = plt.subplots(figsize=(1.8 * len(rows) + 2, 4.2))
    measured = [r["decode_speedup"] for r in rows]
    error = [[m - r["decode_speedup_range"][0] for m, r in zip(measured, rows)],
             [r["decode_speedup_range"][1] - m for m, r in zip(measured, rows)]]
    axis.bar([i - 0.2 for i in x], measured, 0.4, yerr=error, capsize=3, label="decode speedup (median, run range)")
    axis.bar([i + 0.2 for i in x], [r["decode_amdahl_bound"] for r in rows], 0.4, label="Amdahl bound (bytes)")
    axis.plot(x, [r["prefill_speedup"] for r in rows], "k^", label="prefill speedup")
    axis.plot(x, [1.0 / r["first_token_vs_dense"] for r in rows], "rv", label="first-token speedup")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks(x, labels, fontsize=8)
    axis.set_ylabel("x vs dense (median)")
    axis.set_title(f"shadowfx vs dense {results['settings']['dense']}: {results['model']}, "
                   f"{results['threads']} threads")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
