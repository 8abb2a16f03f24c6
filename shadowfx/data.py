"""Text for calibration, training the reference models and evaluation, read at run time from local files.

Three domains: prose (WikiText-2 from ``shared/data``), API documentation (the docstrings of the installed Python
packages and the standard library) and code (their source files). Documentation and code are split into train and
held-out by a hash of the file path, so the split is the same on every machine with the same packages. Nothing here
is copied into the repository.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


class DataError(ValueError):
    """Text that cannot be used: a missing or unreadable file, or too little of it."""


def shared_dir() -> Path:
    """``shared/`` beside the checkout (``SHADOWFX_SHARED`` overrides)."""
    return Path(os.environ.get("SHADOWFX_SHARED", REPO_ROOT.parent / "shared"))


def wikitext_path(split: str) -> Path:
    return shared_dir() / "data" / "wikitext-2" / f"{split}.txt"


def read_text(path: str | Path) -> str:
    """A text file's contents, or a clear error: missing, unreadable, not UTF-8, or empty."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file; pass a plain text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error})") from error
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}") from error
    if not text.strip():
        raise DataError(f"{path} is empty; calibration and training need text")
    return text


def _held_out(path: Path, fraction: float) -> bool:
    digest = hashlib.sha256(str(path).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                texts.append(doc)
    return texts


def python_roots() -> list[Path]:
    """The standard library and the installed packages of this interpreter."""
    paths = sysconfig.get_paths()
    return sorted({Path(paths["stdlib"]), Path(paths["purelib"])})


@dataclass
class Corpus:
    """Documents per domain and split: ``documents[split][domain]`` is a list of texts."""

    documents: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def texts(self, split: str, domain: str | None = None) -> list[str]:
        by_domain = self.documents.get(split, {})
        return [t for d, texts in sorted(by_domain.items()) if domain in (None, d) for t in texts]

    def sizes(self) -> dict[str, dict[str, int]]:
        return {split: {domain: sum(len(t) for t in texts) for domain, texts in domains.items()}
                for split, domains in self.documents.items()}


def build_corpus(*, docs_chars: int = 8_000_000, code_chars: int = 8_000_000, held_out: float = 0.05,
                 roots: list[Path] | None = None) -> Corpus:
    """WikiText-2 valid (prose) and test (held out), plus documentation and code from the installed Python files.

    Files are visited in sorted order and taken until each domain reaches its size, so the corpus is deterministic.
    """
    corpus = Corpus({"train": {"prose": [read_text(wikitext_path("valid"))], "docs": [], "code": []},
                     "heldout": {"prose": [read_text(wikitext_path("test"))], "docs": [], "code": []}})
    # held-out files are the hash-chosen `held_out` share; their budget keeps that share of each domain
    limits = {(split, domain): (limit if split == "train" else int(limit * held_out / (1 - held_out)))
              for split in ("train", "heldout") for domain, limit in (("docs", docs_chars), ("code", code_chars))}
    taken = dict.fromkeys(limits, 0)
    for root in roots or python_roots():
        for path in sorted(root.rglob("*.py")):
            if all(taken[key] >= limits[key] for key in limits):
                return corpus
            if "test" in path.parts or "tests" in path.parts:
                continue
            split = "heldout" if _held_out(path.relative_to(root), held_out) else "train"
            if taken[(split, "docs")] >= limits[(split, "docs")] and taken[(split, "code")] >= limits[(split, "code")]:
                continue
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if taken[(split, "code")] < limits[(split, "code")] and len(source) > 200:
                corpus.documents[split]["code"].append(source)
                taken[(split, "code")] += len(source)
            docs = _docstrings(source) if taken[(split, "docs")] < limits[(split, "docs")] else []
            if docs:
                corpus.documents[split]["docs"].append("\n\n".join(docs))
                taken[(split, "docs")] += sum(map(len, docs))
    return corpus


def token_windows(token_ids: torch.Tensor, length: int, *, stride: int | None = None,
                  limit: int | None = None) -> torch.Tensor:
    """Consecutive windows ``[N, length]`` of a 1-D token stream (``stride`` defaults to ``length``: disjoint)."""
    stride = stride or length
    if token_ids.numel() < length:
        raise DataError(f"the text has {token_ids.numel()} tokens, fewer than one window of {length}")
    windows = token_ids.unfold(0, length, stride)
    return windows[:limit] if limit is not None else windows
