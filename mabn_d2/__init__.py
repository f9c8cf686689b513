"""mabn_d2: Moving Average Batch Normalization (Yan et al., ICLR 2020) for detectron2.

``import mabn_d2`` registers the norm name ``"MABN"`` in detectron2's ``get_norm`` (see
:mod:`mabn_d2.detectron2_patch`), so every detectron2 part with a ``NORM`` key accepts it.
"""

from .calibration import calibrate_mabn, calibrate_mabn_backward, precise_mabn_stats
from .centralization import CentralizedConv2d, centralize_convs_feeding_mabn, centralize_weight
from .checkpoint import MABNCheckpointError
from .config import add_mabn_config, settings_from_cfg
from .convert import convert_bn_to_mabn
from .detectron2_patch import UnknownNormError, finalize_mabn_model, register_mabn
from .fuse import fuse_mabn
from .mabn import MABN2d
from .settings import MABNSettings, use_settings

__version__ = "0.1.0"

register_mabn()

__all__ = [
    "MABN2d",
    "MABNSettings",
    "CentralizedConv2d",
    "MABNCheckpointError",
    "UnknownNormError",
    "add_mabn_config",
    "calibrate_mabn",
    "calibrate_mabn_backward",
    "centralize_convs_feeding_mabn",
    "centralize_weight",
    "convert_bn_to_mabn",
    "finalize_mabn_model",
    "fuse_mabn",
    "precise_mabn_stats",
    "register_mabn",
    "settings_from_cfg",
    "use_settings",
]
