"""Triton kernels of :mod:`mabn_d2.kernels` for CUDA tensors.

Same four passes and contracts as :mod:`mabn_d2.kernels.plain`, for contiguous ``(N, C, H, W)``
tensors of float16 / bfloat16 / float32 / float64:

* reductions run on a ``(C, splits)`` grid: each program walks its share of channel ``c``'s
  ``N`` planes in tiles, squaring/multiplying in float32 (float64 for float64 inputs, so half
  inputs whose squares exceed the half range are safe), writes one partial sum, and the
  ``splits`` partials are added in a fixed order (deterministic);
* elementwise passes run on a flat grid; the channel of each element is ``(i // HW) % C``.

Tested on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, see
``tests/kernels/test_kernels.py``); its speed on a GPU has not been measured in this repository yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import statistics_dtype

__all__ = ["second_moment", "channel_affine", "grad_reductions", "grad_input"]

_REDUCE_BLOCK = 1024
_ELEMENTWISE_BLOCK = 2048
# Reduction programs wanted in flight: a few per SM on current GPUs.
_TARGET_PROGRAMS = 1024


@triton.jit
def _channel_sums_kernel(
    x_ptr, dy_ptr, out_ptr, C, HW, tiles_per_plane, total_tiles, splits,
    WITH_DY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # Program (c, s) adds x^2 (or dy and dy * x) over tiles s, s + splits, ... of channel c.
    c = tl.program_id(0)
    s = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    acc0 = tl.zeros([BLOCK], dtype=ACC)
    acc1 = tl.zeros([BLOCK], dtype=ACC)
    for t in range(s, total_tiles, splits):
        n = t // tiles_per_plane
        j = (t % tiles_per_plane) * BLOCK + lanes
        offs = (n.to(tl.int64) * C + c) * HW + j
        mask = j < HW
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if WITH_DY:
            g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            acc0 += g
            acc1 += g * x
        else:
            acc0 += x * x
    base = (c * splits + s) * 2
    tl.store(out_ptr + base, tl.sum(acc0, axis=0))
    tl.store(out_ptr + base + 1, tl.sum(acc1, axis=0))


@triton.jit
def _channel_axpby_kernel(
    x_ptr, dy_ptr, a_ptr, b_ptr, out_ptr, numel, C, HW,
    WITH_DY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # out = a[c] * x + b[c] (affine), or a[c] * dy + b[c] * x (WITH_DY).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = (offs // HW) % C
    a = tl.load(a_ptr + c, mask=mask, other=0.0).to(ACC)
    b = tl.load(b_ptr + c, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if WITH_DY:
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        out = a * g + b * x
    else:
        out = a * x + b
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if statistics_dtype(dtype) == torch.float64 else tl.float32


def _channel_sums(x: Tensor, dy: Tensor | None) -> Tensor:
    """``(C, 2)`` float64: column 0 is ``sum x^2`` (or ``sum dy``), column 1 ``sum dy * x``."""
    n, c, h, w = x.shape
    hw = h * w
    tiles_per_plane = triton.cdiv(hw, _REDUCE_BLOCK)
    total_tiles = n * tiles_per_plane
    splits = max(1, min(total_tiles, triton.cdiv(_TARGET_PROGRAMS, c)))
    acc_dtype = statistics_dtype(x.dtype)
    partial = torch.empty(c, splits, 2, dtype=acc_dtype, device=x.device)
    _channel_sums_kernel[(c, splits)](
        x, x if dy is None else dy, partial, c, hw, tiles_per_plane, total_tiles, splits,
        WITH_DY=dy is not None, ACC=_acc(x.dtype), BLOCK=_REDUCE_BLOCK,
    )
    return partial.double().sum(dim=1)


def _channel_axpby(x: Tensor, dy: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    acc_dtype = statistics_dtype(x.dtype)
    a = a.to(device=x.device, dtype=acc_dtype).contiguous()
    b = b.to(device=x.device, dtype=acc_dtype).contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    _channel_axpby_kernel[(triton.cdiv(numel, _ELEMENTWISE_BLOCK),)](
        x, x if dy is None else dy, a, b, out, numel, x.shape[1], x.shape[2] * x.shape[3],
        WITH_DY=dy is not None, ACC=_acc(x.dtype), BLOCK=_ELEMENTWISE_BLOCK,
    )
    return out


def second_moment(x: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``mean(x^2)`` per channel of ``x (N, C, H, W)``, in ``out_dtype``."""
    count = x.numel() // x.shape[1]
    return (_channel_sums(x, None)[:, 0] / count).to(out_dtype)


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale[c] * x + shift[c]``, computed in float32 (float64), stored in ``x``'s dtype."""
    return _channel_axpby(x, None, scale, shift)


def grad_reductions(dy: Tensor, x: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(sum(dy), sum(dy * x))`` per channel, in ``out_dtype``."""
    sums = _channel_sums(x, dy).to(out_dtype)
    return sums[:, 0], sums[:, 1]


def grad_input(dy: Tensor, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a[c] * dy + b[c] * x``, computed in float32 (float64), stored in ``x``'s dtype."""
    return _channel_axpby(x, dy, a, b)
