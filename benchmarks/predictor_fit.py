"""How well each predictor ranks heads and neurons on held-out samples, next to the constant predictor.

For each reference model (``scripts/train_reference.py``): calibration windows are drawn evenly from its training
token stream (API docs and code, and prose where it was trained with WikiText-2; ``--streams``) or from a text file
tokenised with the model's tokenizer (``--text``), scored with plainact (ShadowLLM's targets) and magnitude
(DejaVu's), and then the ShadowLLM predictor (prompt and token granularity) and the DejaVu-style per-layer
predictors are trained.
Each report carries the held-out per-example Spearman of the predictor, of the constant predictor (the mean
normalised target: what a predictor outputs when its input tells it nothing) and of the static aggregate, and the
margin over the constant. Writes ``predictor_fit.json`` and ``predictor_fit.png``; entries of models not given in
this run are kept, so the models can be measured one at a time (each entry records its settings).

    python benchmarks/predictor_fit.py --model ~/.cache/shadowfx/reference/llama-8x384 \\
                                       --model ~/.cache/shadowfx/reference/opt-8x384
    python benchmarks/predictor_fit.py --model <dir> --text path/to/wikitext-2/test.txt --out /tmp/fit
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import shadowfx
from shadowfx.calibrate import calibrate
from shadowfx.data import DataError, read_text
from shadowfx.files import atomic_write, atomic_write_text
from shadowfx.loading import load_decoder, load_tokenizer
from shadowfx.training import train_predictor

RUNS = (  # (name, criterion, kind, granularity)
    ("shadowllm_prompt", "plainact", "shadowllm", "prompt"),
    ("shadowllm_token", "plainact", "shadowllm", "token"),
    ("dejavu_prompt", "magnitude", "dejavu", "prompt"),
    ("dejavu_token", "magnitude", "dejavu", "token"),
)


def summary(report: dict) -> dict:
    held_out = report["spearman"]["held_out"]
    return {unit: {"predictor": held_out["predictor"][unit]["flat"], "constant": held_out["constant"][unit]["flat"],
                   "static": held_out["static"][unit]["flat"], "margin": report["margin"][unit]["flat"],
                   "predictor_within_layer": held_out["predictor"][unit]["layer"],
                   "constant_within_layer": held_out["constant"][unit]["layer"]}
            for unit in ("heads", "neurons")}


def calibration_stream(directory: Path, streams: Path | None, text: Path | None,
                       window: int) -> tuple[torch.Tensor, str]:
    """The tokens that windows are drawn from, and where they came from."""
    if text is not None:
        stream = torch.tensor(load_tokenizer(directory)(read_text(text))["input_ids"])
        source = f"text file {text.resolve()}"
    else:
        # train_reference.py keeps the streams in its --home, two levels above the model (<home>/reference/<name>)
        path = streams or directory.parent.parent / "streams.safetensors"
        if not path.is_file():
            raise DataError(f"{path} does not exist: pass --streams (the streams.safetensors that "
                            "scripts/train_reference.py wrote in its --home) or --text (a text file)")
        stream, source = load_file(str(path))["train"].long(), f"training stream {path.resolve()}"
    if stream.numel() <= window:
        raise DataError(f"the {source} has {stream.numel()} tokens, too few for windows of {window}")
    return stream, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True, help="reference model directory")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--streams", type=Path,
                        help="the token streams the models were trained on (default: "
                             "<model>/../../streams.safetensors, where scripts/train_reference.py puts them)")
    source.add_argument("--text", type=Path, help="calibrate on this text file instead (e.g. WikiText-2's test.txt)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--neuron-block", type=int, nargs="+", default=[1],
                        help="neurons per output of the ShadowLLM predictor; several sizes are trained side by side "
                             "(a run of blocks b is named <run>_blocks<b>)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "shadowfx" / "traces")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = args.out / "predictor_fit.json"
    results = {}
    for directory in args.model:
        model = load_decoder(directory, attn_implementation="eager")
        structure = shadowfx.discover(model)
        try:
            stream, source = calibration_stream(directory, args.streams, args.text, args.window)
        except DataError as error:
            raise SystemExit(f"predictor_fit.py: {error}") from error
        starts = torch.linspace(0, stream.numel() - args.window - 1, args.samples).long()
        windows = torch.stack([stream[s:s + args.window] for s in starts.tolist()])
        data = {"source": source, "window": args.window, "samples": args.samples}
        traces = {criterion: calibrate(model, windows, structure, args.work / directory.name / criterion,
                                       criterion=criterion, data=data)
                  for criterion in ("plainact", "magnitude")}
        results[directory.name] = {"settings": {"source": source, "samples": args.samples, "window": args.window,
                                                "hidden": args.hidden,
                                                "tokens_per_sample": traces["plainact"].header["tokens_per_sample"]}}
        for name, criterion, kind, granularity in RUNS:
            for block in args.neuron_block if kind == "shadowllm" else [1]:
                trained = train_predictor(traces[criterion], kind=kind, granularity=granularity, structure=structure,
                                          hidden=args.hidden, neuron_block=block)
                run = name if block == 1 else f"{name}_blocks{block}"
                results[directory.name][run] = summary(trained.report) | {
                    "criterion": criterion, "neuron_block": block, "train_seconds": trained.report["train_seconds"],
                    "predictor_bytes": sum(p.numel() * p.element_size() for p in trained.predictor.parameters())}
                print(directory.name, run, json.dumps(results[directory.name][run]))
    # read just before writing, so runs on other models that finished meanwhile are kept
    results = (json.loads(path.read_text()) if path.is_file() else {}) | results
    atomic_write_text(path, json.dumps(results, indent=2))
    _plot(results, args.out / "predictor_fit.png")
    print(f"wrote {path}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(model, run) for model, runs in results.items() for run in runs if run != "settings"]
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(rows), 4), sharey=True)
    for axis, unit in zip(axes, ("heads", "neurons")):
        x = range(len(rows))
        axis.bar([i - 0.2 for i in x], [results[m][r][unit]["predictor"] for m, r in rows], 0.4, label="predictor")
        axis.bar([i + 0.2 for i in x], [results[m][r][unit]["constant"] for m, r in rows], 0.4, label="constant")
        axis.set_xticks(list(x), [f"{m}\n{r}" for m, r in rows], fontsize=7, rotation=20)
        axis.set_title(f"{unit}: held-out Spearman")
    axes[0].legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120))


if __name__ == "__main__":
    main()
