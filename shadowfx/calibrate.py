"""Calibration: run the criterion over text windows and write the traces predictors are trained on.

Each sample is a window of tokens; the loss is the next-token cross-entropy over the window, and the predictor input
is layer 0's attention context at the window's last token (where a prompt ends). Per sample the traces hold:

* ``inputs``        [n, E]        layer-0 context at the last token (the ShadowLLM predictor's input)
* ``attention_inputs``, ``mlp_inputs``  [n, L, E]   every layer's attention and MLP input (what the q and up
                    projections take) at the last token: the inputs of the layerwise (DejaVu-style) predictor
* ``heads``         [n, L, H]     the criterion per head; ``neurons`` [n, L, F] per MLP neuron
* ``token_*``       the same for ``tokens_per_sample`` positions of the window, each with its own per-token scores
                    and inputs (the token granularity's targets and inputs)

Everything but the head scores is stored in bfloat16 (see ``STORED_DTYPE``). Traces are written in shards
(safetensors) with a JSON header (``traces.json``: model fingerprint, criterion, data description, shards). Each
shard and then the header naming it are written atomically (:mod:`shadowfx.files`), so an interrupted run leaves
only whole shards and resumes after the last one the header names; a run into traces of other settings or another
model is refused before any work (:func:`refuse_other_traces`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from shadowfx.criteria import CRITERIA, Criterion, CriterionHooks, UnitScores
from shadowfx.files import atomic_write, atomic_write_text, writable_directory
from shadowfx.structure import DecoderStructure, Fingerprint, check_fingerprint

HEADER = "traces.json"
FORMAT_VERSION = 3  # 2: per-layer attention and MLP inputs; 3: bfloat16 inputs, fingerprints in parts
# bfloat16 has float32's range, so no activation overflows and no tiny score (Fisher's squared gradients)
# underflows; its 3 significant digits are plenty for predictor inputs and targets that are min-max scaled. Head
# scores stay float32: a few per layer, so they cost little, and rounding would tie heads whose ranking is the target.
STORED_DTYPE = torch.bfloat16

RECALIBRATE_FP32 = ("re-run calibration in float32 into a new directory "
                    "(shadowfx calibrate ... --dtype float32 --out NEW)")


class TraceError(ValueError):
    """Traces that cannot be written or used."""


@dataclass(frozen=True)
class Traces:
    """All shards of a trace directory, concatenated."""

    header: dict
    tensors: dict[str, torch.Tensor]

    @property
    def fingerprint(self) -> str:
        return self.header["fingerprint"]

    def __len__(self) -> int:
        return self.tensors["inputs"].shape[0]

    def aggregate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Static scores: the criterion summed over all samples, heads [L, H] and neurons [L, F]."""
        return self.tensors["heads"].float().sum(0), self.tensors["neurons"].float().sum(0)


# what a header must hold to be resumed or read; every one of them is written by calibrate()
HEADER_KEYS = ("format_version", "fingerprint", "model_class", "criterion", "window", "samples", "tokens_per_sample",
               "seed", "data", "shards")
SHARD_KEYS = ("file", "count")


def _read_header(directory: Path) -> dict | None:
    """The header of the traces in ``directory`` (None when there is none), refused when a field is missing."""
    path = directory / HEADER
    if not path.is_file():
        return None
    try:
        header = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TraceError(f"{path} is not a readable trace header: {error}; re-run calibration into a new "
                         "directory") from error
    if not isinstance(header, dict):
        raise TraceError(f"{path} is not a trace header (not a JSON object); re-run calibration into a new directory")
    if header.get("format_version") != FORMAT_VERSION:
        raise TraceError(f"{path}: trace format {header.get('format_version')!r} is not {FORMAT_VERSION} (made by "
                         "another shadowfx version); re-run calibration into a new directory")
    missing = [key for key in HEADER_KEYS if key not in header]
    if not missing and not isinstance(header["shards"], list):
        missing = ["shards (a list)"]
    missing += [f"shards[{i}].{key}" for i, shard in enumerate(header.get("shards") or [])
                for key in SHARD_KEYS if not isinstance(shard, dict) or key not in shard]
    if missing:
        raise TraceError(f"{path} lacks {', '.join(missing)} (written by another shadowfx version, or edited); "
                         "re-run calibration into a new directory")
    return header


