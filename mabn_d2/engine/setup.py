"""Config and process set-up for training/evaluating MABN models with detectron2."""

from __future__ import annotations

import argparse
import logging

import torch
from detectron2.config import CfgNode
from detectron2.engine import default_setup
from detectron2.layers import get_norm
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn

from ..cli import UserError
from ..data import register_coco_from_cfg
from ..integration.config import settings_from_cfg
from ..integration.conv import CentralizedConv2d
from ..layer import MABN2d
from ..validation import get_mabn_cfg, load_yacs_cfg, validate_yacs_cfg
from ..version import __version__
from .output_lock import hold_output_dir

__all__ = [
    "get_mabn_cfg",
    "load_mabn_cfg",
    "mabn_setup",
    "setup_from_args",
    "describe_mabn_model",
    "check_device",
    "check_mabn_registered",
]

logger = logging.getLogger(__name__)
_NORM_KEYS = ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")


def load_mabn_cfg(config_file: str, opts: list[str]) -> CfgNode:
    """The frozen cfg of a job: :func:`get_mabn_cfg` + the YAML ``config_file`` + the
    command-line overrides ``opts`` (``KEY VALUE`` pairs), values coerced and bad ones refused
    naming the key (:func:`mabn_d2.validation.load_yacs_cfg`).

    Raises:
        UserError: a missing file, an unknown key, a value of the wrong type.
    """
    return load_yacs_cfg(config_file, opts)


def mabn_setup(cfg: CfgNode, *, log_to_output_dir: bool = True) -> None:
    """mabn_d2's part of a job's set-up, after detectron2's ``default_setup``.

    Sets up the ``mabn_d2`` logger (same files as detectron2's; with
    ``log_to_output_dir=False`` the caller has set up logging itself and nothing is written
    under ``OUTPUT_DIR``, e.g. :mod:`mabn_d2.engine.predictor`), validates ``MODEL.MABN``,
    checks the device, registers the user's COCO datasets, and logs that ``"MABN"`` is a
    detectron2 norm and with which settings the model will be built.

    Raises:
        ValueError: invalid ``MODEL.MABN`` value (naming the key), bad ``REGISTER_COCO`` entry.
        RuntimeError: ``MODEL.DEVICE`` is CUDA on a machine without one; ``"MABN"`` is not
            registered in detectron2's ``get_norm``.
    """
    if log_to_output_dir:
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mabn_d2")
    settings = settings_from_cfg(cfg)
    check_device(cfg.MODEL.DEVICE, "MODEL.DEVICE", "'MODEL.DEVICE cpu'")
    check_mabn_registered()
    norms = ", ".join(f"{key}.NORM={cfg.MODEL[key].NORM or 'none'}" for key in _NORM_KEYS)
    logger.info(
        "mabn_d2 %s: norm 'MABN' registered in detectron2's get_norm (get_norm('MABN', C) -> "
        "MABN2d). This model: %s", __version__, norms,
    )
    if settings is not None:
        logger.info("mabn_d2: MODEL.MABN settings of this job: %s", settings)
    for name in register_coco_from_cfg(cfg):
        logger.info("mabn_d2: registered COCO dataset %r from DATASETS.REGISTER_COCO", name)


class DeviceError(UserError, RuntimeError):
    """The config asks for a device this machine does not have."""


def check_device(device: str, key: str, fix: str) -> None:
    """Fail clearly when ``device`` (the value of config key ``key``) is CUDA on a machine
    without one; ``fix`` is the command-line override that selects the CPU."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{key} is {device!r} but no CUDA device is available; add {fix} "
                           "to the command line (or the config) to run on the CPU")


def check_mabn_registered() -> None:
    """Fail clearly when ``"MABN"`` is not a detectron2 norm (``register_mabn`` has not run)."""
    if not isinstance(get_norm("MABN", 1), MABN2d):
        raise RuntimeError("detectron2's get_norm('MABN', C) does not build MABN2d: "
                           "mabn_d2.register_mabn() has not run")


def setup_from_args(args: argparse.Namespace) -> CfgNode:
    """The frozen cfg of a ``tools/train_net.py`` job (detectron2's ``default_argument_parser``
    arguments): defaults + ``MODEL.MABN`` + ``args.config_file`` + ``args.opts``, then
    detectron2's ``default_setup`` and :func:`mabn_setup`.

    The config is loaded and checked first (:mod:`mabn_d2.validation`), then the main process
    takes ``OUTPUT_DIR`` for itself (:func:`~mabn_d2.engine.output_lock.hold_output_dir`),
    before anything is written into it.

    Raises:
        UserError: a bad value (naming the key), an unusable OUTPUT_DIR or weights file.
        OutputDirBusyError: another live run writes into ``OUTPUT_DIR``.
    """
    cfg = load_mabn_cfg(args.config_file, args.opts)
    validate_yacs_cfg(cfg, eval_only=getattr(args, "eval_only", False),
                      resume=getattr(args, "resume", False))
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        hold_output_dir(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    mabn_setup(cfg)
    return cfg


def describe_mabn_model(model: nn.Module) -> str:
    """A one-line count of the model's MABN layers and the centralized convs feeding them."""
    mabn = [m for m in model.modules() if isinstance(m, MABN2d)]
    centralized = [m for m in model.modules() if isinstance(m, CentralizedConv2d)]
    if not mabn:
        return "mabn_d2: the model has no MABN2d layers"
    settings = {(m.momentum, m.buffer_size, m.warmup_iters, m.renorm_start_iter) for m in mabn}
    return (
        f"mabn_d2: the model has {len(mabn)} MABN2d layers ({len(centralized)} fed by "
        "centralized convs); (momentum, buffer_size, warmup_iters, renorm_start_iter) = "
        + ", ".join(str(s) for s in sorted(settings))
    )
