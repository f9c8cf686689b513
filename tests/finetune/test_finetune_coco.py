"""Fine-tuning MABN Mask R-CNN from BN checkpoints on coco_mini: the exact fold of a detectron2
BN checkpoint, a Caffe2 R-50.pkl-style frozen affine calibrated before training, the first
fine-tuning loss, and the hooks in detectron2's DefaultTrainer."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from mabn_d2 import CentralizedConv2d, MABN2d
from mabn_d2.detectron2_compat import trainer_hooks
from mabn_d2.engine import MABNTrainer
from mabn_d2.engine.hooks import MABNCalibrationHook, MABNPreciseBN
from mabn_d2.finetune.convert import SOURCE_AFFINE, SOURCE_BN, SOURCE_NEW

from helpers import import_script, relative_error, require_coco_mini, set_bn_statistics

# The study's model, data and training steps: the test measures what the study reports.
study = import_script("studies/finetune_start_study.py")
coco_batches, small_rcnn_cfg = study.coco_batches, study.small_rcnn_cfg
total_loss, train_steps = study.total_loss, study.train_steps
write_c2_resnet_pkl = study.write_c2_resnet_pkl

# ResNet-18 (stem 1 + 8 blocks x 2 + 3 shortcuts), FPN (4 + 4), box head 2 convs, mask head 2.
N_BACKBONE_NORMS, N_NORMS = 20, 20 + 8 + 2 + 2


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
    """A Mask R-CNN with BN everywhere, trained 3 steps on coco_mini, saved by detectron2."""
    require_coco_mini()
    cfg = small_rcnn_cfg("BN")
    torch.manual_seed(0)
    model = build_model(cfg)
    batches = coco_batches(cfg, 5)
    train_steps(model, batches[:3], lr=0.02)
    out = tmp_path_factory.mktemp("bn_run")
    DetectionCheckpointer(model, str(out)).save("model_bn")
    return SimpleNamespace(cfg=cfg, model=model.eval(), batches=batches,
                           path=str(out / "model_bn.pth"))


@pytest.fixture(scope="module")
def c2_pkl(tmp_path_factory):
    """A ResNet-18 in the MSRA R-50.pkl layout: Caffe2 names, BN folded into a frozen affine
    (statistics of coco_mini images), no running statistics."""
    require_coco_mini()
    cfg = small_rcnn_cfg("BN")
    torch.manual_seed(1)
    model = build_model(cfg)
    set_bn_statistics(model, coco_batches(cfg, 4, start=20))
    path = tmp_path_factory.mktemp("c2") / "R-18.pkl"
    write_c2_resnet_pkl(model.backbone.bottom_up, path)
    return str(path)


def eval_outputs(model, images):
    model.eval()
    with torch.no_grad():
        features = model.backbone(model.preprocess_image(images).tensor)
        instances = model.inference(images, do_postprocess=False)  # mask probabilities
    return features, instances


def loaded(cfg, path):
    model = build_model(cfg)
    checkpointer = DetectionCheckpointer(model)
    checkpointer.load(path)
    return model, getattr(checkpointer, "mabn_load_report", None)  # None: no MABN layers


def test_detectron2_bn_checkpoint_loads_by_exact_fold(bn_run):
    model, report = loaded(small_rcnn_cfg("MABN", CENTRALIZE_WEIGHTS=False), bn_run.path)
    names = [n for n, m in model.named_modules() if isinstance(m, MABN2d)]
    assert len(names) == N_NORMS and sorted(report.names(SOURCE_BN)) == sorted(names)
    assert all(model.get_submodule(n).iteration == 0 for n in names)
    images = [{"image": d["image"]} for d in bn_run.batches[4]]
    ref_features, ref_instances = eval_outputs(bn_run.model, images)
    features, instances = eval_outputs(model, images)
    for key, ref in ref_features.items():
        assert relative_error(features[key], ref) < 1e-4, key
    for got, ref in zip(instances, ref_instances):
        assert len(got) == len(ref) == 100
        assert torch.equal(got.pred_classes, ref.pred_classes)
        for field in ("pred_boxes", "scores", "pred_masks"):
            a, b = got.get(field), ref.get(field)
            a, b = getattr(a, "tensor", a), getattr(b, "tensor", b)
            assert relative_error(a, b) < 1e-4, field


def test_default_predictor_converts_the_bn_checkpoint(bn_run, coco_mini):
    image = read_image(str(next((coco_mini / "coco/val2017").glob("*.jpg"))), format="BGR")
    outputs = {}
    for norm, extra in (("BN", {}), ("MABN", {"CENTRALIZE_WEIGHTS": False})):
        cfg = small_rcnn_cfg(norm, **extra)
        cfg.MODEL.WEIGHTS = bn_run.path
        predictor = DefaultPredictor(cfg)  # a plain DetectionCheckpointer inside
        outputs[norm] = predictor(image)["instances"]
    mabn_layers = [m for m in predictor.model.modules() if isinstance(m, MABN2d)]
    assert len(mabn_layers) == N_NORMS and all(m.converted_from == SOURCE_BN for m in mabn_layers)
    assert relative_error(outputs["MABN"].scores, outputs["BN"].scores) < 1e-4
    assert relative_error(outputs["MABN"].pred_boxes.tensor, outputs["BN"].pred_boxes.tensor) < 1e-4


def test_caffe2_frozen_affine_checkpoint_is_calibrated_before_training(c2_pkl):
    # detectron2's own way to use R-50.pkl (FrozenBN) is the reference function.
    reference, _ = loaded(small_rcnn_cfg("", backbone_norm="FrozenBN"), c2_pkl)
    cfg = small_rcnn_cfg("MABN", CENTRALIZE_EXCLUDE=["backbone.bottom_up"])  # warm-up 100
    model, report = loaded(cfg, c2_pkl)
    affine = report.names(SOURCE_AFFINE)
    assert len(affine) == N_BACKBONE_NORMS and all(n.startswith("backbone.bottom_up.")
                                                   for n in affine)
    assert len(report.names(SOURCE_NEW)) == N_NORMS - N_BACKBONE_NORMS
    batches = coco_batches(cfg, 6, start=40)
    batch = batches[5]
    x = model.preprocess_image(batch).tensor
    model.train()

    def worst_error(m, training):
        """Max over res2..res5 of the relative L2 distance to the reference features."""
        m.backbone.bottom_up.train(training)
        with torch.no_grad():
            got = m.backbone.bottom_up(x)
        return max(relative_error(got[k], ref[k]) for k in ref)

    def calibrated(data, renorm_clip=5.0):
        m = copy.deepcopy(model)
        for layer in m.modules():
            if isinstance(layer, MABN2d):
                layer.renorm_clip = renorm_clip
        hook = MABNCalibrationHook(m, data, num_batches=len(data), mode="auto")
        hook.before_train()
        return m, hook.report

    reference.backbone.bottom_up.eval()
    with torch.no_grad():
        ref = reference.backbone.bottom_up(x)
    assert worst_error(model, False) < 1e-4  # exact fold: the eval functions agree
    uncalibrated = worst_error(copy.deepcopy(model), True)

    # Calibrated on 5 other batches (the paper's schedule: warm-up 100, renorm from 1000):
    # the first training-mode forward on this batch reproduces the reference.
    calibrated_model, report = calibrated(batches[:5])
    assert sorted(report.updated) == sorted(affine)  # new FPN/head layers: untouched
    for name, m in calibrated_model.named_modules():
        if not isinstance(m, MABN2d):
            continue
        if name in affine:  # the moving average holds the calibration statistics
            assert m.iteration == m.renorm_start_iter == 1000  # the schedule's last phase
            torch.testing.assert_close(m.chi2_buffer.mean(0), m.running_second_moment)
        else:
            assert m.iteration == 0
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.running_second_moment, torch.ones_like(m.weight))
    assert worst_error(calibrated_model, False) < 1e-4
    held_out = worst_error(calibrated_model, True)
    assert held_out <= 0.05, held_out
    assert uncalibrated > 0.5, uncalibrated

    # Without the renorm phase the moving average (this batch weighs 1/16) is much further.
    no_renorm, _ = calibrated(batches[:5], renorm_clip=1.0)
    assert worst_error(no_renorm, True) > 2 * max(held_out, 0.01)


def test_finetuning_from_a_bn_checkpoint_starts_lower_than_from_scratch(bn_run):
    cfg = small_rcnn_cfg("MABN", CENTRALIZE_WEIGHTS=False)
    batch = bn_run.batches[4]

    def first_loss(model):
        torch.manual_seed(3)  # the same proposals sampled for every model
        return total_loss(model.train(), batch).item()

    from_bn, _ = loaded(cfg, bn_run.path)
    torch.manual_seed(0)
    scratch = build_model(cfg)
    bn_loss, start_loss = first_loss(copy.deepcopy(bn_run.model)), first_loss(from_bn)
    scratch_loss = first_loss(scratch)
    assert start_loss < scratch_loss - 0.2, (start_loss, scratch_loss)
    assert abs(start_loss - bn_loss) < 0.05 * bn_loss, (start_loss, bn_loss)


@pytest.mark.e2e  # training steps of MABNTrainer
def test_mabn_trainer_calibrates_a_caffe2_checkpoint_then_trains(c2_pkl, tmp_path):
    cfg = small_rcnn_cfg("MABN", CENTRALIZE_EXCLUDE=["backbone.bottom_up"])
    cfg.merge_from_list(["MODEL.WEIGHTS", c2_pkl, "SOLVER.MAX_ITER", "2",
                         "SOLVER.BASE_LR", "0.005", "SOLVER.WARMUP_ITERS", "0",
                         "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.TEST", "()",
                         "TEST.EVAL_PERIOD", "0", "TEST.PRECISE_BN.ENABLED", "True",
                         "TEST.PRECISE_BN.NUM_ITER", "2", "MODEL.MABN.CALIBRATION.NUM_BATCHES",
                         "2", "OUTPUT_DIR", str(tmp_path)])
    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    calibration = next(h for h in trainer_hooks(trainer) if isinstance(h, MABNCalibrationHook))
    precise = next(h for h in trainer_hooks(trainer) if isinstance(h, MABNPreciseBN))
    assert len(calibration.report.updated) == N_BACKBONE_NORMS
    assert sorted(calibration.backward_report.updated) == sorted(calibration.report.updated)
    assert calibration.report.num_batches == 2
    assert precise.report is not None and precise.report.num_batches == 2
    assert len(precise.report.updated) == N_NORMS
    # Calibration moves the layers it filled to their last phase; PreciseBN takes none.
    for name, m in trainer.model.named_modules():
        if isinstance(m, MABN2d):
            calibrated = name in calibration.report.updated
            assert m.iteration == 2 + (m.renorm_start_iter if calibrated else 0), name
            # Backward moving average: calibrated layers start with every slot filled, new
            # layers with the 2 slots of the 2 training steps.
            slots_written = int(m.psi_buffer.any(dim=1).sum())
            assert slots_written == (m.buffer_size if calibrated else 2), name


def test_centralization_per_part(caplog):
    model = build_model(small_rcnn_cfg("MABN", CENTRALIZE_EXCLUDE=["backbone.bottom_up"]))
    feeding = {n: m for n, m in model.named_modules()
               if isinstance(getattr(m, "norm", None), MABN2d)}
    assert len(feeding) == N_NORMS
    for name, conv in feeding.items():
        pretrained_part = name.startswith("backbone.bottom_up.")
        assert isinstance(conv, CentralizedConv2d) is not pretrained_part, name
    with caplog.at_level(logging.WARNING, logger="mabn_d2"):
        build_model(small_rcnn_cfg("MABN", CENTRALIZE_EXCLUDE=["backbone.bottomup"]))
    assert "CENTRALIZE_EXCLUDE entry 'backbone.bottomup' names no module" in caplog.text
    with pytest.raises(ValueError, match="MODEL.MABN.CENTRALIZE_EXCLUDE must be a list"):
        build_model(small_rcnn_cfg("MABN", CENTRALIZE_EXCLUDE="backbone"))
