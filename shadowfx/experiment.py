"""The accuracy comparison as one command: text per domain, calibration, the predictors, then
:func:`shadowfx.comparison.evaluate`.

The text is the built-in corpus (documentation and code of the installed Python packages: its train split
calibrates, its held-out split is evaluated), WikiText-2 prose where a folder is given (valid calibrates, test is
evaluated), and any user files (each its own domain: the first 90% calibrates, the rest is evaluated). Everything
slow is kept under the output directory, so a rerun resumes: traces shard by shard, trained predictors are loaded
rather than retrained, finished runs are skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shadowfx.api import discover
from shadowfx.calibrate import Traces, calibrate, merge_traces
from shadowfx.comparison import (
    DEFAULT_SPARSITIES,
    METHODS,
    PREDICTOR_METHODS,
    Baselines,
    EvalWindows,
    Protocol,
    check_plan,
    evaluate,
    report_runs,
)
from shadowfx.criteria import Criterion
from shadowfx.data import DataError, build_corpus, read_text, token_windows
from shadowfx.files import writable_directory
from shadowfx.predictor import SavedPredictor, load_predictor, saved_predictors
from shadowfx.runtimes.pytorch import Prefill
from shadowfx.selection import SCOPES, Scope
from shadowfx.structure import DecoderStructure
from shadowfx.training import save_trained, train_predictor

BUILTIN_CHARS = 2_000_000  # per built-in domain; its held-out share (5%) is ~100k characters, ~25k tokens
HELD_OUT_SHARE = 0.1  # the end of a user's text file that is evaluated
PREDICTOR_SETTINGS = {method: tuple(method.split("_")) for method in PREDICTOR_METHODS}  # (kind, granularity)


@dataclass(frozen=True)
class DomainText:
    calibration: str
    held_out: str


def domain_texts(*, wikitext: str | Path | None = None, text_files: Sequence[str | Path] = (),
                 builtin: bool = True) -> dict[str, DomainText]:
    """Calibration and held-out text per domain (see the module's description)."""
    texts: dict[str, DomainText] = {}
    if builtin or wikitext is not None:
        corpus = build_corpus(docs_chars=BUILTIN_CHARS if builtin else 0, code_chars=BUILTIN_CHARS if builtin else 0,
                              wikitext=wikitext)
        for domain in sorted(corpus.documents["train"]):
            calibration, held_out = ("\n\n".join(corpus.texts(split, domain)) for split in ("train", "heldout"))
            if calibration and held_out:
                texts[domain] = DomainText(calibration, held_out)
    for path in text_files:
        name = Path(path).stem
        if name in texts:
            raise DataError(f"two texts are named {name!r} (domains are named by file stem); rename one")
        text = read_text(path)
        cut = int(len(text) * (1 - HELD_OUT_SHARE))
        texts[name] = DomainText(text[:cut], text[cut:])
    if not texts:
        raise DataError("no text to evaluate on: use the built-in corpus, or pass --text FILE or --wikitext DIR")
    return texts


def spread_windows(tokenizer, text: str, length: int, count: int, what: str) -> torch.Tensor:
    """``count`` disjoint windows of ``length`` tokens spread evenly over ``text`` (all of them if it has fewer)."""
    tokens = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    if tokens.numel() < length:
        raise DataError(f"the {what} text has {tokens.numel()} tokens, fewer than one window of {length}")
    windows = token_windows(tokens, length)
    if count < windows.shape[0]:
        windows = windows[torch.linspace(0, windows.shape[0] - 1, count).long()]
    return windows


def _windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]


def calibrate_domains(model: nn.Module, structure: DecoderStructure, windows: dict[str, torch.Tensor],
                      directory: Path, *, criterion: Criterion, batch_size: int, progress: bool) -> dict[str, Traces]:
    """Traces per domain under ``directory/<domain>`` (an interrupted calibration resumes)."""
    return {domain: calibrate(model, samples, structure, directory / domain, criterion=criterion,
                              batch_size=batch_size, data={"domain": domain, "windows": _windows_digest(samples)},
                              progress=progress)
            for domain, samples in windows.items()}


def predictors_in(directory: Path, structure: DecoderStructure, methods: Sequence[str]) -> dict[str, nn.Module]:
    """The predictors of ``methods`` saved in ``directory`` (those it lacks are left out)."""
    saved = set(saved_predictors(directory)) if directory.is_dir() else set()
    return {method: load_predictor(directory, structure, kind=kind, granularity=granularity)
            for method, (kind, granularity) in PREDICTOR_SETTINGS.items()
            if method in methods and SavedPredictor(kind, granularity) in saved}


