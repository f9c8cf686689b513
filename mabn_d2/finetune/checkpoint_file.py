"""A checkpoint file's BN layers folded into MABN layers, written to a new file (what
``tools/convert_checkpoint.py`` does).

Reads any file detectron2's ``DetectionCheckpointer`` reads (detectron2 ``.pth``/``.pkl``,
Caffe2/Detectron ``.pkl`` such as the MSRA ``R-50.pkl``, torchvision-converted ``.pkl``, a
plain PyTorch state dict) and writes a ``.pth`` with only the model, in which every BN /
FrozenBN / SyncBN layer (and every Caffe2 frozen affine ``_bn_s``/``_bn_b``) is an MABN layer
computing the same eval function (:func:`mabn_d2.finetune.convert.convert_bn_state_dict`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names

from ..cli import UserError
from ..detectron2_compat import read_checkpoint as read_any_checkpoint
from ..file_io import atomic_write, check_weights_file
from .checkpoint import SOURCES_KEY, CheckpointReadError, check_finite
from .convert import (
    MOVING_AVERAGE_KEYS,
    SOURCE_BN_EPS,
    convert_bn_state_dict,
    group_by_module,
)
from .model_record import RECORD_KEY, recorded_norm_kinds

__all__ = ["convert_checkpoint_file",]

_NORM_NAME = re.compile(r"(^|\.)(norm|bn\d*)$")


def read_checkpoint(path: str, key: str = "input") -> dict:
    """What ``DetectionCheckpointer`` reads from ``path``: ``{"model": state, ...}``.

    Raises:
        UserError: the file (the value of ``key``) is missing, truncated or not a checkpoint.
    """
    check_weights_file(path, key)
    try:  # detectron2's file reading (formats, Caffe2 detection, PathManager URLs)
        return read_any_checkpoint(path)
    except Exception as error:  # torch/pickle: EOFError, UnpicklingError, RuntimeError, ...
        raise CheckpointReadError.unreadable(key, path, error) from error


def _as_tensors(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(f"{key}: not a tensor or array ({type(value).__name__})") \
                    from error
        out[key] = value
    return out


def _affine_modules(state: dict, renamed_to_original: dict[str, str] | None,
                    all_norms: bool) -> list[str]:
    """Modules with only ``weight`` and ``bias`` to fold as frozen affines: Caffe2 ``_bn_s``
    blobs, or (``all_norms``) every such module named ``norm``/``bn*``."""
    found = []
    for module, names in group_by_module(state).items():
        if names != {"weight", "bias"}:
            continue
        if renamed_to_original is not None:
            if renamed_to_original[f"{module}.weight"].endswith("_bn_s"):
                found.append(module)
        elif all_norms and _NORM_NAME.search(module):
            found.append(module)
    return found


def _refuse_recorded_non_affine(checkpoint: dict, affine_modules: list[str]) -> None:
    """``affine`` folds weight+bias modules as frozen affines; a checkpoint that records them
    as GroupNorm/LayerNorm (saved by mabn_d2's checkpointer) is refused: per-image statistics
    cannot be folded."""
    kinds = recorded_norm_kinds(checkpoint)
    wrong = [f"{m} ({kinds[m]})" for m in affine_modules
             if kinds.get(m) not in (None, "FrozenBatchNorm2d")]
    if wrong:
        shown = ", ".join(wrong[:4]) + (f", ... ({len(wrong) - 4} more)" if len(wrong) > 4
                                        else "")
        raise UserError(
            f"--affine: {len(wrong)} modules are recorded in the checkpoint as normalizations "
            f"with per-image statistics, not frozen affines: {shown}. They cannot be folded "
            "into MABN; train MABN for those parts from their initialization instead.")


def convert_checkpoint_file(src: str, dst: str, *, buffer_size: int | None = None,
                            eps: float = 1e-5, bn_eps: float = SOURCE_BN_EPS,
                            affine: bool = False, reset_moving_averages: bool = False
                            ) -> dict[str, str]:
    """Convert the checkpoint file ``src`` into ``dst`` (a ``.pth``; see the module docstring).

    Args:
        buffer_size: also write zeroed MABN moving-average buffers of this size.
        eps, bn_eps: the MABN layers' eps, the source BN layers' eps.
        affine: fold ``norm``/``bn*`` modules with only ``weight`` and ``bias`` as frozen
            affines (Caffe2 ``_bn_s``/``_bn_b`` blobs are recognized without it).
        reset_moving_averages: drop MABN layers' ``chi2_buffer``, ``psi_buffer`` and
            ``num_batches_tracked`` (fine-tuning restarts them).

    Returns:
        ``{module: source}`` for the converted modules (``"bn"`` or ``"affine"``).

    Raises:
        ValueError: ``dst`` is not a ``.pth``, an entry is not a tensor, a layer cannot be
            folded; MABNCheckpointError: the result holds NaN or infinite values (nothing is
            written then).
    """
    if not dst.endswith(".pth"):
        raise UserError(f"the output must be a .pth file (read with torch.load), got {dst!r}")
    checkpoint = read_checkpoint(src)
    state = _as_tensors(checkpoint["model"])
    heuristics = bool(checkpoint.get("matching_heuristics", False))
    renamed_to_original = None
    if checkpoint.get("__author__") == "Caffe2":
        state, renamed_to_original = convert_c2_detectron_names(state)
    affine_modules = _affine_modules(state, renamed_to_original, affine)
    _refuse_recorded_non_affine(checkpoint, affine_modules)
    if reset_moving_averages:
        state = {k: v for k, v in state.items() if not (
            k.rpartition(".")[2] in MOVING_AVERAGE_KEYS
            and f"{k.rpartition('.')[0]}.running_second_moment" in state)}
    converted, sources = convert_bn_state_dict(
        state, affine_modules=affine_modules, bn_eps=bn_eps, mabn_eps=eps,
        buffer_size=buffer_size)
    check_finite(converted, "The conversion", "Nothing was written. The input has such values, "
                 "or a BN channel has running_var + --bn-eps = 0 (give the source layers' eps).")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    data = {"model": converted, "__author__": "mabn_d2 tools/convert_checkpoint.py",
            "matching_heuristics": heuristics, SOURCES_KEY: sources}
    if reset_moving_averages and RECORD_KEY in checkpoint:  # the same model: same record
        data[RECORD_KEY] = checkpoint[RECORD_KEY]
    atomic_write(dst, lambda f: torch.save(data, f))  # an interrupted run leaves dst intact
    return sources
