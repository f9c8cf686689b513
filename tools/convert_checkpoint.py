#!/usr/bin/env python
"""Convert the BatchNorm layers of a checkpoint file into MABN layers (the exact fold).

Reads any file detectron2's ``DetectionCheckpointer`` reads (detectron2 ``.pth``/``.pkl``,
Caffe2/Detectron ``.pkl`` such as the MSRA ``R-50.pkl``, torchvision-converted ``.pkl``, a
plain PyTorch state dict) and writes a ``.pth`` with only the model, in which every BN /
FrozenBN / SyncBN layer (and every Caffe2 frozen affine ``_bn_s``/``_bn_b``) is an MABN layer
computing the same eval function (:mod:`mabn_d2.finetune.checkpoint_file`). Loading a BN
checkpoint into an MABN model with ``MODEL.WEIGHTS`` does this on the fly; this tool is for
keeping the converted file, for PyTorch models outside detectron2, and for restarting the moving
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
import sys
from collections.abc import Sequence
from pathlib import Path

from mabn_d2.cli import UserError, run_tool, strip_debug_flag
from mabn_d2.finetune.checkpoint_file import convert_checkpoint_file
from mabn_d2.finetune.convert import SOURCE_BN_EPS, check_bn_eps
from mabn_d2.layer.settings import check_setting
from mabn_d2.validation import check_output_dir, check_weights_file


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a user error is one message and exit code 2 (``--debug`` or
    ``MABN_D2_DEBUG=1``: with the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_tool("convert_checkpoint.py", lambda: _run(strip_debug_flag(argv)), argv)


def _run(argv: Sequence[str]) -> int:
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
                             "affines (Caffe2 _bn_s/_bn_b blobs are recognized without it). "
                             "Exact only for frozen BN affines: a GroupNorm/LayerNorm has "
                             "the same entries and cannot be folded")
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
    check_weights_file(args.input, "input")
    check_output_dir(str(Path(args.output).parent), "the output's folder")
    try:
        sources = convert_checkpoint_file(
            args.input, args.output, buffer_size=args.buffer_size, eps=args.eps,
            bn_eps=args.bn_eps, affine=args.affine,
            reset_moving_averages=args.reset_moving_averages)
    except (ValueError, OSError) as error:  # MABNCheckpointError is a UserError already
        raise UserError(str(error)) from None
    counts = {s: sum(1 for v in sources.values() if v == s) for s in sorted(set(sources.values()))}
    print(f"wrote {args.output}: {len(sources)} norm layers converted to MABN {counts}")
    if counts.get("affine"):
        print(f"{counts['affine']} layers had no statistics: they are calibrated before "
              "fine-tuning (MODEL.MABN.CALIBRATION.MODE auto)")
        if args.affine:
            print("--affine: layers with only weight and bias were folded as frozen affines "
                  "(scale and shift). That is exact only if they were frozen BatchNorm "
                  "affines; if they were GroupNorm or LayerNorm (per-image statistics, the "
                  "same entries), the converted model computes something else: the fold is "
                  "NOT exact for them, and nothing in the file tells them apart.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
