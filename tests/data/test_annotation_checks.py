"""Malformed COCO annotations are found when the dataset is registered, by annotation id and
image, and can be dropped; COCO evaluation never crashes on them; mask training refuses
instances without a mask up front instead of a KeyError at the first batch holding one."""

from __future__ import annotations

import json
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

from mabn_d2.data import ShapesSpec, write_split
from mabn_d2.data.annotation_checks import find_invalid_annotations
from mabn_d2.data.user_coco import register_coco_from_cfg
from mabn_d2.engine import MABNTrainer, get_mabn_cfg
from mabn_d2.engine.evaluation import CheckedCOCOEvaluator

# annotation index -> its malformation, as they reached the evaluation before.
BROKEN = {0: [], 1: [[]], 2: [[10.0, 10.0, 20.0, 20.0]]}  # empty, empty polygon, 2 points


@pytest.fixture
def broken_json(tmp_path):
    """A 4-image COCO JSON whose first three annotations have malformed segmentations."""
    coco = write_split(ShapesSpec(num_images=4, seed=3, image_size=64, max_objects=3,
                                  min_radius=6, max_radius=14),
                       tmp_path / "images", tmp_path / "good.json")
    for index, segmentation in BROKEN.items():
        coco["annotations"][index]["segmentation"] = segmentation
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(coco))
    return path, tmp_path / "images", coco


def cfg_for(name, json_file, image_root, tmp_path, *opts):
    cfg = get_mabn_cfg()
    cfg.merge_from_list(["DATASETS.REGISTER_COCO", repr([[name, str(json_file),
                                                          str(image_root)]]),
                         "OUTPUT_DIR", str(tmp_path / "out"), *opts])
    return cfg


def test_each_rule_names_the_annotation_and_its_image(broken_json):
    _, _, coco = broken_json
    extra = dict(coco["annotations"][3])
    coco["annotations"] += [
        {**extra, "id": 100, "bbox": [0, 0, float("nan"), 3]},
        {**extra, "id": 101, "category_id": 99},
        {**extra, "id": 102, "image_id": 77},
        {**extra, "id": 103, "area": None},
        {**extra, "id": 104, "iscrowd": 2},
        {**extra, "id": 105, "segmentation": {"counts": "x", "size": [5, 5]}},
        {key: value for key, value in extra.items() if key != "segmentation"} | {"id": 106},
        {**extra, "id": 3},  # a second annotation with id 3
        {**extra, "id": 107, "segmentation": [[1, 2, 3, 4, 5, 6, 7]]},
    ]
    found = {(p.annotation_id, p.index): str(p) for p in find_invalid_annotations(coco)}
    ids = [a["id"] for a in coco["annotations"]]
    expected = {
        0: "segmentation must be a non-empty list of polygons or an RLE, got []",
        1: "a polygon needs at least 3 points", 2: "got 4 coordinates",
        3: "its id is used by 2 annotations", 100: "bbox must be 4 finite numbers",
        101: "category_id 99 is not in 'categories'", 102: "image_id 77 is not in 'images'",
        103: "area must be a finite number >= 0, got None", 104: "iscrowd must be 0 or 1",
        105: "RLE size [5, 5] is not the image's [height, width] [64, 64]",
        106: "no segmentation, while other annotations have one", 107: "got 7 coordinates",
    }
    assert {i for i, _ in found} == {ids[k] if k < 3 else k for k in expected}
    for (annotation_id, index), text in found.items():
        key = index if index < 3 else annotation_id
        assert expected[key] in text, text
    image = coco["images"][0]
    first = next(text for (_, index), text in found.items() if index == 0)
    assert first.startswith(f"annotation id {ids[0]} of image {image['file_name']!r} "
                            f"(id {image['id']})")
    assert find_invalid_annotations(json.loads(broken_json[0].with_name("good.json")
                                               .read_text())) == []


def test_registration_refuses_malformed_annotations_naming_them(broken_json, tmp_path):
    json_file, images, coco = broken_json
    name = f"broken_{tmp_path.name}"
    with pytest.raises(ValueError) as info:
        register_coco_from_cfg(cfg_for(name, json_file, images, tmp_path))
    message = str(info.value)
    assert f"DATASETS.REGISTER_COCO {name!r}: 3 malformed annotations in {json_file}" in message
    for index in BROKEN:
        ann = coco["annotations"][index]
        assert f"annotation id {ann['id']} of image '{ann['image_id']:06d}.png'" in message
    assert "DATASETS.DROP_INVALID_ANNOTATIONS True" in message
    assert name not in DatasetCatalog.list()


