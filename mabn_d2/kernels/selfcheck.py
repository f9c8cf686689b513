"""Self-check of a fast kernel backend against the plain kernels, once per (device, dtype).

A kernel that miscompiles on an unseen GPU, compiler or dtype would silently train a model
on wrong statistics. So before a fast backend (the Triton kernels) first serves tensors of a
``(device, dtype)``, :class:`SelfCheck` runs its four kernels and the plain PyTorch kernels on
one small input of that device and dtype and compares them. An exception or a relative
difference above the dtype's tolerance (:data:`TOLERANCES`; a broken kernel is off by far
more) fails the check: one warning names the kernels that failed and why, and the plain
kernels serve that ``(device, dtype)`` from then on.

The probe input, ``(2, 3, 33, 40)``, has several planes and channels, and planes (1,320
elements) longer than one reduction tile and not a multiple of the tile or of the
elementwise block. Its values are positive, so the sums do not cancel and a relative
difference means what it says.

The check reads its results on the host: one device synchronization, once per
``(device, dtype)``, at the first MABN step -- warm a model up before capturing or
sync-checking its steady state. It runs with autocast and the CUDA sync-debug mode off.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import plain

__all__ = [ "TOLERANCES", "KERNEL_NAMES", "kernel_outputs",
           "compare_kernels", "SelfCheck"]

logger = logging.getLogger(__name__)

PROBE_SHAPE = (2, 3, 33, 40)
KERNEL_NAMES = ("second_moment", "channel_affine", "grad_reductions", "grad_input")
# Relative L2 difference allowed between a fast kernel and the plain one, per input dtype:
# (outputs stored in that dtype, float32/64 statistics). The plain kernels round the
# per-channel coefficients to a half dtype before the affine, the fast ones do not.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 1e-4),
    torch.bfloat16: (3e-2, 1e-4),
}


def probe_inputs(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``(x, dy, a, b)`` of :data:`PROBE_SHAPE` on ``device``: ``x`` and ``dy`` in ``dtype``,
    the per-channel ``a`` and ``b`` in its statistics dtype; the same values every time."""
    from . import statistics_dtype

    g = torch.Generator().manual_seed(0)
    channels = PROBE_SHAPE[1]
    x = torch.rand(PROBE_SHAPE, generator=g, dtype=torch.float64) * 3 + 0.5
    dy = torch.rand(PROBE_SHAPE, generator=g, dtype=torch.float64) + 0.5
    a = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(channels, generator=g, dtype=torch.float64)
    sdtype = statistics_dtype(dtype)
    return (x.to(device, dtype), dy.to(device, dtype), a.to(device, sdtype),
            b.to(device, sdtype))


def kernel_outputs(module: Any, name: str, x: Tensor, dy: Tensor, a: Tensor,
                   b: Tensor) -> tuple[Tensor, ...]:
    """The outputs of kernel ``name`` of ``module`` (a kernel module such as
    :mod:`mabn_d2.kernels.plain`) on ``x, dy (N, C, H, W)`` and per-channel ``a, b``:
    ``(mean x^2,)``, ``(a x + b,)``, ``(sum dy, sum dy x)`` or ``(a dy + b x,)``."""
    if name == "second_moment":
        return (module.second_moment(x, a.dtype),)
    if name == "channel_affine":
        return (module.channel_affine(x, a, b),)
    if name == "grad_reductions":
        return tuple(module.grad_reductions(dy, x, a.dtype))
    return (module.grad_input(dy, x, a, b),)


def _relative_difference(got: Tensor, want: Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


@contextlib.contextmanager
def _quiet_device(device: torch.device) -> Iterator[None]:
    """No autograd, no autocast, and (CUDA) no sync-debug error for the check's one sync."""
    previous_sync_mode = None
    if device.type == "cuda":
        previous_sync_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            yield
    finally:
        if previous_sync_mode is not None:
            torch.cuda.set_sync_debug_mode(previous_sync_mode)


def compare_kernels(fast: Any, device: torch.device | str, dtype: torch.dtype,
                    reference: Any = plain) -> dict[str, str]:
    """Run each kernel of ``fast`` and of ``reference`` on the probe input of ``device`` and
    ``dtype``; returns ``{kernel name: why it failed}`` (empty: all passed).

    A kernel fails if it raises, returns a wrong shape or dtype, or differs from the reference
    by more than :data:`TOLERANCES` (relative L2 difference; NaN counts as a difference).
    """
    device = torch.device(device)
    output_tol, statistics_tol = TOLERANCES[dtype]
    failures: dict[str, str] = {}
    with _quiet_device(device):
        inputs = probe_inputs(device, dtype)
        for name in KERNEL_NAMES:
            want = kernel_outputs(reference, name, *inputs)
            try:
                got = kernel_outputs(fast, name, *inputs)
            except Exception as e:  # a compile or launch error: the reason goes to the warning
                failures[name] = f"raised {type(e).__name__}: {str(e)[:300]}"
                continue
            tol = output_tol if name in ("channel_affine", "grad_input") else statistics_tol
            for got_t, want_t in zip(got, want):
                if got_t.shape != want_t.shape or got_t.dtype != want_t.dtype \
                        or got_t.device != want_t.device:
                    failures[name] = (
                        f"returned {tuple(got_t.shape)} {got_t.dtype} on {got_t.device}, "
                        f"expected {tuple(want_t.shape)} {want_t.dtype} on {want_t.device}")
                    break
                diff = _relative_difference(got_t, want_t)
                if not diff <= tol:  # NaN fails too
                    failures[name] = (f"differs from the plain kernel by {diff:.3g} "
                                      f"(relative; tolerance {tol:g})")
                    break
    return failures


class SelfCheck:
    """The verdicts of one fast backend's self-checks, one per ``(device, dtype)``.

    ``passes(module, x)`` is True if ``module`` may serve tensors like ``x``; the first call
    for a ``(device, dtype)`` runs :func:`compare_kernels` (and warns if it fails), later calls
    return the stored verdict.
    """

    def __init__(self, backend_name: str,
                 compare: Callable[[Any, torch.device, torch.dtype], dict[str, str]]
                 = compare_kernels) -> None:
        self.backend_name = backend_name
        self._compare = compare
        self._failures: dict[tuple[torch.device, torch.dtype], dict[str, str]] = {}

    def passes(self, module: Any, x: Tensor) -> bool:
        key = (x.device, x.dtype)
        failures = self._failures.get(key)
        if failures is None:
            failures = self._compare(module, x.device, x.dtype)
            self._failures[key] = failures
            if failures:
                self._warn(key, failures)
        return not failures

    def results(self) -> dict[str, dict[str, str]]:
        """``{"<device> <dtype>": {kernel: why it failed}}`` for every ``(device, dtype)``
        checked so far (an empty dict: all four kernels passed)."""
        return {f"{device} {str(dtype).replace('torch.', '')}": dict(failures)
                for (device, dtype), failures in self._failures.items()}

    def _warn(self, key: tuple[torch.device, torch.dtype], failures: dict[str, str]) -> None:
        device, dtype = key
        reasons = "; ".join(f"{name} {why}" for name, why in failures.items())
        message = (
            f"mabn_d2: the {self.backend_name} kernel(s) {', '.join(failures)} failed their "
            f"self-check on {device} {dtype}: {reasons}. The plain PyTorch kernels serve "
            f"{device} {dtype} from now on (correct, but slower)."
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
