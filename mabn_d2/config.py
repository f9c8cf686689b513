"""``add_mabn_config``: the ``MODEL.MABN`` config node, and reading it back validated."""

from __future__ import annotations

from dataclasses import dataclass

from detectron2.config import CfgNode as CN

from .batch_stats import add_batch_stats_config
from .settings import MABNSettings

__all__ = ["add_mabn_config", "settings_from_cfg", "CalibrationSettings",
           "calibration_from_cfg"]

_DEFAULTS = MABNSettings()


@dataclass(frozen=True)
class CalibrationSettings:
    """``MODEL.MABN.CALIBRATION``: measuring MABN statistics before fine-tuning."""

    # "auto": when the loaded checkpoint left layers without statistics; "always"; "never".
    mode: str = "auto"
    num_batches: int = 20
    # Also fill the backward moving average (psi_buffer) from the training loss's gradients.
    backward: bool = True


CALIBRATION_MODES = ("auto", "always", "never")
_CALIBRATION_DEFAULTS = CalibrationSettings()


def add_mabn_config(cfg: CN) -> CN:
    """Add ``MODEL.MABN`` with the paper's defaults to ``cfg`` (in place; returns ``cfg``).

    Keys already present are kept, so calling it twice does not undo a merge.

    * ``EPS`` (1e-5): added to the second moment.
    * ``MOMENTUM`` (0.02): weight of the newest value in the running second moment.
    * ``BUFFER_SIZE`` (16): number of recent batch statistics in the moving averages.
    * ``WARMUP_ITERS`` (100): use batch statistics before this iteration.
    * ``RENORM_START_ITER`` (1000): start batch renormalisation after this iteration.
    * ``RENORM_CLIP`` (5.0): clip of the renorm factor.
    * ``CENTRALIZE_WEIGHTS`` (True): convs that feed MABN use centralized weights.
    * ``SYNC`` (False): take batch statistics over all processes (like SyncBN) instead of
      per process (the paper's per-GPU setting).
    * ``CENTRALIZE_EXCLUDE`` ([]): module-name prefixes in the model built by ``build_model``
      (e.g. ``"backbone.bottom_up"``) whose MABN-fed convs keep plain weights: pretrained
      convs keep their function (see docs/finetuning.md).
    * ``CALIBRATION.MODE`` ("auto"): before training, measure the statistics of MABN layers
      converted from a checkpoint: ``"auto"`` when the checkpoint had layers without
      statistics (frozen affine, norm-less convs), ``"always"``, or ``"never"``.
    * ``CALIBRATION.NUM_BATCHES`` (20): training batches used by the calibration.
    * ``CALIBRATION.BACKWARD`` (True): then also fill the backward moving average
      (``psi_buffer``) from as many forward + backward passes of the training loss.

    Also adds the top-level ``BATCH_STATS`` node of the batch-statistics recorder
    (``PERIOD`` 0 = off; :func:`mabn_d2.batch_stats.add_batch_stats_config`).
    """
    if "MABN" not in cfg.MODEL:
        cfg.MODEL.MABN = CN()
    node = cfg.MODEL.MABN
    defaults = {
        "EPS": _DEFAULTS.eps,
        "MOMENTUM": _DEFAULTS.momentum,
        "BUFFER_SIZE": _DEFAULTS.buffer_size,
        "WARMUP_ITERS": _DEFAULTS.warmup_iters,
        "RENORM_START_ITER": _DEFAULTS.renorm_start_iter,
        "RENORM_CLIP": _DEFAULTS.renorm_clip,
        "CENTRALIZE_WEIGHTS": _DEFAULTS.centralize_weights,
        "SYNC": _DEFAULTS.sync,
        "CENTRALIZE_EXCLUDE": list(_DEFAULTS.centralize_exclude),
    }
    for key, value in defaults.items():
        if key not in node:
            setattr(node, key, value)
    if "CALIBRATION" not in node:
        node.CALIBRATION = CN()
    for key, value in (("MODE", _CALIBRATION_DEFAULTS.mode),
                       ("NUM_BATCHES", _CALIBRATION_DEFAULTS.num_batches),
                       ("BACKWARD", _CALIBRATION_DEFAULTS.backward)):
        if key not in node.CALIBRATION:
            setattr(node.CALIBRATION, key, value)
    # Top-level BATCH_STATS (PERIOD 0 = off): see mabn_d2.batch_stats.add_batch_stats_config.
    add_batch_stats_config(cfg)
    return cfg


