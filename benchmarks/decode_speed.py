"""Prefill and decode speed of shadowfx vs the dense model, measured in one run, with the Amdahl bound.

An OPT-1.3B-shaped model with random weights (fp32, batch 1, every core) is run dense (the Hugging Face model with
its KV cache) and through ``shadowfx.transform`` at each sparsity, per prompt and per token. Decode at batch 1 is
bound by the bytes it reads, so the bound for a sparse step is ``bytes_dense / (bytes_dense - bytes_skipped)`` with
the weight and KV-cache bytes the selection actually skips (layer 0 dense, per-layer minimums included) and, per
token, the predictor's bytes added (it runs every step; ``--neuron-block`` shrinks its output layer). Dense and sparse
run in alternation; a speedup is the median ratio of the alternated pairs, and each setting is measured in
``--runs`` independent runs, reported as their median with the range. Writes ``decode_speed.json`` and ``decode_speed.png`` to ``--out``.

With ``--onnx`` the same run also exports the dense model and every per-prompt setting (:func:`shadowfx.export_onnx`)
and times them in onnxruntime with the same thread count, after the PyTorch measurements (which run in a child
process, so their memory is released before the sessions load their own copy of the weights): dense ONNX against
sparse ONNX in alternation, and the sparse ONNX
step against the PyTorch runtime's sparse step measured before.

    python benchmarks/decode_speed.py                      # OPT-1.3B shape (about 9 GB of memory, ~15 minutes)
    python benchmarks/decode_speed.py --onnx --granularity prompt --sparsity 0.5   # and onnxruntime (~13 GB disk, ~23 GB memory)
    python benchmarks/decode_speed.py --layers 4 --hidden 512 --heads 8 --vocab 4096   # a quick check
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM

import shadowfx
from shadowfx.bench import DenseDecoder, alternating, dense_step_bytes
from shadowfx.files import atomic_write, atomic_write_text


@torch.inference_mode()
def compare(dense: DenseDecoder, sparse, input_ids, attention_mask, repeats: int) -> dict:
    """Prefill and decode-step medians of dense and sparse, measured in alternation."""
    dense_prefill, sparse_prefill, prefill_speedup = alternating(
        dense.prefill, lambda: sparse(input_ids, attention_mask), max(3, repeats // 4), warmup=1)
    dense.start()
    started = time.perf_counter()
    state = sparse.start(input_ids, attention_mask)
    start_s = time.perf_counter() - started  # prefill plus gathering the kept weights (per prompt)
    token = input_ids[:, -1]
    dense_step, sparse_step, decode_speedup = alternating(dense.step, lambda: sparse.step(state, token), repeats)
    effective = sparse.effective_sparsity()
    return {
        "dense_prefill_s": dense_prefill,
        "prefill_s": sparse_prefill,
        "prefill_and_gather_s": start_s,
        "dense_decode_step_s": dense_step,
        "decode_step_s": sparse_step,
        "prefill_speedup": prefill_speedup,
        "decode_speedup": decode_speedup,
        "decode_path": sparse.last_decode_path,
        "gathered_bytes": sparse.last_gathered_bytes,
        "effective": {k: v for k, v in effective.to_dict().items() if k != "layers"},
        "weight_bytes_skipped": effective.weight_bytes_skipped,
        "kv_bytes_skipped": effective.kv_bytes_per_token_skipped * input_ids.shape[1],
    }


def onnx_session_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return options


def compare_onnx(dense_dir: Path, sparse_dir: Path, input_ids, attention_mask, repeats: int) -> dict:
    """Prefill and decode-step medians of the dense and the sparse export in onnxruntime, in alternation."""
    from shadowfx.runtimes.onnx import OnnxDecoder

    dense = OnnxDecoder(dense_dir, session_options=onnx_session_options())
    sparse = OnnxDecoder(sparse_dir, session_options=onnx_session_options())
    dense_prefill, sparse_prefill, prefill_speedup = alternating(
        lambda: dense(input_ids, attention_mask), lambda: sparse(input_ids, attention_mask), max(3, repeats // 4),
        warmup=1)
    dense_state = dense.start(input_ids, attention_mask)
    started = time.perf_counter()
    sparse_state = sparse.start(input_ids, attention_mask)
    start_s = time.perf_counter() - started
    token = input_ids[:, -1]
    dense_step, sparse_step, decode_speedup = alternating(lambda: dense.step(dense_state, token),
                                                          lambda: sparse.step(sparse_state, token), repeats)
    return {"onnx_dense_prefill_s": dense_prefill, "onnx_prefill_s": sparse_prefill,
            "onnx_prefill_and_gather_s": start_s, "onnx_dense_decode_step_s": dense_step,
            "onnx_decode_step_s": sparse_step, "onnx_prefill_speedup": prefill_speedup,
            "onnx_decode_speedup": decode_speedup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=50272)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=24, help="alternated dense/sparse decode steps per run")
    parser.add_argument("--runs", type=int, default=3,
                        help="independent runs per setting; the report gives their median and range")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--granularity", nargs="+", default=["prompt", "token"])
    parser.add_argument("--predictor-hidden", type=int, default=1024)
    parser.add_argument("--neuron-block", type=int, default=1,
                        help="neurons per predictor output (a block predictor's output layer is this much smaller)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--onnx", action="store_true", help="also export and time the dense model and every "
                        "per-prompt setting in onnxruntime")
    parser.add_argument("--onnx-dir", type=Path, help="where the exports go (default: a temporary folder, removed "
                        "at the end)")
    args = parser.parse_args()
    exports = None
    if args.onnx:
        exports = args.onnx_dir or Path(tempfile.mkdtemp(prefix="shadowfx-bench-"))
        # PyTorch timing and the exports run in a child process, so that its memory (the model, the gathered
        # weights) is gone before the onnxruntime sessions load their own copy of the weights
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.submit(measure_pytorch, args, exports).result()
        measure_onnx(results, exports, args)
        if args.onnx_dir is None:
            shutil.rmtree(exports, ignore_errors=True)
    else:
        results = measure_pytorch(args, None)
    atomic_write_text(args.out / "decode_speed.json", json.dumps(results, indent=2))
    _plot(results, args.out / "decode_speed.png")
    print(f"wrote {args.out / 'decode_speed.json'} and decode_speed.png")


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    return input_ids, torch.ones_like(input_ids)


def measure_pytorch(args: argparse.Namespace, exports: Path | None) -> dict:
    """Dense vs sparse in the PyTorch runtime, every setting; with ``exports``, also write the dense model and every
    per-prompt setting there as ONNX."""
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       ffn_dim=4 * args.hidden, num_attention_heads=args.heads, word_embed_proj_dim=args.hidden,
                       max_position_embeddings=2048)
    model = OPTForCausalLM(config).eval()
    input_ids, attention_mask = _inputs(args)
    structure = shadowfx.discover(model)
    predictor = shadowfx.ShadowPredictor.for_structure(structure, hidden=args.predictor_hidden,
                                                       neuron_block=args.neuron_block)

    dense_bytes = dense_step_bytes(model, structure, 1, args.prompt)
    predictor_bytes = sum(p.numel() * p.element_size() for p in predictor.parameters())

    results = {"config": vars(args) | {"out": str(args.out), "onnx_dir": str(args.onnx_dir)},
               "threads": torch.get_num_threads(), "bytes_per_dense_decode_step": dense_bytes,
               "predictor_bytes": predictor_bytes, "sparse": []}
    dense = DenseDecoder(model, input_ids, attention_mask)
    if exports is not None:
        shadowfx.export_onnx(model, exports / "dense", overwrite=True)
    for granularity in args.granularity:
        for sparsity in args.sparsity:
            sparse = shadowfx.transform(model, predictor, sparsity=sparsity, granularity=granularity)
            runs = [compare(dense, sparse, input_ids, attention_mask, args.repeats) for _ in range(args.runs)]
            timing = {key: (statistics.median(run[key] for run in runs) if isinstance(value, float) else value)
                      for key, value in runs[0].items()}
            skipped = timing["weight_bytes_skipped"] + timing["kv_bytes_skipped"]
            # per token the predictor runs every step, and its bytes are read with the model's
            added = predictor_bytes if granularity == "token" else 0
            bound = dense_bytes / (dense_bytes - skipped + added)
            speedup = timing["decode_speedup"]
            spread = {f"{key}_runs": [run[key] for run in runs] for key in ("decode_speedup", "prefill_speedup")}
            row = {"granularity": granularity, "sparsity": sparsity, **timing, **spread,
                   "decode_amdahl_bound": bound, "share_of_bound": speedup / bound}
            results["sparse"].append(row)
            low, high = min(spread["decode_speedup_runs"]), max(spread["decode_speedup_runs"])
            print(f"{granularity:6s} {sparsity:.2f}: decode {speedup:.2f}x (runs {low:.2f}-{high:.2f}; bound "
                  f"{bound:.2f}x, {100 * speedup / bound:.0f}% of it; dense {timing['dense_decode_step_s'] * 1e3:.0f} "
                  f"ms, sparse {timing['decode_step_s'] * 1e3:.0f} ms, path {timing['decode_path']}), "
                  f"prefill {timing['prefill_speedup']:.2f}x", flush=True)
            if exports is not None and granularity == "prompt":
                shadowfx.export_onnx(sparse, exports / f"prompt-{sparsity}", overwrite=True)
            del sparse
    return results


def measure_onnx(results: dict, exports: Path, args: argparse.Namespace) -> None:
    """Dense vs sparse ONNX for every per-prompt row of ``results`` (filled in place), with the thread count the
    PyTorch runs had."""
    torch.set_num_threads(results["threads"])
    input_ids, attention_mask = _inputs(args)
    for row in results["sparse"]:
        if row["granularity"] != "prompt":
            continue
        runs = [compare_onnx(exports / "dense", exports / f"prompt-{row['sparsity']}", input_ids, attention_mask,
                             args.repeats) for _ in range(args.runs)]
        row.update({key: statistics.median(run[key] for run in runs) for key in runs[0]})
        row["onnx_decode_speedup_runs"] = [run["onnx_decode_speedup"] for run in runs]
        # medians of the same run: the sparse ONNX step over the PyTorch runtime's sparse step
        row["onnx_over_pytorch_decode"] = row["onnx_decode_step_s"] / row["decode_step_s"]
        row["onnx_dense_over_pytorch_dense_decode"] = row["onnx_dense_decode_step_s"] / row["dense_decode_step_s"]
        low, high = min(row["onnx_decode_speedup_runs"]), max(row["onnx_decode_speedup_runs"])
        print(f"onnx   {row['sparsity']:.2f}: decode {row['onnx_decode_speedup']:.2f}x dense ONNX (runs {low:.2f}-"
              f"{high:.2f}; dense {row['onnx_dense_decode_step_s'] * 1e3:.0f} ms, sparse "
              f"{row['onnx_decode_step_s'] * 1e3:.0f} ms; sparse ONNX step / PyTorch sparse step "
              f"{row['onnx_over_pytorch_decode']:.2f}), prefill {row['onnx_prefill_speedup']:.2f}x", flush=True)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["sparse"]
    labels = [f"{r['granularity']}\n{r['sparsity']:.2f}" for r in rows]
    x = range(len(rows))
    figure, axis = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    measured = [r["decode_speedup"] for r in rows]
    error = [[m - min(r["decode_speedup_runs"]) for m, r in zip(measured, rows)],
             [max(r["decode_speedup_runs"]) - m for m, r in zip(measured, rows)]]
    axis.bar([i - 0.2 for i in x], measured, 0.4, yerr=error, capsize=3, label="decode speedup (median, run range)")
    axis.bar([i + 0.2 for i in x], [r["decode_amdahl_bound"] for r in rows], 0.4, label="Amdahl bound (bytes)")
    axis.plot([i for i in x], [r["prefill_speedup"] for r in rows], "k^", label="prefill speedup")
    onnx = [(i, r["onnx_decode_speedup"]) for i, r in zip(x, rows) if "onnx_decode_speedup" in r]
    if onnx:
        axis.plot(*zip(*onnx), "rs", label="onnxruntime decode speedup (vs dense ONNX)")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks(list(x), labels)
    axis.set_ylabel("x vs dense (median)")
    axis.set_title(f"shadowfx vs dense, batch 1, {results['config']['layers']} layers x {results['config']['hidden']}")
    axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120))


if __name__ == "__main__":
    main()
