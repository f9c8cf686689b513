"""Memory-bound per-channel kernels used by :mod:`mabn_d2.layer.functional`, and their dispatch.

Each kernel is one pass over activation memory in layout ``(N, C, H, W)``:

* :func:`second_moment` -- ``mean(x^2)`` over N, H, W (one read);
* :func:`channel_affine` -- ``a[c] * x + b[c]`` (one read, one write);
* :func:`grad_reductions` -- ``sum(dy)`` and ``sum(dy * x)`` over N, H, W (one read of each);
* :func:`grad_input` -- ``a[c] * dy + b[c] * x`` (two reads, one write).

On the CPU the C++ backend also has a fused training step (:func:`fused_step_applies`): each
thread takes whole channels and makes a channel's output while its input is still in cache,
so forward reads ``x`` once and writes ``y`` once, and backward reads ``dy`` and ``x`` once and
writes ``dx`` once; the schedule's per-channel arithmetic runs in the same op. It is used for
per-process statistics (not with ``sync``); :func:`use_fused_step` turns it off, e.g. to compare.

Backends, chosen per call from the tensors (``"auto"``, the default):

* ``"cpp"`` -- C++ kernels (:mod:`mabn_d2.kernels.cpp`) for contiguous CPU tensors;
* ``"triton"`` -- Triton kernels (:mod:`mabn_d2.kernels.triton`) for contiguous CUDA tensors
  (and, chosen explicitly, CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``);
* ``"plain"`` -- PyTorch ops (:mod:`mabn_d2.kernels.plain`): everything else, and the
  fallback when the C++ kernels cannot be built or Triton is not installed (with a warning).

Before the Triton kernels first serve a ``(device, dtype)`` they are compared with the plain
kernels on a small input (:mod:`mabn_d2.kernels.selfcheck`); a kernel that raises or differs
is never used: one warning names it, and the plain kernels serve that ``(device, dtype)``
from then on, whichever backend was asked for. :func:`self_check_results` lists the verdicts.

All backends keep float32 arithmetic and statistics for half inputs (float64 for float64):
:func:`statistics_dtype` is that rule, for every part of mabn_d2.
``MABN_D2_KERNELS=plain`` (or :func:`set_backend` / :func:`use_backend`) forces the plain
kernels, e.g. to compare; forcing ``"cpp"`` or ``"triton"`` raises where it cannot apply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import cpp, plain
from .selfcheck import SelfCheck

__all__ = [
    "BACKENDS",
    "statistics_dtype",
    "second_moment",
    "channel_affine",
    "grad_reductions",
    "grad_input",
    "backend_for",
    "get_backend",
    "set_backend",
    "use_backend",
    "fused_step_applies",
    "use_fused_step",
    "self_check_results",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cpp", "triton", "plain")
_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ENV = "MABN_D2_KERNELS"
_backend: str | None = None  # None: MABN_D2_KERNELS's choice, read at first use
_fused_step = True
_triton_module: ModuleType | None | bool = None  # None: not tried; False: unavailable
_triton_check = SelfCheck("Triton")


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of MABN statistics and per-channel arithmetic for activations (or buffers) of
    ``dtype``: float64 for float64, float32 for everything else (the squares of half inputs
    exceed the half range)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def set_backend(name: str) -> None:
    """Choose the kernels: one of :data:`BACKENDS` (process-wide)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"mabn_d2 kernels: unknown backend {name!r}; valid: {BACKENDS}")
    _backend = name


def get_backend() -> str:
    """The chosen kernels: :func:`set_backend`'s, else the environment variable
    ``MABN_D2_KERNELS`` (read at first use, so that a bad value fails a forward, naming the
    variable, instead of ``import mabn_d2``), else ``"auto"``."""
    global _backend
    if _backend is None:
        name = os.environ.get(_ENV) or "auto"
        if name not in BACKENDS:
            raise ValueError(f"the environment variable {_ENV}={name!r} is not a kernel backend; "
                             f"valid: {BACKENDS} (or unset it)")
        _backend = name
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily choose the kernels (see :func:`set_backend`)."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@contextlib.contextmanager
def use_fused_step(enabled: bool) -> Iterator[None]:
    """Temporarily allow (default) or forbid the C++ fused training step."""
    global _fused_step
    previous = _fused_step
    _fused_step = bool(enabled)
    try:
        yield
    finally:
        _fused_step = previous


