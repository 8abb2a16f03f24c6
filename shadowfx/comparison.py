"""The accuracy comparison: what each way of choosing the kept units costs in perplexity on held-out text.

Every method runs through :func:`shadowfx.transform` and the runtime's ``start`` / ``step``, as generation does.
Protocol ``"leak_free"`` (the default): each window is a prompt, from which the selection is made, and a
continuation, which alone is scored, token by token through the decode graph. Protocol ``"paper"`` makes the
selection from the whole window and scores the same continuation tokens from one prefill: ShadowLLM's published
evaluation, where the selection has seen the text it is scored on (what that is worth is the difference).

Methods, each a source of scores for layers 1..L-1 fed to the same selection:

* ``random`` (mean over seeds), ``static`` (the criterion summed over the calibration windows) and ``constant`` (the
  mean normalised target: what a predictor gives when its input tells it nothing);
* ``domain_router``: one static selection per text domain, picked by the window's domain;
* ``oracle``: the criterion measured on the window's own prompt; ``other_window_oracle``: that of another window of
  the same domain (separates "this prompt's units" from "units that matter for any such prompt");
* ``shadowllm_prompt`` / ``shadowllm_token``: the layer-0 predictor, per prompt / per token;
* ``dejavu_prompt`` / ``dejavu_token``: per-layer predictors (per-layer scope only: they score each layer as it runs);
* ``budget_only``: the ShadowLLM predictor's per-layer counts, each layer filled by the static ranking (global scope
  only; at per-layer scope the counts are fixed, and it is static).

With ``token_prefill="dense"`` the per-token methods compute each prompt with every unit (``transform(prefill=
"dense")``, as DejaVu's and TEAL's runtimes do) and select for the continuation's tokens only (leak-free protocol
only: under "paper" the scored tokens are the prompt's).

Each finished run is saved at once (``out/runs.json``), so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from tqdm import tqdm

from shadowfx.api import discover, transform
from shadowfx.calibrate import Traces
from shadowfx.capture import PrefillStep
from shadowfx.criteria import Criterion, CriterionHooks
from shadowfx.files import ArtifactError, atomic_write, atomic_write_text, writable_directory
from shadowfx.predictor import Scores, StaticScores
from shadowfx.runtimes.pytorch import PREFILLS, Prefill, SparseDecoder
from shadowfx.selection import SCOPES, Scope, SparsityConfig, planned_sparsity
from shadowfx.structure import DecoderStructure, check_fingerprint
from shadowfx.training import CriterionSums, normalise_targets

Protocol = Literal["leak_free", "paper"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
METHODS = ("random", "static", "constant", "domain_router", "oracle", "other_window_oracle", "budget_only",
           "shadowllm_prompt", "shadowllm_token", "dejavu_prompt", "dejavu_token")
PREDICTOR_METHODS = ("shadowllm_prompt", "shadowllm_token", "dejavu_prompt", "dejavu_token")
# methods whose scores do not depend on the graph's input: one transformed model serves them all, rows set per batch
ROW_METHODS = ("random", "static", "constant", "domain_router", "oracle", "other_window_oracle")
DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.5)
COSTS = {"5%": 1.05, "20%": 1.20}  # the perplexity ratios to dense at which the affordable sparsity is read
RUNS_FILE = "runs.json"


class ComparisonError(ValueError):
    """Settings or inputs the comparison cannot run with."""


@dataclass(frozen=True)
class EvalWindows:
    """Held-out windows ``[N, prompt_length + continuation]`` and each one's text domain."""

    tokens: torch.Tensor
    domains: tuple[str, ...]
    prompt_length: int

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape[0] != len(self.domains):
            raise ComparisonError(f"windows must be [N, W] with one domain each, got {tuple(self.tokens.shape)} and "
                                  f"{len(self.domains)} domains")
        if not 1 <= self.prompt_length < self.tokens.shape[1]:
            raise ComparisonError(f"the prompt length must leave a continuation: 1 <= {self.prompt_length} < "
                                  f"{self.tokens.shape[1]}")

    @property
    def continuation(self) -> int:
        return self.tokens.shape[1] - self.prompt_length

    def describe(self) -> dict:
        return {"windows": self.tokens.shape[0], "prompt_tokens": self.prompt_length,
                "continuation_tokens": self.continuation,
                "per_domain": {d: self.domains.count(d) for d in sorted(set(self.domains))},
                "tokens_sum": int(self.tokens.sum())}


