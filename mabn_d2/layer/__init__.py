"""The MABN layer in plain PyTorch (no detectron2): module, functional core, settings and
weight centralization."""

from .centralization import centralize_weight
from .functional import MABNStep, mabn_eval, mabn_train
from .mabn import MABN2d
from .settings import SETTINGS, MABNSettings, Setting, check_setting

__all__ = [
    "MABN2d",
    "MABNSettings",
    "MABNStep",
    "SETTINGS",
    "Setting",
    "centralize_weight",
    "check_setting",
    "mabn_eval",
    "mabn_train",
]
