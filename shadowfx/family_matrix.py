"""The family matrix: every causal-LM architecture transformers ships, built small and put through ``transform``.

Each family ends in one of four outcomes:

* ``supported``: transformed; at sparsity 0 the prefill logits of a left-padded batch equal the dense model's and
  greedy generation through the KV cache equals Hugging Face ``generate``; at sparsity 0.5 (per layer) the logits
  equal the hook-based :class:`~shadowfx.masked_reference.MaskedReference` run with the same selection;
* ``refused``: capture or ``transform`` raised an error saying why (a :class:`~shadowfx.structure.StructureError`
  names the layer and the ops it could not carry);
* ``not_built``: no small random-weight model could be made from the family's default config (it needs a second
  modality, a kernel this machine lacks, or its config does not shrink); the reason is recorded;
* ``differs``: transformed without complaint but not equal to dense or to the reference. This must never appear.

The committed results (:data:`RESULTS`) are the expected outcomes: the tests re-run a fast subset and compare, so a
transformers release that changes a family fails a test instead of changing silently. ``shadowfx families`` runs the
whole matrix, rewrites the results and the README table, and exits non-zero if any family differs or moved.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from shadowfx.files import atomic_write_text
from shadowfx.verify import excess, probe_batch

Outcome = Literal["supported", "refused", "not_built", "differs"]
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "families.json"

# Small sizes for the attributes configs commonly have (under their own names or through ``attribute_map``). The
# sliding window is shorter than the probe, and the scores' soft cap below the small models' scores (about 0.02), so a
# family that applies one is checked with it in effect.
_SMALL = {
    "num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "head_dim": 16, "vocab_size": 512,
    "max_position_embeddings": 256, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "rotary_dim": 8, "sliding_window": 4, "attn_logit_softcapping": 0.01,
}
# Token ids a config may carry that must stay inside the small vocabulary.
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")
MAX_PARAMETERS = 20_000_000
PROBE_ROWS, NEW_TOKENS = 3, 4


class NotBuilt(RuntimeError):
    """No small model could be made from a family's config."""


@dataclass(frozen=True)
class FamilyResult:
    model_type: str
    model_class: str
    outcome: Outcome
    detail: str
    max_diff: float | None = None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


def small_config(model_type: str) -> PretrainedConfig:
    """The family's default config, shrunk to three layers of width 64 where its attributes allow."""
    config = AutoConfig.for_model(model_type)
    for name, value in _SMALL.items():
        derived = getattr(type(config), name, None)  # a read-only property follows the sizes set here (Falcon)
        if getattr(config, name, None) is not None and not (isinstance(derived, property) and derived.fset is None):
            setattr(config, name, value)
    for name in _TOKEN_IDS:
        token = getattr(config, name, None)
        if isinstance(token, int) and token >= config.vocab_size:
            setattr(config, name, config.vocab_size - 1)
    return config


def build(model_type: str, *, seed: int = 0) -> torch.nn.Module:
    """A small random-weight model of ``model_type`` (sdpa attention, else eager), or :class:`NotBuilt`."""
    try:
        config = small_config(model_type)
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # a family that cannot be built small is recorded, not fatal to the matrix
        raise NotBuilt(_first_line(error)) from error
    parameters = sum(p.numel() for p in shell.parameters())
    if parameters > MAX_PARAMETERS:
        raise NotBuilt(f"the shrunk config still has {parameters / 1e6:.0f}M parameters")
    failures = []
    for attention in ("sdpa", "eager"):
        try:
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
        except Exception as error:
            failures.append(f"{attention}: {_first_line(error)}")
    raise NotBuilt("; ".join(failures)[:400])


def _differs(ours: torch.Tensor, expected: torch.Tensor, real: torch.Tensor) -> float | None:
    """The max |difference| on real tokens if it is beyond rounding (:func:`shadowfx.verify.excess`), else None."""
    diff, allowed = excess(ours[real], expected[real])
    return diff if diff > allowed else None


