"""MABN however detectron2 builds the model: YACS ``build_model``, LazyConfig ``instantiate``,
direct construction in Python, and ``DefaultPredictor`` give the same MABN layers, the same
centralized convs, the same settings per layer and the same outputs for the same weights.

Also: the LazyConfig demo's model equals the YAML demo's, the LazyConfig settings node reaches
every layer through command-line overrides and ``LazyConfig.save``, and excluding a part from
centralization gives the same convs in both config systems.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch
from torch import nn

from helpers import CONFIGS

# The settings the three builders are given: none is a default, so a builder that dropped
# them would be found out (by the layers' settings and by the outputs, which depend on them
# once the moving averages and renorm are on).
SETTINGS = {"momentum": 0.1, "buffer_size": 8, "warmup_iters": 3, "renorm_start_iter": 5,
            "renorm_clip": 3.0}
YAML_KEYS = {"momentum": "MOMENTUM", "buffer_size": "BUFFER_SIZE", "warmup_iters": "WARMUP_ITERS",
             "renorm_start_iter": "RENORM_START_ITER", "renorm_clip": "RENORM_CLIP"}
R50_YAML = CONFIGS / "mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml"
R50_LAZY = CONFIGS / "lazy" / "mask_rcnn_R_50_FPN_2x_mabn_scratch.py"
DEMO_YAML = CONFIGS / "demo" / "mask_rcnn_R_18_FPN_demo_mabn.yaml"
DEMO_LAZY = CONFIGS / "lazy" / "demo" / "mask_rcnn_R_18_FPN_demo_mabn.py"
HEIGHT, WIDTH = 128, 160
# Fewer proposals, sampled RoIs and detections than the paper's set-up (same in all three
# builders): the 4-conv heads on hundreds of RoIs would dominate the test's time.
POST_NMS_TOPK = (100, 50)  # (training, test)
ROIS_PER_IMAGE = 32
DETECTIONS = 10


def yaml_cfg(path, *opts):
    from mabn_d2.engine import get_mabn_cfg

    cfg = get_mabn_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def yaml_settings_opts() -> list[str]:
    return [item for name, value in SETTINGS.items()
            for item in (f"MODEL.MABN.{YAML_KEYS[name]}", str(value))]


def lazy_cfg(path, *overrides):
    from detectron2.config import LazyConfig

    return LazyConfig.apply_overrides(LazyConfig.load(str(path)), list(overrides))


def build_r50_directly(norm, post_nms_topk=(1000, 1000), rois_per_image=512,
                       test_score_thresh=0.05, test_topk_per_image=100) -> nn.Module:
    """Mask R-CNN R50-FPN with a 4conv-1fc box head, as a detectron2 user writes it in Python
    (the architecture of configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml)."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
    from detectron2.modeling.backbone import FPN, BasicStem, ResNet
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.matcher import Matcher
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
    from detectron2.modeling.roi_heads import (
        FastRCNNConvFCHead,
        FastRCNNOutputLayers,
        MaskRCNNConvUpsampleHead,
        StandardROIHeads,
    )

    levels = ["res2", "res3", "res4", "res5"]
    bottom_up = ResNet(
        BasicStem(3, 64, norm=norm),
        ResNet.make_default_stages(50, stride_in_1x1=False, norm=norm),
        out_features=levels,
        freeze_at=0,
    )
    backbone = FPN(bottom_up, levels, 256, norm=norm, top_block=LastLevelMaxPool())
    rpn = RPN(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=StandardRPNHead(in_channels=256, num_anchors=3),
        anchor_generator=DefaultAnchorGenerator(
            sizes=[[32], [64], [128], [256], [512]], aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64], offset=0.0),
        anchor_matcher=Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)),
        batch_size_per_image=256, positive_fraction=0.5, pre_nms_topk=(2000, 1000),
        post_nms_topk=post_nms_topk, nms_thresh=0.7,
    )
    features, scales = ["p2", "p3", "p4", "p5"], (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    roi_heads = StandardROIHeads(
        num_classes=80, batch_size_per_image=rois_per_image, positive_fraction=0.25,
        proposal_matcher=Matcher([0.5], [0, 1], allow_low_quality_matches=False),
        box_in_features=features,
        box_pooler=ROIPooler(7, scales, sampling_ratio=0, pooler_type="ROIAlignV2"),
        box_head=FastRCNNConvFCHead(ShapeSpec(channels=256, height=7, width=7),
                                    conv_dims=[256] * 4, fc_dims=[1024], conv_norm=norm),
        box_predictor=FastRCNNOutputLayers(
            ShapeSpec(channels=1024), box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
            num_classes=80, test_score_thresh=test_score_thresh,
            test_topk_per_image=test_topk_per_image),
        mask_in_features=features,
        mask_pooler=ROIPooler(14, scales, sampling_ratio=0, pooler_type="ROIAlignV2"),
        mask_head=MaskRCNNConvUpsampleHead(ShapeSpec(channels=256, width=14, height=14),
                                           num_classes=80, conv_dims=[256] * 5, conv_norm=norm),
    )
    return GeneralizedRCNN(
        backbone=backbone, proposal_generator=rpn, roi_heads=roi_heads,
        pixel_mean=[103.530, 116.280, 123.675], pixel_std=[57.375, 57.120, 58.395],
        input_format="BGR",
    )


def structure(model: nn.Module) -> dict[str, object]:
    """What must agree between builders: MABN layers with their settings, centralized and
    plain convs, and every module's type and parameter/buffer shapes."""
    from detectron2.layers import Conv2d

    from mabn_d2 import CentralizedConv2d, MABN2d, MABNSettings

    names = [f.name for f in fields(MABNSettings)]
    modules = dict(model.named_modules())
    return {
        "mabn": {n: {k: getattr(m, k) for k in names}
                 for n, m in modules.items() if isinstance(m, MABN2d)},
        "centralized": {n for n, m in modules.items() if type(m) is CentralizedConv2d},
        "plain_conv": {n for n, m in modules.items() if type(m) is Conv2d},
        "types": {n: type(m).__name__ for n, m in modules.items()},
        "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
    }


def warm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state with its MABN layers at step 10: moving averages and renorm on."""
    from mabn_d2 import MABN2d

    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, MABN2d):
            module.iteration = 10
            module.running_second_moment.copy_(0.5 + torch.rand(module.num_features, generator=g))
            module.chi2_buffer.copy_(0.5 + torch.rand(module.chi2_buffer.shape, generator=g))
            module.psi_buffer.copy_(0.01 * torch.randn(module.psi_buffer.shape, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items()}


def image_and_targets() -> tuple[np.ndarray, dict]:
    from detectron2.structures import Boxes, Instances, PolygonMasks

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)  # HWC, BGR
    instances = Instances((HEIGHT, WIDTH))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 30.0, 150.0, 120.0]]))
    instances.gt_classes = torch.tensor([3, 17])
    instances.gt_masks = PolygonMasks([[np.array([10, 12, 70, 12, 70, 90, 10, 90.0])],
                                       [np.array([60, 30, 150, 75, 60, 120.0])]])
    inputs = {"image": torch.as_tensor(image.transpose(2, 0, 1).astype("float32")),
              "height": HEIGHT, "width": WIDTH, "instances": instances}
    return image, inputs


def eval_outputs(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        instances = model([{k: v for k, v in inputs.items() if k != "instances"}])[0]["instances"]
    return instances_fields(instances)


def instances_fields(instances) -> dict[str, torch.Tensor]:
    return {"boxes": instances.pred_boxes.tensor, "scores": instances.scores,
            "classes": instances.pred_classes, "masks": instances.pred_masks.float()}


def train_step(model: nn.Module, inputs: dict) -> tuple[dict, dict]:
    """One training-mode forward + backward: (losses, gradients)."""
    from detectron2.utils.events import EventStorage

    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # RPN and RoI sampling
    with EventStorage():
        losses = model([inputs])
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_all_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5,
                                   msg=f"{what}: {key}")


@pytest.mark.e2e  # the paper's Mask R-CNN R50-FPN built and run four ways
def test_yacs_lazyconfig_direct_and_predictor_build_the_same_mask_rcnn(tmp_path):
    from detectron2.config import instantiate
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    from mabn_d2 import MABNSettings

    torch.manual_seed(0)
    cfg = yaml_cfg(
        R50_YAML, *yaml_settings_opts(), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "INPUT.MIN_SIZE_TEST", str(HEIGHT), "INPUT.MAX_SIZE_TEST", str(WIDTH),
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", str(POST_NMS_TOPK[0]),
        "MODEL.RPN.POST_NMS_TOPK_TEST", str(POST_NMS_TOPK[1]),
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", str(ROIS_PER_IMAGE),
        "TEST.DETECTIONS_PER_IMAGE", str(DETECTIONS),
    )
    lazy = lazy_cfg(
        R50_LAZY, *(f"mabn.{k}={v}" for k, v in SETTINGS.items()),
        "model.roi_heads.box_predictor.test_score_thresh=0.0",
        f"model.proposal_generator.post_nms_topk=[{POST_NMS_TOPK[0]},{POST_NMS_TOPK[1]}]",
        f"model.roi_heads.batch_size_per_image={ROIS_PER_IMAGE}",
        f"model.roi_heads.box_predictor.test_topk_per_image={DETECTIONS}",
    )
    models = {
        "yacs": build_model(cfg),
        "lazy": instantiate(lazy.model),
        "direct": build_r50_directly(
            MABNSettings(**SETTINGS), post_nms_topk=POST_NMS_TOPK, rois_per_image=ROIS_PER_IMAGE,
            test_score_thresh=0.0, test_topk_per_image=DETECTIONS),
    }
    expected = structure(models["yacs"])
    assert len(expected["mabn"]) == 69 and len(expected["centralized"]) == 69
    assert all(s == {**MABNSettings().layer_kwargs(), **SETTINGS}
               for s in expected["mabn"].values())
    for name in ("lazy", "direct"):
        assert structure(models[name]) == expected, name

    state = warm_state(models["yacs"])
    weights = tmp_path / "weights.pth"
    torch.save({"model": state}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    predictor = DefaultPredictor(cfg)
    assert structure(predictor.model) == expected

    image, inputs = image_and_targets()
    results = {}
    for name, model in models.items():
        model.load_state_dict(state)
        results[name] = (eval_outputs(model, inputs), *train_step(model, inputs),
                         model.state_dict())
    reference_eval, reference_losses, reference_grads, reference_state = results["yacs"]
    assert len(reference_eval["scores"]) > 0
    assert_all_close(instances_fields(predictor(image)["instances"]), reference_eval, "predictor")
    for name in ("lazy", "direct"):
        eval_out, losses, grads, new_state = results[name]
        assert_all_close(eval_out, reference_eval, f"{name} eval")
        assert_all_close(losses, reference_losses, f"{name} losses")
        assert_all_close(grads, reference_grads, f"{name} gradients")
        # running statistics and moving-average buffers after the step (momentum, buffer)
        assert_all_close(new_state, reference_state, f"{name} state after the step")


def test_mabn_settings_object_gives_the_structure_of_the_string():
    """detectron2's FPN has a bias where ``norm == ""`` and its heads where ``not conv_norm``:
    a settings object must count as a norm there, as the string does."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import FPN, BasicStem, ResNet
    from detectron2.modeling.roi_heads import FastRCNNConvFCHead, MaskRCNNConvUpsampleHead

    from mabn_d2 import MABNSettings

    def parts(norm):
        bottom_up = ResNet(BasicStem(3, 64, norm=norm),
                           ResNet.make_default_stages(18, norm=norm), out_features=["res5"])
        return nn.ModuleDict({
            "fpn": FPN(bottom_up, ["res5"], 32, norm=norm),
            "box": FastRCNNConvFCHead(ShapeSpec(channels=32, height=7, width=7),
                                      conv_dims=[32], fc_dims=[64], conv_norm=norm),
            "mask": MaskRCNNConvUpsampleHead(ShapeSpec(channels=32, width=14, height=14),
                                             num_classes=2, conv_dims=[32, 32], conv_norm=norm),
        })

    by_string, by_object = structure(parts("MABN")), structure(parts(MABNSettings()))
    assert by_object == by_string
    assert "fpn.fpn_lateral5.bias" not in by_string["shapes"]  # a normed conv has no bias
    assert "box.conv1.bias" not in by_string["shapes"]
    assert "mask.mask_fcn1.bias" not in by_string["shapes"]


def test_lazy_demo_model_equals_the_yaml_demo_model():
    from detectron2.config import instantiate
    from detectron2.modeling import build_model

    yaml = yaml_cfg(DEMO_YAML)
    lazy = lazy_cfg(DEMO_LAZY)
    torch.manual_seed(0)
    by_yaml = build_model(yaml)
    torch.manual_seed(0)
    by_lazy = instantiate(lazy.model)
    expected = structure(by_yaml)
    assert len(expected["mabn"]) == 36
    assert expected["centralized"] == {n.removesuffix(".norm") for n in expected["mabn"]}
    assert {s["buffer_size"] for s in expected["mabn"].values()} == {4}
    assert structure(by_lazy) == expected
    # built in the same order: the same initial weights from the same seed
    assert_all_close(by_lazy.state_dict(), by_yaml.state_dict(), "initial weights")
    # the schedule and data
    assert lazy.train.max_iter == yaml.SOLVER.MAX_ITER
    assert lazy.dataloader.train.total_batch_size == yaml.SOLVER.IMS_PER_BATCH
    assert lazy.optimizer.lr == yaml.SOLVER.BASE_LR
    assert lazy.dataloader.train.dataset.names == yaml.DATASETS.TRAIN[0]
    assert lazy.dataloader.test.dataset.names == yaml.DATASETS.TEST[0]
    assert lazy.train.seed == yaml.SEED
    scheduler = instantiate(lazy.lr_multiplier)
    step = yaml.SOLVER.STEPS[0]
    assert scheduler((step - 1) / yaml.SOLVER.MAX_ITER) == pytest.approx(1.0)
    assert scheduler(step / yaml.SOLVER.MAX_ITER) == pytest.approx(yaml.SOLVER.GAMMA)
    assert scheduler(0.0) == pytest.approx(yaml.SOLVER.WARMUP_FACTOR)


def test_lazy_settings_node_reaches_every_layer_through_overrides_and_save(tmp_path):
    from detectron2.config import LazyConfig, instantiate

    from mabn_d2 import MABN2d

    def settings(model):
        return {(m.buffer_size, m.momentum) for m in model.modules() if isinstance(m, MABN2d)}

    cfg = lazy_cfg(DEMO_LAZY, "mabn.buffer_size=8", "mabn.momentum=0.1")
    assert settings(instantiate(cfg.model)) == {(8, 0.1)}
    path = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(path))
    assert "${mabn}" in path.read_text()  # saved as references to the one node
    again = LazyConfig.apply_overrides(LazyConfig.load(str(path)), ["mabn.buffer_size=2"])
    assert settings(instantiate(again.model)) == {(2, 0.1)}


