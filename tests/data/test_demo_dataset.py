"""The embedded demo dataset: exact masks, determinism, held-out split, registration."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from mabn_d2.data import (
    CATEGORIES,
    DEMO_SPLITS,
    DEMO_TRAIN,
    DEMO_VAL,
    ShapesSpec,
    ensure_demo_dataset,
    write_split,
)
from mabn_d2.data.demo import _manifest

SMALL = ShapesSpec(num_images=12, seed=3)


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    """A full demo dataset written once for this module."""
    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "mabn_demo_shapes")


def test_masks_are_exactly_the_painted_pixels(tmp_path):
    coco = write_split(SMALL, tmp_path / "img", tmp_path / "ann.json")
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert set(by_image) == {im["id"] for im in coco["images"]}  # every image has shapes
    for image in coco["images"]:
        pixels = np.asarray(Image.open(tmp_path / "img" / image["file_name"]))
        covered = np.zeros(pixels.shape[:2], dtype=int)
        for ann in by_image[image["id"]]:
            rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], 128, 128))
            mask = mask_util.decode(rle).astype(bool)
            colours = np.unique(pixels[mask], axis=0)
            assert len(colours) == 1, "a shape is one flat colour"
            ring = ndimage.binary_dilation(mask) & ~mask
            assert not (pixels[ring] == colours[0]).all(axis=1).any(), "colour leaks out"
            assert ann["bbox"] == pytest.approx(list(mask_util.toBbox(rle)))
            assert ann["area"] == mask.sum()
            covered += mask
        assert covered.max() == 1, "shapes never overlap"


def test_split_is_a_pure_function_of_its_spec(tmp_path):
    a = write_split(SMALL, tmp_path / "a", tmp_path / "a.json")
    b = write_split(SMALL, tmp_path / "b", tmp_path / "b.json")
    assert a == b
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    for image in a["images"]:
        name = image["file_name"]
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = write_split(ShapesSpec(num_images=12, seed=4), tmp_path / "c", tmp_path / "c.json")
    assert other["annotations"] != a["annotations"]


@pytest.mark.parametrize("bad", [dict(num_images=0), dict(max_objects=0),
                                 dict(min_radius=30, max_radius=20), dict(max_radius=64)])
def test_invalid_spec_is_an_error(bad):
    with pytest.raises(ValueError, match="ShapesSpec"):
        ShapesSpec(**{"num_images": 4, "seed": 0, **bad})


def test_demo_copy_is_coco_with_a_held_out_val_split(demo_copy):
    digests = {}
    for name, (split_dir, spec) in DEMO_SPLITS.items():
        coco = COCO(str(demo_copy / "annotations" / f"instances_{split_dir}.json"))
        assert len(coco.getImgIds()) == spec.num_images
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
        counts = [len(coco.getAnnIds(catIds=[c])) for c in coco.getCatIds()]
        assert min(counts) > 0.15 * sum(counts), counts  # every category well represented
        digests[name] = {hashlib.sha1((demo_copy / split_dir / im["file_name"]).read_bytes())
                         .hexdigest() for im in coco.loadImgs(coco.getImgIds())}
    assert not digests[DEMO_TRAIN] & digests[DEMO_VAL]


@pytest.mark.e2e  # writes the whole demo dataset twice
def test_demo_copy_is_regenerated_when_stale_or_incomplete(demo_copy):
    val_json = demo_copy / "annotations" / "instances_val.json"
    original = val_json.read_bytes()
    image = demo_copy / "val" / "000001.png"
    image.unlink()
    assert ensure_demo_dataset(demo_copy) == demo_copy
    assert image.is_file()
    manifest = demo_copy / "manifest.json"
    written = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**written, "generator_version": -1}))
    val_json.write_text("{}")
    ensure_demo_dataset(demo_copy)
    assert json.loads(manifest.read_text()) == written
    assert {k: v for k, v in written.items() if k != "files"} == _manifest(DEMO_SPLITS)
    assert val_json.read_bytes() == original


def test_demo_copy_with_a_truncated_image_is_regenerated(demo_copy):
    image = demo_copy / "val" / "000002.png"
    original = image.read_bytes()
    image.write_bytes(original[: len(original) // 2])  # same name, damaged content
    assert ensure_demo_dataset(demo_copy) == demo_copy
    assert image.read_bytes() == original


def test_demo_splits_are_registered_as_coco_datasets():
    for name in (DEMO_TRAIN, DEMO_VAL):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == list(CATEGORIES)
        assert meta.json_file.endswith(".json") and meta.image_root


def test_demo_loader_gives_detectron2_dicts(demo_copy):
    from mabn_d2.data.demo import _load

    dicts = _load(DEMO_VAL, demo_copy)
    assert len(dicts) == DEMO_SPLITS[DEMO_VAL][1].num_images
    first = dicts[0]
    assert first["file_name"].startswith(str(demo_copy / "val"))
    assert (first["height"], first["width"]) == (128, 128)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} == set(range(4))
