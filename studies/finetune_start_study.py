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

    DETECTRON2_DATASETS=../shared/data/coco_mini \
        python studies/finetune_start_study.py --pretrain-iters 300 --iters 30

The small model, the coco_mini batches and the Caffe2-style checkpoint writer below are also
what the fine-tuning tests use.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from mabn_d2 import add_mabn_config
from mabn_d2.engine.atomic_checkpointer import AtomicCheckpointer
from mabn_d2.file_io import atomic_write
from mabn_d2.finetune.calibration import (
    calibrate_mabn,
    calibrate_mabn_backward,
    layers_to_calibrate,
)

REPO = Path(__file__).resolve().parents[1]

NORM_KEYS = ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")


def small_rcnn_cfg(norm: str = "MABN", backbone_norm: str | None = None, **mabn) -> CfgNode:
    """Mask R-CNN R-18-FPN, narrow heads, ~160 px images of coco_2017_train (coco_mini);
    ``norm`` everywhere (``backbone_norm`` for the ResNet if given)."""
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(str(REPO / "configs/Base-RCNN-FPN.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.MASK_ON", "True", "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_CONV", "2",
        "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.NUM_CONV", "2",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
        "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "224",
        "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "224", "INPUT.RANDOM_FLIP", "none",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
    ])
    for key in NORM_KEYS:
        cfg.MODEL[key].NORM = norm
    if backbone_norm is not None:
        cfg.MODEL.RESNETS.NORM = backbone_norm
    for key, value in mabn.items():
        if isinstance(value, dict):  # a sub-node, e.g. CALIBRATION={"BACKWARD": False}
            for sub_key, sub_value in value.items():
                setattr(cfg.MODEL.MABN[key], sub_key, sub_value)
        else:
            setattr(cfg.MODEL.MABN, key, value)
    return cfg


def coco_batches(cfg: CfgNode, num_batches: int, start: int = 0, per_batch: int = 2,
                 dataset: str = "coco_2017_train") -> list[list[dict]]:
    """Mapped training batches of coco_mini images with at least one non-crowd object,
    deterministic (no flip; fixed size), images ``start .. start + num_batches * per_batch``."""
    dicts = [d for d in DatasetCatalog.get(dataset)
             if any(not a.get("iscrowd", 0) for a in d["annotations"])]
    picked = dicts[start:start + num_batches * per_batch]
    assert len(picked) == num_batches * per_batch, "coco_mini has too few training images"
    mapper = DatasetMapper(cfg, is_train=True)
    mapped = [mapper(copy.deepcopy(d)) for d in picked]
    return [mapped[i:i + per_batch] for i in range(0, len(mapped), per_batch)]


def total_loss(model: nn.Module, batch: list[dict]) -> torch.Tensor:
    with EventStorage(0):
        return sum(model(batch).values())


def train_steps(model: nn.Module, batches: list[list[dict]], lr: float = 0.01) -> list[float]:
    """One SGD step per batch (training mode); the losses before each step."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for batch in batches:
        loss = total_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


_C2_BLOCK = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c",
             "shortcut": "branch1"}


def c2_name(d2_name: str) -> str:
    """detectron2 ResNet name -> Caffe2/Detectron name, the inverse of detectron2's
    ``convert_basic_c2_names`` for ResNets (``res2.0.conv1.norm.weight`` ->
    ``res2_0_branch2a_bn_s``)."""
    module, _, leaf = d2_name.rpartition(".")
    if module == "stem.conv1":
        return {"weight": "conv1_w"}[leaf]
    if module == "stem.conv1.norm":
        return {"weight": "res_conv1_bn_s", "bias": "res_conv1_bn_b"}[leaf]
    match = re.fullmatch(r"res(\d)\.(\d+)\.(conv\d|shortcut)(\.norm)?", module)
    assert match, d2_name
    stage, block, conv, norm = match.groups()
    base = f"res{stage}_{block}_{_C2_BLOCK[conv]}"
    if norm:
        return base + {"weight": "_bn_s", "bias": "_bn_b"}[leaf]
    return base + {"weight": "_w"}[leaf]


def write_c2_resnet_pkl(bottom_up: nn.Module, path: Path) -> None:
    """Save a detectron2 ResNet with BatchNorm as an MSRA ``R-*.pkl``-style Caffe2 file: BN
    folded into a frozen affine (``_bn_s``, ``_bn_b``, no statistics), numpy blobs with Caffe2
    names, an ImageNet classifier, ``{"blobs": ..., "__author__": ...}``."""
    state = bottom_up.state_dict()
    blobs = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        if module.endswith(".norm"):
            mean, var = state[f"{module}.running_mean"], state[f"{module}.running_var"]
            scale = state[f"{module}.weight"] / torch.sqrt(var + 1e-5)
            value = scale if leaf == "weight" else state[f"{module}.bias"] - scale * mean
        blobs[c2_name(key)] = value.detach().numpy().copy()
    blobs["fc1000_w"] = torch.randn(1000, 512).numpy()
    blobs["fc1000_b"] = torch.zeros(1000).numpy()
    data = {"blobs": blobs, "__author__": "mabn_d2 tests (MSRA R-50.pkl layout)"}
    atomic_write(str(path), lambda f: pickle.dump(data, f))



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


def main(argv: Sequence[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    for key in ("pretrain_iters", "iters", "calibration_batches", "last"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.last > args.iters:
        parser.error(f"--last ({args.last}) must be <= --iters ({args.iters})")
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
        # R-18.pkl first, each file atomically: a present coco_bn.pth (which makes a rerun
        # skip the pretraining) means both are complete, even after a kill.
        write_c2_resnet_pkl(bn.backbone.bottom_up, tmp / "R-18.pkl")
        AtomicCheckpointer(bn, str(tmp)).save("coco_bn")

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