def test_dropping_them_registers_a_checked_copy_for_training_and_evaluation(broken_json,
                                                                             tmp_path, caplog):
    json_file, images, coco = broken_json
    name = f"dropped_{tmp_path.name}"
    cfg = cfg_for(name, json_file, images, tmp_path, "DATASETS.DROP_INVALID_ANNOTATIONS", "True")
    with caplog.at_level(logging.WARNING, logger="mabn_d2"):
        assert register_coco_from_cfg(cfg) == [name]
    assert "left out 3 malformed annotations" in caplog.text
    assert register_coco_from_cfg(cfg) == [name]  # idempotent, as before
    meta = MetadataCatalog.get(name)
    assert meta.json_file == str(tmp_path / "out" / "checked_annotations" / f"{name}.json")
    assert meta.source_json_file == str(json_file)
    loaded = sum(len(d["annotations"]) for d in DatasetCatalog.get(name))
    assert loaded == len(coco["annotations"]) - 3


def test_drop_option_must_be_a_bool(broken_json, tmp_path):
    json_file, images, _ = broken_json
    cfg = cfg_for("x", json_file, images, tmp_path)
    cfg.DATASETS.DROP_INVALID_ANNOTATIONS = "yes"  # set in Python: no YACS type check
    with pytest.raises(ValueError, match="DATASETS.DROP_INVALID_ANNOTATIONS must be True or "
                                         "False, got 'yes'"):
        register_coco_from_cfg(cfg)


def perfect_predictions(coco: dict, image_id: int) -> Instances:
    anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
    masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], 64, 64)))
             for a in anns]
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
    return Instances((64, 64), pred_boxes=Boxes(torch.tensor(boxes)),
                     scores=torch.ones(len(anns)),
                     pred_classes=torch.tensor([a["category_id"] - 1 for a in anns]),
                     pred_masks=torch.from_numpy(np.stack(masks)).bool())


def test_coco_evaluation_leaves_malformed_ground_truth_out(broken_json, tmp_path, caplog):
    json_file, images, coco = broken_json
    name = f"by_code_{tmp_path.name}"  # registered by code: not checked at registration
    register_coco_instances(name, {}, str(json_file), str(images))
    DatasetCatalog.get(name)  # as the test loader does: the category id mapping
    with caplog.at_level(logging.WARNING, logger="mabn_d2"):
        evaluator = CheckedCOCOEvaluator(name, output_dir=str(tmp_path / "eval"),
                                         use_fast_impl=False)
    assert f"COCO evaluation of {name} leaves out 3 malformed" in caplog.text
    good = json.loads(json_file.with_name("good.json").read_text())
    evaluator.reset()
    for image in coco["images"]:
        evaluator.process([{"image_id": image["id"]}],
                          [{"instances": perfect_predictions(good, image["id"])}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] > 50 and results["segm"]["AP"] > 50


def test_mask_training_refuses_instances_without_a_mask_up_front(broken_json, tmp_path):
    json_file, images, _ = broken_json
    name = f"train_by_code_{tmp_path.name}"
    register_coco_instances(name, {}, str(json_file), str(images))
    cfg = get_mabn_cfg()
    cfg.merge_from_list(["MODEL.MASK_ON", "True", "MODEL.ROI_HEADS.NUM_CLASSES", "4",
                         "DATASETS.TRAIN", f"('{name}',)", "DATALOADER.NUM_WORKERS", "0"])
    # detectron2 loads "segmentation": [] as an instance without a mask, drops [[]] and
    # 2-point polygons: one instance without a mask remains.
    with pytest.raises(ValueError, match=r"MODEL.MASK_ON: 1 training instances have no "
                                         r"segmentation .* in .*000001.png"):
        MABNTrainer.build_train_loader(cfg)
    cfg.DATASETS.DROP_INVALID_ANNOTATIONS = True
    batch = next(iter(MABNTrainer.build_train_loader(cfg)))
    assert all(d["instances"].has("gt_masks") for d in batch if len(d["instances"]))