def refuse_other_traces(out: str | Path, settings: dict, fingerprint: Fingerprint) -> dict | None:
    """The header of the traces in ``out`` (None when there are none), refused (:class:`TraceError`) when they were
    made with settings other than ``settings`` (any of the header's fields; of a dict field, the keys given) or for
    another model than ``fingerprint`` (whole, or :meth:`Fingerprint.of_weights` before the graph is captured).

    Resuming checks this before any work: cheap settings and the weights first, everything once known."""
    header = _read_header(Path(out))
    if header is None:
        return None

    def differing(made: dict, wanted: dict, prefix: str = "") -> list[str]:
        found = []
        for key, value in wanted.items():
            there = made.get(key) if isinstance(made, dict) else None
            if isinstance(value, dict):
                found += differing(there or {}, value, f"{prefix}{key}.")
            elif there != value:
                found.append(f"{prefix}{key} {there!r} (here {value!r})")
        return found

    problems = differing(header, settings)
    made = Fingerprint.parse(header["fingerprint"], what=f"the traces in {out}")
    model = made.differences(fingerprint)
    if {"architecture", "weights"} & set(model):
        problems.append(f"the model (other {' and '.join(d for d in model if d != 'dtype')})")
    elif model:
        problems.append(f"the model's dtype {made.dtype} (here {fingerprint.dtype}; pass --dtype {made.dtype} to "
                        "resume)")
    if problems:
        raise TraceError(f"{out} holds traces made with other settings: {'; '.join(problems)}; write into another "
                         "directory (--out), or resume with the settings they were made with")
    return header


def trace_bytes(directory: str | Path) -> int:
    """Bytes on disk of the traces in ``directory``: the header and every shard it names."""
    directory = Path(directory)
    header = _read_header(directory)
    if header is None:
        return 0
    return (directory / HEADER).stat().st_size + sum((directory / shard["file"]).stat().st_size
                                                     for shard in header["shards"])


def calibrate(model: nn.Module, samples: torch.Tensor, structure: DecoderStructure, out: str | Path, *,
              criterion: Criterion = "plainact", batch_size: int = 8, shard_size: int = 256,
              tokens_per_sample: int = 4, data: dict | None = None, seed: int = 0, progress: bool = True) -> Traces:
    """Score ``samples`` (token windows ``[N, W]``) with ``criterion`` and write traces to ``out``.

    Re-running with the same model, criterion and data continues an interrupted run; traces of another model,
    criterion or data in ``out`` are an error (nothing is overwritten).
    """
    if criterion not in CRITERIA:
        raise TraceError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    if samples.dim() != 2 or samples.shape[0] == 0 or samples.shape[1] < 2:
        raise TraceError(f"samples must be token windows [N >= 1, W >= 2], got shape {tuple(samples.shape)}")
    if not 0 <= tokens_per_sample <= samples.shape[1]:
        raise TraceError(f"tokens_per_sample must be in 0..{samples.shape[1]}, got {tokens_per_sample}")
    out = writable_directory(out)  # before any sample is scored
    settings = {"model_class": structure.model_class, "criterion": criterion, "window": int(samples.shape[1]),
                "samples": int(samples.shape[0]), "tokens_per_sample": tokens_per_sample, "seed": seed,
                "data": data or {}}
    header = refuse_other_traces(out, settings, Fingerprint.parse(structure.fingerprint, what="this model"))
    if header is None:
        header = {"format_version": FORMAT_VERSION, "fingerprint": structure.fingerprint} | settings | {"shards": []}
    done = sum(shard["count"] for shard in header["shards"])
    generator = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(samples.shape[1], generator=generator)[:tokens_per_sample].sort().values
                             for _ in range(samples.shape[0])]) if tokens_per_sample else None
    was_training = model.training
    model.eval()
    bar = tqdm(total=samples.shape[0], initial=done, desc=f"calibrating ({criterion})", disable=not progress)
    try:
        with CriterionHooks(model, structure) as hooks:
            while done < samples.shape[0]:
                stop = min(done + shard_size, samples.shape[0])
                pieces: dict[str, list[torch.Tensor]] = {}
                for start in range(done, stop, batch_size):
                    end = min(start + batch_size, stop)
                    batch = _score_batch(hooks, samples[start:end], criterion,
                                         positions[start:end] if positions is not None else None)
                    for name, tensor in batch.items():
                        pieces.setdefault(name, []).append(tensor)
                    bar.update(end - start)
                name = f"shard-{len(header['shards']):05d}.safetensors"
                shard = {k: torch.cat(v) for k, v in pieces.items()}
                atomic_write(out / name, lambda temporary: save_file(shard, str(temporary)))
                header["shards"].append({"file": name, "count": stop - done})
                atomic_write_text(out / HEADER, json.dumps(header, indent=2))
                done = stop
    finally:
        bar.close()
        model.train(was_training)
    return load_traces(out, structure)


