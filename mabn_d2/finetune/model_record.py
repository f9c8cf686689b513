"""What a checkpoint records about its model, so that loading it can check what a state dict
cannot show.

A state dict holds the same keys whether the convs feeding MABN were trained with centralized
weights (``w - mean(w)``) or plain ones (``MODEL.MABN.CENTRALIZE_WEIGHTS``,
``CENTRALIZE_EXCLUDE``): loaded into a model centralized otherwise, an MABN checkpoint used to
load without a word and predict something else. :class:`~mabn_d2.engine.atomic_checkpointer.
AtomicCheckpointer` saves :func:`model_record` with every checkpoint (entry
:data:`RECORD_KEY`): which convs are centralized, each normalization layer's kind, each MABN
layer's buffer size. :func:`check_model_record` refuses a load whose model differs in what
the record covers, naming the config keys; a checkpoint with MABN layers and no record (saved
before mabn_d2 wrote it) loads with a warning that this cannot be checked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..layer import MABN2d
from ..layer.centralization import CentralizesWeight
from .checkpoint import MABNCheckpointError

__all__ = ["RECORD_KEY", "model_record", "check_model_record", "recorded_norm_kinds"]

logger = logging.getLogger(__name__)

RECORD_KEY = "mabn_d2_model"
_VERSION = 1
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_MABN_KIND = MABN2d.__name__
_CENTRALIZE_KEYS = ("MODEL.MABN.CENTRALIZE_WEIGHTS and MODEL.MABN.CENTRALIZE_EXCLUDE (in a "
                    "LazyConfig: centralize_weights of the MABN settings nodes)")
_NORM_KEYS = ("the parts' NORM keys (MODEL.RESNETS.NORM, MODEL.FPN.NORM, "
              "MODEL.ROI_BOX_HEAD.NORM, MODEL.ROI_MASK_HEAD.NORM; norm/conv_norm in a LazyConfig)")


def _is_norm(module: nn.Module) -> bool:
    from detectron2.layers import FrozenBatchNorm2d

    return isinstance(module, (*_NORM_TYPES, MABN2d, FrozenBatchNorm2d))


def model_record(model: nn.Module) -> dict[str, Any]:
    """``{"version", "centralized": [conv names], "norms": {name: class name},
    "buffer_sizes": {MABN layer name: buffer_size}}`` of ``model``."""
    modules = dict(model.named_modules())
    return {
        "version": _VERSION,
        "centralized": sorted(n for n, m in modules.items() if isinstance(m, CentralizesWeight)),
        "norms": {n: type(m).__name__ for n, m in modules.items() if n and _is_norm(m)},
        "buffer_sizes": {n: m.buffer_size for n, m in modules.items() if isinstance(m, MABN2d)},
    }


def recorded_norm_kinds(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """``{module: norm class name}`` recorded in ``checkpoint`` ({} without a record)."""
    record = checkpoint.get(RECORD_KEY)
    return dict(record.get("norms", {})) if isinstance(record, Mapping) else {}


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")


def check_model_record(model: nn.Module, record: Any, state: Mapping[str, Any]) -> None:
    """Refuse loading a checkpoint (its ``record`` and model ``state``) into ``model`` where
    they differ in what the record covers.

    Raises:
        MABNCheckpointError: naming the convs or layers and the config keys to set.
    """
    has_mabn = any(k.endswith(".running_second_moment") for k in state)
    if not isinstance(record, Mapping):
        if has_mabn and any(isinstance(m, MABN2d) for m in model.modules()):
            logger.warning(
                "mabn_d2: the checkpoint has MABN layers but does not record which convs were "
                "trained with centralized weights (saved before mabn_d2 recorded it): whether "
                "%s match its training run cannot be checked; if they do not, the model "
                "computes something else.", _CENTRALIZE_KEYS)
        return
    modules = dict(model.named_modules())
    errors = []
    saved_norms: Mapping[str, str] = record.get("norms", {})
    kinds = [f"{name} ({saved} in the checkpoint, {type(modules[name]).__name__} in the model)"
             for name, saved in saved_norms.items()
             # BN -> MABN is the conversion of a BN checkpoint: allowed.
             if saved == _MABN_KIND and name in modules and _is_norm(modules[name])
             and not isinstance(modules[name], MABN2d)]
    if kinds:
        errors.append(f"{len(kinds)} normalization layers are MABN in the checkpoint but not "
                      f"in the model: {_shown(kinds)}. Set {_NORM_KEYS} as in the run that "
                      "saved it (its config.yaml).")
    saved_centralized = set(record.get("centralized", []))
    model_centralized = {n for n, m in modules.items() if isinstance(m, CentralizesWeight)}
    # Plain convs trained with BN and centralized now are the fine-tuning of a BN checkpoint
    # (warned about where it is loaded); only convs that fed MABN in the checkpoint count.
    fed_mabn = {n for n in modules if saved_norms.get(f"{n}.norm") == _MABN_KIND}
    were = sorted((saved_centralized - model_centralized) & set(modules))
    were_not = sorted((model_centralized - saved_centralized) & fed_mabn)
    if were or were_not:
        parts = []
        if were:
            parts.append(f"{len(were)} convs were trained with centralized weights but run "
                         f"plain in this model ({_shown(were)})")
        if were_not:
            parts.append(f"{len(were_not)} convs were trained plain but are centralized in "
                         f"this model ({_shown(were_not)})")
        errors.append("; ".join(parts) + f": it would compute something else. Set "
                      f"{_CENTRALIZE_KEYS} as in the run that saved it (its config.yaml).")
    if errors:
        raise MABNCheckpointError("The checkpoint does not fit this model:\n  "
                                  + "\n  ".join(errors))
