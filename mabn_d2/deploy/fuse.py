"""Zero-cost inference: fold eval-mode MABN layers into the convolutions that feed them.

In eval mode MABN is the per-channel affine ``y = gamma * x / sqrt(running + eps) + beta``.
Following a convolution ``x = conv(u; W, b)`` (with ``W`` centralized by
:class:`~mabn_d2.CentralizedConv2d` when weight centralization is on), with
``s = gamma / sqrt(running + eps)`` per output channel::

    y = s * (conv(u; W_c) + b) + beta = conv(u; s[:, None, None, None] * W_c) + (s * b + beta)

where ``W_c = W - mean(W over in-channels, kh, kw)`` (or ``W`` without centralization). The
fused model is made of plain detectron2 ``Conv2d`` layers with a bias and no norm: no
normalization op is left to run, and it traces/exports like any detectron2 model.
"""

from __future__ import annotations

import copy
import logging

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import Tensor, nn

from ..integration.conv import CentralizedConv2d
from ..layer import MABN2d, centralize_weight

__all__ = ["fuse_mabn",]

logger = logging.getLogger(__name__)


def mabn_scale_shift(norm: MABN2d) -> tuple[Tensor, Tensor]:
    """Eval-mode MABN as ``(scale, shift)``, ``(C,)`` float64: ``y = scale * x + shift``."""
    running = norm.running_second_moment.detach().double()
    scale = norm.weight.detach().double() / torch.sqrt(running + norm.eps)
    return scale, norm.bias.detach().double()


@torch.no_grad()
def fold_mabn_into_conv(conv: Conv2d) -> None:
    """Fold ``conv.norm`` (an eval-mode :class:`MABN2d`) and any weight centralization into
    ``conv``'s weight and bias, in place; ``conv`` becomes a plain detectron2 ``Conv2d``
    with a bias, no norm, and the same activation.

    Computed in float64, stored in the conv's dtype.
    """
    norm = conv.norm
    if not isinstance(norm, MABN2d):
        raise TypeError(f"fold_mabn_into_conv: conv.norm is {type(norm).__name__}, not MABN2d")
    if norm.training:
        raise RuntimeError("fold_mabn_into_conv: the MABN layer is in training mode; call "
                           "model.eval() first (training-mode MABN uses batch statistics)")
    weight = conv.weight.detach().double()
    if isinstance(conv, CentralizedConv2d):
        weight = centralize_weight(weight)
    scale, shift = mabn_scale_shift(norm)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(shift)
    new_weight = weight * scale.view(-1, 1, 1, 1)
    new_bias = scale * bias + shift
    conv.weight.copy_(new_weight.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(
            new_bias.to(device=conv.weight.device, dtype=conv.weight.dtype),
            requires_grad=conv.weight.requires_grad,
        )
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))
    conv.norm = None
    conv.__class__ = Conv2d  # centralization is folded into the weight now


def _frozen_affine(norm: MABN2d) -> FrozenBatchNorm2d:
    """A standalone eval-mode MABN as detectron2's FrozenBatchNorm2d (mean 0, var = running)."""
    frozen = FrozenBatchNorm2d(norm.num_features, eps=norm.eps)
    frozen.weight.copy_(norm.weight.detach())
    frozen.bias.copy_(norm.bias.detach())
    frozen.running_mean.zero_()
    frozen.running_var.copy_(norm.running_second_moment.detach())
    return frozen.to(norm.weight.device)


@torch.no_grad()
def fuse_mabn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every MABN layer of an eval-mode model into the convolution that feeds it.

    Every detectron2 ``Conv2d`` (or :class:`CentralizedConv2d`) whose ``norm`` is
    :class:`MABN2d` becomes a plain ``Conv2d`` with bias and no norm (see the module doc).
    An MABN layer that no such conv owns (e.g. after a plain ``nn.Conv2d`` in an
    ``nn.Sequential``) cannot be folded: it is replaced by the equivalent
    ``FrozenBatchNorm2d`` (a per-channel affine) and reported in the log.

    Args:
        model: a model in eval mode (``model.eval()``); training-mode MABN uses batch
            statistics, which cannot be folded.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        the fused model (``model`` itself when ``inplace``), still in eval mode; outputs
        equal the unfused eval model's up to float rounding.

    Raises:
        RuntimeError: if ``model`` or any of its MABN layers is in training mode.
    """
    training = [name for name, m in model.named_modules() if isinstance(m, MABN2d) and m.training]
    if model.training or training:
        raise RuntimeError(
            "fuse_mabn: the model is in training mode"
            + (f" (MABN layers {training[:3]}{'...' if len(training) > 3 else ''})"
               if training else "")
            + "; call model.eval() first. Training-mode MABN normalizes with batch "
            "statistics and cannot be folded into a convolution."
        )
    if not inplace:
        model = copy.deepcopy(model)
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, Conv2d) and isinstance(module.norm, MABN2d):
            fold_mabn_into_conv(module)
            folded += 1
    standalone = [
        (parent, child_name, f"{parent_name}.{child_name}".lstrip("."))
        for parent_name, parent in model.named_modules()
        for child_name, child in parent.named_children()
        if isinstance(child, MABN2d)
    ]
    for parent, child_name, _ in standalone:
        setattr(parent, child_name, _frozen_affine(getattr(parent, child_name)))
    if standalone:
        logger.warning(
            "fuse_mabn: %d MABN layer(s) are not the norm of a detectron2 Conv2d and were "
            "replaced by an equivalent FrozenBatchNorm2d instead of being folded: %s",
            len(standalone), [name for _, _, name in standalone],
        )
    logger.info("fuse_mabn: folded %d MABN layers into their convolutions", folded)
    return model
