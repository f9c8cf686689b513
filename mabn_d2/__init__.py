"""mabn_d2: Moving Average Batch Normalization (Yan et al., ICLR 2020) for detectron2.

``import mabn_d2`` registers the norm name ``"MABN"`` in detectron2 (the changes are listed in
:mod:`mabn_d2.integration.patch`), so every detectron2 part with a ``NORM`` key accepts it.

The package's parts:

* :mod:`mabn_d2.layer` -- the layer in plain PyTorch: :class:`MABN2d`, its functional core
  and settings;
* :mod:`mabn_d2.kernels` -- the per-channel kernels behind it (C++ CPU, Triton CUDA, plain);
* :mod:`mabn_d2.integration` -- detectron2: ``"MABN"`` in ``get_norm``, ``MODEL.MABN``,
  centralized convs;
* :mod:`mabn_d2.engine`, :mod:`mabn_d2.data` -- training and evaluation with detectron2;
* :mod:`mabn_d2.finetune` -- BN checkpoints into MABN models, calibration;
* :mod:`mabn_d2.deploy` -- zero-cost inference.
"""

from .deploy.fuse import fuse_mabn
from .finetune.calibration import calibrate_mabn, calibrate_mabn_backward, precise_mabn_stats
from .finetune.checkpoint import MABNCheckpointError
from .finetune.convert import convert_bn_to_mabn
from .integration.config import add_mabn_config, settings_from_cfg
from .integration.conv import CentralizedConv2d, centralize_convs_feeding_mabn
from .integration.norm import UnknownNormError, name_mabn_layers, use_settings
from .integration.patch import register_mabn
from .layer import MABN2d, MABNSettings, centralize_weight

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
    "fuse_mabn",
    "name_mabn_layers",
    "precise_mabn_stats",
    "register_mabn",
    "settings_from_cfg",
    "use_settings",
]