def fused_step_applies(x: Tensor, *state: Tensor) -> bool:
    """Whether the C++ fused training step handles ``x`` with these per-channel ``state``
    tensors (weight, bias, running statistic, buffers): C++ kernels chosen for ``x``, and every
    state tensor a contiguous CPU tensor of ``x``'s statistics dtype (float64 for float64
    inputs, float32 otherwise -- as under autocast)."""
    if not _fused_step or get_backend() not in ("auto", "cpp"):
        return False
    sdtype = statistics_dtype(x.dtype)
    if not all(t.device.type == "cpu" and t.dtype == sdtype and t.is_contiguous()
               for t in state):
        return False
    return _select(x)[0] == "cpp"


def _triton() -> ModuleType | None:
    global _triton_module
    if _triton_module is None:
        try:
            from . import triton as triton_backend  # triton is an optional dependency

            _triton_module = triton_backend
        except Exception as e:  # ImportError, or a triton too old for the kernels
            message = (
                "mabn_d2: Triton kernels unavailable, using the plain PyTorch kernels on CUDA "
                f"(correct, but slower). Reason: {type(e).__name__}: {e}"
            )
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            _triton_module = False
    return _triton_module or None


def self_check_results() -> dict[str, dict[str, str]]:
    """The Triton kernels' self-check verdicts so far: ``{"<device> <dtype>": {kernel: why it
    failed}}``, an empty inner dict where all four passed (see :mod:`.selfcheck`)."""
    return _triton_check.results()


def _triton_serves(backend: str, device: str) -> bool:
    """Whether the Triton backend may take tensors of this device type: CUDA, or the CPU when
    Triton was chosen explicitly and runs in its interpreter (tests, no GPU)."""
    if device == "cuda":
        return backend in ("auto", "triton")
    return (backend == "triton" and device == "cpu"
            and os.environ.get("TRITON_INTERPRET") == "1")


def _fast_layout(*tensors: Tensor) -> bool:
    first = tensors[0]
    return all(
        t.dim() == 4 and t.is_contiguous() and t.dtype == first.dtype
        and t.dtype in _FAST_DTYPES and t.device == first.device
        for t in tensors
    )


def backend_for(*tensors: Tensor) -> str:
    """The backend that handles these activation tensors (``"cpp"``, ``"triton"`` or
    ``"plain"``); may build the C++ kernels on first use."""
    return _select(*tensors)[0]


class _CppOps:
    """The C++ ops (``torch.ops.mabn_d2``) under the kernel interface."""

    @staticmethod
    def second_moment(x: Tensor, out_dtype: torch.dtype) -> Tensor:
        return torch.ops.mabn_d2.second_moment(x, out_dtype)

    @staticmethod
    def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        return torch.ops.mabn_d2.channel_affine(x, scale, shift)

    @staticmethod
    def grad_reductions(dy: Tensor, x: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return torch.ops.mabn_d2.grad_reductions(dy, x, out_dtype)

    @staticmethod
    def grad_input(dy: Tensor, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.ops.mabn_d2.grad_input(dy, x, a, b)


def _select(*tensors: Tensor) -> tuple[str, Any]:
    """``(name, implementation)`` of the backend for these activation tensors."""
    backend = get_backend()
    if backend == "plain":
        return "plain", plain
    device = tensors[0].device.type
    fast = _fast_layout(*tensors)
    if backend in ("auto", "cpp") and device == "cpu" and fast and cpp.load():
        return "cpp", _CppOps
    if fast and _triton_serves(backend, device):
        module = _triton()
        if module is not None:
            if _triton_check.passes(module, tensors[0]):
                return "triton", module
            return "plain", plain  # failed its self-check (warned once)
    if backend != "auto":
        raise RuntimeError(
            f"mabn_d2 kernels: backend {backend!r} cannot handle {device} tensors of dtype "
            f"{tensors[0].dtype}, shape {tuple(tensors[0].shape)}, contiguous="
            f"{tensors[0].is_contiguous()}"
            + (f" (C++ build failed: {cpp.load_error()})" if backend == "cpp" else "")
        )
    return "plain", plain


def second_moment(x: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``mean(x^2)`` per channel of ``x (N, C, H, W)``, accumulated in ``out_dtype`` or wider.

    Returns a ``(C,)`` tensor of ``out_dtype``.
    """
    return _select(x)[1].second_moment(x, out_dtype)


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale[c] * x + shift[c]`` for ``x (N, C, H, W)`` and ``(C,)`` coefficients, in ``x``'s
    dtype."""
    return _select(x)[1].channel_affine(x, scale, shift)


def grad_reductions(dy: Tensor, x: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(sum(dy), sum(dy * x))`` over N, H, W, two ``(C,)`` tensors of ``out_dtype``."""
    return _select(dy, x)[1].grad_reductions(dy, x, out_dtype)


def grad_input(dy: Tensor, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a[c] * dy + b[c] * x`` in ``x``'s dtype, same shape as ``x``."""
    return _select(dy, x)[1].grad_input(dy, x, a, b)

