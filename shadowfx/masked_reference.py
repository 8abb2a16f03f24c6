"""An eager reference for a sparsified model, independent of every shadowfx op and pass.

:class:`MaskedReference` runs the ORIGINAL Hugging Face model and, through forward pre-hooks, zeroes

* the attention context of the query heads whose KV-head group is not selected (the input of the attention output
  projection, ``[B, S, H * D]``, where query head ``h`` occupies features ``h * D .. (h + 1) * D - 1``), and
* the MLP intermediate of the neurons that are not selected (the input of the MLP down projection, ``[..., F]``).

Zeroing a head's context before the output projection is exactly what computing only the selected heads does: the
projection is linear, so the unselected heads contribute nothing (the projection's bias is still added once). Zeroing
the down projection's input likewise leaves only the selected neurons (plus the down bias). The selection is per
batch row and applies to every token of the row, in prefill and in every decode step.

Only the structure's module paths and head/neuron counts are used; nothing from ``shadowfx.ops`` or
``shadowfx.passes`` is imported, so the reference cannot share a bug with the passes it checks. Positions are derived
from the attention mask like :func:`shadowfx.capture.positions_from_mask` (re-implemented here for the same reason).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``generate``'s position ids: real tokens so far minus one, pad positions pinned to 1."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _logits_of(output: object) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}, which carries no logits tensor")
    return logits


def _apply_row_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` with ``mask`` ``[B, F]`` over the rows of ``x`` (``[B, ..., F]``, or ``[B * S, F]`` flattened),
    or a per-token ``mask`` ``[B, S, F]`` over ``x`` ``[B, S, F]`` (or ``[B * S, F]``)."""
    if mask.dim() == 3:
        if x.shape[-1] != mask.shape[-1] or x.numel() != mask.numel():
            raise ValueError(f"the hooked input {tuple(x.shape)} does not match the per-token mask {tuple(mask.shape)}")
        return x * mask.to(device=x.device, dtype=x.dtype).view_as(x)
    batch, features = mask.shape
    if x.shape[-1] != features:
        raise ValueError(f"the hooked input has {x.shape[-1]} features but the mask has {features}")
    mask = mask.to(device=x.device, dtype=x.dtype)
    if x.dim() >= 2 and x.shape[0] == batch:
        return x * mask.view(batch, *([1] * (x.dim() - 2)), features)
    if x.dim() == 2 and x.shape[0] % batch == 0:
        # OPT flattens the tokens before fc1/fc2: [B * S, F], batch-major. Un-flatten, mask per row, flatten back.
        return (x.view(batch, -1, features) * mask[:, None, :]).view_as(x)
    raise ValueError(
        f"the hooked input has shape {tuple(x.shape)}, which does not match a selection for batch size {batch}; "
        "set a selection with one row per sequence of the call"
    )


