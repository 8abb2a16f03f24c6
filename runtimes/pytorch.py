"""Run rewritten decoder graphs in PyTorch (eagerly or through ``torch.compile``), with a generation loop.

The module returned by :func:`shadowfx.transform` holds two rewritten graphs: the prefill, which runs layer 0, the
shadow predictor and the selection, then the sparse layers and returns the logits, the KV cache and the selection;
and the one-token decode step, which reuses the prompt's selection and a KV cache that holds only the kept heads of
layers >= 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from shadowfx.passes.base import PassResult
from shadowfx.selection import EffectiveSparsity, Selection, SparsityConfig, effective_sparsity
from shadowfx.structure import DecoderStructure

Granularity = Literal["prompt"]
Runtime = Literal["eager", "compile"]


class InputError(ValueError):
    """Inputs the transformed model cannot run on."""


@dataclass(frozen=True)
class RewriteReport:
    """What the passes changed in each graph: pass name -> per-layer counts."""

    prefill: dict[str, PassResult]
    decode: dict[str, PassResult]

    def counts(self) -> dict[str, dict[str, int]]:
        return {graph: {name: result.total for name, result in results.items()}
                for graph, results in (("prefill", self.prefill), ("decode", self.decode))}


class SparseDecoder(nn.Module):
    """A drop-in for the model's forward (logits for ``input_ids`` + ``attention_mask``) with ``generate``."""

    def __init__(self, model: nn.Module, structure: DecoderStructure, predictor: nn.Module, config: SparsityConfig,
                 prefill: torch.fx.GraphModule, decode: torch.fx.GraphModule, rewrites: RewriteReport, *,
                 granularity: Granularity, runtime: Runtime, max_positions: int | None) -> None:
        super().__init__()
        self.structure = structure
        self.predictor = predictor
        self.config = config
        self.prefill_graph = prefill
        self.decode_graph = decode
        self.rewrites = rewrites
        self.granularity = granularity
        self.runtime = runtime
        self.max_positions = max_positions
        self.generation_config = getattr(model, "generation_config", None)
        self._dtype = next(model.parameters()).dtype
        self._run_prefill: Callable = prefill
        self._run_decode: Callable = decode
        if runtime == "compile":
            self._run_prefill = torch.compile(prefill, dynamic=True)
            self._run_decode = torch.compile(decode, dynamic=True)
        self.last_selection: Selection | None = None

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

    def _unpack(self, outputs: tuple) -> tuple[torch.Tensor, list, list, Selection]:
        layers = self.structure.num_layers
        later = layers - 1
        logits, cache = outputs[0], outputs[1:1 + 2 * layers]
        chosen = outputs[1 + 2 * layers:]
        selection = Selection(kv_heads=tuple(chosen[:later]), neurons=tuple(chosen[later:2 * later]))
        return logits, list(cache[:layers]), list(cache[layers:]), selection

    # ---- running -----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        attention_mask = self._check(input_ids, attention_mask)
        logits, _, _, self.last_selection = self._unpack(self._run_prefill(input_ids, attention_mask))
        return logits

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
        attention_mask = self._check(input_ids, attention_mask, max_new_tokens)
        eos = self._eos(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self._default_pad(eos)
        logits, keys, values, selection = self._unpack(self._run_prefill(input_ids, attention_mask))
        self.last_selection = selection
        tokens, mask = input_ids, attention_mask
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        chosen_from = []
        for step in range(max_new_tokens):
            chosen_from.append(logits[:, -1])
            next_token = self._choose(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            if eos:
                next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
                finished |= torch.isin(next_token, torch.tensor(eos, device=next_token.device))
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            outputs = self._run_decode(next_token[:, None], mask, *keys, *values, *selection.kv_heads,
                                       *selection.neurons)
            logits = outputs[0]
            layers = self.structure.num_layers
            keys, values = list(outputs[1:1 + layers]), list(outputs[1 + layers:1 + 2 * layers])
        if return_logits:
            return tokens, torch.stack(chosen_from, dim=1) if chosen_from else logits[:, :0]
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

    # ---- reporting ---------------------------------------------------------------------------------------------------
    def effective_sparsity(self) -> EffectiveSparsity:
        """What the last call's selection skipped, per layer and overall (heads, neurons, weight and KV bytes)."""
        if self.last_selection is None:
            raise RuntimeError("no selection yet: call the model or generate() first")
        element_bytes = torch.finfo(self._dtype).bits // 8
        return effective_sparsity(self.structure, self.last_selection, element_bytes=element_bytes,
                                  kv_cache_shrinks=self.granularity == "prompt")