def _score_batch(hooks: CriterionHooks, windows: torch.Tensor, criterion: Criterion,
                 positions: torch.Tensor | None) -> dict[str, torch.Tensor]:
    loss_mask = torch.ones_like(windows)
    if positions is None:
        scores = hooks.score(windows, loss_mask, criterion)
        token = None
    else:
        token = hooks.score(windows, loss_mask, criterion, per_token=True)
        scores = _sample_scores(token, criterion)
    attention_inputs = torch.stack(hooks.attention_inputs, 2).to(STORED_DTYPE)  # [B, S, L, E]
    mlp_inputs = torch.stack(hooks.mlp_inputs, 2).to(STORED_DTYPE)
    result = {
        "inputs": scores.context[:, -1].to(STORED_DTYPE),
        "attention_inputs": attention_inputs[:, -1],
        "mlp_inputs": mlp_inputs[:, -1],
        "heads": scores.heads.float(),
        "neurons": scores.neurons.to(STORED_DTYPE),
    }
    if positions is not None and token is not None:
        rows = torch.arange(windows.shape[0])[:, None]
        result["token_inputs"] = token.context[rows, positions].flatten(0, 1).to(STORED_DTYPE)
        result["token_heads"] = token.heads[rows, positions].flatten(0, 1).float()
        result["token_neurons"] = token.neurons[rows, positions].flatten(0, 1).to(STORED_DTYPE)
        result["token_attention_inputs"] = attention_inputs[rows, positions].flatten(0, 1)
        result["token_mlp_inputs"] = mlp_inputs[rows, positions].flatten(0, 1)
    return result


def _sample_scores(token, criterion: Criterion):
    """Per-sample scores from per-token ones (one backward serves both granularities)."""

    def reduce(per_token: torch.Tensor) -> torch.Tensor:
        if criterion in ("plainact", "fisher"):
            return per_token.sum(1)
        if criterion == "snip":
            return per_token.sum(1).abs()
        return per_token.square().sum(1).sqrt()  # magnitude, grad_norm: l2 over tokens

    return UnitScores(heads=reduce(token.heads), neurons=reduce(token.neurons), context=token.context)


def load_traces(directory: str | Path, structure: DecoderStructure | None = None) -> Traces:
    """Read a trace directory (all shards); with ``structure``, refuse traces of another model."""
    directory = Path(directory)
    header = _read_header(directory)
    if header is None:
        raise TraceError(f"no traces in {directory} (no {HEADER}); run calibration first")
    if not header["shards"]:
        raise TraceError(f"{directory} has a header but no finished shard; re-run calibration to resume")
    if structure is not None:
        check_fingerprint(header["fingerprint"], structure, what=f"the traces in {directory}")
    pieces: dict[str, list[torch.Tensor]] = {}
    for shard in header["shards"]:
        path = directory / shard["file"]
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as error:
            raise TraceError(f"cannot read the trace shard {path}: {error}; re-run calibration into a new "
                             "directory") from error
        for name, tensor in tensors.items():
            pieces.setdefault(name, []).append(tensor)
    tensors = {name: torch.cat(parts) for name, parts in pieces.items()}
    for name in ("heads", "neurons", "token_heads", "token_neurons"):
        if name in tensors and not torch.isfinite(tensors[name].float()).all():
            raise TraceError(f"{directory}: {name} holds non-finite scores (a diverged model?); {RECALIBRATE_FP32}")
    return Traces(header=header, tensors=tensors)


def merge_traces(parts: dict[str, Traces]) -> Traces:
    """Traces of one model and criterion made on several texts (named), as one set; the header records each part."""
    if not parts:
        raise TraceError("no traces to merge")
    first = next(iter(parts.values()))
    for name, traces in parts.items():
        for key in ("fingerprint", "criterion", "window", "tokens_per_sample", "format_version"):
            if traces.header.get(key) != first.header.get(key):
                raise TraceError(f"the traces of {name!r} differ from the others in {key} "
                                 f"({traces.header.get(key)!r} vs {first.header.get(key)!r}); they cannot be merged")
    names = sorted(set().union(*(t.tensors for t in parts.values())))
    missing = {name: sorted(set(names) - set(t.tensors)) for name, t in parts.items() if set(names) - set(t.tensors)}
    if missing:
        raise TraceError(f"the traces hold different tensors ({missing} missing); calibrate them alike")
    header = {key: first.header[key] for key in HEADER_KEYS if key not in ("samples", "data", "shards", "seed")}
    header |= {"samples": sum(len(t) for t in parts.values()),
               "data": {name: t.header["data"] for name, t in parts.items()},
               "parts": {name: len(t) for name, t in parts.items()}}
    return Traces(header=header, tensors={name: torch.cat([t.tensors[name] for t in parts.values()])
                                          for name in names})
