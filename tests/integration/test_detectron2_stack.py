"""detectron2 on today's stack (numpy 2, Pillow >= 10, setuptools without pkg_resources).

``tools/install_detectron2.py`` edits detectron2 v0.6's sources at install time (its
``SOURCE_EDITS``, each mirroring a later upstream change). Here: the edit machinery fails
loudly, every edit is in the installed sources (fallback install only), every touched module
imports, and each edited line runs where the CPU can run it. Then the model zoo: every config
the sdist carries loads, and ``model_zoo.get`` builds a Mask R-CNN.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import detectron2
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, import_script

installer = import_script("tools/install_detectron2.py")

D2_ROOT = Path(detectron2.__file__).resolve().parents[1]
# The pure-Python fallback install has the stand-in detectron2/_C.py.
FALLBACK = (D2_ROOT / "detectron2" / "_C.py").is_file()
fallback_only = pytest.mark.skipif(not FALLBACK, reason="detectron2 is not the v0.6 fallback "
                                                        "install of tools/install_detectron2.py")


def _module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


# --- the edit machinery ------------------------------------------------------------------


def test_an_anchor_that_is_missing_or_repeated_stops_everything_and_writes_nothing(tmp_path):
    (tmp_path / "a.py").write_text("x = np.bool\ny = np.bool\n")
    (tmp_path / "b.py").write_text("z = 1\n")
    good = installer.SourceEdit("b.py", "z = 1\n", "z = 2\n", "upstream X")
    missing = installer.SourceEdit("a.py", "w = np.int\n", "w = int\n", "upstream Y")
    repeated = installer.SourceEdit("a.py", "np.bool", "bool", "upstream Z")
    for bad, found in ((missing, 0), (repeated, 2)):
        with pytest.raises(installer.SourceEditError, match=rf"a.py: expected 1 .* found {found}"):
            installer.apply_source_edits(tmp_path, [good, bad])
        assert (tmp_path / "b.py").read_text() == "z = 1\n"  # all or nothing
    with pytest.raises(installer.SourceEditError, match="c.py: file not found"):
        installer.apply_source_edits(tmp_path, [installer.SourceEdit("c.py", "a", "b", "U")])
    lines = installer.apply_source_edits(
        tmp_path, [good, installer.SourceEdit("a.py", "np.bool", "bool", "upstream Z", count=2)])
    assert (tmp_path / "a.py").read_text() == "x = bool\ny = bool\n"
    assert (tmp_path / "b.py").read_text() == "z = 2\n"
    assert lines == ["b.py (x1): as upstream X", "a.py (x2): as upstream Z"]


def test_every_edit_names_its_upstream_change_in_the_installer_and_the_docs():
    rows = [line for line in (REPO / "docs" / "install.md").read_text().splitlines()
            if line.startswith("| ")]
    for edit in installer.SOURCE_EDITS:
        assert edit.upstream.startswith(installer.UPSTREAM + "/"), edit
        assert edit.old != edit.new and edit.count >= 1
        where = edit.upstream.removeprefix(installer.UPSTREAM + "/").split()[0].rstrip(",")
        kind, ref = where.split("/")  # commit/857d5de2, issues/5494
        ref = ref if kind == "commit" else f"#{ref}"
        assert [row for row in rows if f"`{edit.path}`" in row and ref in row], (edit.path, ref)


@fallback_only
def test_every_edit_is_installed_and_every_touched_module_imports():
    for edit in installer.SOURCE_EDITS:
        text = (D2_ROOT / edit.path).read_text(encoding="utf-8")
        assert text.count(edit.new) >= edit.count, f"{edit.path}: edit missing ({edit.upstream})"
        if edit.old not in edit.new:
            assert edit.old not in text, f"{edit.path}: v0.6 text left ({edit.upstream})"
    for path in sorted({edit.path for edit in installer.SOURCE_EDITS}):
        importlib.import_module(_module_name(path))


@fallback_only
def test_no_removed_alias_is_left_on_the_edited_paths():
    import re

    removed = re.compile(r"\bnp\.(bool|int|float|str|object)\b(?!_)|Image\.LINEAR\b|pkg_resources")
    for path in sorted({edit.path for edit in installer.SOURCE_EDITS}):
        code = [line for line in (D2_ROOT / path).read_text().splitlines()
                if not line.lstrip().startswith("#")]
        assert not [line for line in code if removed.search(line)], path


# --- each edited line's path --------------------------------------------------------------


def test_masks_from_polygons_and_nonempty():  # structures/masks.py
    from detectron2.structures import PolygonMasks, polygons_to_bitmask

    square = np.array([2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0])
    bitmask = polygons_to_bitmask([square], 12, 12)
    assert bitmask.dtype == bool and 30 <= bitmask.sum() <= 50
    empty = polygons_to_bitmask([], 12, 12)
    assert empty.dtype == bool and not empty.any()
    keep = PolygonMasks([[square], []]).nonempty()
    assert keep.dtype == torch.bool and keep.tolist() == [True, False]


def test_paste_mask_in_image_old():  # layers/mask_ops.py (numpy 2 copy semantics)
    from detectron2.layers.mask_ops import paste_mask_in_image_old

    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1.0
    pasted = paste_mask_in_image_old(mask, torch.tensor([4, 4, 19, 19]), 24, 24, 0.5)
    assert pasted.shape == (24, 24) and pasted.dtype == torch.uint8
    assert pasted[4:20, 4:20].sum() > 0 and pasted[:4].sum() == 0


def test_extent_transform_default_interpolation():  # data/transforms/transform.py (Pillow 10)
    from detectron2.data.transforms import ExtentTransform

    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    transform = ExtentTransform(src_rect=(0, 0, 16, 16), output_size=(8, 8))
    assert transform.interp == Image.BILINEAR
    assert transform.apply_image(image).shape == (8, 8, 3)


def test_class_histogram_of_a_dataset(caplog):  # data/build.py
    from detectron2.data.build import print_instances_class_histogram

    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 1}, {"category_id": 1,
                                                                         "iscrowd": 1}]}]
    with caplog.at_level("INFO"):
        print_instances_class_histogram(dicts, ["a", "b"])
    assert "Distribution of instances among all 2 categories" in caplog.text


def test_map_dataset_retries_another_index_when_the_mapper_drops_one():  # data/common.py
    from detectron2.data.common import MapDataset

    dataset = MapDataset(list(range(5)), lambda x: None if x == 0 else x * 10)
    assert dataset[0] in (10, 20, 30, 40)  # Python 3.11: random.sample of a list, not a set


def test_lr_scheduler_hook_saves_and_restores_torch_schedulers():  # solver/, engine/hooks.py
    from detectron2.engine import hooks
    from detectron2.solver import LRMultiplier
    from fvcore.common.param_scheduler import ConstantParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 3)
    for _ in range(4):
        opt.step()
        scheduler.step()
    state = hooks.LRScheduler(opt, scheduler).state_dict()
    assert state["last_epoch"] == 4  # v0.6 on torch >= 2.0 saved {}
    fresh = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.nn.Parameter(
        torch.zeros(1))], lr=0.1), 3)
    hooks.LRScheduler(fresh.optimizer, fresh).load_state_dict(state)
    assert fresh.last_epoch == 4
    multiplier = LRMultiplier(opt, ConstantParamScheduler(1.0), max_iter=10)
    assert isinstance(multiplier, torch.optim.lr_scheduler.LRScheduler)


def test_sem_seg_evaluator(tmp_path):  # evaluation/sem_seg_evaluation.py
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator

    gt = np.zeros((6, 6), dtype=np.uint8)
    gt[:, 3:] = 1
    gt[0, 0] = 255  # ignored
    Image.fromarray(gt).save(tmp_path / "gt.png")
    name = "mabn_d2_test_sem_seg"
    DatasetCatalog.register(name, lambda: [{"file_name": "img.jpg",
                                            "sem_seg_file_name": str(tmp_path / "gt.png")}])
    MetadataCatalog.get(name).set(stuff_classes=["left", "right"], ignore_label=255)
    try:
        evaluator = SemSegEvaluator(name, distributed=False)
        evaluator.reset()
        logits = torch.zeros(2, 6, 6)
        logits[1, :, 3:] = 1.0
        evaluator.process([{"file_name": "img.jpg"}], [{"sem_seg": logits}])
        result = evaluator.evaluate()["sem_seg"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert result["mIoU"] == pytest.approx(100.0) and result["pACC"] == pytest.approx(100.0)


def _write_voc(root: Path) -> None:
    """Two images (a one-line split file is a v0.6 bug of its own): a cat, a dog."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n")
    for image_id, name in (("000001", "cat"), ("000002", "dog")):
        (root / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation><size><width>64</width><height>48</height></size><object>"
            f"<name>{name}</name><pose>Left</pose><truncated>0</truncated>"
            "<difficult>0</difficult><bndbox><xmin>10</xmin><ymin>8</ymin><xmax>40</xmax>"
            "<ymax>30</ymax></bndbox></object></annotation>")


