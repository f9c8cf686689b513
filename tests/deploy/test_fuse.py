"""fuse_mabn: eval-mode MABN (and weight centralization) folded into the preceding convs."""

from __future__ import annotations

import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from mabn_d2 import CentralizedConv2d, MABN2d, add_mabn_config, fuse_mabn
from mabn_d2.deploy.trace import trace_for_deployment
from mabn_d2.integration.patch import import_tracing_adapter

from helpers import CONFIGS, SmallNet, relative_error


def randomize_mabn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial eval statistics and affine parameters in every MABN layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MABN2d):
                c = m.num_features
                m.running_second_moment.copy_(torch.rand(c, generator=g) * 3 + 0.2)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def trained_small_net() -> SmallNet:
    torch.manual_seed(0)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(30):  # real running statistics, moved weights
        loss = net(torch.randn(2, 3, 12, 12) * 2 + 0.5).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_fuse_small_model_matches_and_removes_every_mabn():
    net = trained_small_net()
    assert net.with_bias.norm.running_second_moment.sub(1).abs().max() > 0.05
    fused = fuse_mabn(net)
    assert fused is not net and any(isinstance(m, MABN2d) for m in net.modules())
    assert not any(isinstance(m, (MABN2d, CentralizedConv2d)) for m in fused.modules())
    for name in ("centralized", "with_bias", "grouped"):
        conv = getattr(fused, name)
        assert type(conv) is Conv2d and conv.norm is None and conv.bias is not None
    assert isinstance(fused.centralized.activation, nn.ReLU)
    assert isinstance(fused.plain_conv[1], FrozenBatchNorm2d)
    x = torch.randn(3, 3, 16, 20) * 3
    with torch.no_grad():
        assert relative_error(fused(x), net(x)) < 1e-5
        empty = fused(torch.zeros(0, 3, 16, 20))
    assert empty.shape == (0, 4, 16, 20)


