"""Weight centralization of detectron2's ``Conv2d`` layers that feed MABN.

A detectron2 ``Conv2d`` holds its norm (``Conv2d(..., norm=get_norm("MABN", C))``). When that
norm is an :class:`~mabn_d2.MABN2d` with ``centralize_weights=True`` the conv becomes a
:class:`CentralizedConv2d` as it is constructed (:mod:`mabn_d2.integration.patch`), whichever
builder made it: YACS ``build_model``, LazyConfig ``instantiate`` or plain Python. Only the
forward pass changes: parameters, buffers and state-dict keys stay those of ``Conv2d``, so
checkpoints load both ways.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import Tensor, nn

from ..layer import MABN2d, centralize_weight
from ..layer.centralization import CentralizesWeight

__all__ = ["CentralizedConv2d", "centralize_convs_feeding_mabn", "uncentralize_convs"]


class CentralizedConv2d(Conv2d, CentralizesWeight):
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


def centralizes(conv: nn.Module) -> bool:
    """Whether ``conv`` should become a :class:`CentralizedConv2d` at construction: a plain
    detectron2 ``Conv2d`` (not a subclass, whose forward may differ) whose ``norm`` is an MABN
    layer asking for centralized weights."""
    norm = getattr(conv, "norm", None)
    return type(conv) is Conv2d and isinstance(norm, MABN2d) and norm.centralize_weights


def centralize_convs_feeding_mabn(
    model: nn.Module, include: Callable[[str], bool] = lambda name: True
) -> list[str]:
    """Switch every plain detectron2 ``Conv2d`` whose ``norm`` is :class:`MABN2d` to centralized
    weights, in place, whatever the layers' ``centralize_weights`` (for models converted or
    built before ``import mabn_d2``).

    Args:
        model: any module tree.
        include: predicate on the conv's qualified name; convs it rejects are left as they are.

    Returns:
        the qualified names of the convs switched by this call.
    """
    switched = []
    for name, module in model.named_modules():
        if type(module) is Conv2d and isinstance(getattr(module, "norm", None), MABN2d) \
                and include(name):
            module.__class__ = CentralizedConv2d
            switched.append(name)
    return switched


def uncentralize_convs(model: nn.Module, include: Callable[[str], bool]) -> list[str]:
    """Switch the :class:`CentralizedConv2d` layers whose qualified name ``include`` accepts
    back to plain ``Conv2d`` (their pretrained function kept); returns their names."""
    switched = []
    for name, module in model.named_modules():
        if type(module) is CentralizedConv2d and include(name):
            module.__class__ = Conv2d
            switched.append(name)
    return switched