@dataclass(frozen=True)
class Baselines:
    """The input-free score sources, from calibration traces per domain."""

    static: StaticScores
    constant: StaticScores
    by_domain: dict[str, StaticScores]

    @classmethod
    def from_traces(cls, traces: dict[str, Traces]) -> Baselines:
        """Static and constant over every domain's traces together; one static per domain for the router."""
        if not traces:
            raise ComparisonError("no calibration traces: the baselines need at least one domain's")
        sums = {domain: CriterionSums.of(t) for domain, t in traces.items()}
        pooled = functools.reduce(operator.add, sums.values())
        return cls(pooled.static(), pooled.constant(), {domain: s.static() for domain, s in sums.items()})


class RowScores(nn.Module):
    """A predictor whose scores are set for each batch from outside, one set per row (oracles, router, controls).

    Until a batch is set it returns its initial scores for any number of rows (what :func:`transform` probes).
    """

    def __init__(self, initial: StaticScores) -> None:
        super().__init__()
        self.fingerprint = initial.fingerprint
        self.use(initial.head_scores[None], initial.neuron_scores[None])

    def use(self, heads: torch.Tensor, neurons: torch.Tensor) -> None:
        self.heads, self.neurons = heads.float(), neurons.float()

    def forward(self, context: torch.Tensor) -> Scores:
        rows = context.shape[0]
        if self.heads.shape[0] not in (1, rows):
            raise ComparisonError(f"row scores are set for {self.heads.shape[0]} rows, but the batch has {rows}")
        return Scores(self.heads.expand(rows, -1, -1), self.neurons.expand(rows, -1, -1))


def within_layer_order(scores: torch.Tensor, order: torch.Tensor, block: int = 1) -> torch.Tensor:
    """``scores`` [B, L, U] rearranged inside each layer so that the units rank as ``order`` [L, U] ranks them.

    Each layer keeps the multiset of its (block-mean) scores, so a ranking across layers keeps as many units of
    every layer as ``scores`` would; which units those are follows ``order``.
    """
    units = scores.unflatten(-1, (-1, block)).mean(-1)
    reference = order.unflatten(-1, (-1, block)).mean(-1)
    values = units.sort(dim=-1, descending=True, stable=True).values
    rank = reference.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return values.gather(-1, rank.expand_as(values)).repeat_interleave(block, -1)


class BudgetOnly(nn.Module):
    """The budget-only control: a predictor's counts per layer, with the static ranking inside each layer."""

    def __init__(self, predictor: nn.Module, static: StaticScores, structure: DecoderStructure) -> None:
        super().__init__()
        self.predictor = predictor
        self.static = static
        self.fingerprint = predictor.fingerprint
        self.group = structure.layers[1].attention.kv_group_size  # heads are kept as whole KV groups
        self.neuron_block = getattr(predictor, "neuron_block", 1)

    def forward(self, context: torch.Tensor) -> Scores:
        heads, neurons = self.predictor(context)
        return Scores(within_layer_order(heads.float(), self.static.head_scores, self.group),
                      within_layer_order(neurons.float(), self.static.neuron_scores, self.neuron_block))