def test_fuse_in_place_and_keeps_gradients_flowing():
    net = trained_small_net()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
    assert fuse_mabn(net, inplace=True) is net
    assert relative_error(net(x), expected) < 1e-5
    # The fused convs are ordinary trainable layers: their bias gradients are the loss's
    # derivatives (central differences, float64).
    net.double()
    x, probe = x.double(), torch.randn(2, 4, 8, 8, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (net(x) * probe).sum()

    net.zero_grad()  # the last training step's gradients
    loss().backward()
    h = 1e-6
    with torch.no_grad():
        for name in ("centralized", "with_bias", "grouped"):
            bias = getattr(net, name).bias
            for c in range(bias.numel()):
                bias[c] += h
                up = loss()
                bias[c] -= 2 * h
                down = loss()
                bias[c] += h
                numeric = float(up - down) / (2 * h)
                assert float(bias.grad[c]) == pytest.approx(numeric, rel=1e-5, abs=1e-6), name


def test_fuse_refuses_training_mode():
    net = trained_small_net().train()
    with pytest.raises(RuntimeError, match="training mode.*model.eval"):
        fuse_mabn(net)
    net.eval()
    net.grouped.norm.train()  # a single MABN layer left in training mode
    with pytest.raises(RuntimeError, match="grouped.norm"):
        fuse_mabn(net)


def mask_rcnn_cfg():
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 192
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # keep detections of a random model
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    return cfg


@pytest.fixture(scope="module")
def mask_rcnn():
    torch.manual_seed(0)
    model = build_model(mask_rcnn_cfg())
    randomize_mabn(model)
    return model.eval()


def mabn_components(model: nn.Module, image: torch.Tensor, dtype: torch.dtype):
    """Outputs of the parts of Mask R-CNN that hold MABN layers: backbone + FPN, the conv box
    head and the mask head (the latter two on fixed pooled features)."""
    g = torch.Generator().manual_seed(3)
    box_in = torch.randn(6, 256, 7, 7, generator=g).to(dtype)
    mask_in = torch.randn(3, 256, 14, 14, generator=g).to(dtype)
    with torch.no_grad():
        out = dict(model.backbone(model.preprocess_image([{"image": image.to(dtype)}]).tensor))
        out["box_head"] = model.roi_heads.box_head(box_in)
        out["mask_head"] = model.roi_heads.mask_head.layers(mask_in)
    return out


def test_fuse_mask_rcnn_r50_fpn(mask_rcnn):
    image = torch.rand(3, 128, 160) * 255
    n_mabn = sum(isinstance(m, MABN2d) for m in mask_rcnn.modules())
    assert n_mabn > 60
    # float64: the folding itself is exact up to float64 rounding.
    model64 = copy.deepcopy(mask_rcnn).double()
    fused64 = fuse_mabn(model64)
    assert not any(isinstance(m, (MABN2d, CentralizedConv2d, FrozenBatchNorm2d))
                   for m in fused64.modules())
    ref = mabn_components(model64, image, torch.float64)
    got = mabn_components(fused64, image, torch.float64)
    assert ref.keys() == got.keys() and {"p2", "p6", "box_head", "mask_head"} <= ref.keys()
    for key in ref:
        assert relative_error(got[key], ref[key]) < 1e-10, key
    # float32: the fused model is as close to the exact result as the unfused one (a deep
    # random-weight network amplifies float32 rounding to ~1e-4 in both).
    fused32 = fuse_mabn(mask_rcnn)
    unfused = mabn_components(mask_rcnn, image, torch.float32)
    fused = mabn_components(fused32, image, torch.float32)
    for key in ref:
        assert (relative_error(fused[key], ref[key])
                <= 1.5 * relative_error(unfused[key], ref[key]) + 1e-6), key
    with torch.no_grad():  # end to end, including an image batch with no detections
        outputs = fused32([{"image": image}, {"image": torch.zeros(3, 128, 160)}])
    assert len(outputs) == 2 and len(outputs[0]["instances"]) == 10


def test_fused_mask_rcnn_traces_with_detectron2_export(mask_rcnn):
    tracing_adapter = import_tracing_adapter()
    assert import_tracing_adapter() is tracing_adapter  # idempotent
    fused = fuse_mabn(mask_rcnn)

    def inference(model, image):
        # As detectron2's own export tests: everything up to the (data-dependent) mask pasting.
        return model.inference([{"image": image}], do_postprocess=False)[0]

    images = [torch.rand(3, 128, 160) * 255 for _ in range(2)]
    adapter = tracing_adapter(fused, images[0], inference)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        for image in images:  # the second image was not seen while tracing
            mine = adapter.outputs_schema(traced(image))
            theirs = inference(fused, image)
            assert len(mine) == len(theirs) == 10
            torch.testing.assert_close(mine.pred_boxes.tensor, theirs.pred_boxes.tensor)
            torch.testing.assert_close(mine.scores, theirs.scores)
            torch.testing.assert_close(mine.pred_masks, theirs.pred_masks)


def test_trace_for_deployment_matches_the_eager_model(mask_rcnn):
    fused = fuse_mabn(mask_rcnn)
    images = [torch.rand(3, 128, 160) * 255, torch.rand(3, 112, 176) * 255]
    deployed = trace_for_deployment(fused, images[0])  # frozen + optimize_for_inference
    graph = str(deployed.module.inlined_graph)
    assert "batch_norm" not in graph and "group_norm" not in graph
    for image in images:  # the second one (another size) was not seen while tracing
        mine = deployed(image)
        with torch.no_grad():
            theirs = fused.inference([{"image": image}], do_postprocess=False)[0]
        assert len(mine) == len(theirs) == 10
        torch.testing.assert_close(mine.pred_boxes.tensor, theirs.pred_boxes.tensor,
                                   rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(mine.scores, theirs.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.pred_masks, theirs.pred_masks, rtol=1e-4, atol=1e-4)


def test_trace_for_deployment_refuses_what_it_cannot_trace(mask_rcnn):
    image = torch.rand(3, 128, 160) * 255
    with pytest.raises(ValueError, match="eval-mode"):
        trace_for_deployment(copy.deepcopy(mask_rcnn).train(), image)
    with pytest.raises(TypeError, match="no inference"):
        trace_for_deployment(nn.Conv2d(3, 3, 1).eval(), image)
    deployed = trace_for_deployment(fuse_mabn(mask_rcnn), image, optimize=False)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        deployed(image[None])