class MaskedReference:
    """Runs ``model`` with the unselected heads' attention context and the unselected MLP neurons zeroed.

    Use as a context manager (or call :meth:`close`) so the hooks are removed from ``model`` afterwards. With no
    selection set the hooks return their input untouched, so the model computes exactly what it computes unhooked.
    """

    def __init__(self, model: nn.Module, structure) -> None:
        self.model = model
        self.structure = structure
        self._attention_masks: dict[int, torch.Tensor] = {}  # layer -> bool [B, H * D]
        self._neuron_masks: dict[int, torch.Tensor] = {}  # layer -> bool [B, F]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for layer in structure.layers:
            o_proj = model.get_submodule(layer.attention.o.module)
            down = model.get_submodule(layer.mlp.down.module)
            self._handles.append(o_proj.register_forward_pre_hook(self._hook(self._attention_masks, layer.index)))
            self._handles.append(down.register_forward_pre_hook(self._hook(self._neuron_masks, layer.index)))

    # ---- hooks ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _hook(masks: dict[int, torch.Tensor], index: int):
        def pre_hook(module: nn.Module, args: tuple):
            mask = masks.get(index)
            if mask is None:
                return None  # dense in this part: the input is passed on untouched
            if not args or not isinstance(args[0], torch.Tensor):
                raise RuntimeError(f"{type(module).__name__} was called without a positional input tensor")
            return (_apply_row_mask(args[0], mask), *args[1:])

        return pre_hook

    def close(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> MaskedReference:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- selection -----------------------------------------------------------------------------------------------
    def set_selection(
        self,
        kv_head_indices: Mapping[int, torch.Tensor] | None = None,
        neuron_indices: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        """Select per layer and batch row which KV-head groups and MLP neurons are computed.

        ``kv_head_indices[l]`` is int64 ``[B, g]``: KV head ``j`` keeps query heads ``j * r .. j * r + r - 1``
        (``r = num_heads // num_kv_heads``). ``neuron_indices[l]`` is int64 ``[B, k]``. Per-token selections are
        ``[B, S, g]`` / ``[B, S, k]`` and apply to a call over exactly those S tokens. ``g`` or ``k`` may be 0 (the
        part computes nothing but its output bias); repeated indices are allowed, and the unit count itself (``H_kv``
        or ``F``) is an empty slot that keeps nothing. Layers absent from a dict are dense
        in that part. Replaces any previous selection.
        """
        if not self._handles:
            raise RuntimeError("this MaskedReference is closed")
        attention_masks = {index: self._attention_mask(index, indices) for index, indices in
                           (kv_head_indices or {}).items()}
        neuron_masks = {index: self._neuron_mask(index, indices) for index, indices in (neuron_indices or {}).items()}
        batch_sizes = {mask.shape[0] for mask in (*attention_masks.values(), *neuron_masks.values())}
        if len(batch_sizes) > 1:
            raise ValueError(f"the selection's layers disagree on the batch size: {sorted(batch_sizes)}")
        self._attention_masks.clear()
        self._attention_masks.update(attention_masks)
        self._neuron_masks.clear()
        self._neuron_masks.update(neuron_masks)

    def _attention_mask(self, index: int, indices: torch.Tensor) -> torch.Tensor:
        """Context-feature mask ``[B, (S,) H * D]`` of the query heads of the kept KV groups."""
        attention = self._layer(index).attention
        kv_mask = self._index_mask(indices, attention.num_kv_heads, f"layer {index} KV head")
        # KV head j -> query heads j*r .. j*r+r-1 -> features h*D .. (h+1)*D-1
        feature_mask = kv_mask.repeat_interleave(attention.kv_group_size * attention.head_dim, dim=-1)
        if feature_mask.shape[-1] != attention.o.in_features:
            raise ValueError(
                f"layer {index}: {attention.num_heads} heads x {attention.head_dim} = {feature_mask.shape[-1]} "
                f"context features, but the output projection takes {attention.o.in_features}"
            )
        return feature_mask

    def _neuron_mask(self, index: int, indices: torch.Tensor) -> torch.Tensor:
        return self._index_mask(indices, self._layer(index).mlp.intermediate_size, f"layer {index} MLP neuron")

    def clear(self) -> None:
        """Drop the selection: every layer dense."""
        self._attention_masks.clear()
        self._neuron_masks.clear()

    @property
    def selection_batch_size(self) -> int | None:
        for mask in (*self._attention_masks.values(), *self._neuron_masks.values()):
            return mask.shape[0]
        return None

    def _layer(self, index: int):
        if not isinstance(index, int) or not 0 <= index < len(self.structure.layers):
            raise ValueError(f"layer index {index!r} is not in 0..{len(self.structure.layers) - 1}")
        return self.structure.layers[index]

    @staticmethod
    def _index_mask(indices: torch.Tensor, size: int, what: str) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor) or indices.dim() not in (2, 3):
            raise ValueError(f"{what} indices must be a [batch, count] or [batch, tokens, count] tensor")
        if indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) > size):
            raise ValueError(f"{what} indices must lie in 0..{size - 1}, or be {size} for an empty slot")
        # one extra column catches the empty slots and is dropped
        mask = torch.zeros(*indices.shape[:-1], size + 1, dtype=torch.bool, device=indices.device)
        return mask.scatter_(-1, indices.long(), True)[..., :size]

    def _check_batch(self, batch: int) -> None:
        selected = self.selection_batch_size
        if selected is not None and selected != batch:
            raise ValueError(f"the selection has {selected} rows but the batch has {batch}")

    # ---- running -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Prefill logits ``[B, S, V]``, positions from the mask (as ``shadowfx.capture.PrefillStep``), no cache."""
        self._check_batch(input_ids.shape[0])
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_positions_from_mask(attention_mask),
            use_cache=False,
        )
        return _logits_of(output)

    @torch.no_grad()
    def logits_recomputed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of a longer sequence (e.g. prompt + generated tokens) by a full recompute, no cache.

        ``attention_mask`` may cover only the prompt; the tokens beyond it count as real (mask 1), as in generation.
        """
        extra = input_ids.shape[1] - attention_mask.shape[1]
        if extra < 0:
            raise ValueError("attention_mask is longer than input_ids")
        if extra:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], extra)], 1)
        return self.logits(input_ids, attention_mask)

    @torch.no_grad()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        *,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding with the HF KV cache: ``[B, S + max_new_tokens]`` token ids (left padding supported).

        The selection applies at every step. No end-of-sequence stopping: always ``max_new_tokens`` tokens. With
        ``return_logits`` also returns the logits each new token was picked from, ``[B, max_new_tokens, V]``.
        """
        from transformers import DynamicCache

        self._check_batch(input_ids.shape[0])
        cache = DynamicCache(config=getattr(self.model, "config", None))
        tokens, mask = input_ids, attention_mask
        step_ids = input_ids
        picked: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            output = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=_positions_from_mask(mask)[:, -step_ids.shape[1] :],
                cache=cache,
                use_cache=True,
            )
            if getattr(output, "cache", None) is not None:
                cache = output.cache
            last = _logits_of(output)[:, -1, :]
            picked.append(last)
            step_ids = last.argmax(-1, keepdim=True).to(tokens.dtype)
            tokens = torch.cat([tokens, step_ids], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if return_logits:
            empty = input_ids.new_zeros(input_ids.shape[0], 0, 0, dtype=torch.float32)
            return tokens, (torch.stack(picked, dim=1) if picked else empty)
        return tokens


class LayerwiseMaskedReference(MaskedReference):
    """A :class:`MaskedReference` that selects as the model runs, for a layerwise (DejaVu-style) predictor.

    Before layer l's attention (MLP), a pre-hook on its q (up) projection applies the predictor's layer-l MLP
    (``predictor.heads[l - 1]`` / ``predictor.neurons[l - 1]``) to that projection's input and keeps the top
    ``kv_heads_kept`` KV groups (a group scores the mean of its query heads) or ``neurons_kept`` neurons. Per prompt
    the last position of each row decides, in the first call only (the prefill), and the selection then holds for
    the decode steps; per token every position of every call decides for itself. The top-k is written here with
    ``torch.topk``, not taken from shadowfx.
    """

    def __init__(self, model: nn.Module, structure, predictor: nn.Module, *, kv_heads_kept: int, neurons_kept: int,
                 per_token: bool) -> None:
        super().__init__(model, structure)
        self.predictor = predictor
        self.per_token = per_token
        self._batch = 0
        self._prefilled: set[tuple[str, int]] = set()
        for position, layer in enumerate(structure.layers[1:]):
            attention = layer.attention
            q = model.get_submodule(attention.q.module)
            up = model.get_submodule(layer.mlp.up.module)
            group = attention.kv_group_size

            def head_masks(scores: torch.Tensor, index: int = layer.index, group: int = group) -> torch.Tensor:
                groups = scores.unflatten(-1, (-1, group)).mean(-1)
                return self._attention_mask(index, groups.topk(kv_heads_kept, dim=-1).indices)

            def neuron_masks(scores: torch.Tensor, index: int = layer.index) -> torch.Tensor:
                return self._neuron_mask(index, scores.topk(neurons_kept, dim=-1).indices)

            self._handles.append(q.register_forward_pre_hook(
                self._selecting(("heads", layer.index), predictor.heads[position], head_masks,
                                self._attention_masks, layer.index)))
            self._handles.append(up.register_forward_pre_hook(
                self._selecting(("neurons", layer.index), predictor.neurons[position], neuron_masks,
                                self._neuron_masks, layer.index)))

    def _selecting(self, key, layer_predictor: nn.Module, to_mask, masks: dict, index: int):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if key[0] == "heads":
                self._batch = x.shape[0]  # the attention input is [B, S, E] in every supported family
            if not self.per_token and key in self._prefilled:
                return
            tokens = x.reshape(self._batch, -1, x.shape[-1])
            with torch.no_grad():
                scores = layer_predictor(tokens if self.per_token else tokens[:, -1])
            masks[index] = to_mask(scores)
            self._prefilled.add(key)

        return pre_hook

    def clear(self) -> None:
        super().clear()
        self._prefilled = set()
