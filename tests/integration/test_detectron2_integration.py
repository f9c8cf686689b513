"""``"MABN"`` in detectron2: registration, config, Mask R-CNN R50-FPN build and training."""

from __future__ import annotations

import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from detectron2.data.datasets import load_coco_json
from detectron2.engine import DefaultPredictor, DefaultTrainer
from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage
from torch import nn

import mabn_d2
from mabn_d2 import CentralizedConv2d, MABN2d, add_mabn_config

from helpers import CONFIGS

R50_MABN_YAML = CONFIGS / "mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml"


def mabn_cfg(**mabn_overrides):
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(str(R50_MABN_YAML))
    cfg.MODEL.DEVICE = "cpu"
    for key, value in mabn_overrides.items():
        setattr(cfg.MODEL.MABN, key, value)
    return cfg


# ---------------------------------------------------------------- registration


def test_get_norm_mabn_and_other_names_unchanged():
    assert isinstance(get_norm("MABN", 16), MABN2d)
    assert type(get_norm("BN", 16)) is nn.BatchNorm2d
    assert type(get_norm("FrozenBN", 16)) is FrozenBatchNorm2d
    assert type(get_norm("SyncBN", 16)) is nn.SyncBatchNorm
    gn = get_norm("GN", 64)
    assert type(gn) is nn.GroupNorm and gn.num_groups == 32
    assert get_norm("", 16) is None and get_norm(None, 16) is None
    custom = get_norm(lambda c: nn.Identity(), 16)
    assert isinstance(custom, nn.Identity)


def test_every_detectron2_binding_of_get_norm_is_the_patched_one():
    from detectron2.layers import batch_norm
    from detectron2.modeling.backbone import fpn, resnet
    from detectron2.modeling.roi_heads import box_head, mask_head

    for module in (batch_norm, resnet, fpn, box_head, mask_head):
        assert module.get_norm is get_norm, module.__name__


def test_registration_is_idempotent():
    before = get_norm
    mabn_d2.register_mabn()
    mabn_d2.register_mabn()
    from detectron2.layers import get_norm as after

    assert after is before
    assert isinstance(after("MABN", 4), MABN2d)
    assert type(after("BN", 4)) is nn.BatchNorm2d


def test_unknown_norm_lists_valid_names():
    with pytest.raises(KeyError) as info:
        get_norm("MABM", 16)
    message = str(info.value)
    for name in ("MABN", "BN", "GN", "SyncBN", "FrozenBN"):
        assert name in message


def test_unknown_norm_in_cfg_fails_at_build():
    cfg = mabn_cfg()
    cfg.MODEL.FPN.NORM = "MABNN"
    with pytest.raises(KeyError, match="valid names"):
        build_model(cfg)


# ---------------------------------------------------------------- config


def test_add_mabn_config_defaults_and_idempotence():
    cfg = add_mabn_config(get_cfg())
    node = cfg.MODEL.MABN
    assert (node.EPS, node.MOMENTUM, node.BUFFER_SIZE, node.WARMUP_ITERS) == (1e-5, 0.02, 16, 100)
    assert (node.RENORM_START_ITER, node.RENORM_CLIP, node.CENTRALIZE_WEIGHTS) == (1000, 5.0, True)
    node.BUFFER_SIZE = 4
    add_mabn_config(cfg)
    assert cfg.MODEL.MABN.BUFFER_SIZE == 4


@pytest.mark.parametrize(
    "key, value",
    [("BUFFER_SIZE", 0), ("MOMENTUM", 0.0), ("MOMENTUM", 1.5), ("EPS", -1e-5),
     ("RENORM_CLIP", 0.5), ("WARMUP_ITERS", -1), ("BUFFER_SIZE", 2.5),
     ("CENTRALIZE_WEIGHTS", "yes"), ("SYNC", 1)],
)
def test_invalid_values_fail_at_build_naming_the_key(key, value):
    cfg = mabn_cfg(**{key: value})
    with pytest.raises(ValueError, match=f"MODEL.MABN.{key}"):
        build_model(cfg)


def test_mabn_keys_without_add_mabn_config_fail_at_merge():
    # yacs names the key: an AssertionError from merge_from_list, a KeyError from a file.
    with pytest.raises(AssertionError, match="MODEL.MABN.BUFFER_SIZE"):
        get_cfg().merge_from_list(["MODEL.MABN.BUFFER_SIZE", "8"])
    with pytest.raises(KeyError, match="MODEL.MABN"):
        get_cfg().merge_from_file(str(R50_MABN_YAML))


def small_backbone_cfg(**mabn):
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                         "MODEL.RESNETS.NORM", "MABN", "MODEL.BACKBONE.FREEZE_AT", "0"])
    for key, value in mabn.items():
        setattr(cfg.MODEL.MABN, key, value)
    return cfg


