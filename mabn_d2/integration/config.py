"""``add_mabn_config``: detectron2's YAML node ``MODEL.MABN``, and reading it back validated.

The layer's keys, defaults and ranges come from :data:`mabn_d2.layer.settings.SETTINGS`; this
module adds what only a YACS-built detectron2 model has: ``CENTRALIZE_EXCLUDE`` (module names
of the built model) and ``CALIBRATION`` (fine-tuning from BN checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from detectron2.config import CfgNode as CN

from ..finetune.calibration import check_calibration_mode
from ..layer.settings import SETTINGS, MABNSettings, check_known_names
from .batch_stats import add_batch_stats_config

__all__ = [
    "add_mabn_config",
    "settings_from_cfg",
    "centralize_exclude_from_cfg",
    "CalibrationSettings",
    "calibration_from_cfg",
    "calibration_from_mapping",
]

_KEYS = {setting.name: setting.key for setting in SETTINGS}


@dataclass(frozen=True)
class CalibrationSettings:
    """``MODEL.MABN.CALIBRATION``: measuring MABN statistics before fine-tuning."""

    # "auto": when the loaded checkpoint left layers without statistics; "always"; "never".
    mode: str = "auto"
    num_batches: int = 20
    # Also fill the backward moving average (psi_buffer) from the training loss's gradients.
    backward: bool = True


_CALIBRATION_DEFAULTS = CalibrationSettings()
_CALIBRATION_FIELDS = tuple(f.name for f in fields(CalibrationSettings))


def add_mabn_config(cfg: CN) -> CN:
    """Add ``MODEL.MABN`` with the paper's defaults to ``cfg`` (in place; returns ``cfg``).

    Keys already present are kept, so calling it twice does not undo a merge.

    The :class:`~mabn_d2.MABN2d` settings (from :data:`mabn_d2.layer.settings.SETTINGS`):

{settings}

    and what only a YACS-built model has:

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
    (``PERIOD`` 0 = off; :func:`mabn_d2.integration.batch_stats.add_batch_stats_config`).
    """
    if "MABN" not in cfg.MODEL:
        cfg.MODEL.MABN = CN()
    node = cfg.MODEL.MABN
    for setting in SETTINGS:
        if setting.key not in node:
            setattr(node, setting.key, setting.default)
    if "CENTRALIZE_EXCLUDE" not in node:
        node.CENTRALIZE_EXCLUDE = []
    if "CALIBRATION" not in node:
        node.CALIBRATION = CN()
    for key, value in (("MODE", _CALIBRATION_DEFAULTS.mode),
                       ("NUM_BATCHES", _CALIBRATION_DEFAULTS.num_batches),
                       ("BACKWARD", _CALIBRATION_DEFAULTS.backward)):
        if key not in node.CALIBRATION:
            setattr(node.CALIBRATION, key, value)
    add_batch_stats_config(cfg)
    return cfg


# The settings' lines of the docstring come from the table, so that help() cannot go stale
# (no docstring under python -OO).
if add_mabn_config.__doc__:
    add_mabn_config.__doc__ = add_mabn_config.__doc__.format(settings="\n".join(
        f"    * ``{s.key}`` ({s.default!r}): {s.doc}; {s.expected}." for s in SETTINGS))


def _mabn_node(cfg: CN) -> CN | None:
    model = cfg.get("MODEL") if hasattr(cfg, "get") else None
    return model.get("MABN") if model is not None else None


def settings_from_cfg(cfg: CN) -> MABNSettings | None:
    """The validated layer settings of ``cfg.MODEL.MABN``; None if ``cfg`` has no such node.

    Raises:
        ValueError: naming the offending key, e.g. ``MODEL.MABN.BUFFER_SIZE must be an
            integer >= 1, got 0``.
    """
    node = _mabn_node(cfg)
    if node is None:
        return None
    values = {setting.name: node[setting.key] for setting in SETTINGS if setting.key in node}
    return MABNSettings.from_mapping(values, key=lambda name: f"MODEL.MABN.{_KEYS[name]}")


def centralize_exclude_from_cfg(cfg: CN) -> tuple[str, ...]:
    """The validated ``MODEL.MABN.CENTRALIZE_EXCLUDE`` prefixes (``()`` without the node)."""
    node = _mabn_node(cfg)
    value = node.get("CENTRALIZE_EXCLUDE", []) if node is not None else []
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, str) and v and not v.startswith(".") and not v.endswith(".") for v in value
    ):
        raise ValueError("MODEL.MABN.CENTRALIZE_EXCLUDE must be a list of module names such as "
                         f"['backbone.bottom_up'], got {value!r}")
    return tuple(value)


def calibration_from_mapping(
    values: Mapping[str, Any], key: Callable[[str], str]
) -> CalibrationSettings:
    """Validated :class:`CalibrationSettings` from ``{"mode", "num_batches", "backward"}``
    (missing names take their default); errors name ``key(name)``.

    Raises:
        ValueError: naming the offending key.
    """
    check_known_names(values, _CALIBRATION_FIELDS, key, "MABN calibration settings")
    mode = check_calibration_mode(values.get("mode", _CALIBRATION_DEFAULTS.mode), key("mode"))
    num_batches = values.get("num_batches", _CALIBRATION_DEFAULTS.num_batches)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"{key('num_batches')} must be an integer >= 1, got {num_batches!r}")
    backward = values.get("backward", _CALIBRATION_DEFAULTS.backward)
    if not isinstance(backward, bool):
        raise ValueError(f"{key('backward')} must be True or False, got {backward!r}")
    return CalibrationSettings(mode=mode, num_batches=num_batches, backward=backward)


def calibration_from_cfg(cfg: CN) -> CalibrationSettings:
    """The validated ``MODEL.MABN.CALIBRATION`` settings (defaults where the node is absent).

    Raises:
        ValueError: naming the offending key.
    """
    node = cfg.MODEL.get("MABN", CN()).get("CALIBRATION", CN())
    values = {name: node[name.upper()] for name in _CALIBRATION_FIELDS if name.upper() in node}
    return calibration_from_mapping(
        values, key=lambda name: f"MODEL.MABN.CALIBRATION.{name.upper()}")
