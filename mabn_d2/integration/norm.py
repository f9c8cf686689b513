"""The norm name ``"MABN"`` in detectron2: what ``get_norm("MABN", C)`` builds, and with which
settings.

detectron2's ``get_norm(norm, channels)`` receives no config. A string ``"MABN"`` therefore
builds an :class:`~mabn_d2.MABN2d` with the settings of the model build in progress: a YACS
build (``build_model(cfg)`` and every registry builder) runs inside :func:`use_settings` with its
cfg's ``MODEL.MABN`` (see :mod:`mabn_d2.integration.patch`); outside a build the paper's
defaults apply. A LazyConfig or Python build that wants other settings passes a settings object
as the norm instead of the string: ``norm=MABNSettings(buffer_size=4)`` (detectron2's
``get_norm`` calls callables with the channel count).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from detectron2.config import CfgNode
from torch import nn

from ..layer import MABN2d, MABNSettings
from .config import centralize_exclude_from_cfg, settings_from_cfg
from .conv import uncentralize_convs

__all__ = [
    "NORM_NAME",
    "UnknownNormError",
    "use_settings",
    "build_mabn_norm",
    "valid_norm_names",
    "name_mabn_layers",
    "build_with_cfg_settings",
]

logger = logging.getLogger(__name__)

NORM_NAME = "MABN"
# Names detectron2 releases have accepted; the valid ones are found by asking get_norm.
_CANDIDATE_D2_NORMS = (
    "BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN",
)

_ACTIVE: contextvars.ContextVar[MABNSettings | None] = contextvars.ContextVar(
    "mabn_d2_settings", default=None
)


class UnknownNormError(KeyError):
    """An unknown ``NORM`` name (a KeyError, as detectron2's own get_norm raises)."""

    def __str__(self) -> str:
        return str(self.args[0])


def active_settings() -> MABNSettings | None:
    """The settings of the model build in progress, or None outside a build."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_settings(settings: MABNSettings) -> Iterator[MABNSettings]:
    """Within this block, ``get_norm("MABN", C)`` builds layers with ``settings``."""
    token = _ACTIVE.set(settings)
    try:
        yield settings
    finally:
        _ACTIVE.reset(token)


def build_mabn_norm(num_features: int) -> MABN2d:
    """``get_norm("MABN", num_features)``: an :class:`MABN2d` with the active settings (the
    paper's defaults outside a build)."""
    return (active_settings() or MABNSettings())(num_features)


def valid_norm_names(original_get_norm: Callable[[Any, int], Any]) -> tuple[str, ...]:
    """Every string ``get_norm`` accepts (besides ``""``), ``"MABN"`` included."""
    return _valid_names(original_get_norm)


@functools.lru_cache(maxsize=4)
def _valid_names(original_get_norm: Callable[[Any, int], Any]) -> tuple[str, ...]:
    names = []
    for name in _CANDIDATE_D2_NORMS:
        try:
            original_get_norm(name, 32)
        except KeyError:
            continue
        except Exception:  # exists but cannot be built here (e.g. needs a process group)
            pass
        names.append(name)
    return tuple(names) + (NORM_NAME,)


def name_mabn_layers(model: nn.Module) -> int:
    """Give every MABN layer of ``model`` its qualified name (``layer.name``, used in its
    messages); returns how many there are."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, MABN2d):
            module.name = name
            count += 1
    return count


def _first_cfg(args: tuple, kwargs: dict) -> CfgNode | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, CfgNode):
            return value
    return None


def _exclude(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """``MODEL.MABN.CENTRALIZE_EXCLUDE``: plain weights for the convs under ``prefixes``."""
    if not prefixes:
        return
    uncentralize_convs(model, include=lambda name: any(
        name == prefix or name.startswith(prefix + ".") for prefix in prefixes))
    names = [name for name, _ in model.named_modules()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            logger.warning(
                "MODEL.MABN.CENTRALIZE_EXCLUDE entry %r names no module of the built %s (names "
                "are those of the model built by build_model, e.g. 'backbone.bottom_up')",
                prefix, type(model).__name__,
            )


def build_with_cfg_settings(builder: Callable[..., Any]) -> Callable[..., Any]:
    """``builder`` (a class or function a detectron2 registry returns) run with its cfg's
    ``MODEL.MABN`` settings active; the outermost build also names the MABN layers and applies
    ``MODEL.MABN.CENTRALIZE_EXCLUDE``. Calls without a cfg run ``builder`` unchanged."""

    @functools.wraps(builder, updated=())
    def build(*args: Any, **kwargs: Any) -> Any:
        cfg = _first_cfg(args, kwargs)
        if cfg is None:
            return builder(*args, **kwargs)
        outermost = active_settings() is None
        settings = settings_from_cfg(cfg)
        exclude = centralize_exclude_from_cfg(cfg)
        with use_settings(settings or MABNSettings()):
            built = builder(*args, **kwargs)
        if outermost and isinstance(built, nn.Module) and name_mabn_layers(built):
            if settings is None:
                logger.warning(
                    "The cfg has no MODEL.MABN node (call mabn_d2.add_mabn_config(cfg)); "
                    "MABN layers were built with the paper's defaults."
                )
            _exclude(built, exclude)
        return built

    return build