def test_pascal_voc_dataset_and_evaluator(tmp_path):  # data/datasets/, evaluation/pascal_voc
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_pascal_voc
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    _write_voc(tmp_path)
    name = "mabn_d2_test_voc"
    register_pascal_voc(name, str(tmp_path), "test", 2007, class_names=["cat", "dog"])
    try:
        records = DatasetCatalog.get(name)
        assert [(r["image_id"], r["annotations"][0]["category_id"]) for r in records] == \
            [("000001", 0), ("000002", 1)]
        evaluator = PascalVOCDetectionEvaluator(name)
        evaluator.reset()
        # a cat found in both images: wrong with the higher score, then right
        for image_id, score in (("000001", 0.8), ("000002", 0.9)):
            found = Instances((48, 64), scores=torch.tensor([score]),
                              pred_boxes=Boxes(torch.tensor([[9.0, 8.0, 40.0, 30.0]])),
                              pred_classes=torch.tensor([0]))
            evaluator.process([{"image_id": image_id}], [{"instances": found}])
        result = evaluator.evaluate()["bbox"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert result["AP50"] == pytest.approx(25.0)  # cat: precision 1/2 at its recall 1; dog: 0


def _panoptic():
    seg = torch.zeros(16, 16, dtype=torch.int32)  # id 0: no prediction
    seg[:8] = 1  # stuff
    seg[8:, :8] = 2  # thing
    info = [{"id": 1, "isthing": False, "category_id": 0},
            {"id": 2, "isthing": True, "category_id": 0, "score": 0.9}]
    return seg, info


def test_visualizer_draws_instances_and_panoptic_segmentation():  # utils/visualizer.py
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.visualizer import ColorMode, Visualizer

    metadata = MetadataCatalog.get("mabn_d2_test_vis").set(
        thing_classes=["cat"], stuff_classes=["sky"], thing_colors=[(255, 0, 0)],
        stuff_colors=[(0, 0, 255)])
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, 4:12, 4:12] = True
    instances = Instances((16, 16), pred_boxes=Boxes(torch.tensor([[4.0, 4.0, 12.0, 12.0]])),
                          scores=torch.tensor([0.9]), pred_classes=torch.tensor([0]),
                          pred_masks=masks)
    drawn = Visualizer(image, metadata).draw_instance_predictions(instances).get_image()
    assert drawn.shape == (16, 16, 3) and (drawn != image).any()
    seg, info = _panoptic()
    for mode in (ColorMode.IMAGE, ColorMode.IMAGE_BW):  # IMAGE_BW: the non-empty mask
        drawn = Visualizer(image, metadata, instance_mode=mode).draw_panoptic_seg(seg, info)
        assert drawn.get_image().shape == (16, 16, 3)