def check(model_type: str) -> FamilyResult:
    """Build ``model_type`` small, transform it and compare; every outcome, including failures, is a result."""
    import shadowfx
    from shadowfx.capture import PrefillStep
    from shadowfx.masked_reference import MaskedReference
    from shadowfx.predictor import ShadowPredictor

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "?")
    try:
        model = build(model_type)
    except NotBuilt as error:
        return FamilyResult(model_type, model_class, "not_built", str(error))
    try:
        structure = shadowfx.discover(model)
        predictor = ShadowPredictor.for_structure(structure, hidden=16, seed=1)
        dense_rewrite = shadowfx.transform(model, predictor, sparsity=0.0)
        # the check at sparsity 0 just ran on this model and granularity; running it again would repeat it exactly
        sparse = shadowfx.transform(model, predictor, sparsity=0.5, scope="per_layer", verify=False)
    except Exception as error:  # the refusal, whatever raised it, is the family's recorded outcome
        return FamilyResult(model_type, model_class, "refused", _first_line(error))
    input_ids, attention_mask = probe_batch(structure.vocab_size, torch.device("cpu"), rows=PROBE_ROWS)
    real = attention_mask.bool()
    with torch.no_grad():
        dense = PrefillStep(model)(input_ids, attention_mask)
        diff = _differs(dense_rewrite(input_ids, attention_mask), dense, real)
        if diff is not None:
            return FamilyResult(model_type, model_class, "differs", f"sparsity 0: prefill logits differ by {diff:.3g}",
                                diff)
        pad = getattr(model.generation_config, "pad_token_id", None) or getattr(
            model.generation_config, "eos_token_id", None) or 0
        hf = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=pad if isinstance(pad, int) else pad[0])
        ours = dense_rewrite.generate(input_ids, attention_mask, max_new_tokens=NEW_TOKENS)
        if not torch.equal(ours, hf):
            return FamilyResult(model_type, model_class, "differs",
                                "sparsity 0: greedy generation through the KV cache differs from generate")
        logits = sparse(input_ids, attention_mask)
        chosen = sparse.last_selection
        with MaskedReference(model, structure) as reference:
            reference.set_selection({i + 1: t for i, t in enumerate(chosen.kv_heads)},
                                    {i + 1: t for i, t in enumerate(chosen.neurons)})
            diff = _differs(logits, reference.logits(input_ids, attention_mask), real)
    if diff is not None:
        return FamilyResult(model_type, model_class, "differs",
                            f"sparsity 0.5: logits differ from the masked reference by {diff:.3g}", diff)
    return FamilyResult(model_type, model_class, "supported",
                        "equal to dense at sparsity 0 (prefill and generation); equal to the masked reference at 0.5")


def run_matrix(model_types: Iterable[str], *, progress: bool = True) -> list[FamilyResult]:
    from tqdm import tqdm

    results = []
    model_types = list(model_types)
    bar = tqdm(model_types, desc="families", unit="family", disable=not progress)
    for model_type in bar:
        bar.set_postfix_str(model_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(check(model_type))
    return results


def load_results(path: Path = RESULTS) -> dict[str, FamilyResult]:
    data = json.loads(Path(path).read_text())
    return {entry["model_type"]: FamilyResult(**entry) for entry in data["families"]}


def save_results(results: Sequence[FamilyResult], path: Path = RESULTS) -> None:
    atomic_write_text(path, json.dumps({
        "transformers": transformers.__version__, "torch": torch.__version__,
        "counts": dict(Counter(r.outcome for r in results)),
        "families": [asdict(r) for r in sorted(results, key=lambda r: r.model_type)],
    }, indent=1) + "\n")


def table(results: Sequence[FamilyResult]) -> str:
    """The README's family table: counts, then one row per family grouped by outcome."""
    counts = Counter(r.outcome for r in results)
    lines = [f"transformers {transformers.__version__}: " + ", ".join(
        f"{counts[o]} {o.replace('_', ' ')}" for o in ("supported", "refused", "not_built", "differs")), "",
        "| outcome | family | class | why |", "|---|---|---|---|"]
    order = {"differs": 0, "supported": 1, "refused": 2, "not_built": 3}
    for r in sorted(results, key=lambda r: (order[r.outcome], r.model_type)):
        why = "" if r.outcome == "supported" else r.detail.replace("|", "\\|")
        lines.append(f"| {r.outcome.replace('_', ' ')} | {r.model_type} | {r.model_class} | {why} |")
    return "\n".join(lines)


def moved(results: Sequence[FamilyResult], expected: dict[str, FamilyResult]) -> list[str]:
    """Families whose outcome is not the recorded one, and (when any are recorded) families new to the mapping."""
    return [f"{r.model_type}: {expected[r.model_type].outcome if r.model_type in expected else 'new'} -> {r.outcome}"
            for r in results if (r.model_type in expected and expected[r.model_type].outcome != r.outcome)
            or (expected and r.model_type not in expected)]
