"""How well each predictor ranks heads and neurons on held-out samples, next to the constant predictor.

For each reference model (``scripts/train_reference.py``): calibration windows are drawn evenly from its training
token stream (prose, API docs and code), scored with plainact (ShadowLLM's targets) and magnitude (DejaVu's), and
then the ShadowLLM predictor (prompt and token granularity) and the DejaVu-style per-layer predictors are trained.
Each report carries the held-out per-example Spearman of the predictor, of the constant predictor (the mean
normalised target: what a predictor outputs when its input tells it nothing) and of the static aggregate, and the
margin over the constant. Writes ``predictor_fit.json`` and ``predictor_fit.png``; entries of models not given in
this run are kept, so the models can be measured one at a time (each entry records its settings).

    python benchmarks/predictor_fit.py --model ~/.cache/shadowfx/reference/llama-8x384 \\
                                       --model ~/.cache/shadowfx/reference/opt-8x384
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import shadowfx
from shadowfx.calibrate import calibrate
from shadowfx.loading import load_decoder
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True, help="reference model directory")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
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
        stream = load_file(str(directory.parent.parent / "streams.safetensors"))["train"].long()
        starts = torch.linspace(0, stream.numel() - args.window - 1, args.samples).long()
        windows = torch.stack([stream[s:s + args.window] for s in starts.tolist()])
        data = {"source": "training stream of the reference model", "window": args.window, "samples": args.samples}
        traces = {criterion: calibrate(model, windows, structure, args.work / directory.name / criterion,
                                       criterion=criterion, data=data)
                  for criterion in ("plainact", "magnitude")}
        results[directory.name] = {"settings": {"samples": args.samples, "window": args.window,
                                                "hidden": args.hidden,
                                                "tokens_per_sample": traces["plainact"].header["tokens_per_sample"]}}
        for name, criterion, kind, granularity in RUNS:
            trained = train_predictor(traces[criterion], kind=kind, granularity=granularity, structure=structure,
                                      hidden=args.hidden)
            results[directory.name][name] = summary(trained.report) | {
                "criterion": criterion, "train_seconds": trained.report["train_seconds"]}
            print(directory.name, name, json.dumps(results[directory.name][name]))
    args.out.mkdir(parents=True, exist_ok=True)
    # read just before writing, so runs on other models that finished meanwhile are kept
    results = (json.loads(path.read_text()) if path.is_file() else {}) | results
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
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
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
