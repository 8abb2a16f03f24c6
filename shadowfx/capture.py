"""Capture a causal-LM decoder as a ``torch.export`` graph.

Three graphs can be captured from one model:

* ``prefill``: ``(input_ids [B, S], attention_mask [B, S]) -> logits [B, S, V]`` with dynamic ``B`` and ``S``;
* ``prefill_cache``: the same, returning ``(logits, keys, values)``: the KV cache a generation starts from;
* ``decode``: one new token against a KV cache,
  ``(input_ids [B, 1], attention_mask [B, P + 1], past_keys, past_values) -> (logits [B, 1, V], keys, values)``
  with dynamic ``B`` and past length ``P``; keys/values are tuples with one ``[B, H_kv, P, D]`` tensor per layer, so
  the graph has plain tensor inputs and outputs (no cache object crosses the graph boundary).

Position ids are derived from the attention mask the way ``generate`` does it (``cumsum - 1``, pad positions set to
1), so left-padded batches get the same positions in the captured graph as in Hugging Face generation.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

Step = Literal["prefill", "prefill_cache", "decode"]

# Attribute under which the wrapper holds the user's model; node module paths start with it and discovery strips it.
WRAPPED_MODEL_ATTR = "lm"


class CaptureError(RuntimeError):
    """The model cannot be captured as a decoder graph."""


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` builds them: count of real tokens so far, pad positions pinned to 1."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _forward_parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _logits_of(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if logits is None:
        raise CaptureError(f"the model returned {type(output).__name__}, which carries no logits tensor")
    return logits


def _cache_keyword(model: nn.Module) -> str:
    params = _forward_parameters(model)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise CaptureError(
        f"{type(model).__name__}.forward takes no KV cache argument (`cache` or `past_key_values`), so no decode "
        "graph can be captured; capture the prefill graph instead"
    )


class PrefillStep(nn.Module):
    """``(input_ids, attention_mask) -> logits`` around a causal LM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED_MODEL_ATTR, model)
        params = _forward_parameters(model)
        self._pass_positions = "position_ids" in params
        self._pass_use_cache = "use_cache" in params

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, object] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._pass_positions:
            kwargs["position_ids"] = positions_from_mask(attention_mask)
        if self._pass_use_cache:
            kwargs["use_cache"] = False
        return _logits_of(getattr(self, WRAPPED_MODEL_ATTR)(**kwargs))


class DecodeStep(nn.Module):
    """A step against the KV cache as explicit per-layer tensors (an empty cache for a prefill)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED_MODEL_ATTR, model)
        self._cache_keyword = _cache_keyword(model)
        self._pass_positions = "position_ids" in _forward_parameters(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_keys: tuple[torch.Tensor, ...],
        past_values: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        from transformers import DynamicCache

        cache = DynamicCache(list(zip(past_keys, past_values)))
        kwargs: dict[str, object] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            self._cache_keyword: cache,
            "use_cache": True,
        }
        if self._pass_positions:
            kwargs["position_ids"] = positions_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        output = getattr(self, WRAPPED_MODEL_ATTR)(**kwargs)
        # The model appends this step's keys/values to `cache` in place.
        keys = tuple(layer.keys for layer in cache.layers)
        values = tuple(layer.values for layer in cache.layers)
        return _logits_of(output), keys, values


@dataclass
class CapturedDecoder:
    """A captured decoder graph and how to call it."""

    program: ExportedProgram
    step: Step
    model: nn.Module
    num_layers: int | None = None  # graphs with a cache: how many (key, value) pairs it holds

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def module(self) -> torch.fx.GraphModule:
        """The graph as a runnable module (parameters as attributes)."""
        return self.program.module()

    def __call__(self, *args: torch.Tensor | tuple[torch.Tensor, ...]):
        return self.program.module()(*args)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position scheme supports, if its config says so."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise CaptureError("cannot tell the number of layers from the model config, which a decode capture needs")


def _example_inputs(model: nn.Module, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
    attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    attention_mask[0, :1] = 0  # a left-padded row keeps the padding path in the graph
    return input_ids, attention_mask


def _example_cache(model: nn.Module, batch: int, past: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Run the model once to get a cache of the right per-layer shapes."""
    input_ids, attention_mask = _example_inputs(model, batch, past)
    with torch.no_grad():
        _, keys, values = DecodeStep(model)(input_ids, attention_mask, (), ())
    return keys, values