def test_video_visualizer_assigns_colors():  # utils/video_visualizer.py
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.video_visualizer import VideoVisualizer

    visualizer = VideoVisualizer(MetadataCatalog.get("mabn_d2_test_vis"))
    frame = np.zeros((16, 16, 3), dtype=np.uint8)
    for shift in (0.0, 1.0):  # the second frame matches the first frame's instance
        found = Instances((16, 16), pred_boxes=Boxes(torch.tensor([[2.0, 2.0, 9.0, 9.0]]) + shift),
                          scores=torch.tensor([0.9]), pred_classes=torch.tensor([0]))
        assert visualizer.draw_instance_predictions(frame, found).get_image().shape == (16, 16, 3)


def test_read_image_applies_exif_orientation(tmp_path):  # data/detection_utils.py, Pillow
    from detectron2.data.detection_utils import read_image

    image = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(str(tmp_path / "rotated.jpg"), format="BGR").shape == (4, 6, 3)


def test_dataset_mapper_with_resize_crop_and_color_augmentations(tmp_path):  # data pipeline
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper
    from detectron2.data import transforms as T

    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    record = {"file_name": str(tmp_path / "image.png"), "height": 40, "width": 60,
              "annotations": [{"bbox": [10.0, 10.0, 30.0, 30.0], "bbox_mode": 0,
                               "category_id": 0, "iscrowd": 0,
                               "segmentation": [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]}]}
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    augmentations = [
        T.ResizeShortestEdge((32, 48), 80, sample_style="choice"),
        T.RandomFlip(prob=1.0),
        T.RandomCrop("relative_range", (0.8, 0.8)),
        T.RandomExtent((1.0, 1.2), (0.1, 0.1)),
        T.RandomRotation([-10, 10]),
        T.RandomBrightness(0.8, 1.2),
        T.RandomContrast(0.8, 1.2),
        T.RandomSaturation(0.8, 1.2),
        T.RandomLighting(0.1),
        T.Resize((32, 32)),
    ]
    mapper = DatasetMapper(cfg, is_train=True, augmentations=augmentations)
    out = mapper(record)
    assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.uint8
    assert out["instances"].gt_masks.tensor.shape[1:] == (32, 32)


