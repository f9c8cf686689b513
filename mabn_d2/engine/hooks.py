"""detectron2 training hooks: MABN calibration before training, MABN PreciseBN after.

:func:`build_mabn_hooks` gives both for a YACS cfg, :func:`mabn_hooks` for explicit settings
(the LazyConfig tool). In a ``DefaultTrainer`` subclass, put them
before the checkpointer (so that what they change is saved)::

    def build_hooks(self):
        hooks = super().build_hooks()  # [timer, lr scheduler, BN PreciseBN, checkpointer, ...]
        return hooks[:3] + build_mabn_hooks(self.cfg, self.model, self.build_train_loader) \
            + hooks[3:]
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from detectron2.config import CfgNode
from detectron2.engine import HookBase
from torch import nn

from ..finetune.calibration import (
    PRECISE_BN_NUM_ITER,
    calibrate_mabn,
    calibrate_mabn_backward,
    check_calibration_mode,
    layers_to_calibrate,
    mabn_layers,
    precise_mabn_stats,
    read_batches,
)
from ..integration.config import CalibrationSettings, calibration_from_cfg

__all__ = ["MABNCalibrationHook", "MABNPreciseBN", "mabn_hooks", "build_mabn_hooks"]

logger = logging.getLogger(__name__)


class MABNCalibrationHook(HookBase):
    """Before the first iteration, calibrate the MABN layers converted from a checkpoint
    (:func:`mabn_d2.calibrate_mabn`; which layers:
    :func:`mabn_d2.finetune.calibration.layers_to_calibrate` for ``mode``). Runs after
    ``resume_or_load``, so a resumed MABN run (layers from an MABN checkpoint) is not
    calibrated again."""

    def __init__(self, model: nn.Module, data_loader: Iterable[Any] | Callable[[], Iterable[Any]],
                 num_batches: int, mode: str = "auto", backward: bool = True) -> None:
        """
        Args:
            model: the trained model (DDP-wrapped or not).
            data_loader: training batches, or a function building them (called only if the
                calibration runs, so no loader is built for nothing).
            num_batches: batches used.
            mode: ``"auto"``, ``"always"`` or ``"never"`` (``MODEL.MABN.CALIBRATION.MODE``).
            backward: also fill ``psi_buffer`` (:func:`mabn_d2.calibrate_mabn_backward`,
                ``MODEL.MABN.CALIBRATION.BACKWARD``).
        """
        check_calibration_mode(mode, "MABNCalibrationHook: mode")
        self._model = model
        self._data = data_loader
        self._num_batches = num_batches
        self._mode = mode
        self._backward = backward
        self.report = None
        self.backward_report = None

    @classmethod
    def from_config(cls, cfg: CfgNode, model: nn.Module,
                    build_loader: Callable[[CfgNode], Iterable[Any]]) -> MABNCalibrationHook:
        """The hook for ``MODEL.MABN.CALIBRATION`` (validated); ``build_loader(cfg)`` builds
        the training loader when the calibration runs."""
        settings = calibration_from_cfg(cfg)
        return cls(model, lambda: build_loader(cfg), settings.num_batches, settings.mode,
                   settings.backward)

    def before_train(self) -> None:
        layers = layers_to_calibrate(self._model, self._mode)
        if not layers:
            logger.info("mabn_d2: MABN calibration (mode %r): nothing to calibrate", self._mode)
            return
        data = self._data() if callable(self._data) else self._data
        # One bounded pass over the loader, shared by both calibrations (read_batches says
        # why a loader must not be iterated twice).
        batches = read_batches(data, self._num_batches)
        self.report = calibrate_mabn(self._model, batches, len(batches), layers=layers)
        if self._backward:
            self.backward_report = calibrate_mabn_backward(self._model, batches, len(batches),
                                                           layers=layers)


class MABNPreciseBN(HookBase):
    """detectron2's ``PreciseBN`` hook for MABN layers (detectron2's only finds BN types):
    every ``period`` iterations and after the last, :func:`mabn_d2.precise_mabn_stats` over
    ``num_iter`` batches of a separate data loader."""

    def __init__(self, period: int, model: nn.Module, data_loader: Iterable[Any],
                 num_iter: int) -> None:
        self._model = model
        self._period = period
        self._num_iter = num_iter
        self._data_loader = data_loader
        self._data_iter = None
        self.report = None  # of the last update
        self._disabled = not mabn_layers(model)
        if self._disabled:
            logger.info("mabn_d2: MABN PreciseBN is disabled: the model has no MABN layers")

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self._period > 0
                                                  and next_iter % self._period == 0):
            self.update_stats()

    def update_stats(self) -> None:
        """Recompute the running statistics now (may be called by hand)."""
        if self._disabled:
            return
        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        logger.info("mabn_d2: MABN PreciseBN over %d batches ...", self._num_iter)
        self.report = precise_mabn_stats(
            self._model, itertools.islice(self._data_iter, self._num_iter), self._num_iter)


def mabn_hooks(
    model: nn.Module,
    build_loader: Callable[[], Iterable[Any]],
    calibration: CalibrationSettings,
    precise_bn_period: int | None = None,
    precise_bn_num_iter: int = PRECISE_BN_NUM_ITER,
) -> list[HookBase]:
    """The hooks a trainer of an MABN model adds, whatever its config system: calibration
    before training and, with ``precise_bn_period`` not None, MABN PreciseBN every
    ``precise_bn_period`` iterations (0: after the last only) over ``precise_bn_num_iter``
    batches. No hooks for a model without MABN layers.

    Args:
        model: the trained model.
        build_loader: builds a training loader for these hooks (called when calibration runs,
            and once now for PreciseBN), e.g. with 0 workers as detectron2's PreciseBN loader.
        calibration: the validated calibration settings.
    """
    if not mabn_layers(model):
        return []
    hooks: list[HookBase] = [MABNCalibrationHook(
        model, build_loader, calibration.num_batches, calibration.mode, calibration.backward)]
    if precise_bn_period is not None:
        hooks.append(MABNPreciseBN(precise_bn_period, model, build_loader(), precise_bn_num_iter))
    return hooks


def build_mabn_hooks(cfg: CfgNode, model: nn.Module,
                     build_train_loader: Callable[[CfgNode], Iterable[Any]]) -> list[HookBase]:
    """:func:`mabn_hooks` of a YACS job: calibration (``MODEL.MABN.CALIBRATION``) and, with
    ``TEST.PRECISE_BN.ENABLED``, MABN PreciseBN at ``TEST.EVAL_PERIOD``.

    ``cfg`` should have ``DATALOADER.NUM_WORKERS`` as wanted for these extra loaders
    (detectron2's ``build_hooks`` uses 0)."""
    precise = cfg.TEST.PRECISE_BN
    return mabn_hooks(
        model, lambda: build_train_loader(cfg), calibration_from_cfg(cfg),
        cfg.TEST.EVAL_PERIOD if precise.ENABLED else None, precise.NUM_ITER,
    )
