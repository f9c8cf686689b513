"""Weight centralization (the paper's Sec. 4.3): the convolutions that feed MABN use
``w - mean(w)``, the mean taken per output channel over input channels and kernel positions.

This is the formula; :class:`mabn_d2.CentralizedConv2d` applies it to detectron2's ``Conv2d``
whose ``norm`` is an :class:`~mabn_d2.MABN2d` with ``centralize_weights=True``.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["CentralizesWeight", "centralize_weight"]


class CentralizesWeight:
    """Marks a convolution that computes with :func:`centralize_weight` of its weight
    (:class:`mabn_d2.CentralizedConv2d` is one): lets the checkpoint loading
    (:mod:`mabn_d2.finetune`), which sits below the detectron2 integration, recognise it."""


def centralize_weight(weight: Tensor) -> Tensor:
    """``weight - mean(weight over in-channels, kh, kw)`` per output channel.

    Args:
        weight: ``(C_out, C_in / groups, kh, kw)``.

    Returns:
        a tensor of the same shape whose every output channel sums to zero (differentiable).
    """
    return weight - weight.mean(dim=(1, 2, 3), keepdim=True)