def capture(
    model: nn.Module,
    *,
    step: Step = "prefill",
    example_batch: int = 2,
    example_length: int = 8,
) -> CapturedDecoder:
    """Capture ``model`` (a causal-LM decoder) with ``torch.export`` (non-strict), dynamic batch and length.

    ``step="prefill"`` gives the ``(input_ids, attention_mask) -> logits`` graph, ``"prefill_cache"`` the same with
    the KV cache as extra outputs, ``"decode"`` the one-token step with an explicit KV cache. The model is put in
    eval mode (dropout off), which is what all graphs compute.
    """
    if step not in ("prefill", "prefill_cache", "decode"):
        raise ValueError(f"step must be 'prefill', 'prefill_cache' or 'decode', got {step!r}")
    if example_batch < 2 or example_length < 3:
        raise ValueError("example_batch must be >= 2 and example_length >= 3 so that batch and length stay dynamic")
    model.eval()
    state = (step, example_batch, example_length, _model_state(model))
    programs = _CAPTURES.setdefault(model, {})
    if state not in programs:
        programs[state] = _export(model, step, example_batch, example_length)
    program, num_layers = programs[state]
    return CapturedDecoder(program=program, step=step, model=model, num_layers=num_layers)


# torch.export of a model costs seconds (a minute on a large one), and transforming a model at several sparsities,
# or discovering it first, captures the same graphs again: an export is kept per model, for as long as the model
# lives, under everything it depends on (see _model_state).
_CAPTURES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[ExportedProgram, int | None]]] = (
    weakref.WeakKeyDictionary())


def _model_state(model: nn.Module) -> tuple:
    """What a captured graph of ``model`` depends on: the graph lifts the model's parameters and buffers by
    identity (so new values in the same tensors need no new capture, a new dtype, device or shape does), and bakes
    in the modules' code and hooks and the config."""
    tensors = tuple((name, id(t), t.dtype, t.device, tuple(t.shape))
                    for name, t in (*model.named_parameters(remove_duplicate=False),
                                    *model.named_buffers(remove_duplicate=False)))
    code = tuple((name, type(m).forward, m.__dict__.get("forward"), tuple(m._forward_pre_hooks),
                  tuple(m._forward_hooks)) for name, m in model.named_modules(remove_duplicate=False))
    config = getattr(model, "config", None)
    settings = (config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config),
                getattr(config, "_attn_implementation", None))
    return tensors, code, settings, torch.is_grad_enabled(), torch.get_default_dtype()


def _export(model: nn.Module, step: Step, example_batch: int, example_length: int
            ) -> tuple[ExportedProgram, int | None]:
    limit = max_positions(model)
    length_max = limit if limit is not None else 1 << 16
    batch_dim = Dim("batch", min=1, max=1 << 16)
    try:
        if step in ("prefill", "prefill_cache"):
            input_ids, attention_mask = _example_inputs(model, example_batch, example_length)
            seq_dim = Dim("seq", min=1, max=length_max)
            shapes = {"input_ids": {0: batch_dim, 1: seq_dim}, "attention_mask": {0: batch_dim, 1: seq_dim}}
            if step == "prefill":
                wrapper, args, num_layers = PrefillStep(model), (input_ids, attention_mask), None
            else:
                wrapper, args, num_layers = DecodeStep(model), (input_ids, attention_mask, (), ()), _num_layers(model)
                shapes |= {"past_keys": (), "past_values": ()}
            program = torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False,
                                          prefer_deferred_runtime_asserts_over_guards=True)
            return program, num_layers
        _cache_keyword(model)
        num_layers = _num_layers(model)
        keys, values = _example_cache(model, example_batch, example_length)
        if len(keys) != num_layers:
            raise CaptureError(f"the model's cache holds {len(keys)} layers but its config says {num_layers}")
        input_ids, _ = _example_inputs(model, example_batch, 1)
        attention_mask = torch.ones(example_batch, example_length + 1, dtype=torch.long, device=input_ids.device)
        attention_mask[0, :1] = 0
        past_dim = Dim("past", min=1, max=length_max - 1)
        cache_shape = tuple({0: batch_dim, 2: past_dim} for _ in range(num_layers))
        program = torch.export.export(
            DecodeStep(model),
            (input_ids, attention_mask, keys, values),
            dynamic_shapes={
                "input_ids": {0: batch_dim},
                "attention_mask": {0: batch_dim, 1: past_dim + 1},
                "past_keys": cache_shape,
                "past_values": cache_shape,
            },
            strict=False,
            # GQA models guard on the repeated-KV shapes; deferring the guards keeps the past length dynamic.
            prefer_deferred_runtime_asserts_over_guards=True,
        )
        return program, num_layers
    except CaptureError:
        raise
    except Exception as error:  # export failures are long; keep the cause, say what failed
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} ({step}): {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from error
