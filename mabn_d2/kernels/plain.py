"""Plain PyTorch implementations of the kernels in :mod:`mabn_d2.kernels`: the fallback.

They run on every device and dtype PyTorch supports, each choosing the fastest native
primitive for the job, but allocate temporaries the fused kernels avoid. Per-channel
coefficients (``scale``, ``shift``, ``a``, ``b``) are ``(C,)`` tensors in the statistics dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["second_moment", "channel_affine", "grad_reductions", "grad_input"]

_REDUCE_DIMS = (0, 2, 3)


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).view(1, -1, 1, 1)


def second_moment(x: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``mean(x^2)`` per channel of ``x (N, C, H, W)``, accumulated in ``out_dtype``."""
    xs = x if x.dtype == out_dtype else x.to(out_dtype)
    if xs.device.type == "meta":  # shapes only (no meta kernel below): mean, same result
        return (xs * xs).mean(_REDUCE_DIMS)
    # batch_norm_update_stats is a one-pass (Welford) mean/var kernel on CPU and CUDA;
    # E[x^2] = var + mean^2 adds two non-negative terms, so nothing cancels.
    mean, var = torch.batch_norm_update_stats(xs, None, None, 0.0)
    return var + mean * mean


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale[c] * x + shift[c]`` for ``x (N, C, H, W)``, in ``x``'s dtype."""
    return torch.addcmul(_per_channel(shift, x), x, _per_channel(scale, x))


def grad_reductions(dy: Tensor, x: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(sum(dy), sum(dy * x))`` per channel, in ``out_dtype``."""
    if dy.dtype == x.dtype:
        # BatchNorm's backward reduction with mean 0 and invstd 1 is exactly these two sums,
        # computed in one fused pass (accumulating in float32 for half inputs).
        zeros = torch.zeros(x.shape[1], dtype=out_dtype, device=x.device)
        ones = torch.ones_like(zeros)
        _, sum_dy_x, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, None, None, None, zeros, ones, True, 0.0, [False, True, True]
        )
        return sum_dy.to(out_dtype), sum_dy_x.to(out_dtype)
    dy32, x32 = dy.to(out_dtype), x.to(out_dtype)
    return dy32.sum(_REDUCE_DIMS), (dy32 * x32).sum(_REDUCE_DIMS)


def grad_input(dy: Tensor, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a[c] * dy + b[c] * x`` in ``x``'s dtype."""
    if x.dtype in (torch.float16, torch.bfloat16):
        # b = -psi / (var + eps) can be far below the half range's normal numbers: compute in
        # float32 (a temporary the fused kernels do not need).
        out = torch.addcmul(dy.float() * _per_channel(a, dy.float()), x.float(),
                            _per_channel(b, x.float()))
        return out.to(x.dtype)
    return torch.addcmul(dy * _per_channel(a, dy), x, _per_channel(b, x)).to(x.dtype)
