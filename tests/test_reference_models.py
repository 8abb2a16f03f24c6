"""The reference models committed under ``reference/``: they load, and their ONNX export scores held-out text with the
perplexity of the PyTorch runtime, to four digits."""

from __future__ import annotations

import math
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

import shadowfx
from shadowfx.data import build_corpus, token_windows
from shadowfx.perplexity import mean_nll
from shadowfx.loading import load_decoder
from shadowfx.predictor import KINDS, load_predictor, saved_predictors
from shadowfx.runtimes.onnx import OnnxDecoder

REFERENCE = Path(__file__).resolve().parents[1] / "reference"
MODELS = ["llama-8x384", "opt-8x384"]


def held_out_windows(tokenizer, count: int = 8, length: int = 128) -> torch.Tensor:
    """Windows of the built-in corpus's held-out API documentation (files the reference models never trained on)."""
    corpus = build_corpus(docs_chars=400_000, code_chars=0)
    ids = tokenizer("\n\n".join(corpus.texts("heldout", "docs")), return_tensors="pt")["input_ids"][0]
    return token_windows(ids, length, limit=count)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_perplexity_equals_the_pytorch_runtimes(name, tmp_path):
    from transformers import AutoTokenizer

    directory = REFERENCE / name
    model = load_decoder(directory)
    assert next(model.parameters()).dtype == torch.float32  # stored in float16, loaded as asked
    windows = held_out_windows(AutoTokenizer.from_pretrained(directory, local_files_only=True))
    predictor = load_predictor(directory, shadowfx.discover(model), kind="shadowllm", granularity="prompt")
    sparse = shadowfx.transform(model, predictor, sparsity=0.5, granularity="prompt")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    onnx_model = OnnxDecoder(shadowfx.export_onnx(sparse, tmp_path / "onnx"), session_options=options,
                             structure=sparse.structure)
    pytorch, onnxruntime = (math.exp(mean_nll(runtime, windows)) for runtime in (sparse, onnx_model))
    assert 1 < pytorch < 1e4  # a trained model's perplexity, not a degenerate one
    assert f"{onnxruntime:.4g}" == f"{pytorch:.4g}", (onnxruntime, pytorch)


@pytest.mark.parametrize("name", MODELS)
def test_the_trained_predictors_travel_with_the_model(name):
    """Each reference model carries its ShadowLLM and DejaVu-style predictors of both granularities, made for it
    (the fingerprint is checked on load), in files that stay small enough for the repository."""
    directory = REFERENCE / name
    model = load_decoder(directory)
    structure = shadowfx.discover(model)
    saved = {(unit.kind, unit.granularity) for unit in saved_predictors(directory)}
    assert saved == {(kind, granularity) for kind in KINDS if kind != "static" for granularity in ("prompt", "token")}
    for kind, granularity in saved:
        predictor = load_predictor(directory, structure, kind=kind, granularity=granularity)
        assert predictor.granularity == granularity
    weights = [p for p in directory.iterdir() if p.suffix == ".safetensors"]
    assert all(p.stat().st_size <= 40 * 2**20 for p in weights)
    assert sum(p.stat().st_size for p in weights if p.name != "model.safetensors") <= 40 * 2**20
