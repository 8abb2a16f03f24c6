"""Text sources, windows, perplexity and the damage curve."""

from __future__ import annotations

import math

import pytest
import torch

from shadowfx.data import DataError, build_corpus, read_text, token_windows, wikitext_path
from shadowfx.evaluate import damage_curve, perplexity
from conftest import small_model


def test_read_text_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_text(tmp_path / "latin1.txt")
    assert read_text(wikitext_path("valid")).lstrip().startswith("=")


def test_corpus_splits_files_by_hash_and_keeps_domains(tmp_path):
    for index in range(40):
        (tmp_path / f"module_{index}.py").write_text(
            f'"""Module {index}: {"documentation words " * 10}"""\n\n' + f"def f_{index}(x):\n    return x * {index}\n" * 20)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_skip.py").write_text("x = 1\n" * 100)
    corpus = build_corpus(docs_chars=10_000, code_chars=10_000, held_out=0.25, roots=[tmp_path])
    again = build_corpus(docs_chars=10_000, code_chars=10_000, held_out=0.25, roots=[tmp_path])
    assert corpus.documents == again.documents  # deterministic
    train, held = set(corpus.texts("train", "code")), set(corpus.texts("heldout", "code"))
    assert train and held and not train & held
    assert all("x = 1" not in text for text in train | held)  # tests are skipped
    assert all(text.startswith("Module") for text in corpus.texts("train", "docs"))
    assert corpus.sizes()["train"]["prose"] > 1_000_000


def test_token_windows():
    stream = torch.arange(10)
    assert token_windows(stream, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert token_windows(stream, 4, stride=3, limit=2).tolist() == [[0, 1, 2, 3], [3, 4, 5, 6]]
    with pytest.raises(DataError, match="fewer than one window"):
        token_windows(stream, 11)


def test_perplexity_and_damage_curve():
    model = small_model("llama")
    tokens = torch.randint(0, 512, (600,), generator=torch.Generator().manual_seed(0))
    dense = perplexity(model, tokens, length=32, windows=8)
    assert math.isfinite(dense) and dense > 1
    curve = damage_curve(model, tokens, fractions=(0.5,), seeds=(0,), length=32, windows=8)
    assert curve["dense"] == pytest.approx(dense)
    assert curve["random_0.50_ratio"] == pytest.approx(curve["random_0.50"] / dense)
    assert curve["random_0.50"] != pytest.approx(dense)
