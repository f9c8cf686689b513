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


@pytest.mark.parametrize("path", LEAF_CONFIGS, ids=config_id)
def test_config_header_says_what_it_reproduces_and_expects(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert "# Reproduces:" in text, f"{path.name}: no '# Reproduces:' in the header comment"
    assert "Expected" in text, f"{path.name}: no 'Expected' numbers in the header comment"


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
