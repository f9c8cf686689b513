"""A user's own COCO-format datasets, registered from the config (no code edits).

``DATASETS.REGISTER_COCO`` lists ``[name, json_file, image_root]`` triples; each is registered
with detectron2's ``register_coco_instances`` and can then be named in ``DATASETS.TRAIN`` /
``DATASETS.TEST``::

    DATASETS.REGISTER_COCO "[['my_train', 'ann/train.json', 'images/'], \
                             ['my_val', 'ann/val.json', 'images/']]" \
    DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)" MODEL.ROI_HEADS.NUM_CLASSES 3
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = [
    "add_dataset_config",
    "register_coco_from_cfg",
    "check_num_classes",
    "check_dataset_classes",
]


def add_dataset_config(cfg: CfgNode) -> CfgNode:
    """Add ``DATASETS.REGISTER_COCO`` (default ``[]``) to ``cfg`` in place; returns ``cfg``."""
    if "REGISTER_COCO" not in cfg.DATASETS:
        cfg.DATASETS.REGISTER_COCO = []
    return cfg


def _entry(entry: object) -> tuple[str, str, str]:
    if (
        not isinstance(entry, (list, tuple))
        or len(entry) != 3
        or not all(isinstance(v, str) and v for v in entry)
    ):
        raise ValueError(
            "DATASETS.REGISTER_COCO entries must be [name, json_file, image_root] (three "
            f"non-empty strings), got {entry!r}"
        )
    name, json_file, image_root = entry
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"DATASETS.REGISTER_COCO {name!r}: no JSON file {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(
            f"DATASETS.REGISTER_COCO {name!r}: no image directory {image_root}"
        )
    return name, json_file, image_root


def register_coco_from_cfg(cfg: CfgNode) -> list[str]:
    """Register every dataset of ``cfg.DATASETS.REGISTER_COCO``; return their names.

    Registering the same name with the same files again is a no-op (set-up may run twice in
    one process); a name already used for anything else is an error.
    """
    names = []
    for entry in cfg.DATASETS.get("REGISTER_COCO", []):
        name, json_file, image_root = _entry(entry)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (meta.get("json_file"), meta.get("image_root")) != (json_file, image_root):
                raise ValueError(
                    f"DATASETS.REGISTER_COCO: the name {name!r} is already registered (to "
                    f"{meta.get('json_file')!r}); choose another name"
                )
        else:
            register_coco_instances(name, {}, json_file, image_root)
        names.append(name)
    return names


def check_num_classes(cfg: CfgNode, dataset_names: list[str] | tuple[str, ...]) -> None:
    """Fail clearly when a dataset's category count differs from the model's
    (``MODEL.ROI_HEADS.NUM_CLASSES``); see :func:`check_dataset_classes`."""
    check_dataset_classes(cfg.MODEL.ROI_HEADS.NUM_CLASSES, dataset_names,
                          key="MODEL.ROI_HEADS.NUM_CLASSES", fix="MODEL.ROI_HEADS.NUM_CLASSES {}")


def check_dataset_classes(
    num_classes: int, dataset_names: Iterable[str], key: str, fix: str
) -> None:
    """Fail clearly when a dataset's category count differs from ``num_classes``, the value of
    config key ``key``; ``fix.format(n)`` is the override that fixes it.

    Call after the datasets were loaded (their ``thing_classes`` are then known).
    """
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"Dataset {name!r} has {len(classes)} categories but {key} is {num_classes}; "
                f"set {fix.format(len(classes))}"
            )
