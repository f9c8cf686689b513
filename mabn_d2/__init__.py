"""mabn_d2: Moving Average Batch Normalization (Yan et al., ICLR 2020) for detectron2.

``import mabn_d2`` registers the norm name ``"MABN"`` in detectron2 (the changes are listed in
:mod:`mabn_d2.integration.patch`), so every detectron2 part with a ``NORM`` key accepts it.
The public names below are imported at first use; :mod:`mabn_d2.layer` and
:mod:`mabn_d2.kernels` need only PyTorch (without detectron2 installed, nothing is registered
and the detectron2 parts raise ImportError).

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

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .deploy.fuse import fuse_mabn
    from .finetune.calibration import calibrate_mabn, calibrate_mabn_backward, precise_mabn_stats
    from .finetune.checkpoint import MABNCheckpointError
    from .finetune.convert import convert_bn_to_mabn
    from .integration.config import add_mabn_config, settings_from_cfg
    from .integration.conv import CentralizedConv2d, centralize_convs_feeding_mabn
    from .integration.norm import UnknownNormError, name_mabn_layers, use_settings
    from .integration.patch import register_mabn
    from .layer import MABN2d, MABNSettings, centralize_weight

# The public names and the modules defining them, imported at first use: ``mabn_d2.layer`` and
# ``mabn_d2.kernels`` work in an interpreter without detectron2 (tests/test_import_contract.py).
_EXPORTS = {
    "MABN2d": ".layer",
    "MABNSettings": ".layer",
    "centralize_weight": ".layer",
    "CentralizedConv2d": ".integration.conv",
    "centralize_convs_feeding_mabn": ".integration.conv",
    "MABNCheckpointError": ".finetune.checkpoint",
    "UnknownNormError": ".integration.norm",
    "name_mabn_layers": ".integration.norm",
    "use_settings": ".integration.norm",
    "add_mabn_config": ".integration.config",
    "settings_from_cfg": ".integration.config",
    "calibrate_mabn": ".finetune.calibration",
    "calibrate_mabn_backward": ".finetune.calibration",
    "precise_mabn_stats": ".finetune.calibration",
    "convert_bn_to_mabn": ".finetune.convert",
    "fuse_mabn": ".deploy.fuse",
    "register_mabn": ".integration.patch",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mabn_d2' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


# Where detectron2 is installed, importing mabn_d2 (or any part of it) registers "MABN" in it.
if importlib.util.find_spec("detectron2") is not None:
    from .integration.patch import register_mabn as _register_mabn

    _register_mabn()

__all__ = [
    "__version__",
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
