"""Functional core of Moving Average Batch Normalization (Yan et al., ICLR 2020).

Notation (per channel ``c``; statistics over N, H and W; ``M = N * H * W``):

* forward:  ``chi2_B = mean(x^2)`` (no centering); ``var`` is ``chi2_B`` or the simple moving
  average of the last ``m`` values of ``chi2_B``; ``z = x / sqrt(var + eps)``;
  ``y = weight * r * z + bias`` with the batch-renormalisation factor ``r``.
* backward: ``g = dy * weight * r``; ``psi_B = mean(g * z)``; ``psi`` is ``psi_B`` or the
  simple moving average of its last ``m`` values; ``dx = (g - z * psi) / sqrt(var + eps)``,
  ``dweight = sum(dy * r * z)``, ``dbias = sum(dy)``.

Both passes are written as per-channel affine maps so that each touches the activation
memory as few times as possible:

* forward: one reduction (``sum x^2``) and one elementwise pass ``y = a * x + b``;
* backward: one reduction (``sum dy``, ``sum dy * x``) and one elementwise pass
  ``dx = a * dy + b * x``; only ``x`` is saved for backward.

On the CPU with the C++ kernels, a step without ``process_group`` runs as two fused ops
(:class:`_FusedMABNTrainFunction`, see :func:`mabn_d2.kernels.fused_step_applies`): the same
arithmetic per channel, with each channel's statistics and output made in one visit.

Statistics and per-channel coefficients are kept in float32 (float64 for float64 inputs),
whatever the activation dtype, so half inputs whose squares exceed the half range are safe.
Nothing here reads a tensor value on the host: the step's schedule (which of batch / moving
statistics, renorm on or off, buffer slot) is decided by the caller from a host-side counter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import kernels

__all__ = ["MABNStep", "mabn_train", "mabn_eval"]

@dataclass(frozen=True)
class MABNStep:
    """Host-side schedule of one training step (decided without reading device values).

    Attributes:
        slot: index ``t mod m`` of the moving-average buffers written this step.
        use_batch_stats: ``t <= m or t < warmup_iters``: normalise with this batch's
            ``chi2_B`` instead of the moving average.
        backward_batch_stats: the backward pass uses this batch's ``psi_B`` instead of the
            moving average (``use_batch_stats``, or the layer's batch-psi ablation).
        renorm: ``t > max(renorm_start_iter, warmup_iters)``: apply the clipped renorm factor.
        renorm_clip: ``r`` is clamped to ``[1 / renorm_clip, renorm_clip]``.
        momentum: weight of the newest value in the running second moment.
        eps: added to the second moment before the square root.
    """

    slot: int
    use_batch_stats: bool
    backward_batch_stats: bool
    renorm: bool
    renorm_clip: float
    momentum: float
    eps: float


_DOUBLE_BACKWARD = (
    "MABN2d in training mode does not support double backward (a second gradient through "
    "torch.autograd.grad(..., create_graph=True), e.g. a gradient penalty): its backward "
    "writes the Psi moving average and normalizes with moving statistics that are not "
    "functions of the input. Put the layer in eval mode for such terms (there it is a "
    "per-channel affine, differentiable to any order)."
)


class _NoSecondOrder(torch.autograd.Function):
    """Identity on first-order gradients whose own backward is an error (what
    ``torch.autograd.function.once_differentiable`` does, with MABN's message). ``anchors``
    (the step's inputs) only connect it to the graph, so that a second gradient with respect
    to them reaches this node."""

    @staticmethod
    def forward(ctx, num_grads: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(g.view_as(g) for g in tensors[:num_grads])

    @staticmethod
    def backward(ctx, *_: Tensor):  # type: ignore[override]
        raise RuntimeError(_DOUBLE_BACKWARD)


def _first_order_only(backward):
    """Decorate an ``autograd.Function.backward``: it runs without building a graph, and
    under ``create_graph=True`` its gradients carry a node that refuses to be differentiated,
    instead of silently being constants (zero second derivatives)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():  # the usual first-order backward
            return grads
        present = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
        anchors = [t for t in ctx.saved_tensors if t.requires_grad]
        guarded = _NoSecondOrder.apply(
            len(present), *(grads[i].detach().requires_grad_() for i in present), *anchors)
        out = list(grads)
        for i, g in zip(present, guarded):
            out[i] = g
        return tuple(out)

    return wrapper


def _channel_view(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _keep_if_finite(new: Tensor, old: Tensor, finite: Tensor) -> Tensor:
    # torch.where instead of a host-side branch: no device sync on a GPU.
    return torch.where(finite, new, old)


def _all_reduce_sum(t: Tensor, group: object | None) -> Tensor:
    """Sum ``t`` over the processes of ``group`` (one collective; no host sync)."""
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class _MABNTrainFunction(torch.autograd.Function):
    """Training-mode MABN with the moving-average backward (``psi``).

    ``forward`` takes the per-channel coefficients already computed from the forward
    statistics; ``backward`` computes ``psi_B``, writes it into ``psi_buffer[slot]`` and
    returns the gradients of the specification.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        inv_std: Tensor,
        r: Tensor,
        psi_buffer: Tensor,
        step: MABNStep,
        finite: Tensor,
        sync: tuple[object, Tensor] | None,
    ) -> Tensor:
        w = weight.detach().to(inv_std.dtype)
        scale = w * r * inv_std
        shift = bias.detach().to(inv_std.dtype)
        y = kernels.channel_affine(x, scale, shift)
        ctx.save_for_backward(x, weight, inv_std, r)
        ctx.psi_buffer = psi_buffer
        ctx.step = step
        ctx.finite = finite
        ctx.sync = sync
        return y

    @staticmethod
    @_first_order_only
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, weight, inv_std, r = ctx.saved_tensors
        step: MABNStep = ctx.step
        psi_buffer: Tensor = ctx.psi_buffer
        dy = dy.contiguous()
        if x.numel() > 0:
            sum_dy, sum_dy_x = kernels.grad_reductions(dy, x, inv_std.dtype)
        else:  # an empty local input in a synced step still joins the all-reduce below
            sum_dy = sum_dy_x = torch.zeros_like(inv_std)
        w = weight.detach().to(inv_std.dtype)
        if ctx.sync is None:
            count: Tensor | int = x.numel() // x.shape[1]
            sum_dy_x_batch = sum_dy_x
        else:  # psi_B over the whole process group, like the forward statistics
            group, count = ctx.sync
            sum_dy_x_batch = _all_reduce_sum(sum_dy_x, group)
        # psi_B = mean(g * z) with g = dy * w * r and z = x * inv_std.
        psi_batch = w * r * inv_std * sum_dy_x_batch / count
        finite = ctx.finite & torch.isfinite(psi_batch).all()
        with torch.no_grad():
            old = psi_buffer[step.slot]
            psi_buffer[step.slot] = _keep_if_finite(psi_batch, old, finite)
        psi = psi_batch if step.backward_batch_stats else psi_buffer.mean(dim=0)
        # dx = (g - z * psi) * inv_std = (w r inv_std) * dy - (psi inv_std^2) * x
        dx = None
        if ctx.needs_input_grad[0]:
            dx = kernels.grad_input(dy, x, w * r * inv_std, -psi * inv_std * inv_std)
        dweight = (r * inv_std * sum_dy_x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None, None, None


class _FusedMABNTrainFunction(torch.autograd.Function):
    """The step of :func:`mabn_train` as two C++ ops (CPU, per-process statistics).

    ``torch.ops.mabn_d2.train_forward`` computes ``chi2_B``, updates ``chi2_buffer[slot]`` and
    the running second moment, and returns ``y``, ``inv_std``, ``r`` and ``finite``;
    ``train_backward`` computes ``psi_B``, updates ``psi_buffer[slot]`` and returns ``dx``,
    ``dweight`` and ``dbias``: the formulas of :class:`_MABNTrainFunction`, channel by channel.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_second_moment: Tensor,
        chi2_buffer: Tensor,
        psi_buffer: Tensor,
        step: MABNStep,
    ) -> tuple[Tensor, Tensor]:
        y, inv_std, r, finite = torch.ops.mabn_d2.train_forward(
            x, weight.detach(), bias.detach(), running_second_moment, chi2_buffer, step.slot,
            step.use_batch_stats, step.renorm, step.renorm_clip, step.momentum, step.eps,
        )
        ctx.save_for_backward(x, weight, inv_std, r)
        ctx.psi_buffer = psi_buffer
        ctx.step = step
        ctx.finite = bool(finite)  # a CPU tensor: no sync
        ctx.mark_non_differentiable(finite)
        return y, finite

    @staticmethod
    @_first_order_only
    def backward(ctx, dy: Tensor, _: Tensor | None):  # type: ignore[override]
        x, weight, inv_std, r = ctx.saved_tensors
        step: MABNStep = ctx.step
        dx, dweight, dbias = torch.ops.mabn_d2.train_backward(
            dy.contiguous(), x, weight.detach(), inv_std, r, ctx.psi_buffer, step.slot,
            step.backward_batch_stats, ctx.finite, ctx.needs_input_grad[0],
        )
        return (
            dx if ctx.needs_input_grad[0] else None,
            dweight if ctx.needs_input_grad[1] else None,
            dbias if ctx.needs_input_grad[2] else None,
            None, None, None, None,
        )


def mabn_train(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_second_moment: Tensor,
    chi2_buffer: Tensor,
    psi_buffer: Tensor,
    step: MABNStep,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor]:
    """One training-mode MABN step on ``x`` of shape ``(N, C, H, W)``.

    Updates ``chi2_buffer[step.slot]`` and ``running_second_moment`` in place now, and
    ``psi_buffer[step.slot]`` in place during backward. A step whose statistics are not
    finite leaves all three exactly as they were (its output may be non-finite).

    Args:
        x: input, ``(N, C, H, W)``, any floating dtype, ``N * H * W > 0``.
        weight, bias: ``(C,)`` affine parameters.
        running_second_moment: ``(C,)`` running average of ``var`` (float32/64).
        chi2_buffer, psi_buffer: ``(m, C)`` moving-average buffers (float32/64).
        step: the host-side schedule of this step.
        process_group: if given (an initialised ``torch.distributed`` group, or
            ``dist.group.WORLD``), the batch statistics ``chi2_B`` and ``psi_B`` are taken over
            the inputs of all its processes (weighted by their ``N * H * W``), like SyncBN.
            Every process of the group must then call this step and its backward; an empty
            local input (``N * H * W == 0``) takes part with a zero count.

    Returns:
        ``(y, finite)``: the output, same shape and dtype as ``x``, and a 0-dim bool tensor
        telling whether this step's forward statistics were finite (no sync needed to get it).
    """
    if process_group is None and kernels.fused_step_applies(
        x, weight, bias, running_second_moment, chi2_buffer, psi_buffer
    ):
        y, finite = _FusedMABNTrainFunction.apply(
            x, weight, bias, running_second_moment, chi2_buffer, psi_buffer, step
        )
        return y, finite
    sdtype = running_second_moment.dtype
    sync = None
    with torch.no_grad():
        if process_group is None:
            chi2_batch = kernels.second_moment(x, sdtype)
            finite = torch.isfinite(chi2_batch).all()
        else:
            chi2_batch, count = _synced_second_moment(x, sdtype, process_group)
            sync = (process_group, count)
            finite = torch.isfinite(chi2_batch).all() & (count > 0)
        chi2_buffer[step.slot] = _keep_if_finite(chi2_batch, chi2_buffer[step.slot], finite)
        var = chi2_batch if step.use_batch_stats else chi2_buffer.mean(dim=0)
        inv_std = torch.rsqrt(var + step.eps)
        if step.renorm:
            r = (torch.rsqrt(running_second_moment + step.eps) / inv_std).clamp(
                1.0 / step.renorm_clip, step.renorm_clip
            )
        else:
            r = torch.ones_like(inv_std)
        updated = torch.lerp(running_second_moment, var, step.momentum)
        running_second_moment.copy_(_keep_if_finite(updated, running_second_moment, finite))
    y = _MABNTrainFunction.apply(x, weight, bias, inv_std, r, psi_buffer, step, finite, sync)
    return y, finite


def _synced_second_moment(
    x: Tensor, dtype: torch.dtype, group: object
) -> tuple[Tensor, Tensor]:
    """``(mean(x^2) over all processes' N, H, W; total count)`` with one all-reduce."""
    channels = x.shape[1]
    local_count = x.numel() // channels
    if local_count > 0:
        local_sum = kernels.second_moment(x, dtype) * local_count
    else:
        local_sum = torch.zeros(channels, dtype=dtype, device=x.device)
    packed = torch.cat([local_sum, local_sum.new_full((1,), float(local_count))])
    packed = _all_reduce_sum(packed, group)
    count = packed[channels]
    return packed[:channels] / count.clamp_min(1), count


def mabn_eval(
    x: Tensor, weight: Tensor, bias: Tensor, running_second_moment: Tensor, eps: float
) -> Tensor:
    """Eval-mode MABN: ``y = weight * x / sqrt(running + eps) + bias``, a per-channel affine.

    Differentiable in ``x``, ``weight`` and ``bias`` (plain autograd ops).
    """
    inv_std = torch.rsqrt(running_second_moment + eps)
    scale = weight.to(inv_std.dtype) * inv_std
    out = x * _channel_view(scale).to(x.dtype) + _channel_view(bias).to(x.dtype)
    return out
