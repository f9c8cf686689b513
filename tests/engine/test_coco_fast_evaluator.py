"""COCO evaluation with detectron2's compiled COCOeval (upstream main): mabn_d2's evaluator
uses it where it is compiled, and its AP equals pycocotools' official COCOeval on coco_mini's
validation set (boxes and masks), for the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from mabn_d2.detectron2_compat import has_compiled_coco_eval
from mabn_d2.engine.evaluation import coco_evaluator

compiled_only = pytest.mark.skipif(
    not has_compiled_coco_eval(),
    reason="needs detectron2's compiled COCOeval: the upstream-main stack (docs/install.md); "
           "this detectron2 is the v0.6 fallback without compiled ops")


def _predictions(dataset: list[dict], seed: int = 0) -> list[tuple[dict, dict]]:
    """(input, output) pairs as a model gives them: every ground-truth box, jittered, with a
    random score, a mask filling it, and some with the wrong class; plus a few false ones."""
    rng = np.random.default_rng(seed)
    pairs = []
    for record in dataset:
        h, w = record["height"], record["width"]
        boxes, classes = [], []
        for ann in record["annotations"]:
            x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
            jitter = rng.normal(0, 0.1, 4) * [bw, bh, bw, bh]
            boxes.append([x0, y0, x1, y1] + jitter)
            classes.append(ann["category_id"] if rng.random() > 0.15 else int(rng.integers(80)))
        for _ in range(2):  # false detections
            x0, y0 = rng.random() * w * 0.8, rng.random() * h * 0.8
            boxes.append([x0, y0, x0 + w * 0.15, y0 + h * 0.15])
            classes.append(int(rng.integers(80)))
        box_array = np.clip(np.array(boxes, dtype=np.float32), 0, [w, h, w, h])
        masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(box_array.round().astype(int)):
            masks[i, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = True
        instances = Instances((h, w))
        instances.pred_boxes = Boxes(torch.from_numpy(box_array))
        instances.scores = torch.from_numpy(rng.random(len(boxes)).astype(np.float32))
        instances.pred_classes = torch.tensor(classes)
        instances.pred_masks = masks
        pairs.append(({"image_id": record["image_id"], "height": h, "width": w},
                      {"instances": instances}))
    return pairs


def _evaluate(pairs: list[tuple[dict, dict]], **kwargs) -> dict:
    evaluator = coco_evaluator("coco_2017_val", **kwargs)
    evaluator.reset()
    for inputs, outputs in pairs:
        evaluator.process([inputs], [outputs])
    return evaluator.evaluate()


@compiled_only
def test_the_compiled_evaluator_is_the_default_and_its_ap_equals_pycocotools(coco_mini, caplog):
    pairs = _predictions(DatasetCatalog.get("coco_2017_val"))
    with caplog.at_level("INFO", logger="detectron2"):
        fast = _evaluate(pairs)  # mabn_d2's default where the C++ COCOeval is compiled
    assert "Evaluating predictions with unofficial COCO API" in caplog.text
    official = _evaluate(pairs, use_fast_impl=False)
    for task in ("bbox", "segm"):
        assert 5 < official[task]["AP"] < 95, official[task]  # neither empty nor perfect
        for metric, value in official[task].items():
            assert fast[task][metric] == pytest.approx(value, abs=1e-9, nan_ok=True), \
                (task, metric)


def test_without_compiled_ops_the_default_is_pycocotools(coco_mini, caplog):
    if has_compiled_coco_eval():
        pytest.skip("this detectron2 has its compiled COCOeval (upstream main): the test "
                    "above covers the default")
    pairs = _predictions(DatasetCatalog.get("coco_2017_val"))[:5]
    with caplog.at_level("INFO"):
        results = _evaluate(pairs)
    assert "COCOEvaluator(use_fast_impl=False)" in caplog.text
    assert "Evaluating predictions with official COCO API" in caplog.text
    assert np.isfinite(results["bbox"]["AP"])
