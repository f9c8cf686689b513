"""MABN in detectron2's LazyConfig: one settings node for every part, validated by key path.

A LazyConfig gives MABN its settings the detectron2 way, as a norm factory (detectron2's
``get_norm`` calls a callable norm with the channel count)::

    mabn = L(MABNSettings)(buffer_size=16, warmup_iters=100)   # one node, at the top level
    model.backbone.bottom_up.stem.norm = "${mabn}"             # every part points at it
    model.backbone.bottom_up.stages.norm = "${mabn}"
    model.backbone.norm = "${mabn}"                            # FPN
    model.roi_heads.box_head.conv_norm = "${mabn}"
    model.roi_heads.mask_head.conv_norm = "${mabn}"

``instantiate(cfg.model)`` resolves each ``"${mabn}"`` to that node and builds an
:class:`~mabn_d2.MABNSettings` per part (equal values), so ``mabn.buffer_size=8`` on the
command line (``LazyConfig.apply_overrides``) changes every layer, and the config saved by
``LazyConfig.save`` keeps the references. A part that needs one setting changed derives its
node from the shared one, e.g. plain weights for the pretrained convs of a fine-tuned
backbone (YAML's ``MODEL.MABN.CENTRALIZE_EXCLUDE``)::

    model.backbone.bottom_up.stem.norm = model.backbone.bottom_up.stages.norm = \
        L(derive_settings)(base="${mabn}", centralize_weights=False)

``instantiate`` refuses a bad value when it builds the first layer, naming the argument
(``buffer_size must be an integer in [1, 1024], got 0``). :func:`validate_lazy_config` checks
the whole config before anything is built and names the full key (``mabn.buffer_size``); the
LazyConfig train tool calls it first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from detectron2.layers import batch_norm as d2_batch_norm
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..layer import MABN2d, MABNSettings, check_setting
from ..layer.settings import SETTINGS
from .config import CalibrationSettings, calibration_from_mapping
from .norm import NORM_NAME, UnknownNormError

__all__ = [
    "derive_settings",
    "target_of",
    "validate_lazy_config",
    "calibration_from_lazy",
]

logger = logging.getLogger(__name__)

# The conventional top-level settings node that the parts' norms point at ("${mabn}").
SETTINGS_NODE = "mabn"
# Calibration before fine-tuning from BN checkpoints (MODEL.MABN.CALIBRATION in YAML).
CALIBRATION_NODE = "train.mabn_calibration"
# The arguments through which detectron2's modules take a norm.
_NORM_ARGUMENTS = ("norm", "conv_norm")
_SETTING_NAMES = {setting.name for setting in SETTINGS}


def derive_settings(base: MABNSettings, **changes: Any) -> MABNSettings:
    """``base`` with ``changes`` (validated, errors naming the field): in a LazyConfig,
    ``L(derive_settings)(base="${mabn}", centralize_weights=False)`` follows every other value
    of the shared node, overrides included."""
    if not isinstance(base, MABNSettings):
        reference = "${" + SETTINGS_NODE + "}"
        raise TypeError(f"derive_settings: base must be MABNSettings (e.g. base={reference!r}), "
                        f"got {type(base).__name__}")
    return MABNSettings(**{**base.layer_kwargs(), **changes})


# The LazyCall targets whose nodes set MABN values.
_SETTINGS_TARGETS = (MABNSettings, derive_settings, MABN2d)


def target_of(node: DictConfig) -> Any:
    """The callable a LazyCall node builds, or None (no ``_target_``, or one not importable:
    ``instantiate`` reports that itself)."""
    if "_target_" not in node or OmegaConf.is_interpolation(node, "_target_"):
        return None
    target = node["_target_"]
    if isinstance(target, str):
        try:
            return locate(target)
        except Exception:
            return None
    return target


def _children(node: DictConfig | ListConfig, path: str) -> Iterator[tuple[Any, str]]:
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        yield key, f"{path}.{key}" if path else str(key)


def _walk(
    node: DictConfig | ListConfig, path: str = ""
) -> Iterator[tuple[DictConfig | ListConfig, Any, str]]:
    """Every (parent, key, full key) of ``node``'s tree; interpolations are visited but not
    followed (what they point at is visited where it is defined)."""
    for key, full_key in _children(node, path):
        yield node, key, full_key
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue
        child = node[key]
        if isinstance(child, (DictConfig, ListConfig)):
            yield from _walk(child, full_key)


def find_mabn_nodes(cfg: DictConfig) -> dict[str, DictConfig]:
    """``{full key: node}`` of every ``L(MABNSettings)(...)``, ``L(derive_settings)(...)`` and
    ``L(MABN2d)(...)`` node in ``cfg`` (the nodes that set MABN values)."""
    nodes = {}
    for parent, key, full_key in _walk(cfg):
        if OmegaConf.is_interpolation(parent, key) or OmegaConf.is_missing(parent, key):
            continue
        child = parent[key]
        if isinstance(child, DictConfig) and target_of(child) in _SETTINGS_TARGETS:
            nodes[full_key] = child
    return nodes


def _check_settings_node(node: DictConfig, path: str) -> None:
    arguments = {key: node[key] for key in node.keys() if key != "_target_"}
    target = target_of(node)
    if target is MABNSettings:
        MABNSettings.from_mapping(arguments, key=lambda name: f"{path}.{name}")
    elif target is derive_settings:  # base: the node it points at is checked where defined
        arguments.pop("base", None)
        MABNSettings.from_mapping(arguments, key=lambda name: f"{path}.{name}")
    else:  # MABN2d(num_features, ...): its other arguments are checked by the layer
        for name in _SETTING_NAMES & set(arguments):
            check_setting(name, arguments[name], f"{path}.{name}")


def _check_norm_argument(parent: DictConfig, key: str, full_key: str) -> str | None:
    """Validate one ``norm``/``conv_norm`` value; returns ``full_key`` if it is the string
    ``"MABN"`` (paper defaults, not the settings node)."""
    try:
        value = parent[key]  # resolves "${mabn}"
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        raise ValueError(
            f"{full_key} does not resolve ({reason}); define the MABN settings node it points "
            f"at, e.g. {SETTINGS_NODE} = L(MABNSettings)(...) at the top level of the config"
        ) from None
    if not isinstance(value, str) or not value:
        return None
    try:
        d2_batch_norm.get_norm(value, 32)
    except UnknownNormError as e:
        raise ValueError(f"{full_key}: {e}") from None
    except Exception:  # a valid name that cannot be built here (e.g. needs a process group)
        pass
    return full_key if value == NORM_NAME else None


def calibration_from_lazy(cfg: DictConfig) -> CalibrationSettings:
    """The validated ``train.mabn_calibration`` settings (``mode``, ``num_batches``,
    ``backward``; defaults where absent), errors naming the key."""
    train = cfg.get("train")
    node = train.get("mabn_calibration") if isinstance(train, DictConfig) else None
    if node is None:
        return CalibrationSettings()
    if not isinstance(node, DictConfig):
        raise ValueError(f"{CALIBRATION_NODE} must be a dict such as dict(mode='auto', "
                         f"num_batches=20, backward=True), got {node!r}")
    values = {key: node[key] for key in node.keys()}
    return calibration_from_mapping(values, key=lambda name: f"{CALIBRATION_NODE}.{name}")


def validate_lazy_config(cfg: DictConfig) -> dict[str, DictConfig]:
    """Check every MABN value of a LazyConfig before anything is built.

    * every ``L(MABNSettings)`` / ``L(MABN2d)`` node's settings (valid ranges, no unknown
      names);
    * every ``norm`` / ``conv_norm`` argument: a known norm name, and an interpolation such as
      ``"${mabn}"`` that resolves;
    * ``train.mabn_calibration``.

    Parts whose norm is the string ``"MABN"`` get the paper's defaults, not a settings node:
    logged as a warning when the config has a settings node.

    Returns:
        the settings nodes, ``{full key: node}``.

    Raises:
        ValueError: naming the full key, e.g. ``mabn.buffer_size must be an integer >= 1,
            got 0``.
    """
    nodes = find_mabn_nodes(cfg)
    for path, node in nodes.items():
        _check_settings_node(node, path)
    by_string = []
    for parent, key, full_key in _walk(cfg):
        if isinstance(parent, DictConfig) and key in _NORM_ARGUMENTS:
            if _check_norm_argument(parent, key, full_key):
                by_string.append(full_key)
    if by_string and nodes:
        logger.warning(
            "%s: the norm is the string %r, which builds layers with the paper's default "
            "settings, not those of %s; write \"${%s}\" to use the settings node",
            ", ".join(by_string), NORM_NAME, ", ".join(nodes), SETTINGS_NODE,
        )
    calibration_from_lazy(cfg)
    return nodes