def _number(node: CN, key: str, kind: type, ok, expected: str):
    value = node[key]
    full_key = f"MODEL.MABN.{key}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{full_key} must be a number ({expected}), got {value!r}")
    if kind is int and (not float(value).is_integer()):
        raise ValueError(f"{full_key} must be an integer ({expected}), got {value!r}")
    value = kind(value)
    if not ok(value):
        raise ValueError(f"{full_key} must be {expected}, got {value!r}")
    return value


def settings_from_cfg(cfg: CN) -> MABNSettings | None:
    """The validated ``MODEL.MABN`` settings of ``cfg``; None if ``cfg`` has no such node.

    Raises:
        ValueError: naming the offending key, e.g. ``MODEL.MABN.BUFFER_SIZE must be >= 1``.
    """
    model = cfg.get("MODEL") if hasattr(cfg, "get") else None
    if model is None or "MABN" not in model:
        return None
    node = model.MABN
    flags = {}
    for key in ("CENTRALIZE_WEIGHTS", "SYNC"):
        flags[key] = node.get(key, getattr(_DEFAULTS, key.lower()))
        if not isinstance(flags[key], bool):
            raise ValueError(f"MODEL.MABN.{key} must be true or false, got {flags[key]!r}")
    return MABNSettings(
        eps=_number(node, "EPS", float, lambda v: v >= 0, ">= 0"),
        momentum=_number(node, "MOMENTUM", float, lambda v: 0 < v <= 1, "in (0, 1]"),
        buffer_size=_number(node, "BUFFER_SIZE", int, lambda v: v >= 1, ">= 1"),
        warmup_iters=_number(node, "WARMUP_ITERS", int, lambda v: v >= 0, ">= 0"),
        renorm_start_iter=_number(node, "RENORM_START_ITER", int, lambda v: v >= 0, ">= 0"),
        renorm_clip=_number(node, "RENORM_CLIP", float, lambda v: v >= 1, ">= 1"),
        centralize_weights=flags["CENTRALIZE_WEIGHTS"],
        sync=flags["SYNC"],
        centralize_exclude=_prefixes(node, "CENTRALIZE_EXCLUDE"),
    )


def _prefixes(node: CN, key: str) -> tuple[str, ...]:
    value = node.get(key, [])
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, str) and v and not v.startswith(".") and not v.endswith(".") for v in value
    ):
        raise ValueError(f"MODEL.MABN.{key} must be a list of module names such as "
                         f"['backbone.bottom_up'], got {value!r}")
    return tuple(value)


def calibration_from_cfg(cfg: CN) -> CalibrationSettings:
    """The validated ``MODEL.MABN.CALIBRATION`` settings (defaults where the node is absent).

    Raises:
        ValueError: naming the offending key.
    """
    node = cfg.MODEL.get("MABN", CN()).get("CALIBRATION", CN())
    mode = node.get("MODE", _CALIBRATION_DEFAULTS.mode)
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"MODEL.MABN.CALIBRATION.MODE must be one of {CALIBRATION_MODES}, "
                         f"got {mode!r}")
    num_batches = node.get("NUM_BATCHES", _CALIBRATION_DEFAULTS.num_batches)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"MODEL.MABN.CALIBRATION.NUM_BATCHES must be an integer >= 1, got "
                         f"{num_batches!r}")
    backward = node.get("BACKWARD", _CALIBRATION_DEFAULTS.backward)
    if not isinstance(backward, bool):
        raise ValueError(f"MODEL.MABN.CALIBRATION.BACKWARD must be True or False, got "
                         f"{backward!r}")
    return CalibrationSettings(mode=mode, num_batches=num_batches, backward=backward)
