#!/usr/bin/env python
"""Convert the BatchNorm layers of a checkpoint file into MABN layers (the exact fold).

Reads any file detectron2's ``DetectionCheckpointer`` reads (detectron2 ``.pth``/``.pkl``,
Caffe2/Detectron ``.pkl`` such as the MSRA ``R-50.pkl``, torchvision-converted ``.pkl``, a
plain PyTorch state dict) and writes a ``.pth`` with only the model, in which every BN /
FrozenBN / SyncBN layer (and every Caffe2 frozen affine ``_bn_s``/``_bn_b``) is an MABN layer
computing the same eval function (see :mod:`mabn_d2.finetune.convert`). Loading a BN checkpoint into
an MABN model with ``MODEL.WEIGHTS`` does this on the fly; this tool is for keeping the
converted file, for PyTorch models outside detectron2, and for restarting the moving
averages of an MABN checkpoint (``--reset-moving-averages``, e.g. to fine-tune with another
``MODEL.MABN.BUFFER_SIZE``).

Examples::

    python tools/convert_checkpoint.py R-50.pkl R-50-mabn.pth
    python tools/convert_checkpoint.py resnet18.pth resnet18-mabn.pth --buffer-size 16
    python tools/convert_checkpoint.py mabn_run/model_final.pth restart.pth \
        --reset-moving-averages
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names
from torch import nn

from mabn_d2.file_io import atomic_write
from mabn_d2.finetune.checkpoint import SOURCES_KEY, MABNCheckpointError, check_finite
from mabn_d2.finetune.convert import (
    MOVING_AVERAGE_KEYS,
    SOURCE_BN_EPS,
    check_bn_eps,
    convert_bn_state_dict,
)
from mabn_d2.layer.settings import check_setting

_NORM_NAME = re.compile(r"(^|\.)(norm|bn\d*)$")


def read_checkpoint(path: str) -> dict:
    """What ``DetectionCheckpointer`` reads from ``path``: ``{"model": state, ...}``."""
    # detectron2's file reading (formats, Caffe2 detection, PathManager URLs); no model needed.
    return DetectionCheckpointer(nn.Module())._load_file(path)


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
    leaves: dict[str, set[str]] = {}
    for key in state:
        module, _, leaf = key.rpartition(".")
        leaves.setdefault(module, set()).add(leaf)
    found = []
    for module, names in leaves.items():
        if names != {"weight", "bias"}:
            continue
        if renamed_to_original is not None:
            if renamed_to_original[f"{module}.weight"].endswith("_bn_s"):
                found.append(module)
        elif all_norms and _NORM_NAME.search(module):
            found.append(module)
    return found


def convert_file(src: str, dst: str, *, buffer_size: int | None = None, eps: float = 1e-5,
                 bn_eps: float = SOURCE_BN_EPS, affine: bool = False,
                 reset_moving_averages: bool = False) -> dict[str, str]:
    """Convert ``src`` into ``dst`` (see the module docstring). Returns ``{module: source}``
    for the converted modules."""
    if not dst.endswith(".pth"):
        raise ValueError(f"the output must be a .pth file (read with torch.load), got {dst!r}")
    checkpoint = read_checkpoint(src)
    state = _as_tensors(checkpoint["model"])
    heuristics = bool(checkpoint.get("matching_heuristics", False))
    renamed_to_original = None
    if checkpoint.get("__author__") == "Caffe2":
        state, renamed_to_original = convert_c2_detectron_names(state)
    affine_modules = _affine_modules(state, renamed_to_original, affine)
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
    atomic_write(dst, lambda f: torch.save(data, f))  # an interrupted run leaves dst intact
    return sources


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="checkpoint to convert (.pth, .pkl, ...)")
    parser.add_argument("output", help="converted checkpoint (.pth)")
    parser.add_argument("--buffer-size", type=int, default=None,
                        help="also write zeroed MABN moving-average buffers of this size (for "
                             "a strict plain-PyTorch load_state_dict)")
    parser.add_argument("--eps", type=float, default=1e-5, help="the MABN layers' eps")
    parser.add_argument("--bn-eps", type=float, default=SOURCE_BN_EPS,
                        help="the source BN layers' eps")
    parser.add_argument("--affine", action="store_true",
                        help="fold norm/bn modules that have only weight and bias as frozen "
                             "affines (Caffe2 _bn_s/_bn_b blobs are recognized without it)")
    parser.add_argument("--reset-moving-averages", action="store_true",
                        help="drop the MABN layers' chi2_buffer, psi_buffer and "
                             "num_batches_tracked: fine-tuning restarts them (any buffer size)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # detectron2's renaming log
    try:
        if args.buffer_size is not None:
            check_setting("buffer_size", args.buffer_size, "--buffer-size")
        check_setting("eps", args.eps, "--eps")
        check_bn_eps(args.bn_eps, "--bn-eps")
    except ValueError as error:
        parser.error(str(error))
    try:
        sources = convert_file(args.input, args.output, buffer_size=args.buffer_size,
                               eps=args.eps, bn_eps=args.bn_eps, affine=args.affine,
                               reset_moving_averages=args.reset_moving_averages)
    except (ValueError, OSError, MABNCheckpointError) as error:
        print(f"convert_checkpoint: {error}", file=sys.stderr)
        return 1
    counts = {s: sum(1 for v in sources.values() if v == s) for s in sorted(set(sources.values()))}
    print(f"wrote {args.output}: {len(sources)} norm layers converted to MABN {counts}")
    if counts.get("affine"):
        print(f"{counts['affine']} layers had no statistics: they are calibrated before "
              "fine-tuning (MODEL.MABN.CALIBRATION.MODE auto)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
