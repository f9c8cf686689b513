"""A user's own COCO JSON through ``DATASETS.REGISTER_COCO``, and the category-count check."""

from __future__ import annotations

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from mabn_d2.data import ShapesSpec, check_num_classes, register_coco_from_cfg, write_split
from mabn_d2.engine import get_mabn_cfg


@pytest.fixture
def user_files(tmp_path):
    write_split(ShapesSpec(num_images=3, seed=11), tmp_path / "images", tmp_path / "train.json")
    return tmp_path / "train.json", tmp_path / "images"


def cfg_with(entries):
    cfg = get_mabn_cfg()
    cfg.merge_from_list(["DATASETS.REGISTER_COCO", repr(entries)])
    return cfg


def test_register_from_cfg_loads_and_is_idempotent(user_files, tmp_path):
    json_file, image_root = user_files
    name = f"user_shapes_{tmp_path.name}"
    cfg = cfg_with([[name, str(json_file), str(image_root)]])
    assert register_coco_from_cfg(cfg) == [name]
    assert register_coco_from_cfg(cfg) == [name]  # set-up running twice in one process
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 3 and dicts[0]["annotations"]
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "coco" and len(meta.thing_classes) == 4

    cfg.defrost()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES 4"):
        check_num_classes(cfg, [name])
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 4
    check_num_classes(cfg, [name])

    other = cfg_with([[name, str(json_file), str(tmp_path)]])
    with pytest.raises(ValueError, match="already registered"):
        register_coco_from_cfg(other)


@pytest.mark.parametrize("entry, error", [
    (["only_a_name"], ValueError),
    (["n", "", "x"], ValueError),
    (["missing_json", "/no/such/file.json", "."], FileNotFoundError),
])
def test_bad_entries_are_clear_errors(entry, error):
    with pytest.raises(error, match="DATASETS.REGISTER_COCO"):
        register_coco_from_cfg(cfg_with([entry]))


def test_missing_image_root_is_an_error(user_files):
    json_file, _ = user_files
    with pytest.raises(FileNotFoundError, match="no image directory"):
        register_coco_from_cfg(cfg_with([["no_images", str(json_file), "/no/such/dir"]]))
