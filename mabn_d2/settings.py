"""MABN hyper-parameters of one model build, and the scope in which they apply.

detectron2's ``get_norm(norm, channels)`` receives no config, so the settings of the model
being built travel in a context variable: :mod:`mabn_d2.detectron2_patch` sets it for the
duration of each model build from that build's cfg, and resets it afterwards, so two models
built in one process never see each other's settings.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from .mabn import MABN2d

__all__ = ["MABNSettings", "active_settings", "use_settings", "build_mabn"]


@dataclass(frozen=True)
class MABNSettings:
    """The ``MODEL.MABN`` settings (defaults: the paper's)."""

    eps: float = 1e-5
    momentum: float = 0.02
    buffer_size: int = 16
    warmup_iters: int = 100
    renorm_start_iter: int = 1000
    renorm_clip: float = 5.0
    centralize_weights: bool = True
    sync: bool = False
    # Module-name prefixes (e.g. "backbone.bottom_up") whose MABN-fed convs keep plain weights.
    centralize_exclude: tuple[str, ...] = ()

    def layer_kwargs(self) -> dict:
        kwargs = asdict(self)
        kwargs.pop("centralize_weights")
        kwargs.pop("centralize_exclude")
        return kwargs

    def centralizes(self, conv_name: str) -> bool:
        """Whether the MABN-fed conv ``conv_name`` (its name in the built model) is centralized."""
        return self.centralize_weights and not any(
            conv_name == prefix or conv_name.startswith(prefix + ".")
            for prefix in self.centralize_exclude
        )


_ACTIVE: contextvars.ContextVar[MABNSettings | None] = contextvars.ContextVar(
    "mabn_d2_settings", default=None
)


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


def build_mabn(num_features: int) -> MABN2d:
    """The ``"MABN"`` entry of ``get_norm``: an :class:`MABN2d` with the active settings."""
    settings = active_settings() or MABNSettings()
    return MABN2d(num_features, **settings.layer_kwargs())
