"""Every config in configs/ loads with mabn_d2's cfg, builds on the CPU with the norms it
names, and says in its header what it reproduces and which numbers to expect."""

from __future__ import annotations

import pytest
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from mabn_d2 import MABN2d
from mabn_d2.engine import get_mabn_cfg

from helpers import CONFIGS

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
LEAF_CONFIGS = [p for p in ALL_CONFIGS if not p.name.startswith("Base-")]
NORM_TYPES = {
    "MABN": MABN2d,
    "BN": nn.BatchNorm2d,
    "SyncBN": nn.SyncBatchNorm,
    "GN": nn.GroupNorm,
    "FrozenBN": FrozenBatchNorm2d,
    "": type(None),
}


def config_id(path) -> str:
    return str(path.relative_to(CONFIGS))


def load(path):
    cfg = get_mabn_cfg()
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""  # no download
    return cfg


def test_the_paper_configs_are_all_there():
    names = {p.name for p in ALL_CONFIGS}
    for norm in ("mabn", "bn", "syncbn", "gn"):
        assert f"mask_rcnn_R_50_FPN_2x_{norm}_scratch.yaml" in names
    for norm in ("mabn", "bn", "syncbn", "frozenbn"):
        assert f"mask_rcnn_R_50_FPN_2x_{norm}_finetune.yaml" in names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=config_id)
def test_config_builds_on_cpu_with_its_norms(path):
    cfg = load(path)
    model = build_model(cfg)
    # res3 is never frozen (FREEZE_AT <= 2), so its norm is exactly RESNETS.NORM's.
    parts = {
        "RESNETS": model.backbone.bottom_up.res3[0].conv1.norm,
        "FPN": model.backbone.fpn_lateral3.norm,
    }
    if cfg.MODEL.ROI_BOX_HEAD.NUM_CONV:
        parts["ROI_BOX_HEAD"] = model.roi_heads.box_head.conv1.norm
    if cfg.MODEL.MASK_ON:
        parts["ROI_MASK_HEAD"] = model.roi_heads.mask_head.mask_fcn1.norm
    for key, norm in parts.items():
        assert type(norm) is NORM_TYPES[cfg.MODEL[key].NORM], (key, cfg.MODEL[key].NORM, norm)
    if any(isinstance(m, MABN2d) for m in model.modules()):
        settings = cfg.MODEL.MABN
        layer = next(m for m in model.modules() if isinstance(m, MABN2d))
        assert (layer.momentum, layer.buffer_size, layer.warmup_iters) == (
            settings.MOMENTUM, settings.BUFFER_SIZE, settings.WARMUP_ITERS)


def header(path) -> str:
    """The leading comment block of a config, as one line of words."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#"))
    return " ".join(" ".join(lines).split())


def _norms(cfg) -> set[str]:
    return {cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM,
            cfg.MODEL.ROI_MASK_HEAD.NORM}


MSRA_R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
# What a header may say about its config, and what the config must then hold.
HEADER_CLAIMS = {
    "2x schedule": lambda cfg: (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (
        180000, (120000, 160000)),
    "2 images per GPU on 8 GPUs": lambda cfg: cfg.SOLVER.IMS_PER_BATCH == 16,
    "all 16 images of the 8 GPUs": lambda cfg: cfg.SOLVER.IMS_PER_BATCH == 16
    and _norms(cfg) == {"SyncBN"},
    "from scratch": lambda cfg: cfg.MODEL.WEIGHTS == "",
    "MSRA ImageNet R-50": lambda cfg: cfg.MODEL.WEIGHTS == MSRA_R50,
    "detectron2's MSRA R-50": lambda cfg: cfg.MODEL.WEIGHTS == MSRA_R50,
    "nothing frozen": lambda cfg: cfg.MODEL.BACKBONE.FREEZE_AT == 0,
    "every layer trained": lambda cfg: cfg.MODEL.BACKBONE.FREEZE_AT == 0,
    "stem and res2 frozen": lambda cfg: cfg.MODEL.BACKBONE.FREEZE_AT == 2,
    "no norm in the FPN and heads": lambda cfg: {
        cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.ROI_MASK_HEAD.NORM} == {""},
    "GroupNorm (32 groups) in the ResNet, FPN, box and mask heads": lambda cfg: _norms(cfg)
    == {"GN"},
    "plain per-GPU BN": lambda cfg: _norms(cfg) == {"BN"},
    "4conv-1fc box head": lambda cfg: (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV,
                                       cfg.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1),
    "R50-FPN": lambda cfg: cfg.MODEL.RESNETS.DEPTH == 50,
    "R-18-FPN": lambda cfg: cfg.MODEL.RESNETS.DEPTH == 18,
    "600 iterations of 4 images": lambda cfg: (cfg.SOLVER.MAX_ITER,
                                               cfg.SOLVER.IMS_PER_BATCH) == (600, 4),
    "BUFFER_SIZE 4 instead of 16": lambda cfg: cfg.MODEL.MABN.BUFFER_SIZE == 4,
    "buffer 16, warm-up 100, renorm from 1000, momentum 0.02": lambda cfg: (
        cfg.MODEL.MABN.BUFFER_SIZE, cfg.MODEL.MABN.WARMUP_ITERS,
        cfg.MODEL.MABN.RENORM_START_ITER, cfg.MODEL.MABN.MOMENTUM) == (16, 100, 1000, 0.02),
    "weight centralization on": lambda cfg: cfg.MODEL.MABN.CENTRALIZE_WEIGHTS is True,
    "seeds 0-9": lambda cfg: cfg.SEED == 0,
    "160-px images": lambda cfg: tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (160,),
    "2 images per batch": lambda cfg: cfg.SOLVER.IMS_PER_BATCH == 2,
    "COCO train2017": lambda cfg: cfg.DATASETS.TRAIN == ("coco_2017_train",),
    "procedural shapes": lambda cfg: cfg.DATASETS.TRAIN == ("mabn_demo_shapes_train",),
}


@pytest.mark.parametrize("path", LEAF_CONFIGS, ids=config_id)
def test_config_header_claims_hold(path):
    text = header(path)
    assert text.startswith("Reproduces:") and "Expected" in text, path.name
    cfg = get_mabn_cfg()
    cfg.merge_from_file(str(path))  # as written (load() clears MODEL.WEIGHTS)
    claims = [claim for claim in HEADER_CLAIMS if claim in text]
    assert claims, f"{path.name}: its header states nothing HEADER_CLAIMS can check"
    for claim in claims:
        assert HEADER_CLAIMS[claim](cfg), f"{path.name}: the header says '{claim}'"


def test_every_header_claim_is_made_somewhere():
    made = " ".join(header(p) for p in LEAF_CONFIGS)
    assert [claim for claim in HEADER_CLAIMS if claim not in made] == []


def test_paper_numbers_are_marked_as_the_papers():
    expected = {
        "mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml": "36.5 box AP / 32.7 mask AP",
        "mask_rcnn_R_50_FPN_2x_syncbn_scratch.yaml": "36.8 box AP / 33.1 mask AP",
        "mask_rcnn_R_50_FPN_2x_mabn_finetune.yaml": "38.4 box AP / 34.1 mask AP",
        "mask_rcnn_R_50_FPN_2x_syncbn_finetune.yaml": "38.3 box AP / 34.2 mask AP",
    }
    for name, numbers in expected.items():
        text = (CONFIGS / name).read_text()
        assert numbers in text and "the paper's numbers, not measured by mabn_d2" in text, name
