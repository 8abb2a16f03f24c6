"""Text sources (the built-in corpus, WikiText-2 where pointed at), windows, perplexity and the damage curve."""

from __future__ import annotations

import math

import pytest
import torch

from shadowfx.data import WIKITEXT_ENV, DataError, build_corpus, read_text, token_windows, wikitext_dir
from shadowfx.perplexity import damage_curve, perplexity
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


def write_modules(root):
    """40 small documented modules, and a test file that the corpus must skip."""
    (root / "tests").mkdir(parents=True)
    for index in range(40):
        (root / f"module_{index}.py").write_text(
            f'"""Module {index}: {"documentation words " * 10}"""\n\n' + f"def f_{index}(x):\n    return x * {index}\n" * 20)
    (root / "tests" / "test_skip.py").write_text("x = 1\n" * 100)
    return root


def test_corpus_splits_files_by_hash_and_keeps_domains(tmp_path):
    root = write_modules(tmp_path / "test")  # a "test" folder above the root skips nothing
    corpus = build_corpus(docs_chars=10_000, code_chars=10_000, held_out=0.25, roots=[root])
    again = build_corpus(docs_chars=10_000, code_chars=10_000, held_out=0.25, roots=[root])
    assert corpus.documents == again.documents  # deterministic
    train, held = set(corpus.texts("train", "code")), set(corpus.texts("heldout", "code"))
    assert train and held and not train & held
    assert all("x = 1" not in text for text in train | held)  # tests are skipped
    assert all(text.startswith("Module") for text in corpus.texts("train", "docs"))
    assert set(corpus.sizes()["train"]) == {"docs", "code"}  # no prose unless WikiText-2 is given


def test_builtin_corpus_needs_no_files_beyond_the_interpreter():
    corpus = build_corpus(docs_chars=20_000, code_chars=20_000)
    for split in ("train", "heldout"):
        assert set(corpus.sizes()[split]) == {"docs", "code"}
        assert min(corpus.sizes()[split].values()) > 0


def test_wikitext_is_read_where_the_environment_points(tmp_path, monkeypatch):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    (folder / "valid.txt").write_text(" = Valley = \n The valley is green in spring . \n")
    (folder / "test.txt").write_text(" = Harbour = \n The harbour froze in winter . \n")
    root = write_modules(tmp_path / "python")
    monkeypatch.delenv(WIKITEXT_ENV, raising=False)
    assert wikitext_dir() is None
    monkeypatch.setenv(WIKITEXT_ENV, str(folder))
    corpus = build_corpus(docs_chars=2_000, code_chars=2_000, roots=[root], wikitext=wikitext_dir())
    assert corpus.texts("train", "prose") == [(folder / "valid.txt").read_text()]
    assert corpus.texts("heldout", "prose") == [(folder / "test.txt").read_text()]
    assert corpus.texts("train", "code")  # documentation and code stay
    monkeypatch.setenv(WIKITEXT_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataError, match=f"missing/valid.txt does not exist.*point {WIKITEXT_ENV}"):
        build_corpus(docs_chars=2_000, code_chars=2_000, roots=[root], wikitext=wikitext_dir())


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
