"""The native onnxruntime kernels of the ``shadowfx`` ONNX domain: :func:`kernel_library` builds
``shadowfx/kernels/shadowfx_ort.cc`` into a shared library for ``OnnxDecoder(kernels=...)``.

The library is compiled with g++ once per source (with ``shadowfx/kernels/gather_kernels.h``, the gather kernels it
shares with the PyTorch ops), compiler flags, CPU and onnxruntime version, into a cache folder
(``$SHADOWFX_HOME/ort-kernels``, else ``~/.cache/shadowfx/ort-kernels``). It needs onnxruntime's C/C++ API headers,
which no pip package ships: they are fetched once into the same folder from the Debian package ``libonnxruntime-dev``
of Debian 13 (onnxruntime 1.21, C API version 21), with apt-get pointed at the Debian mirror this machine's apt
sources name; ``$SHADOWFX_ORT_INCLUDE`` names a folder holding the headers instead. The C API is ABI-stable, so a
library built against these headers loads in every newer onnxruntime; it links nothing of onnxruntime and takes the
API from onnxruntime when a session registers it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime

from shadowfx.files import atomic_write
from shadowfx.native import SHARED_KERNELS, cpu_model

SOURCE = Path(__file__).with_name("kernels") / "shadowfx_ort.cc"
# vectorised for the CPU it is built on (the shared kernels' simd loops and register tiles), as the PyTorch build is
COMPILE_FLAGS = ("-std=c++17", "-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-Wall", "-Wextra")
INCLUDE_ENV = "SHADOWFX_ORT_INCLUDE"
HEADERS_PACKAGE = "libonnxruntime-dev"
HEADERS_SUITE = "trixie"  # Debian 13: libonnxruntime-dev 1.21.0, C API version 21
HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h", "onnxruntime_float16.h")
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCE_PARTS = Path("/etc/apt/sources.list.d")


class KernelBuildError(RuntimeError):
    """The kernel library could not be built; the message says why and what to do."""


class KernelPrerequisiteMissing(KernelBuildError):
    """What the build needs is not on this machine and cannot be fetched: the compiler or the API headers."""


def cache_folder(cache: str | Path | None = None) -> Path:
    """``cache``, else ``$SHADOWFX_HOME/ort-kernels``, else ``~/.cache/shadowfx/ort-kernels``."""
    if cache is not None:
        return Path(cache)
    home = os.environ.get("SHADOWFX_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "shadowfx") / "ort-kernels"


def kernel_library(cache: str | Path | None = None, *, progress: bool = True) -> Path:
    """The path of the compiled kernel library, building it (and fetching the headers) when the cache has none.

    ``progress`` prints a line to stderr before each slow step. Raises :class:`KernelPrerequisiteMissing` when g++ or
    the headers cannot be had, :class:`KernelBuildError` when the compile fails.
    """
    folder = cache_folder(cache)
    identity = [SOURCE.read_bytes(), SHARED_KERNELS.read_bytes(), " ".join(COMPILE_FLAGS).encode(),
                cpu_model().encode()]
    key = hashlib.sha256(b"\0".join(identity)).hexdigest()[:16]
    library = folder / f"libshadowfx_ort-{onnxruntime.__version__}-{key}.so"
    if library.is_file():
        return library
    compiler = shutil.which("g++")
    if compiler is None:
        raise KernelPrerequisiteMissing("g++ is not on PATH, and the shadowfx kernel library is compiled with it: "
                                        "install it (apt-get install g++), or run without kernels (the function "
                                        "bodies)")
    try:
        include = _headers(folder, progress)
        _say(progress, f"compiling the shadowfx onnxruntime kernels into {library}")
        atomic_write(library, lambda temporary: _compile(compiler, include, temporary))
    except OSError as error:
        raise KernelBuildError(f"cannot write the kernel cache {folder}: {error}; set $SHADOWFX_HOME (or pass "
                               "cache=) to a writable folder") from error
    return library


def _say(progress: bool, line: str) -> None:
    if progress:
        print(f"shadowfx: {line}", file=sys.stderr, flush=True)


def _compile(compiler: str, include: Path, output: Path) -> None:
    command = [compiler, *COMPILE_FLAGS, f"-I{include}", str(SOURCE), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-20:])
        raise KernelBuildError(f"compiling {SOURCE.name} failed ({' '.join(command)}):\n{tail}")


def _has_headers(folder: Path) -> bool:
    return all((folder / name).is_file() for name in HEADERS)


def _headers(cache: Path, progress: bool) -> Path:
    """The folder holding the onnxruntime API headers: ``$SHADOWFX_ORT_INCLUDE``, the cached copy, or a fresh one."""
    given = os.environ.get(INCLUDE_ENV)
    if given:
        if not _has_headers(Path(given)):
            raise KernelPrerequisiteMissing(f"${INCLUDE_ENV} is {given}, which lacks onnxruntime's API headers "
                                            f"({', '.join(HEADERS)}); point it at their folder, or unset it to "
                                            f"fetch them")
        return Path(given)
    include = cache / "include"
    if _has_headers(include):
        return include
    _say(progress, f"fetching onnxruntime's C API headers ({HEADERS_PACKAGE} of Debian {HEADERS_SUITE}) into "
                   f"{include}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".headers-", dir=cache) as scratch:
        fetched = _fetch_headers(Path(scratch))
        try:
            os.rename(fetched, include)
        except OSError:
            if not _has_headers(include):  # not another process that fetched them first: a real failure
                raise
    return include


def _debian_mirror() -> str | None:
    """The first Debian archive (a URI ending in /debian) that this machine's apt sources name."""
    files = [APT_SOURCES, *sorted(APT_SOURCE_PARTS.glob("*.list")), *sorted(APT_SOURCE_PARTS.glob("*.sources"))]
    for path in files:
        text = path.read_text(errors="replace") if path.is_file() else ""
        for uri in re.findall(r"^\s*(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", text, flags=re.MULTILINE):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return None


