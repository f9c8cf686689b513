"""Faults MABN must survive: empty batches, non-finite batches, wrong input, low precision."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.roi_heads import build_box_head, build_mask_head

from mabn_d2 import MABN2d, add_mabn_config, fuse_mabn

SMALL = dict(buffer_size=4, warmup_iters=3, renorm_start_iter=5)


def state(layer: MABN2d) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items() if k not in ("weight", "bias")}


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def warmed_layer(steps: int = 8) -> MABN2d:
    torch.manual_seed(0)
    layer = MABN2d(4, **SMALL).train()
    for _ in range(steps):
        x = torch.randn(2, 4, 5, 5, requires_grad=True)
        layer(x).square().sum().backward()
    layer.weight.grad = layer.bias.grad = None
    return layer


# ---------------------------------------------------------------- empty batches


@pytest.mark.parametrize("shape", [(0, 4, 7, 7), (2, 4, 0, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_changes_nothing_and_has_no_nan(shape, training):
    layer = warmed_layer().train(training)
    before, iteration = state(layer), layer.iteration
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(layer.weight.grad, torch.zeros(4))
    assert torch.equal(layer.bias.grad, torch.zeros(4))
    assert layer.iteration == iteration
    assert_state_equal(state(layer), before)


def mabn_heads_cfg():
    cfg = add_mabn_config(get_cfg())
    cfg.merge_from_list(["MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
                         "MODEL.ROI_BOX_HEAD.NUM_CONV", "2", "MODEL.ROI_BOX_HEAD.NUM_FC", "1",
                         "MODEL.ROI_BOX_HEAD.NORM", "MABN",
                         "MODEL.ROI_MASK_HEAD.NORM", "MABN", "MODEL.ROI_MASK_HEAD.NUM_CONV", "2"])
    return cfg


def test_box_and_mask_heads_with_zero_rois():
    cfg = mabn_heads_cfg()
    box_head = build_box_head(cfg, ShapeSpec(channels=16, height=7, width=7)).train()
    mask_head = build_mask_head(cfg, ShapeSpec(channels=16, height=14, width=14)).train()
    box_features = torch.zeros(0, 16, 7, 7, requires_grad=True)
    out = box_head(box_features)
    assert out.shape == (0, cfg.MODEL.ROI_BOX_HEAD.FC_DIM)
    out.sum().backward()
    mask_features = torch.zeros(0, 16, 14, 14, requires_grad=True)
    masks = mask_head.layers(mask_features)
    assert masks.shape[0] == 0
    masks.sum().backward()
    for head in (box_head, mask_head):
        norms = [m for m in head.modules() if isinstance(m, MABN2d)]
        assert norms and all(m.iteration == 0 for m in norms)
        for name, param in head.named_parameters():  # every parameter: an exact zero gradient
            assert param.grad is not None and torch.equal(param.grad, torch.zeros_like(param)), \
                name


# ---------------------------------------------------------------- non-finite batches


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_leaves_statistics_untouched(bad, caplog):
    layer = warmed_layer()
    layer.name = "backbone.res2.0.conv1.norm"
    before = state(layer)
    twin = copy.deepcopy(layer)  # will skip the bad batch
    x = torch.randn(2, 4, 5, 5)
    x[1, 2, 3, 3] = bad
    x.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="mabn_d2"):
        y = layer(x)
    assert "backbone.res2.0.conv1.norm" in caplog.text and "non-finite" in caplog.text
    y.sum().backward()
    after = state(layer)
    assert layer.iteration == 9  # the schedule advances; the statistics do not
    for key in ("running_second_moment", "chi2_buffer", "psi_buffer"):
        assert torch.equal(after[key], before[key]), key
    # The next finite batch trains exactly as if the bad one had been skipped (the schedule
    # one step further).
    twin.iteration += 1
    x = torch.randn(2, 4, 5, 5)
    results = []
    for net in (layer, twin):
        net.weight.grad = net.bias.grad = None
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        out.square().sum().backward()
        results.append([out, xi.grad, net.weight.grad, net.bias.grad, *state(net).values()])
    for got, want in zip(*results):
        assert torch.isfinite(want).all() and torch.equal(got, want)


def test_non_finite_gradient_leaves_psi_buffer_untouched():
    layer = warmed_layer()
    before = state(layer)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y = layer(x)
    dy = torch.ones_like(y)
    dy[0, 1, 0, 0] = float("nan")
    y.backward(dy)
    after = state(layer)
    assert torch.equal(after["psi_buffer"], before["psi_buffer"])
    assert not torch.equal(after["chi2_buffer"], before["chi2_buffer"])  # forward was fine


# ---------------------------------------------------------------- wrong input


def test_wrong_input_errors_name_the_layer_and_expected_shape():
    cfg = add_mabn_config(get_cfg())
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                         "MODEL.RESNETS.NORM", "MABN"])
    backbone = build_backbone(cfg)
    norm = backbone.stem.conv1.norm
    with pytest.raises(ValueError, match=r"'stem.conv1.norm'.*\(N, 64, H, W\)"):
        norm(torch.randn(2, 32, 8, 8))
    with pytest.raises(ValueError, match=r"4-D input \(N, 64, H, W\)"):
        norm(torch.randn(2, 64, 8))
    with pytest.raises(TypeError, match=r"floating-point input \(N, 64, H, W\).*int64"):
        norm(torch.ones(2, 64, 8, 8, dtype=torch.long))


# ---------------------------------------------------------------- low precision


def test_bfloat16_autocast_training_keeps_float32_finite_statistics():
    cfg = add_mabn_config(get_cfg())
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                         "MODEL.RESNETS.NORM", "MABN", "MODEL.BACKBONE.FREEZE_AT", "0",
                         "MODEL.MABN.WARMUP_ITERS", "2", "MODEL.MABN.BUFFER_SIZE", "2",
                         "MODEL.MABN.RENORM_START_ITER", "3"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg).train()
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = backbone(torch.randn(2, 3, 64, 64))
            loss = sum(f.float().square().mean() for f in features.values())
        loss.backward()
    norms = [m for m in backbone.modules() if isinstance(m, MABN2d)]
    assert norms
    for m in norms:
        assert m.iteration == 5
        for buf in (m.running_second_moment, m.chi2_buffer, m.psi_buffer):
            assert buf.dtype == torch.float32 and torch.isfinite(buf).all()
        assert m.psi_buffer.abs().sum() > 0


def test_fused_heads_with_zero_rois():
    cfg = mabn_heads_cfg()
    box_head = build_box_head(cfg, ShapeSpec(channels=16, height=7, width=7)).eval()
    mask_head = build_mask_head(cfg, ShapeSpec(channels=16, height=14, width=14)).eval()
    fused_box, fused_mask = fuse_mabn(box_head), fuse_mabn(mask_head)
    for fused in (fused_box, fused_mask):
        assert not any(isinstance(m, MABN2d) for m in fused.modules())
    boxes = fused_box(torch.zeros(0, 16, 7, 7))
    masks = fused_mask.layers(torch.zeros(0, 16, 14, 14))
    assert boxes.shape == (0, cfg.MODEL.ROI_BOX_HEAD.FC_DIM) and masks.shape[0] == 0
    x = torch.randn(3, 16, 7, 7)
    torch.testing.assert_close(fused_box(x), box_head(x))
