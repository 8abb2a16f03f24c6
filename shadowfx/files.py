"""Writing artifacts so that a crash never leaves one half-written: each file (or folder) goes to a temporary name
in its own folder, is flushed to disk, and is renamed over the old one (a rename within one file system is
atomic)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


class ArtifactError(OSError):
    """An artifact that cannot be written (an unwritable or missing folder, a full disk)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def writable_directory(path: str | Path) -> Path:
    """Create the folder ``path`` if needed and refuse one this process cannot write into, before work is spent on
    what goes there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ArtifactError(f"cannot create the folder {path}: {error.strerror or error}; choose a writable "
                            "folder") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write into {path}: permission denied; choose a writable folder")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)`` to produce the file, then move it onto ``path`` in one step.

    The temporary file sits beside ``path`` (same file system) and keeps its suffix, so writers that choose a format
    by extension (``savefig``) work. On any failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise ArtifactError(f"cannot write {path}: {error.strerror or error}; choose a writable folder") from error
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, ArtifactError):
            raise ArtifactError(f"cannot write {path}: {error.strerror or error}") from error
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_write_directory(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_folder)`` to fill a fresh folder beside ``path``, then rename it to ``path``.

    For artifacts that are folders (``save_pretrained``): a reader sees the old folder or the complete new one, never
    a half-written one. An existing ``path`` is first moved aside and is removed once the new folder is in place (two
    renames: a crash between them leaves the old folder as ``.<name>.old-*`` beside a missing ``path``). On any
    failure the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as error:
        raise ArtifactError(f"cannot write {path}: {error.strerror or error}; choose a writable folder") from error
    old = None
    try:
        write(temporary)
        for written in temporary.rglob("*"):
            if written.is_file():
                with open(written, "rb+") as handle:
                    os.fsync(handle.fileno())
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp makes the folder private; give it the usual mode
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old)  # onto the empty placeholder that mkdtemp reserved
        os.replace(temporary, path)
    except BaseException as error:
        if old is not None and not path.exists():
            os.replace(old, path)
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError) and not isinstance(error, ArtifactError):
            raise ArtifactError(f"cannot write {path}: {error.strerror or error}") from error
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