# --- the model zoo -------------------------------------------------------------------------


def _zoo_configs() -> dict[str, list[str]]:
    from detectron2 import model_zoo

    root = Path(model_zoo.__file__).parent / "configs"
    return {suffix: sorted(str(p.relative_to(root)) for p in root.rglob(f"*{suffix}"))
            for suffix in installer.MODEL_ZOO_CONFIG_COUNTS}


def test_every_model_zoo_config_the_sdist_carries_loads():
    from detectron2 import model_zoo
    from detectron2.config import CfgNode

    configs = _zoo_configs()
    if FALLBACK:
        assert {s: len(n) for s, n in configs.items()} == installer.MODEL_ZOO_CONFIG_COUNTS
    failed = {}
    for name in configs[".yaml"] + configs[".py"]:
        try:
            assert Path(model_zoo.get_config_file(name)).is_file()
            cfg = model_zoo.get_config(name)
            assert isinstance(cfg, CfgNode) if name.endswith(".yaml") else "model" in cfg or \
                "dataloader" in cfg or "train" in cfg or "optimizer" in cfg or cfg
        except Exception as e:  # collect them all
            failed[name] = repr(e)
    assert not failed
    assert model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    with pytest.raises(RuntimeError, match="not available in Model Zoo"):
        model_zoo.get_config_file("COCO-InstanceSegmentation/no_such_config.yaml")


def test_model_zoo_get_builds_mask_rcnn_untrained(tmp_path, monkeypatch):
    """``trained=False`` still loads the ImageNet backbone named by the config; detectron2's
    download cache gets a stand-in file there (no network here), so only building is tested."""
    from detectron2 import model_zoo
    from detectron2.modeling import GeneralizedRCNN

    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path))
    stand_in = tmp_path / "detectron2" / "ImageNetPretrained" / "MSRA" / "R-50.pkl"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_bytes(pickle.dumps({"model": {}, "__author__": "mabn_d2 tests"}))
    model = model_zoo.get("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", trained=False,
                          device="cpu")
    assert isinstance(model, GeneralizedRCNN) and model.roi_heads.mask_on


@pytest.mark.parametrize("name", ["common/models/mask_rcnn_fpn.py",
                                  "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py",
                                  "common/models/fcos.py"])
def test_lazy_configs_instantiate_and_run(name):
    from detectron2 import model_zoo
    from detectron2.config import instantiate

    model = instantiate(model_zoo.get_config(name).model).eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.zeros(3, 64, 96), "height": 64, "width": 96}])
    assert "instances" in out


def test_tracing_adapter_imports_without_caffe2():  # export/__init__.py
    export = importlib.import_module("detectron2.export")
    assert export.TracingAdapter.__module__ == "detectron2.export.flatten"
