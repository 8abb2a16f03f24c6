"""Run rewritten decoder graphs in PyTorch (eagerly, through ``torch.compile``, or each graph whichever of the two a
probe times faster), with a generation loop.

The module returned by :func:`shadowfx.transform` holds rewritten graphs. The prefill runs layer 0, the shadow
predictor and the selection, then the sparse layers, and returns the logits, the KV cache and the selection; called,
the module returns every position's logits, and ``start`` (a generation) computes the last position's only.

* Per prompt, the decode step reuses the prompt's selection, and the KV cache of layers >= 1 holds only the kept
  heads. The kept weights are gathered once and every step runs dense matmuls on them. When every row's copy is
  sure to fit ``max_gathered_bytes`` (with the default, a batch of one), the prefill itself gathers them, computes
  on them and returns them, so the first token waits for one gather, not two; otherwise they are gathered after the
  prefill, shared by the rows when the rows chose alike, and when that copy would exceed ``max_gathered_bytes``
  (large batches whose rows chose differently) the step gathers from the full weights on every call instead, which
  needs no extra memory.
* Per token, the decode step runs the predictor on the new token and selects again; the KV cache stays complete.
  With a dense prefill (``transform(prefill="dense")``) the prefill graphs are the model's, as captured: the prompt
  is computed with every unit, and the decode steps alone select.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from shadowfx import native
from shadowfx.compact import CompactWeights, compact_weights
from shadowfx.passes.base import PassResult
from shadowfx.selection import (
    BatchSelection,
    EffectiveSparsity,
    Selection,
    SparsityConfig,
    effective_sparsity,
    full_selection,
    union_of_neurons,
)
from shadowfx.structure import DecoderStructure
from shadowfx.timing import alternating_within

Granularity = Literal["prompt", "token"]
Runtime = Literal["eager", "compile", "auto"]
DecodePath = Literal["pregathered", "gather_per_call", "per_token"]
Prefill = Literal["sparse", "dense"]
PREFILLS: tuple[Prefill, ...] = get_args(Prefill)
PROBE_TOKENS, PROBE_SECONDS, PROBE_PAIRS = 64, 2.0, (5, 50)
"""``runtime="auto"``'s probe: the prompt's length, and for each graph the alternated eager and compiled calls, as
many pairs as fit in about PROBE_SECONDS within PROBE_PAIRS (after three, the first of which compiles)."""
COMPILE_MARGIN = 0.03
"""How much faster than eager a compiled graph must be for ``runtime="auto"`` to run it."""


class InputError(ValueError):
    """Inputs the transformed model cannot run on."""


@dataclass(frozen=True)
class RewriteReport:
    """What the passes changed in each graph: graph name -> pass name -> result (per-layer counts)."""

    graphs: dict[str, dict[str, PassResult]]

    def counts(self) -> dict[str, dict[str, int]]:
        return {graph: {name: result.total for name, result in results.items()}
                for graph, results in self.graphs.items()}


@dataclass
class DecodeState:
    """A generation in progress: next-token logits [B, V], the KV cache, the mask, and the decode step to run."""

    logits: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    run: Callable
    inputs: list[torch.Tensor]


@dataclass(frozen=True)
class SparseGraphs:
    prefill: torch.fx.GraphModule  # every position's logits
    prefill_next: torch.fx.GraphModule  # the last position's logits only, for a generation's start
    # per prompt only: the prefill that gathers the kept weights once, computes on them and returns them per row
    prefill_gathering: torch.fx.GraphModule | None
    decode: torch.fx.GraphModule  # per prompt: gathers from the full weights every step; per token: selects too
    decode_pregathered: torch.fx.GraphModule | None  # per prompt only: reads the prompt's compact weights


@dataclass(frozen=True)
class RuntimeTiming:
    """One graph timed by ``runtime="auto"`` on the probe: median seconds per call, eager and ``torch.compile``d,
    and the median over the alternated pairs of eager's time over compiled's."""

    eager_s: float
    compile_s: float
    speedup: float

    @property
    def chosen(self) -> str:
        """Compiled where it beats eager by more than :data:`COMPILE_MARGIN`: a tie within the noise goes to eager,
        which has nothing to recompile when the shapes change."""
        return "compile" if self.speedup > 1 + COMPILE_MARGIN else "eager"


@dataclass(frozen=True)
class RewrittenGraphs:
    """What the passes made of the model as it was captured: its structure, the graphs and the pass reports."""

    structure: DecoderStructure
    graphs: SparseGraphs
    rewrites: RewriteReport


def layer_weight_bytes(structure: DecoderStructure, model: nn.Module) -> int:
    """Bytes of the attention and MLP weights of layers 1..L-1 (the default bound on a prompt's gathered copy)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    total = 0
    for layer in structure.layers[1:]:
        projections = {p.weight for p in (layer.attention.q, layer.attention.k, layer.attention.v, layer.attention.o,
                                          layer.mlp.up, layer.mlp.down) + ((layer.mlp.gate,) if layer.mlp.gate else ())}
        total += sum(params[name].numel() * params[name].element_size() for name in projections)
    return total


class GenerationLoop:
    """Input checks and ``generate`` on top of a runtime's ``start`` (prefill) and ``step`` (one token per row).

    Shared by the PyTorch and onnxruntime runtimes; a subclass sets ``max_positions`` and ``generation_config`` and
    returns from ``start`` a state whose ``logits`` are the next-token logits ``[B, V]``.
    """

    max_positions: int | None
    generation_config: object
    # for effective_sparsity: what the model is and selected last (None before the first call, or with no selection)
    structure: DecoderStructure
    config: SparsityConfig | None
    granularity: Granularity | Literal["dense"]
    prefill: Prefill  # "dense": the prompt is computed with every unit and selects nothing
    element_bytes: int  # of one weight
    last_selection: Selection | None

    def effective_sparsity(self) -> EffectiveSparsity:
        """What the last call's selection skipped, per layer and overall (heads, neurons, weight and KV bytes)."""
        if self.last_selection is None:
            raise RuntimeError("no selection yet: call the model or generate() first" + (
                " (a dense prefill selects nothing: the decode steps do)"
                if self.prefill == "dense" and self.granularity == "token" else ""))
        return effective_sparsity(self.structure, self.last_selection, self.config, element_bytes=self.element_bytes,
                                  kv_cache_shrinks=self.granularity == "prompt")

    def _every_unit(self, input_ids: torch.Tensor) -> Selection:
        """The selection of a prefill with every unit kept, whose graph (the model's own) selects nothing: every unit,
        per row, or per token of ``input_ids``."""
        return full_selection(self.structure, input_ids.shape[0], input_ids.device,
                              tokens=input_ids.shape[1] if self.granularity == "token" else None)

    # ---- inputs ------------------------------------------------------------------------------------------------------
    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               new_tokens: int = 0) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise InputError("input_ids must be an integer tensor [batch, length]")
        batch, length = input_ids.shape
        if batch == 0 or length == 0:
            raise InputError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}; give at least one token")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        if bool((attention_mask[:, -1] == 0).any()):
            raise InputError("prompts must be left-padded: the shadow predictor reads each row's last position, and "
                             "some rows end in padding (tokenizer.padding_side = 'left')")
        if self.max_positions is not None and length + new_tokens > self.max_positions:
            raise InputError(f"{length} prompt tokens + {new_tokens} new tokens exceed the model's "
                             f"{self.max_positions} positions")
        return attention_mask.to(input_ids.dtype)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Prompt plus up to ``max_new_tokens`` tokens, greedy or sampled; a row that ends pads with ``pad_token_id``.

        With ``return_logits`` also the logits each new token was chosen from, ``[B, new, V]``.
        """
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
        eos = self._eos(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self._default_pad(eos)
        state = self.start(input_ids, attention_mask, decode=max_new_tokens > 1, new_tokens=max_new_tokens)
        tokens = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        chosen_from = []
        for step in range(max_new_tokens):
            chosen_from.append(state.logits)
            next_token = self._choose(state.logits, do_sample, temperature, top_k, top_p, generator)
            if eos:
                next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
                finished |= torch.isin(next_token, torch.tensor(eos, device=next_token.device))
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            self.step(state, next_token)
        if return_logits:
            return tokens, (torch.stack(chosen_from, dim=1) if chosen_from
                            else state.logits.new_empty(state.logits.shape[0], 0, state.logits.shape[-1]))
        return tokens

    def _eos(self, eos_token_id: int | list[int] | None) -> list[int]:
        if eos_token_id is None and self.generation_config is not None:
            eos_token_id = self.generation_config.eos_token_id
        if eos_token_id is None:
            return []
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    def _default_pad(self, eos: list[int]) -> int:
        pad = getattr(self.generation_config, "pad_token_id", None)
        return pad if pad is not None else (eos[0] if eos else 0)

    @staticmethod
    def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:
            ordered, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class SparseDecoder(GenerationLoop, nn.Module):
    """A drop-in for the model's forward (logits for ``input_ids`` + ``attention_mask``) with ``generate``.

    The captured graphs are specific to the dtype and device the model had at capture, so ``.to()``, ``.half()``
    and the like rebuild them (``rebuild`` re-captures the converted model and runs the passes again).
    """

    def __init__(self, model: nn.Module, predictor: nn.Module, config: SparsityConfig,
                 rebuild: Callable[[], RewrittenGraphs], rewritten: RewrittenGraphs, *, granularity: Granularity,
                 runtime: Runtime, max_positions: int | None, max_gathered_bytes: int | None,
                 batch_selection: BatchSelection = "per_row", prefill: Prefill = "sparse") -> None:
        super().__init__()
        self.model = model
        self.predictor = predictor
        self.config = config
        self.granularity = granularity
        self.batch_selection = batch_selection
        self.prefill = prefill
        self.runtime = runtime
        self.max_positions = max_positions
        self.generation_config = getattr(model, "generation_config", None)
        self._rebuild = rebuild
        self._max_gathered_bytes = max_gathered_bytes
        self._install(rewritten)

    def _install(self, rewritten: RewrittenGraphs) -> None:
        self.structure = rewritten.structure
        self.graphs = rewritten.graphs
        self.rewrites = rewritten.rewrites
        self._layer_weight_bytes = layer_weight_bytes(self.structure, self.model)
        self.max_gathered_bytes = (self._max_gathered_bytes if self._max_gathered_bytes is not None
                                   else self._layer_weight_bytes)
        parameter = next(self.model.parameters())
        self._dtype, self._device = parameter.dtype, parameter.device
        self.element_bytes = parameter.element_size()
        if self._device.type == "cpu":  # the native kernels and their copy buffers are CPU-only
            native.kernels()  # built here on first use, rather than in the first decode step
            if self.granularity == "prompt":
                native.keep_gathered_buffers(self.max_gathered_bytes)
        graphs = {name: graph for name, graph in vars(self.graphs).items() if graph is not None}
        self._runs: dict[str, Callable] = (
            {name: torch.compile(graph, dynamic=True) for name, graph in graphs.items()}
            if self.runtime == "compile" else dict(graphs))
        self._every_unit_weights: CompactWeights | None = None
        self.last_selection: Selection | None = None
        self.last_decode_path: DecodePath | None = None
        self.last_gathered_bytes = 0
        self.runtime_timings: dict[str, RuntimeTiming] = {}
        if self.runtime == "auto":
            self.runtime_timings = self._time_runtimes(graphs)
        self.graph_runtimes: dict[str, str] = {
            name: self.runtime_timings[name].chosen if name in self.runtime_timings
            else "compile" if self.runtime == "compile" else "eager" for name in graphs}

    @property
    def prefill_selects(self) -> bool:
        """Whether the prefill graphs output a selection: not where they are the model's own graph, with a dense
        prefill or with every unit kept."""
        return self.prefill == "sparse" and not self.config.keeps_every_unit

    def _apply(self, fn: Callable, recurse: bool = True) -> SparseDecoder:
        super()._apply(fn, recurse)
        parameter = next(self.model.parameters())
        if (parameter.dtype, parameter.device) != (self._dtype, self._device):
            self._install(self._rebuild())
        return self

    def _unpack(self, outputs: tuple) -> tuple[torch.Tensor, list, list, Selection | None]:
        """(logits, keys, values, selection or None when the graph does not select); what follows the selection
        (the gathering prefill's kept weights) is left out."""
        layers = self.structure.num_layers
        later = layers - 1
        logits, cache = outputs[0], outputs[1:1 + 2 * layers]
        chosen = outputs[1 + 2 * layers:1 + 2 * layers + 2 * later]
        selection = Selection(kv_heads=tuple(chosen[:later]), neurons=tuple(chosen[later:])) if chosen else None
        return logits, list(cache[:layers]), list(cache[layers:]), selection

    def _prefill(self, graph: str, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, list, list, Selection | None]:
        """``_unpack`` of a prefill graph's outputs. With every unit kept the prefill is the model's own graph, which
        selects nothing: the selection is every unit."""
        logits, keys, values, selection = self._unpack(self._runs[graph](input_ids, attention_mask))
        if selection is None and self.config.keeps_every_unit:
            selection = self._every_unit(input_ids)
        return logits, keys, values, selection

    # ---- running -----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        attention_mask = self._check(input_ids, attention_mask)
        logits, _, _, self.last_selection = self._prefill("prefill", input_ids, attention_mask)
        return logits

    @torch.inference_mode()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
              decode: bool = True, new_tokens: int = 0) -> DecodeState:
        """Prefill the prompt; the state holds the next-token logits and what :meth:`step` needs.

        For a per-prompt selection this is where the kept weights are gathered (``decode=False`` skips that).
        ``new_tokens``: how many tokens will follow, refused up front if they would not fit the model's positions.
        """
        attention_mask = self._check(input_ids, attention_mask, new_tokens)
        if decode and self._gathers_in_prefill(input_ids.shape[0]):
            outputs = self._runs["prefill_gathering"](input_ids, attention_mask)
            logits, keys, values, selection = self._unpack(outputs)
            kept = list(outputs[1 + 2 * self.structure.num_layers + 2 * (self.structure.num_layers - 1):])
            # every gathered tensor leads with the batch axis; the output biases, kept whole, are the 1-D ones
            self.last_decode_path = "pregathered"
            self.last_gathered_bytes = sum(t.numel() * t.element_size() for t in kept if t.dim() > 1)
            run, inputs = self._runs["decode_pregathered"], kept
        else:
            logits, keys, values, selection = self._prefill("prefill_next", input_ids, attention_mask)
            if decode and self.batch_selection == "union":
                selection = union_of_neurons(selection, self.structure)  # one copy of the kept weights for all rows
            run, inputs = self._decode_step(selection) if decode else (self._runs["decode"], [])
        self.last_selection = selection
        return DecodeState(logits[:, -1], keys, values, attention_mask, run, inputs)

    def _gathers_in_prefill(self, batch: int) -> bool:
        """Whether the prefill gathers the kept weights itself: per row, so only where ``batch`` copies of every
        later layer's weights would fit ``max_gathered_bytes`` (the kept ones are known only after the prefill)."""
        return ("prefill_gathering" in self._runs and "decode_pregathered" in self._runs
                and not self.config.keeps_every_unit  # then the decode reads the model's own weights, uncopied
                and batch * self._layer_weight_bytes <= self.max_gathered_bytes
                and (batch == 1 or self.batch_selection == "per_row"))  # a union is known after the prefill

    @torch.inference_mode()
    def step(self, state: DecodeState, next_token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``[B]``; returns (and keeps in ``state``) the logits for the token after it."""
        if self.max_positions is not None and state.mask.shape[1] >= self.max_positions:
            raise InputError(f"the sequence already fills the model's {self.max_positions} positions")
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        logits, state.keys, state.values, stepped = self._unpack(
            state.run(next_token[:, None], state.mask, *state.keys, *state.values, *state.inputs))
        if stepped is not None:
            self.last_selection = stepped
        state.logits = logits[:, -1]
        return state.logits

    def _decode_step(self, selection: Selection) -> tuple[Callable, list[torch.Tensor]]:
        """The decode graph for this generation and the inputs it takes besides the token, mask and cache."""
        if self.granularity == "token":
            self.last_decode_path, self.last_gathered_bytes = "per_token", 0
            return self._runs["decode"], []
        if "decode_pregathered" in self._runs:
            compact = self._kept_weights(selection)
            if compact is not None:
                self.last_decode_path, self.last_gathered_bytes = "pregathered", compact.gathered_bytes
                return self._runs["decode_pregathered"], compact.tensors
        self.last_decode_path, self.last_gathered_bytes = "gather_per_call", 0
        return self._runs["decode"], [*selection.kv_heads, *selection.neurons]

    def _kept_weights(self, selection: Selection) -> CompactWeights | None:
        """The kept weights a per-prompt decode reads. With every unit kept they are views of the model's own
        weights, the same for every generation and batch: planned once (a few milliseconds of a small model's first
        token), until a conversion rebuilds the graphs."""
        if self._every_unit_weights is not None:
            return self._every_unit_weights
        compact = compact_weights(self.model, self.structure, selection, max_bytes=self.max_gathered_bytes)
        if self.config.keeps_every_unit:
            self._every_unit_weights = compact
        return compact

    @torch.inference_mode()
    def _time_runtimes(self, graphs: dict[str, torch.fx.GraphModule]) -> dict[str, RuntimeTiming]:
        """``runtime="auto"``: the forward and every graph a generation of a batch of one runs, each eager and
        through ``torch.compile``, timed in alternation on a probe (a random prompt of :data:`PROBE_TOKENS` tokens,
        fewer where the model has fewer positions, then its decode step); the faster one runs from then on, and a
        graph no such generation runs stays eager. The pre-gathered decode is timed where the probe's generation
        takes it (not when ``max_gathered_bytes`` is too small for a batch of one's copy)."""
        tokens = PROBE_TOKENS if self.max_positions is None else max(1, min(PROBE_TOKENS, self.max_positions - 1))
        vocab = self.model.get_input_embeddings().num_embeddings
        input_ids = torch.randint(vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(self._device)
        mask = torch.ones_like(input_ids)
        synchronize = torch.cuda.synchronize if self._device.type == "cuda" else (lambda: None)
        timings = {}

        def time_graph(name: str, *args: torch.Tensor) -> None:
            eager, compiled = graphs[name], torch.compile(graphs[name], dynamic=True)
            timings[name] = RuntimeTiming(*alternating_within(
                lambda: (eager(*args), synchronize()), lambda: (compiled(*args), synchronize()), PROBE_SECONDS,
                *PROBE_PAIRS, warmup=3))
            if timings[name].chosen == "compile":
                self._runs[name] = compiled

        starts = "prefill_gathering" if self._gathers_in_prefill(1) else "prefill_next"
        for name in ("prefill", starts):
            time_graph(name, input_ids, mask)
        state = self.start(input_ids, mask)  # on the prefill graphs just chosen
        step = (input_ids[:, -1:], torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), *state.keys,
                *state.values)
        if self.last_decode_path == "pregathered":
            time_graph("decode_pregathered", *step, *state.inputs)
        selection = self.last_selection
        time_graph("decode", *step, *([] if self.granularity == "token" else [*selection.kv_heads,
                                                                               *selection.neurons]))
        self.last_selection, self.last_decode_path, self.last_gathered_bytes = None, None, 0
        return timings
