#!/usr/bin/env python
"""How well does MABN fine-tuning start from a BN checkpoint? (docs/finetuning.md's numbers)

On the CPU with coco_mini: a small Mask R-CNN R-18-FPN with BatchNorm is "pretrained" on
coco_2017_val (the model zoo's part), then an MABN model (MABN in the ResNet, FPN, box and
mask heads, as in the paper) is fine-tuned on coco_2017_train, all runs with the same seed
and batches, from:

* ``coco``: the whole BN detector (``.pth``; exact fold, every layer pretrained), and
* ``imagenet``: the BN ResNet only, as an MSRA ``R-50.pkl``-style Caffe2 file (frozen
  affine without statistics: calibrated before training unless said otherwise); FPN and
  heads new,

with weight centralization on all MABN-fed convs, on none, or on all but the pretrained
part (``MODEL.MABN.CENTRALIZE_EXCLUDE``), and from scratch. Prints the first-iteration loss
and the mean loss of the last iterations of each run, and the BN model's own loss.

    python tools/finetune_start_study.py --pretrain-iters 300 --iters 30
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The small model, the coco_mini batches and the Caffe2 writer of the tests.
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("DETECTRON2_DATASETS", str(REPO.parent / "shared/data/coco_mini"))

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from finetune_helpers import (  # noqa: E402
    coco_batches,
    small_rcnn_cfg,
    total_loss,
    train_steps,
    write_c2_resnet_pkl,
)

from mabn_d2.calibration import (  # noqa: E402
    calibrate_mabn,
    calibrate_mabn_backward,
    layers_to_calibrate,
)


def finetune(cfg, weights: str | None, batches: list, calibration: list, mode: str, seed: int
             ) -> list[float]:
    torch.manual_seed(seed)
    model = build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    model.train()
    layers = layers_to_calibrate(model, mode)
    if layers:
        calibrate_mabn(model, calibration, len(calibration), layers=layers)
        if cfg.MODEL.MABN.CALIBRATION.BACKWARD:
            calibrate_mabn_backward(model, calibration, len(calibration), layers=layers)
    torch.manual_seed(seed)
    return train_steps(model, batches, lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-iters", type=int, default=300)
    parser.add_argument("--iters", type=int, default=30, help="fine-tuning iterations")
    parser.add_argument("--calibration-batches", type=int, default=10)
    parser.add_argument("--last", type=int, default=10, help="iterations averaged at the end")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fine-tuning runs")
    parser.add_argument("--only", action="append", default=[],
                        help="run only the starts whose name contains this (repeatable)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mabn_ft_study"),
                        help="keeps the pretrained checkpoints: a rerun skips pretraining")
    args = parser.parse_args()
    start = time.time()
    bn_cfg = small_rcnn_cfg("BN")
    tmp = Path(args.workdir)
    tmp.mkdir(parents=True, exist_ok=True)
    bn = build_model(bn_cfg)
    if (tmp / "coco_bn.pth").is_file():
        DetectionCheckpointer(bn).load(str(tmp / "coco_bn.pth"))
        print(f"BN model pretrained earlier: {tmp / 'coco_bn.pth'}")
    else:
        pretrain = coco_batches(bn_cfg, 36, dataset="coco_2017_val")  # coco_mini: 79 images
        torch.manual_seed(0)
        bn = build_model(bn_cfg)
        losses = train_steps(bn, (pretrain * (args.pretrain_iters // len(pretrain) + 1))
                             [:args.pretrain_iters], lr=0.02)
        print(f"BN pretraining on coco_2017_val, {args.pretrain_iters} iterations: loss "
              f"{losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f} (mean of last 20), "
              f"{time.time() - start:.0f} s", flush=True)
        DetectionCheckpointer(bn, str(tmp)).save("coco_bn")
        write_c2_resnet_pkl(bn.backbone.bottom_up, tmp / "R-18.pkl")

    batches = coco_batches(bn_cfg, args.iters + args.calibration_batches)
    calibration, batches = batches[:args.calibration_batches], batches[args.calibration_batches:]
    torch.manual_seed(1)
    bn_loss = total_loss(copy.deepcopy(bn).train(), batches[0]).item()
    print(f"BN model, training mode, on the first fine-tuning batch: {bn_loss:.3f}", flush=True)

    none = {"CENTRALIZE_WEIGHTS": False}
    new_only = {"CENTRALIZE_EXCLUDE": ["backbone.bottom_up"]}
    # Calibrated layers continue in the schedule's last phase (moving averages with renorm);
    # RENORM_CLIP 1 keeps r = 1: the moving averages alone.
    no_renorm = {"RENORM_CLIP": 1.0}
    runs = [  # name, weights, MODEL.MABN, MODEL.MABN.CALIBRATION.MODE, norm
        ("MABN from scratch (paper's settings)", None, {}, "never", "MABN"),
        ("BN (batch 2), coco checkpoint", "coco_bn.pth", {}, "never", "BN"),
        # Every MABN-fed conv is pretrained here: "new parts only" is "none".
        ("coco, centralize none", "coco_bn.pth", none, "auto", "MABN"),
        ("coco, centralize none, calibrated", "coco_bn.pth", none, "always", "MABN"),
        ("coco, centralize all", "coco_bn.pth", {}, "auto", "MABN"),
        ("coco, centralize all, calibrated", "coco_bn.pth", {}, "always", "MABN"),
        ("imagenet, centralize new parts only", "R-18.pkl", new_only, "auto", "MABN"),
        ("imagenet, centralize new parts only, calibrated without renorm", "R-18.pkl",
         {**new_only, **no_renorm}, "auto", "MABN"),
        ("imagenet, centralize new parts only, forward calibration only", "R-18.pkl",
         {**new_only, "CALIBRATION": {"BACKWARD": False}}, "auto", "MABN"),
        ("imagenet, centralize all", "R-18.pkl", {}, "auto", "MABN"),
        ("imagenet, centralize none", "R-18.pkl", none, "auto", "MABN"),
        ("imagenet, centralize new parts only, not calibrated", "R-18.pkl", new_only, "never",
         "MABN"),
    ]
    print(f"\n| start | first-iteration loss | mean loss of iterations "
          f"{args.iters - args.last + 1}-{args.iters} |\n|---|---|---|")
    for name, weights, mabn, mode, norm in runs:
        if args.only and not any(part in name for part in args.only):
            continue
        cfg = small_rcnn_cfg(norm, **mabn)
        losses = finetune(cfg, str(tmp / weights) if weights else None, batches, calibration,
                          mode, seed=args.seed)
        print(f"| {name} | {losses[0]:.3f} | {sum(losses[-args.last:]) / args.last:.3f} |",
              flush=True)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
