"""Weight centralization of the convolutions that feed MABN layers.

A convolution followed by MABN uses ``w - mean(w)`` in its forward pass, the mean taken per
output channel over input channels and kernel positions. The stored parameter is unchanged,
so state-dict keys (``weight``, ``bias``) stay exactly those of detectron2's ``Conv2d``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import Tensor, nn

from .mabn import MABN2d

__all__ = [
    "CentralizedConv2d",
    "centralize_weight",
    "centralize_convs_feeding_mabn",
    "is_centralized",
]


def centralize_weight(weight: Tensor) -> Tensor:
    """``weight - mean(weight over in-channels, kh, kw)`` per output channel.

    Args:
        weight: ``(C_out, C_in / groups, kh, kw)``.
    """
    return weight - weight.mean(dim=(1, 2, 3), keepdim=True)


class CentralizedConv2d(Conv2d):
    """detectron2 ``Conv2d`` (with its ``norm`` and ``activation``) on a centralized weight."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(
            x,
            centralize_weight(self.weight),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def centralize_convs_feeding_mabn(
    model: nn.Module, include: Callable[[str], bool] = lambda name: True
) -> list[str]:
    """Switch every detectron2 ``Conv2d`` whose ``norm`` is :class:`MABN2d` to centralized
    weights, in place (parameters, buffers and state-dict keys are unchanged).

    Args:
        model: any module tree.
        include: predicate on the conv's qualified name; convs it rejects are left as they are.

    Returns:
        the qualified names of the convs switched by this call.
    """
    switched = []
    for name, module in model.named_modules():
        if (
            type(module) is Conv2d
            and isinstance(getattr(module, "norm", None), MABN2d)
            and include(name)
        ):
            module.__class__ = CentralizedConv2d
            switched.append(name)
    return switched


def is_centralized(conv: nn.Module) -> bool:
    return isinstance(conv, CentralizedConv2d)