# ---- scoring -----------------------------------------------------------------------------------------------------
def continuation_nll(model: nn.Module | SparseDecoder, tokens: torch.Tensor, prompt_length: int,
                     protocol: Protocol) -> torch.Tensor:
    """Summed next-token NLL of each row's continuation ``tokens[:, prompt_length:]`` -> [B].

    A dense model scores from one forward (causal: no protocol applies). A sparse one, leak-free, selects from the
    prompt at ``start`` and steps through the continuation; with protocol "paper" it selects from the whole window.
    """
    continuation = tokens[:, prompt_length:]
    if not isinstance(model, SparseDecoder):
        with torch.inference_mode():
            logits = PrefillStep(model)(tokens, torch.ones_like(tokens))[:, prompt_length - 1:-1]
    elif protocol == "paper":
        logits = model(tokens)[:, prompt_length - 1:-1]
    else:
        state = model.start(tokens[:, :prompt_length], new_tokens=continuation.shape[1])
        steps = [state.logits]
        for position in range(continuation.shape[1] - 1):
            steps.append(model.step(state, continuation[:, position]))
        logits = torch.stack(steps, 1)
    return nn.functional.cross_entropy(logits.float().transpose(1, 2), continuation, reduction="none").sum(1)


def oracle_scores(model: nn.Module, structure: DecoderStructure, tokens: torch.Tensor, criterion: Criterion, *,
                  batch_size: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The criterion of each row of ``tokens`` (its loss over those tokens alone), layers 1..L-1, normalised as the
    predictors' targets are: heads [N, L-1, H], neurons [N, L-1, F]."""
    heads, neurons = [], []
    with CriterionHooks(model, structure) as hooks:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="oracle scores", disable=not progress,
                          leave=False):
            batch = tokens[start:start + batch_size]
            scores = hooks.score(batch, torch.ones_like(batch), criterion)
            heads.append(normalise_targets(scores.heads[:, 1:]))
            neurons.append(normalise_targets(scores.neurons[:, 1:]))
    return torch.cat(heads), torch.cat(neurons)


def _other_window(domains: Sequence[str]) -> torch.Tensor:
    """For each window, the next window of its domain (cyclically); itself when it is its domain's only one."""
    other = torch.arange(len(domains))
    for domain in set(domains):
        members = [i for i, d in enumerate(domains) if d == domain]
        for i, j in zip(members, members[1:] + members[:1]):
            other[i] = j
    return other


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, tokens_per_window: int, *, samples: int = 2000,
                     seed: int = 0) -> dict:
    """Perplexity ratio a / b over the same windows (per-window NLL sums), with a 95% paired bootstrap interval."""
    n = a.shape[0]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (samples, n), generator=generator)
    difference = (a.double() - b.double())
    ratios = torch.exp(difference[picks].sum(1) / (n * tokens_per_window))
    low, high = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    ratio = math.exp(difference.sum().item() / (n * tokens_per_window))
    return {"ratio": ratio, "ci95": [low, high], "excludes_equality": not low <= 1.0 <= high}


def affordable_sparsity(ratios: dict[float, float], cost: float) -> float | None:
    """The highest swept sparsity whose perplexity ratio to dense stays within ``cost`` (None: not even the lowest)."""
    within = [s for s, r in ratios.items() if r <= cost]
    return max(within) if within else None


# ---- the comparison ----------------------------------------------------------------------------------------------
@dataclass
class _Context:
    model: nn.Module
    structure: DecoderStructure
    windows: EvalWindows
    protocol: Protocol
    batch_size: int
    progress: bool


def _methods_at(scope: Scope, methods: Sequence[str], predictors: dict[str, nn.Module]) -> tuple[list[str], dict]:
    """The methods that run at ``scope``, and for the others why not."""
    runs, skipped = [], {}
    for method in methods:
        if method.startswith("dejavu") and scope != "per_layer":
            skipped[method] = "a per-layer predictor scores each layer as it runs: per-layer scope only"
        elif method == "budget_only" and scope != "global":
            skipped[method] = "at per-layer scope every layer keeps a fixed count, so it is the static selection"
        elif method in PREDICTOR_METHODS and method not in predictors:
            skipped[method] = "no predictor of this kind was given"
        elif method == "budget_only" and "shadowllm_prompt" not in predictors:
            skipped[method] = "needs the per-prompt ShadowLLM predictor, which was not given"
        else:
            runs.append(method)
    return runs, skipped


