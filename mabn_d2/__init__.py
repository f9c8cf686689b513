"""mabn_d2: Moving Average Batch Normalization (Yan et al., ICLR 2020) for detectron2.

``import mabn_d2`` registers the norm name ``"MABN"`` in detectron2's ``get_norm`` (see
:mod:`mabn_d2.detectron2_patch`), so every detectron2 part with a ``NORM`` key accepts it.
"""

from .centralization import CentralizedConv2d, centralize_convs_feeding_mabn, centralize_weight
from .config import add_mabn_config, settings_from_cfg
from .detectron2_patch import UnknownNormError, finalize_mabn_model, register_mabn
from .mabn import MABN2d
from .settings import MABNSettings, use_settings

__version__ = "0.1.0"

register_mabn()

__all__ = [
    "MABN2d",
    "MABNSettings",
    "CentralizedConv2d",
    "UnknownNormError",
    "add_mabn_config",
    "centralize_convs_feeding_mabn",
    "centralize_weight",
    "finalize_mabn_model",
    "register_mabn",
    "settings_from_cfg",
    "use_settings",
]
