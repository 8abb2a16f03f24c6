"""Writing artifacts so that a crash never leaves one half-written: each file goes to a temporary name in its own
folder, is flushed to disk, and is renamed over the old one (a rename within one file system is atomic)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class ArtifactError(OSError):
    """An artifact that cannot be written (an unwritable or missing folder, a full disk)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
