"""The native decode kernels of the ``shadowfx::`` ops: ``shadowfx/kernels/shadowfx_torch.cc``, built with torch's
extension machinery on first use.

A decode step (one token per batch row) of ``gathered_mlp``, ``gathered_attention`` with a selection and
``token_sparse_attention`` reads the kept rows and kept input features of each weight straight from the full weight
(:func:`gather_rows`, :func:`gather_cols`), where the PyTorch path copies them out first or, per token, computes
every neuron and masks. A float32 prefill's per-token selections take the same two kernels over all its tokens
(:func:`tiles`), which then compute only each token's kept units by register tiles of weight rows by tokens;
:func:`copy_rows` makes the gathered copies of kept weights, and
:func:`inspect_selection` checks a selection's values for every op call in one pass; :func:`topk_indices` ranks
scores into a selection. The kernels are threaded over torch's intra-op threads and vectorised for the CPU they are
built on, in float32 and bfloat16 (other dtypes take the PyTorch path). The extension is built with OpenMP: torch's
OpenMP build inlines ``at::parallel_for``'s parallel region from its header into the caller, which without
``-fopenmp`` runs the whole range on one thread (as these kernels did until it was found). It shares torch's OpenMP
runtime, so ``torch.set_num_threads`` sets their threads too.

The gather kernels themselves are in ``shadowfx/kernels/gather_kernels.h``, which the onnxruntime library
(:mod:`shadowfx.ort_kernels`) compiles too. The build goes to ``$SHADOWFX_HOME/torch-kernels`` (else
``~/.cache/shadowfx/torch-kernels``), one folder per source, flags, torch version and CPU, and is reused from
there. When it cannot be built (no C++ compiler, no ninja, a failed compile) the ops warn once and run their
PyTorch implementation, which computes the same values. The switch
``$SHADOWFX_NATIVE_KERNELS=0``, or :func:`use_native_kernels`, selects the PyTorch path on purpose.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels") / "shadowfx_torch.cc"
SHARED_KERNELS = SOURCE.with_name("gather_kernels.h")  # the gather kernels, shared with the onnxruntime library
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp")
SWITCH_ENV = "SHADOWFX_NATIVE_KERNELS"
DTYPES = (torch.float32, torch.bfloat16)
RANKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_enabled = os.environ.get(SWITCH_ENV, "1") != "0"
_module: Optional[ModuleType] = None
_unavailable: Optional[str] = None  # why the build failed, once it has
_pool_limit = 0  # bytes of freed copy buffers the kernels keep (see keep_gathered_buffers)


def build_folder() -> Path:
    """The folder of this source's build for this torch and CPU (see the module docstring)."""
    home = os.environ.get("SHADOWFX_HOME")
    root = (Path(home) if home else Path.home() / ".cache" / "shadowfx") / "torch-kernels"
    # -march=native code runs only on the CPU it was built for, so the CPU is part of the key
    identity = b"\0".join(
        [SOURCE.read_bytes(), SHARED_KERNELS.read_bytes(), " ".join(COMPILE_FLAGS).encode(),
         torch.__version__.encode(), cpu_model().encode()])
    return root / hashlib.sha256(identity).hexdigest()[:16]