def _predictor_of(method: str) -> str:
    """The predictor a predictor method's runs are made with (budget-only takes ShadowLLM's per-prompt counts)."""
    return "shadowllm_prompt" if method == "budget_only" else method


def _run_keys(method: str, seeds: Sequence[int]) -> list[str]:
    """The runs a method takes at one scope and sparsity (one per seed for random)."""
    return [f"random/seed{seed}" for seed in seeds] if method == "random" else [method]


def _row_sources(method: str, baselines: Baselines, oracle: tuple[torch.Tensor, torch.Tensor], windows: EvalWindows,
                 structure: DecoderStructure, seeds: Sequence[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-window scores of an input-free method, one entry per run (a run per seed for random)."""
    n = windows.tokens.shape[0]

    def each(scores: StaticScores) -> tuple[torch.Tensor, torch.Tensor]:
        return scores.head_scores.expand(n, -1, -1), scores.neuron_scores.expand(n, -1, -1)

    if method == "random":
        return {key: each(StaticScores.random(structure, seed)) for key, seed in zip(_run_keys(method, seeds), seeds)}
    if method in ("static", "constant"):
        return {method: each(getattr(baselines, method))}
    if method == "domain_router":
        missing = sorted(set(windows.domains) - set(baselines.by_domain))
        if missing:
            raise ComparisonError(f"the domain router has no calibration for the domains {missing}; calibrate on "
                                  "text of every evaluated domain")
        chosen = [baselines.by_domain[d] for d in windows.domains]
        return {method: (torch.stack([s.head_scores for s in chosen]), torch.stack([s.neuron_scores for s in chosen]))}
    heads, neurons = oracle
    if method == "oracle":
        return {method: (heads, neurons)}
    other = _other_window(windows.domains)
    return {method: (heads[other], neurons[other])}


def _run(context: _Context, sparse: nn.Module | SparseDecoder, rows: RowScores | None = None,
         scores: tuple[torch.Tensor, torch.Tensor] | None = None, desc: str = "") -> dict:
    """Per-window continuation NLL sums of one method, and the effective sparsity its selections reached."""
    windows, nll = context.windows, []
    effective: list[tuple[int, dict]] = []
    for start in tqdm(range(0, windows.tokens.shape[0], context.batch_size), desc=desc, disable=not context.progress,
                      leave=False):
        batch = windows.tokens[start:start + context.batch_size]
        if rows is not None and scores is not None:
            rows.use(scores[0][start:start + batch.shape[0]], scores[1][start:start + batch.shape[0]])
        nll.append(continuation_nll(sparse, batch, windows.prompt_length, context.protocol))
        if isinstance(sparse, SparseDecoder):
            effective.append((batch.shape[0], sparse.effective_sparsity().sparse_layers))
    result = {"nll": torch.cat(nll).tolist()}
    if effective:
        total = sum(count for count, _ in effective)
        result["effective_sparsity"] = {key: sum(count * e[key] for count, e in effective) / total
                                        for key in effective[0][1]}
    return result


def check_plan(methods: Sequence[str], protocol: str, scopes: Sequence[str], sparsities: Sequence[float],
                token_prefill: str) -> None:
    """Refuse a comparison plan it cannot run, before anything slow."""
    if token_prefill not in PREFILLS:
        raise ComparisonError(f"token_prefill must be one of {PREFILLS}, got {token_prefill!r}")
    if token_prefill == "dense" and protocol == "paper":
        raise ComparisonError("token_prefill='dense' needs the leak_free protocol: under 'paper' the scored tokens are "
                              "part of the prefill, which would then be the dense model")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ComparisonError(f"unknown methods {unknown}; expected some of {', '.join(METHODS)}")
    if protocol not in PROTOCOLS:
        raise ComparisonError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    bad = sorted(set(scopes) - set(SCOPES))
    if bad:
        raise ComparisonError(f"unknown scopes {bad}; expected some of {', '.join(SCOPES)}")
    if not sparsities or not all(0.0 < s < 1.0 for s in sparsities):
        raise ComparisonError(f"sparsities must be fractions in (0, 1), got {list(sparsities)}")


def _plan(scopes: Sequence[str], sparsities: Sequence[float]) -> list[tuple[str, float]]:
    return [(scope, sparsity) for scope in scopes for sparsity in sorted(sparsities)]


def _checked_settings(structure: DecoderStructure, windows: EvalWindows, protocol: str, criterion: str,
                      random_seeds: Sequence[int], token_prefill: str) -> dict:
    """The settings a saved run must share to be reused (the caller adds its baselines and model). A dense
    per-token prefill is recorded; the sparse one, which every run made before the choice existed used, is not."""
    return {"fingerprint": structure.fingerprint, "protocol": protocol, "criterion": criterion,
            "windows": windows.describe(), "random_seeds": list(random_seeds)} | (
        {"token_prefill": token_prefill} if token_prefill == "dense" else {})


def _read_runs(out: Path) -> dict:
    try:
        return json.loads((out / RUNS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ArtifactError(f"cannot read {out / RUNS_FILE}: {error}; remove it to start the comparison afresh") \
            from error


def _load_runs(out: Path | None, settings: dict) -> dict:
    if out is None or not (out / RUNS_FILE).is_file():
        return {}
    saved = _read_runs(out)
    if saved.get("settings") != settings:
        raise ComparisonError(f"{out} holds runs of other settings (model, windows, protocol, criterion or "
                              "predictors); pass another output directory, or remove it to start afresh")
    return saved["runs"]


def _save_runs(out: Path | None, settings: dict, runs: dict) -> None:
    if out is not None:
        atomic_write_text(out / RUNS_FILE, json.dumps({"settings": settings, "runs": runs}))


def evaluate(model: nn.Module, windows: EvalWindows, baselines: Baselines, *, criterion: Criterion,
             predictors: dict[str, nn.Module] | None = None, sparsities: Sequence[float] = DEFAULT_SPARSITIES,
             scopes: Sequence[Scope] = SCOPES, methods: Sequence[str] = METHODS, protocol: Protocol = "leak_free",
             random_seeds: Sequence[int] = (0, 1, 2), batch_size: int = 8, bootstrap_samples: int = 2000,
             out: str | Path | None = None, settings: dict | None = None, token_prefill: Prefill = "sparse",
             progress: bool = True) -> dict:
    """Perplexity of ``model`` dense and under every method, sparsity and scope, on the same held-out windows.

    ``predictors`` maps ``shadowllm_prompt``, ``shadowllm_token``, ``dejavu_prompt``, ``dejavu_token`` to trained
    predictors (a method without one is skipped, and the report says so). ``criterion`` is the one the oracle
    measures: the predictors' training criterion. With ``out``, each finished run is saved there and a rerun with the
    same settings resumes; the report (``comparison.json``) and its plot (``comparison.png``) are written there too.
    ``settings`` adds what the caller wants recorded (and checked on resume) to the report's settings.
    ``token_prefill`` "dense": the per-token methods compute the prompt with every unit (see the module docstring).
    :func:`report_runs` writes the report of the runs made so far without running any.
    """
    predictors = dict(predictors or {})
    check_plan(methods, protocol, scopes, sparsities, token_prefill)
    if batch_size < 1:
        raise ComparisonError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    structure = discover(model)
    for name, module in [*predictors.items(), ("the static baseline", baselines.static)]:
        check_fingerprint(module.fingerprint, structure, what=name)
    directory = writable_directory(out) if out is not None else None
    recorded = _checked_settings(structure, windows, protocol, criterion, random_seeds, token_prefill) | {
        "baselines": _digest(baselines.static)} | (settings or {})
    runs = _load_runs(directory, recorded)
    context = _Context(model, structure, windows, protocol, batch_size, progress)
    # each predictor run records the predictor it used, so that one trained later (DejaVu) does not void the others
    used = {name: {"digest": _digest(module), "hidden": module.config().get("hidden")}
            for name, module in predictors.items()}

    def record(key: str, compute: Callable[[], dict], predictor: str | None = None) -> dict:
        if key in runs and predictor is not None and runs[key].get("predictor") != used[predictor]:
            raise ComparisonError(f"the finished run {key} of {directory} was made with another {predictor} "
                                  f"predictor ({runs[key].get('predictor')}, now {used[predictor]}); pass the "
                                  "predictors it was made with, or another output directory")
        if key not in runs:
            runs[key] = compute() | ({"predictor": used[predictor]} if predictor is not None else {})
            _save_runs(directory, recorded, runs)
        return runs[key]

    record("dense", lambda: _run(context, model, desc="dense"))
    oracle_tokens = windows.tokens if protocol == "paper" else windows.tokens[:, :windows.prompt_length]
    oracle: tuple[torch.Tensor, torch.Tensor] | None = None
    skipped: dict[str, dict[str, str]] = {}
    plan = _plan(scopes, sparsities)
    verified: set[str] = set()

    def sparse_model(predictor: nn.Module, sparsity: float, scope: str, granularity: str) -> nn.Module:
        # the rewrite's self-check depends on the model and granularity only: once each is enough
        sparse = transform(model, predictor, sparsity=sparsity, scope=scope, granularity=granularity,
                           prefill=token_prefill if granularity == "token" else "sparse",
                           verify=granularity not in verified)
        verified.add(granularity)
        return sparse

    bar = tqdm(plan, desc="comparison", disable=not progress)
    for scope, sparsity in bar:
        active, skipped[scope] = _methods_at(scope, methods, predictors)
        prefix = f"{scope}/{sparsity:g}"
        row_methods = [m for m in active if m in ROW_METHODS]
        if any(m.endswith("oracle") for m in row_methods) and oracle is None:
            oracle = oracle_scores(model, structure, oracle_tokens, criterion, batch_size=batch_size,
                                   progress=progress)
        sources = {key: scores for m in row_methods
                   for key, scores in _row_sources(m, baselines, oracle, windows, structure, random_seeds).items()}
        pending = {key: scores for key, scores in sources.items() if f"{prefix}/{key}" not in runs}
        if pending:
            rows = RowScores(baselines.static)
            sparse = sparse_model(rows, sparsity, scope, "prompt")
            for key, scores in pending.items():
                bar.set_postfix_str(f"{prefix} {key}")
                record(f"{prefix}/{key}", lambda: _run(context, sparse, rows, scores, desc=key))
        for method in (m for m in active if m not in ROW_METHODS):
            key = f"{prefix}/{method}"
            if key not in runs:
                bar.set_postfix_str(f"{prefix} {method}")
                predictor = (BudgetOnly(predictors[_predictor_of(method)], baselines.static, structure)
                             if method == "budget_only" else predictors[method])
                granularity = "token" if method.endswith("_token") else "prompt"
                sparse = sparse_model(predictor, sparsity, scope, granularity)
            record(key, lambda: _run(context, sparse, desc=method), _predictor_of(method))
    bar.close()
    return _write_report(directory, runs, windows, recorded, structure, plan=plan, methods=methods,
                         random_seeds=random_seeds, skipped=skipped, missing=[], predictors=used,
                         bootstrap_samples=bootstrap_samples)


def report_runs(model: nn.Module, windows: EvalWindows, out: str | Path, *, criterion: Criterion,
                sparsities: Sequence[float] = DEFAULT_SPARSITIES, scopes: Sequence[Scope] = SCOPES,
                methods: Sequence[str] = METHODS, protocol: Protocol = "leak_free",
                random_seeds: Sequence[int] = (0, 1, 2), bootstrap_samples: int = 2000,
                settings: dict | None = None, token_prefill: Prefill = "sparse") -> dict:
    """The report of the runs :func:`evaluate` saved in ``out`` so far, running nothing: no calibration traces or
    predictors are needed. The runs must be of this model, these windows, protocol and criterion (and ``settings``);
    the report lists the runs still missing (every method that runs at its scope, predictors assumed given)."""
    check_plan(methods, protocol, scopes, sparsities, token_prefill)
    structure = discover(model)
    directory = writable_directory(out)
    if not (directory / RUNS_FILE).is_file():
        raise ComparisonError(f"{directory} holds no finished runs yet; run the comparison first")
    saved = _read_runs(directory)
    expected = _checked_settings(structure, windows, protocol, criterion, random_seeds, token_prefill) | (settings or {})
    if any(saved["settings"].get(key) != value for key, value in expected.items()) or (
            "token_prefill" in saved["settings"]) != ("token_prefill" in expected):
        raise ComparisonError(f"{directory} holds runs of other settings (model, windows, protocol or criterion); "
                              "pass the settings they were made with")
    runs, plan = saved["runs"], _plan(scopes, sparsities)
    every_predictor = dict.fromkeys(PREDICTOR_METHODS)
    skipped, missing = {}, []
    for scope, sparsity in plan:
        active, skipped[scope] = _methods_at(scope, methods, every_predictor)
        missing += [f"{scope}/{sparsity:g}/{key}" for method in active for key in _run_keys(method, random_seeds)
                    if f"{scope}/{sparsity:g}/{key}" not in runs]
    # the predictors the runs were made with, as each predictor run recorded it
    used = {_predictor_of(key.rsplit("/", 1)[-1]): run["predictor"] for key, run in runs.items() if "predictor" in run}
    return _write_report(directory, runs, windows, saved["settings"], structure, plan=plan, methods=methods,
                         random_seeds=random_seeds, skipped=skipped, missing=missing, predictors=used,
                         bootstrap_samples=bootstrap_samples)


def _write_report(directory: Path | None, runs: dict, windows: EvalWindows, settings: dict,
                  structure: DecoderStructure, *, plan: list[tuple[str, float]], methods: Sequence[str],
                  random_seeds: Sequence[int], skipped: dict, missing: list[str], predictors: dict,
                  bootstrap_samples: int) -> dict:
    report = summarise(runs, windows, settings, plan=plan, methods=methods, random_seeds=random_seeds,
                       skipped=skipped, bootstrap_samples=bootstrap_samples)
    report["missing_runs"] = missing
    report["predictors"] = predictors
    # what each budget skips of the later layers' KV groups and neurons (units are whole, so not always the ask)
    report["planned_sparsity"] = {scope: {f"{sparsity:g}": planned_sparsity(
        structure, SparsityConfig.from_arguments(sparsity, None, None, scope)) for s, sparsity in plan if s == scope}
        for scope in dict.fromkeys(scope for scope, _ in plan)}
    if directory is not None:
        atomic_write_text(directory / "comparison.json", json.dumps(report, indent=2))
        plot(report, directory / "comparison.png")
    return report


def _digest(module: nn.Module) -> str:
    """A short content digest of a module's tensors (so resuming with other predictors is refused)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def summarise(runs: dict, windows: EvalWindows, settings: dict, *, plan: Sequence[tuple[str, float]],
              methods: Sequence[str], random_seeds: Sequence[int], skipped: dict, bootstrap_samples: int) -> dict:
    """The report: perplexities, ratios to dense with intervals, ShadowLLM against every other method, and the
    sparsity each method affords at a 5% and a 20% cost."""
    tokens = windows.continuation
    n = windows.tokens.shape[0]
    domains = sorted(set(windows.domains))
    masks = {d: torch.tensor([w == d for w in windows.domains]) for d in domains}

    def perplexity(nll: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        chosen = nll if mask is None else nll[mask]
        return math.exp(chosen.sum().item() / (chosen.numel() * tokens))

    dense = torch.tensor(runs["dense"]["nll"], dtype=torch.float64)
    results: dict[str, dict[str, dict[str, dict]]] = {}
    nll_of: dict[tuple[str, float, str], torch.Tensor] = {}
    for scope, sparsity in plan:
        prefix = f"{scope}/{sparsity:g}"
        for method in methods:
            keys = [f"{prefix}/{key}" for key in _run_keys(method, random_seeds)]
            if not all(k in runs for k in keys):
                continue
            # the random floor is the mean over seeds of each window's NLL: a paired sample like any other method
            nll = torch.stack([torch.tensor(runs[k]["nll"], dtype=torch.float64) for k in keys]).mean(0)
            nll_of[(scope, sparsity, method)] = nll
            entry = {"perplexity": perplexity(nll), "vs_dense": paired_bootstrap(nll, dense, tokens,
                                                                                 samples=bootstrap_samples),
                     "per_domain": {d: perplexity(nll, masks[d]) for d in domains}}
            if "effective_sparsity" in runs[keys[0]]:
                entry["effective_sparsity"] = runs[keys[0]]["effective_sparsity"]
            if method == "random":
                entry["per_seed"] = {str(s): perplexity(torch.tensor(runs[k]["nll"])) for s, k in zip(random_seeds,
                                                                                                        keys)}
            results.setdefault(scope, {}).setdefault(method, {})[f"{sparsity:g}"] = entry
    comparisons: dict[str, dict[str, dict]] = {}
    for (scope, sparsity, method), nll in nll_of.items():
        reference = nll_of.get((scope, sparsity, "shadowllm_prompt"))
        if reference is not None and method != "shadowllm_prompt":
            comparisons.setdefault(scope, {}).setdefault(f"{sparsity:g}", {})[method] = paired_bootstrap(
                reference, nll, tokens, samples=bootstrap_samples)
    affordable = {scope: {method: {cost: affordable_sparsity({float(s): e["vs_dense"]["ratio"]
                                                              for s, e in by_sparsity.items()}, limit)
                                   for cost, limit in COSTS.items()}
                          for method, by_sparsity in by_method.items()}
                  for scope, by_method in results.items()}
    return {
        "settings": settings,
        "dense": {"perplexity": perplexity(dense), "per_domain": {d: perplexity(dense, masks[d]) for d in domains},
                  "windows": n},
        "methods": results,
        "shadowllm_prompt_vs": comparisons,
        "affordable_sparsity": affordable,
        "skipped": {scope: reasons for scope, reasons in skipped.items() if reasons},
        "reading": ("perplexity ratios are method / dense (vs_dense) and ShadowLLM per prompt / method "
                    "(shadowllm_prompt_vs: below 1, ShadowLLM is better); ci95 are paired bootstrap intervals over "
                    "windows; affordable_sparsity is the highest swept sparsity within 5% / 20% of dense"),
    }


def plot(report: dict, path: Path) -> None:
    """Perplexity relative to dense against sparsity, a line per method, a panel per scope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = list(report["methods"])
    figure, axes = plt.subplots(1, max(1, len(scopes)), figsize=(6 * max(1, len(scopes)), 4.5), squeeze=False)
    for axis, scope in zip(axes[0], scopes):
        for method, by_sparsity in report["methods"][scope].items():
            xs = [float(s) for s in by_sparsity]
            axis.plot(xs, [e["vs_dense"]["ratio"] for e in by_sparsity.values()], marker="o", label=method)
        for limit in COSTS.values():
            axis.axhline(limit, color="grey", linewidth=0.6, linestyle=":")
        axis.set_yscale("log")
        axis.set_xlabel("sparsity of layers 1..L-1")
        axis.set_ylabel("perplexity / dense")
        axis.set_title(f"scope {scope} (dense {report['dense']['perplexity']:.2f})")
        axis.legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)