def _fetch_headers(scratch: Path) -> Path:
    """Download ``libonnxruntime-dev`` with apt-get (its own lists and cache under ``scratch``; the system's apt
    state is left alone) and unpack its headers; returns their folder."""
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    mirror = _debian_mirror()
    advice = (f"set ${INCLUDE_ENV} to a folder holding onnxruntime's C/C++ API headers (onnxruntime 1.21 or "
              "newer), or run without kernels (the function bodies)")
    if missing or mirror is None or not DEBIAN_KEYRING.is_file():
        what = (f"{' and '.join(missing)} not found" if missing else
                "no Debian mirror in the apt sources" if mirror is None else f"{DEBIAN_KEYRING} is missing")
        raise KernelPrerequisiteMissing(f"cannot fetch onnxruntime's C API headers ({HEADERS_PACKAGE} of Debian "
                                        f"{HEADERS_SUITE}): {what}; {advice}")
    apt = scratch / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "parts"):
        (apt / sub).mkdir(parents=True)
    (apt / "sources.list").write_text(f"deb [signed-by={DEBIAN_KEYRING}] {mirror} {HEADERS_SUITE} main\n")
    # as root, apt downloads as the user _apt, who may not enter a private cache folder: it stays root here
    options = [f"-oDir::Etc::SourceList={apt / 'sources.list'}", f"-oDir::Etc::SourceParts={apt / 'parts'}",
               f"-oDir::State::Lists={apt / 'lists'}", f"-oDir::Cache={apt / 'cache'}", "-qq",
               *(["-oAPT::Sandbox::User=root"] if os.geteuid() == 0 else [])]
    said = ""  # apt-get update reports an unreachable mirror as a warning; the download then fails
    for step in (["update"], ["download", HEADERS_PACKAGE]):
        result = subprocess.run(["apt-get", *options, *step], cwd=scratch, capture_output=True, text=True)
        said += result.stderr
        if result.returncode != 0:
            detail = " ".join(said.split())[-600:]
            raise KernelPrerequisiteMissing(f"cannot fetch onnxruntime's C API headers: apt-get {step[0]} failed "
                                            f"against {mirror} {HEADERS_SUITE} ({detail}); check the network, or "
                                            f"{advice}")
    (package,) = scratch.glob(f"{HEADERS_PACKAGE}_*.deb")
    unpacked = scratch / "unpacked"
    result = subprocess.run(["dpkg-deb", "-x", str(package), str(unpacked)], capture_output=True, text=True)
    headers = unpacked / "usr" / "include" / "onnxruntime"
    if result.returncode != 0 or not _has_headers(headers):
        raise KernelBuildError(f"{package.name} did not unpack to onnxruntime's API headers in "
                               f"usr/include/onnxruntime ({' '.join(result.stderr.split()) or 'none there'}); "
                               f"{advice}")
    return headers
