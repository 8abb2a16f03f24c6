"""Text for calibration, training the reference models and evaluation, read at run time from local files.

Two domains are always there, read from this interpreter's own files: API documentation (the docstrings of the
installed Python packages and the standard library) and code (their source files). They are split into train and
held-out by a hash of the file path, so the split is the same on every machine with the same packages. A third,
prose, is WikiText-2 where the user points at it (``SHADOWFX_WIKITEXT`` or a script's ``--wikitext``: a folder
holding ``valid.txt`` and ``test.txt``); nothing is looked for beside the checkout. Nothing here is copied into the
repository.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

WIKITEXT_ENV = "SHADOWFX_WIKITEXT"
# the WikiText-2 file that gives each corpus split its prose
WIKITEXT_FILES = {"train": "valid.txt", "heldout": "test.txt"}


class DataError(ValueError):
    """Text that cannot be used: a missing or unreadable file, or too little of it."""


def wikitext_dir() -> Path | None:
    """The WikiText-2 folder that ``$SHADOWFX_WIKITEXT`` names, or None (unset or empty: no prose)."""
    folder = os.environ.get(WIKITEXT_ENV)
    return Path(folder) if folder else None


def wikitext_file(folder: str | Path, name: str) -> Path:
    """``folder/name``, or a clear error that says how to point at WikiText-2."""
    path = Path(folder) / name
    if not path.is_file():
        raise DataError(f"{path} does not exist: WikiText-2 is read from a folder holding "
                        f"{' and '.join(WIKITEXT_FILES.values())}; point {WIKITEXT_ENV} "
                        f"(or the script's --wikitext) at that folder, or leave both unset to go without prose")
    return path


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
                 roots: list[Path] | None = None, wikitext: str | Path | None = None) -> Corpus:
    """Documentation and code from the installed Python files, plus prose where ``wikitext`` names a WikiText-2
    folder (its valid split trains, its test split is held out).

    Files are visited in sorted order and taken until each domain reaches its size, so the corpus is deterministic.
    """
    corpus = Corpus({split: {"docs": [], "code": []} for split in ("train", "heldout")})
    if wikitext is not None:
        for split, name in WIKITEXT_FILES.items():
            corpus.documents[split]["prose"] = [read_text(wikitext_file(wikitext, name))]
    # held-out files are the hash-chosen `held_out` share; their budget keeps that share of each domain
    limits = {(split, domain): (limit if split == "train" else int(limit * held_out / (1 - held_out)))
              for split in ("train", "heldout") for domain, limit in (("docs", docs_chars), ("code", code_chars))}
    taken = dict.fromkeys(limits, 0)
    for root in roots or python_roots():
        for path in sorted(root.rglob("*.py")):
            if all(taken[key] >= limits[key] for key in limits):
                return corpus
            relative = path.relative_to(root)  # only below the root: a checkout may itself sit in a "test" folder
            if "test" in relative.parts or "tests" in relative.parts:
                continue
            split = "heldout" if _held_out(relative, held_out) else "train"
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