def cpu_model() -> str:
    """What a build for this CPU depends on (its model and feature flags): a build with -march=native is kept per
    CPU."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    return platform.processor() or platform.machine()


def kernels() -> Optional[ModuleType]:
    """The compiled kernel module, building it on the first call; None when switched off or when it cannot be built
    (then a warning says why, once)."""
    global _module, _unavailable
    if not _enabled:
        return None
    if _module is not None or _unavailable is not None:
        return _module
    missing = missing_tools()
    if missing:
        _unavailable = f"{' and '.join(missing)} not found"
    else:
        from torch.utils import cpp_extension

        folder = build_folder()
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("*.so")):
            print(f"shadowfx: compiling the native decode kernels into {folder} (once)", file=sys.stderr, flush=True)
        try:
            _module = cpp_extension.load(
                name="shadowfx_native", sources=[str(SOURCE)], extra_cflags=list(COMPILE_FLAGS),
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder), verbose=False)
        except (OSError, RuntimeError, ImportError) as error:  # a failed compile or link is a RuntimeError
            _unavailable = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    if _unavailable is not None:
        warnings.warn(f"shadowfx: the native decode kernels could not be built ({_unavailable}); the sparse ops run "
                      f"their PyTorch implementation, which computes the same values more slowly. Install a C++ "
                      f"compiler and ninja (pip install ninja), or set {SWITCH_ENV}=0 to silence this.", stacklevel=2)
    return _module


def missing_tools() -> list[str]:
    """What the build needs and this machine lacks: ``c++`` (the compiler) and ``ninja``."""
    return [tool for tool in ("c++", "ninja") if shutil.which(tool) is None and not _ninja_module(tool)]


def _ninja_module(tool: str) -> bool:
    """ninja from the pip package counts even when its script folder is not on PATH (torch looks it up there)."""
    if tool != "ninja":
        return False
    with contextlib.suppress(ImportError):
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        return True
    return False


@contextlib.contextmanager
def use_native_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, the ops use the native kernels (``True``, where they can be built) or the PyTorch path."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def applies(x: Tensor, *weights: Tensor) -> bool:
    """Whether a decode step on ``x`` [B, 1, E] with these full weights runs natively: one token per row, CPU
    tensors of one of :data:`DTYPES`, the switch on and the kernels built."""
    return x.dim() == 3 and x.shape[1] == 1 and x.dtype in DTYPES and _runs_natively(x, weights)


def tiles(x: Tensor, *weights: Tensor) -> bool:
    """Whether per-token selections over the tokens of ``x`` [B, S, E] (more than one) with these full weights run
    natively: :func:`gather_rows` and :func:`gather_cols` of several tokens take float32 weights by register tiles
    (in bfloat16 they take one token at a time, slower than the PyTorch path's dense products); CPU tensors, the
    switch on and the kernels built."""
    return x.dim() == 3 and x.shape[0] * x.shape[1] > 1 and x.dtype == torch.float32 and _runs_natively(x, weights)


def _runs_natively(x: Tensor, weights: tuple[Tensor, ...]) -> bool:
    """``x`` and the 2-D ``weights`` of its dtype on the CPU, and the kernels built."""
    if x.device.type != "cpu" or any(w.device.type != "cpu" or w.dtype != x.dtype or w.dim() != 2 for w in weights):
        return False
    return kernels() is not None


def inspect_selection(selection: Tensor, size: int) -> Optional[tuple[int, int, bool, bool, int, int]]:
    """One pass over a selection [..., k] of ``size`` units on the CPU: (lowest index, highest index, whether a row
    repeats a unit, whether every row keeps every unit, the first unit of a one-row selection's ascending run or
    -1, how many runs of consecutive units the rows hold, 0 if a row repeats a unit). None where the kernels do not
    run (another device, switched off, not built)."""
    if selection.device.type != "cpu":
        return None
    module = kernels()
    return None if module is None else module.inspect_selection(selection, size)


def topk_indices(scores: Tensor, k: int) -> Optional[Tensor]:
    """int64 ``[..., k]``: the indices of the k largest ``scores`` along the last dim, ascending, ties to the lower
    index and NaN above every number (``shadowfx::topk_indices``), by one selection per row; None where the kernels
    do not run (another device or dtype, switched off, not built, or traced)."""
    module = _ranking_kernels(scores)
    if module is None:
        return None
    rows = scores.float().reshape(-1, scores.shape[-1])
    return module.topk_indices(rows, k).view(*scores.shape[:-1], k)


def _ranking_kernels(scores: Tensor) -> Optional[ModuleType]:
    """The kernel module where it ranks ``scores``: eager CPU tensors of :data:`RANKED_DTYPES` (the kernels rank
    float32; half types convert to it exactly, float64 would not), the switch on and the kernels built."""
    if scores.device.type != "cpu" or scores.dtype not in RANKED_DTYPES or torch.compiler.is_compiling():
        return None
    return kernels()


def plan(selection: Tensor, units: int) -> Any:
    """The kernels' reading of a selection [T, k] of ``units`` (a contiguous int64 CPU tensor) by unit, made once for
    the several :func:`gather_rows` / :func:`gather_cols` calls of one layer that take it (their ``plan``): without
    one, each call of several tokens sorts the selection itself."""
    module = kernels()
    assert module is not None, "plan needs the native kernels: check tiles() first"
    return module.SelectionPlan(selection, units)


def global_topk_indices(scores: Tensor, budget: int, minimum: int) -> Optional[list[Tensor]]:
    """``shadowfx::global_topk_indices`` of scores [R, L, N] (per layer int64 [R, w_l], each row's kept units
    ascending, padded with the empty slot N) by two selections a row; None where the kernels do not run (as for
    :func:`topk_indices`)."""
    module = _ranking_kernels(scores)
    return None if module is None else module.global_topk_indices(scores.float(), budget, minimum)


def gather_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor, plan: Any = None) -> Tensor:
    """``x [T, E] . weight[rows[t]]^T + bias[rows[t]]`` for rows [T, k]: [T, k] in x's dtype, 0 at the empty slot.
    ``plan``: :func:`plan` of ``rows`` and weight's N, or None."""
    module = kernels()
    assert module is not None, "gather_rows needs the native kernels: check applies() first"
    return module.gather_rows(x, weight.contiguous(), bias, rows, plan).to(x.dtype)


def gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x [1, E] . weight^T + bias`` for weight [N, E]: :func:`gather_rows` of every row. On 2 threads of the
    development machine it reads a gathered copy (huge pages) at about 30 GB/s and other weights at about 23, where
    F.linear reads either at 19 (a decode step of a batch of one)."""
    return gather_rows(x, weight, bias, torch.arange(weight.shape[0], device=x.device).unsqueeze(0))


def gemv_input_major(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``h [1, N] . weight^T + bias`` for an input-major weight [E, N]: :func:`gather_cols` of every input."""
    return gather_cols(h, weight, bias, torch.arange(weight.shape[1], device=h.device).unsqueeze(0))


def gather_cols(h: Tensor, weight: Tensor, bias: Optional[Tensor], cols: Tensor, plan: Any = None) -> Tensor:
    """``h [T, k] . weight[:, cols[t]]^T + bias`` for weight [E, N] and cols [T, k]: [T, E] in h's dtype; empty
    slots add nothing. Fastest when ``weight`` is the transpose of a contiguous [N, E] (:func:`input_major`).
    ``plan``: :func:`plan` of ``cols`` and N, or None."""
    module = kernels()
    assert module is not None, "gather_cols needs the native kernels: check applies() first"
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        weight = weight.contiguous()
    return module.gather_cols(h, weight, bias, cols, plan).to(h.dtype)


def copies(source: Tensor, rows: Tensor) -> bool:
    """Whether :func:`copy_rows` takes ``source[rows]``: eager (not traced) CPU tensors, a contiguous 2-D source
    outside autograd, and the kernels built."""
    traced = torch.compiler.is_compiling() or type(source) not in (Tensor, torch.nn.Parameter)
    if traced or source.device.type != "cpu" or rows.device.type != "cpu" or source.dim() != 2:
        return False
    if not source.is_contiguous() or (source.requires_grad and torch.is_grad_enabled()):
        return False
    return kernels() is not None


def copy_rows(source: Tensor, rows: Tensor) -> Tensor:
    """``source[rows]`` for rows [n] in [0, N], N the empty slot, which gives a row of zeros: a new [n, W], copied into
    memory backed by huge pages where the system allows (a fresh gathered copy of weights
    otherwise costs more in page faults than in copying)."""
    module = kernels()
    assert module is not None, "copy_rows needs the native kernels: check copies() first"
    return module.copy_rows(source, rows)


def keep_gathered_buffers(limit: int) -> None:
    """Keep freed copy buffers of :func:`copy_rows` for reuse, up to at least ``limit`` bytes of them (the limit only
    grows; see :func:`release_gathered_buffers`). A transformed model asks for its ``max_gathered_bytes``: the next
    prompt's gathered weights then go into memory already faulted in, instead of fresh pages the system must zero."""
    global _pool_limit
    module = kernels()
    if module is not None and limit > _pool_limit:
        _pool_limit = limit
        module.set_pool_limit(limit)


def kept_buffer_bytes() -> int:
    """Bytes of freed copy buffers kept for reuse now (0 without the kernels)."""
    module = kernels()
    return 0 if module is None else module.pool_bytes()


def release_gathered_buffers() -> None:
    """Free the kept copy buffers now, and keep none from here on."""
    global _pool_limit
    module = kernels()
    if module is not None:
        _pool_limit = 0
        module.set_pool_limit(0)


def input_major(weight: Tensor) -> Tensor:
    """``weight`` [out, in] with the same values, stored input-major (the transpose of a contiguous [in, out]): the
    layout in which one input feature's weights, a kept column, are one contiguous run."""
    return weight if weight.t().is_contiguous() else weight.t().contiguous().t()