def test_centralization_opt_out_is_the_same_in_both_config_systems():
    """YAML: ``MODEL.MABN.CENTRALIZE_EXCLUDE``; LazyConfig: the part's settings derived from
    the shared node with ``centralize_weights=False`` (its other values follow the node)."""
    from detectron2.config import LazyCall as L
    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling import build_model

    from mabn_d2.integration.lazy_config import derive_settings

    yaml = yaml_cfg(DEMO_YAML, "MODEL.MABN.CENTRALIZE_EXCLUDE", "['backbone.bottom_up']",
                    "MODEL.MABN.BUFFER_SIZE", "6")
    lazy = lazy_cfg(DEMO_LAZY)
    bottom_up = lazy.model.backbone.bottom_up
    bottom_up.stem.norm = bottom_up.stages.norm = L(derive_settings)(
        base="${mabn}", centralize_weights=False)
    lazy = LazyConfig.apply_overrides(lazy, ["mabn.buffer_size=6"])  # reaches the derived too
    by_yaml = structure(build_model(yaml))
    by_lazy = structure(instantiate(lazy.model))
    assert by_lazy["centralized"] == by_yaml["centralized"]
    assert by_yaml["centralized"]
    assert not any(n.startswith("backbone.bottom_up.") for n in by_yaml["centralized"])
    excluded = {n for n in by_lazy["mabn"] if n.startswith("backbone.bottom_up.")}
    for name, settings in by_lazy["mabn"].items():
        assert settings["buffer_size"] == 6, name
        assert settings["centralize_weights"] == (name not in excluded), name
