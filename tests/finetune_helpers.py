"""Small Mask R-CNN models on coco_mini for the fine-tuning tests, and a Caffe2-style writer."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import pickle
import re
from pathlib import Path

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.utils.events import EventStorage
from torch import nn

from mabn_d2 import add_mabn_config

NORM_KEYS = ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")


def small_rcnn_cfg(norm: str = "MABN", backbone_norm: str | None = None, **mabn) -> CfgNode:
    """Mask R-CNN R-18-FPN, narrow heads, ~160 px images of coco_2017_train (coco_mini);
    ``norm`` everywhere (``backbone_norm`` for the ResNet if given)."""
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(str(Path(__file__).resolve().parents[1] / "configs/Base-RCNN-FPN.yaml"))
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


def small_backbone_cfg(norm: str, **mabn) -> CfgNode:
    """A ResNet-18 backbone (``build_backbone``), 4 stages, ``norm`` in every block."""
    cfg = add_mabn_config(get_cfg())
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                         "MODEL.RESNETS.NORM", norm, "MODEL.BACKBONE.FREEZE_AT", "0",
                         "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"])
    for key, value in mabn.items():
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


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


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
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs, "__author__": "mabn_d2 tests (MSRA R-50.pkl layout)"}, f)


def set_bn_statistics(model: nn.Module, batches: list[list[dict]]) -> None:
    """Give every BatchNorm the cumulative statistics of ``batches`` (training forward with
    ``momentum=None``), as a converged BN model has."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            total_loss(model, batch)
    for bn in bns:
        bn.momentum = 0.1


def run_tool(*args: str) -> tuple[int, str]:
    """``tools/convert_checkpoint.py ARGS`` in this process: (exit code, stdout + stderr)."""
    path = Path(__file__).resolve().parents[1] / "tools/convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = tool.main(list(args))
    return code, out.getvalue()
