"""BatchNorm -> MABN: the exact fold of a BN layer into an MABN layer, for modules and state dicts.

MABN normalizes without a mean. A BN layer in eval mode is the per-channel affine

.. math:: y = a x + c, \\qquad a = \\frac{\\gamma}{\\sqrt{\\mathrm{var} + \\epsilon_{BN}}},
          \\qquad c = \\beta - a\\,\\mathrm{mean},

and an MABN layer in eval mode is ``y = weight * x / sqrt(s + eps) + bias``. Choosing

* ``s = var + mean^2`` (the second moment of the BN layer's input, which is what MABN's
  running statistic estimates),
* ``weight = a * sqrt(s + eps) = gamma * sqrt(s + eps) / sqrt(var + eps_BN)``,
* ``bias = c = beta - gamma * mean / sqrt(var + eps_BN)``

gives the same function. A frozen affine without statistics (Caffe2 ``AffineChannel``, as in
the MSRA ``R-50.pkl``) is folded like detectron2's ``FrozenBatchNorm2d`` loads it (mean 0,
var 1): exact too, but ``s = 1`` describes no data, so such layers are marked as lacking
statistics and :mod:`mabn_d2.finetune.calibration` measures them before training.

:func:`convert_bn_to_mabn` converts the modules of any PyTorch model;
:func:`convert_bn_state_dict` converts the entries of a checkpoint without a model (used by
``tools/convert_checkpoint.py``). Loading a BN checkpoint into an MABN model through
detectron2's ``DetectionCheckpointer`` is :mod:`mabn_d2.finetune.checkpoint`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import Tensor, nn

from ..layer import MABN2d
from ..layer.settings import check_setting

__all__ = [
    "SOURCE_BN_EPS",
    "SOURCE_MABN",
    "SOURCE_BN",
    "SOURCE_AFFINE",
    "SOURCE_IDENTITY",
    "SOURCE_NEW",
    "NO_STATISTICS",
    "FoldedNorm",
    "fold_bn",
    "convert_bn_to_mabn",
    "convert_bn_state_dict",
    "has_usable_statistics",
    "check_bn_eps",
]

# Where an MABN layer's parameters came from (its attribute ``converted_from``,
# set by conversion and checkpoint loading; read by calibration).
SOURCE_MABN = "mabn"  # an MABN checkpoint: real MABN statistics
SOURCE_BN = "bn"  # a BN layer with statistics: exact fold
SOURCE_AFFINE = "affine"  # a frozen affine without statistics: exact fold, s = 1 placeholder
SOURCE_IDENTITY = "identity"  # a conv without norm: identity + its bias, s = 1 placeholder
SOURCE_NEW = "new"  # nothing to convert: MABN's own initialization
NO_STATISTICS = (SOURCE_AFFINE, SOURCE_IDENTITY)

# eps of the BN layers that wrote a checkpoint (not stored in it): detectron2's BN/FrozenBN/
# SyncBN, torchvision's and Caffe2's SpatialBN all use 1e-5.
SOURCE_BN_EPS = 1e-5


@dataclass(frozen=True)
class FoldedNorm:
    """MABN parameters computing a BN layer's eval function; all ``(C,)`` float32.

    Attributes:
        weight, bias, running_second_moment: the MABN layer's values.
        has_statistics: False when the source had no usable running statistics (a frozen
            affine, or mean 0 / var 1 exactly), so ``running_second_moment`` (1) describes no
            data and the layer should be calibrated before training.
    """

    weight: Tensor
    bias: Tensor
    running_second_moment: Tensor
    has_statistics: bool


def check_bn_eps(value: Any, key: str = "fold_bn: bn_eps") -> float:
    """``value`` as a float if it is a finite number >= 0 (a BN layer's eps may be 0); else
    ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def has_usable_statistics(running_mean: Tensor | None, running_var: Tensor | None,
                          bn_eps: float = SOURCE_BN_EPS) -> bool:
    """False if there are no statistics or they are a FrozenBN's identity defaults
    (mean 0, var 1 or ``1 - eps``), which is what affine-only checkpoints load as."""
    if running_mean is None or running_var is None:
        return False
    if bool((running_mean != 0).any()):
        return True
    var = running_var.double()
    identity = ((var - 1).abs() <= 1e-7) | ((var - (1 - bn_eps)).abs() <= 1e-7)
    return not bool(identity.all())


def fold_bn(
    num_features: int,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    bn_eps: float = SOURCE_BN_EPS,
    mabn_eps: float = 1e-5,
) -> FoldedNorm:
    """The exact fold of one BN layer (see the module docstring); computed in float64.

    Args:
        num_features: ``C``.
        weight, bias: ``(C,)`` gamma and beta; None for a BN without affine (1 and 0).
        running_mean, running_var: ``(C,)`` statistics; None for a frozen affine (mean 0,
            var 1, as detectron2's FrozenBatchNorm2d loads Caffe2 weights).
        bn_eps: the source layer's eps.
        mabn_eps: the target MABN layer's eps.

    Raises:
        ValueError: a tensor is not of shape ``(C,)``, only one of the statistics is given,
            ``bn_eps`` is not a finite number >= 0 or ``mabn_eps`` not a finite number > 0.
    """
    bn_eps = check_bn_eps(bn_eps)
    mabn_eps = check_setting("eps", mabn_eps, "fold_bn: mabn_eps")
    given = {"weight": weight, "bias": bias, "running_mean": running_mean,
             "running_var": running_var}
    for name, value in given.items():
        if value is not None and tuple(value.shape) != (num_features,):
            raise ValueError(f"fold_bn: {name} must have shape ({num_features},), got "
                             f"{tuple(value.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("fold_bn: running_mean and running_var must be given together")
    f64 = torch.float64
    gamma = torch.ones(num_features, dtype=f64) if weight is None else weight.detach().cpu().to(f64)
    beta = torch.zeros(num_features, dtype=f64) if bias is None else bias.detach().cpu().to(f64)
    mean = (torch.zeros(num_features, dtype=f64) if running_mean is None
            else running_mean.detach().cpu().to(f64))
    var = (torch.ones(num_features, dtype=f64) if running_var is None
           else running_var.detach().cpu().to(f64))
    scale = gamma / torch.sqrt(var + bn_eps)
    second_moment = var + mean * mean
    return FoldedNorm(
        weight=(scale * torch.sqrt(second_moment + mabn_eps)).float(),
        bias=(beta - scale * mean).float(),
        running_second_moment=second_moment.float(),
        has_statistics=has_usable_statistics(running_mean, running_var, bn_eps),
    )


def _bn_tensors(module: nn.Module) -> dict[str, Tensor | None]:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return {"weight": module.weight if module.affine else None,
                "bias": module.bias if module.affine else None,
                "running_mean": module.running_mean, "running_var": module.running_var}
    return {"weight": module.weight, "bias": module.bias,
            "running_mean": module.running_mean, "running_var": module.running_var}


def _convertible_types() -> tuple[type, ...]:
    types: list[type] = [nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d]
    try:  # torchvision's own FrozenBatchNorm2d (detection models)
        from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d

        types.append(TVFrozenBatchNorm2d)
    except ImportError:  # pragma: no cover - torchvision is a detectron2 dependency
        pass
    return tuple(types)


def convert_bn_to_mabn(module: nn.Module, **mabn_kwargs) -> nn.Module:
    """Replace every ``BatchNorm2d``, ``SyncBatchNorm`` and ``FrozenBatchNorm2d`` (detectron2's
    and torchvision's) in ``module`` by an :class:`MABN2d` computing the same eval function.

    In the spirit of ``nn.SyncBatchNorm.convert_sync_batchnorm``: if ``module`` itself is a BN
    layer a new module is returned, otherwise ``module`` is converted in place and returned.
    The new layers are on the source layer's device, with float32 parameters and buffers;
    ``requires_grad`` of the affine parameters follows the source (False for frozen BN).
    Convolutions are left as they are (centralize them with
    :func:`mabn_d2.centralize_convs_feeding_mabn` if wanted: that changes their function).
    A BN without running statistics (or with a FrozenBN's identity statistics) gets
    ``running_second_moment = 1`` and ``converted_from = "affine"``, telling
    :func:`mabn_d2.calibrate_mabn` that it needs calibration; the others get ``"bn"``
    (``"new"`` for a BN with ``track_running_stats=False``: gamma and beta carry over).

    Args:
        module: any module tree.
        mabn_kwargs: :class:`MABN2d` arguments (``eps``, ``momentum``, ``buffer_size``, ...);
            ``eps`` defaults to each source layer's eps.

    Returns:
        ``module`` (converted in place) or, for a BN ``module``, its MABN replacement.
    """
    if isinstance(module, _convertible_types()):
        return _convert_one(module, mabn_kwargs)
    for name, child in list(module.named_children()):
        new_child = convert_bn_to_mabn(child, **mabn_kwargs)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _convert_one(bn: nn.Module, mabn_kwargs: dict) -> MABN2d:
    kwargs = dict(mabn_kwargs)
    kwargs.setdefault("eps", float(bn.eps))
    tensors = _bn_tensors(bn)
    num_features = tensors["running_var"].shape[0] if tensors["running_var"] is not None \
        else bn.num_features  # torchvision's FrozenBatchNorm2d has no num_features
    mabn = MABN2d(num_features, **kwargs)
    if tensors["running_mean"] is None:
        # track_running_stats=False: batch statistics in eval too, like MABN's training mode;
        # nothing to fold, gamma and beta carry over.
        folded = FoldedNorm(
            weight=torch.ones(num_features) if tensors["weight"] is None
            else tensors["weight"].detach().float().cpu(),
            bias=torch.zeros(num_features) if tensors["bias"] is None
            else tensors["bias"].detach().float().cpu(),
            running_second_moment=torch.ones(num_features),
            has_statistics=False,
        )
        source = SOURCE_NEW
    else:
        folded = fold_bn(num_features, bn_eps=float(bn.eps), mabn_eps=mabn.eps, **tensors)
        source = SOURCE_BN if folded.has_statistics else SOURCE_AFFINE
    device = next(iter(bn.buffers()), torch.empty(0)).device
    mabn.to(device)
    with torch.no_grad():
        mabn.weight.copy_(folded.weight)
        mabn.bias.copy_(folded.bias)
        mabn.running_second_moment.copy_(folded.running_second_moment)
    trainable = isinstance(bn.weight, nn.Parameter) and bn.weight.requires_grad
    mabn.weight.requires_grad_(trainable)
    mabn.bias.requires_grad_(trainable)
    mabn.train(bn.training)
    mabn.converted_from = source
    return mabn


# ---------------------------------------------------------------------------- state dicts

MABN_KEYS = ("weight", "bias", "running_second_moment", "chi2_buffer", "psi_buffer",
             "num_batches_tracked")
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
MOVING_AVERAGE_KEYS = ("chi2_buffer", "psi_buffer", "num_batches_tracked")


def group_by_module(keys: Iterable[str]) -> dict[str, set[str]]:
    """``{module prefix: {leaf names}}`` of state-dict keys (``"a.b.weight"`` -> ``"a.b"``)."""
    groups: dict[str, set[str]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module, set()).add(leaf)
    return groups


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def moving_average_state(buffer_size: int, num_features: int) -> dict[str, Tensor]:
    """Fresh MABN moving averages (all zero, ``t = 0``): the state of a layer that has not
    trained yet."""
    return {"chi2_buffer": torch.zeros(buffer_size, num_features),
            "psi_buffer": torch.zeros(buffer_size, num_features),
            "num_batches_tracked": torch.tensor(0, dtype=torch.long)}


def convert_bn_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    affine_modules: Iterable[str] = (),
    bn_eps: float = SOURCE_BN_EPS,
    mabn_eps: float = 1e-5,
    buffer_size: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Fold every BN layer of a checkpoint's state dict into MABN entries, without a model.

    A BN layer is a module prefix with ``running_mean`` and ``running_var`` (BatchNorm2d,
    SyncBatchNorm, FrozenBatchNorm2d); modules named in ``affine_modules`` (frozen affine
    layers with only ``weight`` and ``bias``, e.g. Caffe2 ``_bn_s``/``_bn_b``) are folded as
    mean 0, var 1. Each becomes ``weight``, ``bias``, ``running_second_moment`` (and, with
    ``buffer_size``, zeroed ``chi2_buffer``/``psi_buffer`` and ``num_batches_tracked = 0``, so
    that a plain strict ``load_state_dict`` works); BN's ``num_batches_tracked`` is dropped.
    Every other entry is kept as it is.

    Returns:
        ``(converted, sources)``: the new state dict, and for each converted module ``"bn"``
        or ``"affine"`` (no usable statistics: calibrate before training).
    """
    if buffer_size is not None:
        buffer_size = check_setting("buffer_size", buffer_size)
    affine = set(affine_modules)
    groups = group_by_module(state_dict)
    converted: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    folded_modules = {m for m, leaves in groups.items()
                      if {"running_mean", "running_var"} <= leaves or m in affine}
    for module in sorted(folded_modules):
        leaves = groups.get(module, set())
        if "running_second_moment" in leaves:
            raise ValueError(f"{module}: has both BN and MABN statistics; not a BN layer")
        stats = ({"running_mean": state_dict[_join(module, "running_mean")],
                  "running_var": state_dict[_join(module, "running_var")]}
                 if "running_mean" in leaves else {})
        affine_params = {k: state_dict[_join(module, k)] for k in ("weight", "bias")
                         if k in leaves}
        any_tensor = next(iter({**stats, **affine_params}.values()), None)
        if any_tensor is None:
            raise ValueError(f"{module}: named as a frozen affine but has no weight or bias")
        num_features = any_tensor.shape[0]
        folded = fold_bn(num_features, bn_eps=bn_eps, mabn_eps=mabn_eps, **stats,
                         **affine_params)
        converted[_join(module, "weight")] = folded.weight
        converted[_join(module, "bias")] = folded.bias
        converted[_join(module, "running_second_moment")] = folded.running_second_moment
        if buffer_size is not None:
            for leaf, value in moving_average_state(buffer_size, num_features).items():
                converted[_join(module, leaf)] = value
        sources[module] = SOURCE_BN if folded.has_statistics else SOURCE_AFFINE
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module in folded_modules and leaf in BN_KEYS:
            continue
        converted[key] = value
    return converted, sources