def train_missing(traces: dict[str, Traces], structure: DecoderStructure, directory: Path, methods: Sequence[str],
                  *, hidden: int, stored_dtype: torch.dtype | None = None,
                  progress: bool) -> dict[str, nn.Module]:
    """The predictors of ``methods``: loaded from ``directory``, or trained on all of ``traces`` and saved there
    (weights in ``stored_dtype``, if given). What is used is always what was saved, read back, so a first run and
    a resumed one compare the same predictors."""
    found = predictors_in(directory, structure, methods)
    missing = [m for m in PREDICTOR_SETTINGS if m in methods and m not in found]
    merged = merge_traces(traces) if missing else None
    for method in missing:
        kind, granularity = PREDICTOR_SETTINGS[method]
        result = train_predictor(merged, kind=kind, granularity=granularity, structure=structure, hidden=hidden,
                                 progress=progress)
        save_trained(result, directory, dtype=stored_dtype)
    return found | predictors_in(directory, structure, missing)


def compare(model: nn.Module, tokenizer, out: str | Path, *, model_name: str, wikitext: str | Path | None = None,
            text_files: Sequence[str | Path] = (), builtin: bool = True, predictors: str | Path | None = None,
            sparsities: Sequence[float] = DEFAULT_SPARSITIES, scopes: Sequence[Scope] = SCOPES,
            methods: Sequence[str] = METHODS, protocol: Protocol = "leak_free", windows: int = 64,
            prompt_length: int = 128, continuation: int = 32, calibration_samples: int = 512,
            criterion: Criterion = "plainact", hidden: int = 1024, predictor_dtype: torch.dtype | None = None,
            random_seeds: Sequence[int] = (0, 1, 2), token_prefill: Prefill = "sparse",
            batch_size: int = 8, run_missing: bool = True, progress: bool = True) -> dict:
    """Calibrate ``model`` on each domain's text, train the predictors, and compare every method on each domain's
    held-out windows; the report and plot go to ``out``.

    The predictors are loaded from ``predictors`` (default ``out/predictors``) where they were saved before; the
    missing ones are trained on the calibration traces and saved there. Calibration windows are as long as the
    prompts, so the predictors learn from contexts like the ones they select from. Returns the report
    (``out/comparison.json``). ``run_missing=False`` runs nothing (no calibration or training either): the report
    covers the runs ``out`` holds so far and lists the missing ones. ``token_prefill``: see
    :func:`shadowfx.comparison.evaluate`.
    """
    check_plan(methods, protocol, scopes, sparsities, token_prefill)
    out = writable_directory(out)  # before anything slow
    structure = discover(model)
    texts = domain_texts(wikitext=wikitext, text_files=text_files, builtin=builtin)
    held_out = {domain: spread_windows(tokenizer, text.held_out, prompt_length + continuation, windows,
                                       f"held-out {domain}") for domain, text in texts.items()}
    eval_windows = EvalWindows(torch.cat(list(held_out.values())),
                               tuple(d for d, w in held_out.items() for _ in range(w.shape[0])), prompt_length)
    model_settings = {"model": model_name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if not run_missing:
        return report_runs(model, eval_windows, out, criterion=criterion, sparsities=sparsities, scopes=scopes,
                           methods=methods, protocol=protocol, random_seeds=random_seeds, settings=model_settings,
                           token_prefill=token_prefill)
    calibration = {domain: spread_windows(tokenizer, text.calibration, prompt_length, calibration_samples,
                                          f"calibration {domain}") for domain, text in texts.items()}
    traces = calibrate_domains(model, structure, calibration, out / "traces", criterion=criterion,
                               batch_size=batch_size, progress=progress)
    directory = Path(predictors) if predictors is not None else out / "predictors"
    trained = train_missing(traces, structure, directory, methods, hidden=hidden, stored_dtype=predictor_dtype,
                            progress=progress)
    settings = model_settings | {"calibration": {d: {"windows": int(w.shape[0]), "tokens": prompt_length}
                                                 for d, w in calibration.items()}}
    return evaluate(model, eval_windows, Baselines.from_traces(traces), criterion=criterion, predictors=trained,
                    sparsities=sparsities, scopes=scopes, methods=methods, protocol=protocol,
                    random_seeds=random_seeds, batch_size=batch_size, out=out, settings=settings,
                    token_prefill=token_prefill, progress=progress)