def test_two_builds_do_not_leak_settings():
    a = build_backbone(small_backbone_cfg(BUFFER_SIZE=4, MOMENTUM=0.1, CENTRALIZE_WEIGHTS=False))
    b = build_backbone(small_backbone_cfg(BUFFER_SIZE=32, WARMUP_ITERS=7, SYNC=True))
    plain = get_norm("MABN", 8)  # outside any build: the paper's defaults
    norms_a = [m for m in a.modules() if isinstance(m, MABN2d)]
    norms_b = [m for m in b.modules() if isinstance(m, MABN2d)]
    assert norms_a and norms_b
    assert all(m.buffer_size == 4 and m.momentum == 0.1 and not m.sync for m in norms_a)
    assert all(m.buffer_size == 32 and m.momentum == 0.02 and m.warmup_iters == 7 and m.sync
               for m in norms_b)
    assert not any(isinstance(m, CentralizedConv2d) for m in a.modules())
    assert any(isinstance(m, CentralizedConv2d) for m in b.modules())
    assert (plain.buffer_size, plain.momentum, plain.warmup_iters) == (16, 0.02, 100)


# ---------------------------------------------------------------- centralization


def test_centralized_conv_uses_centralized_weight_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    conv = Conv2d(3, 5, 3, padding=1, bias=False, norm=MABN2d(5, centralize_weights=False))
    assert type(conv) is Conv2d
    keys = list(conv.state_dict())
    assert mabn_d2.centralize_convs_feeding_mabn(conv) == [""]
    assert isinstance(conv, CentralizedConv2d) and list(conv.state_dict()) == keys
    conv.eval()
    x = torch.randn(2, 3, 6, 6)
    w = conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    expected = conv.norm(torch.nn.functional.conv2d(x, w, None, 1, 1))
    torch.testing.assert_close(conv(x), expected)
    plain = Conv2d(3, 5, 3, padding=1, bias=False, norm=MABN2d(5, centralize_weights=False))
    plain.load_state_dict(conv.state_dict())  # loads both ways
    conv.load_state_dict(plain.state_dict())


# ---------------------------------------------------------------- Mask R-CNN R50-FPN


def check_mabn_model(model, cfg):
    mabn_layers = [m for m in model.modules() if isinstance(m, MABN2d)]
    other_norms = [m for m in model.modules()
                   if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm))]
    assert not other_norms
    # ResNet-50 (stem 1 + 16 blocks x 3 + 4 shortcuts) + FPN (4 lateral + 4 output)
    # + box head (4 convs) + mask head (4 convs).
    assert len(mabn_layers) == 53 + 8 + 4 + 4
    node = cfg.MODEL.MABN
    for m in mabn_layers:
        assert (m.eps, m.momentum, m.buffer_size, m.warmup_iters, m.renorm_start_iter,
                m.renorm_clip) == (node.EPS, node.MOMENTUM, node.BUFFER_SIZE,
                                   node.WARMUP_ITERS, node.RENORM_START_ITER, node.RENORM_CLIP)
    feeding = [m for m in model.modules() if isinstance(getattr(m, "norm", None), MABN2d)]
    assert len(feeding) == len(mabn_layers)
    assert all(isinstance(conv, CentralizedConv2d) for conv in feeding)
    parts = {"backbone.bottom_up.stem", "backbone.bottom_up.res2", "backbone.bottom_up.res5",
             "backbone.fpn_lateral2", "backbone.fpn_output5", "roi_heads.box_head.conv4",
             "roi_heads.mask_head.mask_fcn4"}
    named = {name for name, m in model.named_modules() if isinstance(m, MABN2d)}
    for part in parts:
        assert any(name.startswith(part) for name in named), part


def test_r50_fpn_from_yaml_every_norm_is_mabn_with_cfg_settings():
    cfg = mabn_cfg(BUFFER_SIZE=8, MOMENTUM=0.05, WARMUP_ITERS=20, RENORM_START_ITER=300,
                   RENORM_CLIP=3.0, EPS=1e-4)
    check_mabn_model(build_model(cfg), cfg)


def test_default_trainer_and_predictor_build_mabn_models():
    cfg = mabn_cfg(BUFFER_SIZE=4)
    check_mabn_model(DefaultTrainer.build_model(cfg), cfg)
    predictor = DefaultPredictor(cfg)
    check_mabn_model(predictor.model, cfg)


def real_batch(coco_mini, cfg, n=2):
    root = coco_mini / "coco"
    dicts = load_coco_json(str(root / "annotations/instances_train2017.json"),
                           str(root / "train2017"), "coco_2017_train")
    dicts = [d for d in dicts if any(not a.get("iscrowd", 0) for a in d["annotations"])][:n]
    mapper = DatasetMapper(cfg, is_train=True)
    torch.manual_seed(0)
    return [mapper(copy.deepcopy(d)) for d in dicts]


@pytest.mark.e2e  # training steps of Mask R-CNN R50-FPN on real images
def test_r50_fpn_training_step_lowers_loss_on_real_images(coco_mini):
    cfg = mabn_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (256,)
    cfg.INPUT.MAX_SIZE_TRAIN = 384
    cfg.INPUT.RANDOM_FLIP = "none"
    # fewer proposals and RoIs than the paper's config: the same model, a quarter of the head work
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 500
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 128
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = real_batch(coco_mini, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for it in range(3):
        with EventStorage(it):
            loss = sum(model(batch).values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    mabn_layers = [m for m in model.modules() if isinstance(m, MABN2d)]
    backbone_norms = [m for m in model.backbone.modules() if isinstance(m, MABN2d)]
    assert all(m.iteration == 3 for m in backbone_norms)
    assert all(torch.isfinite(m.running_second_moment).all() for m in mabn_layers)
