"""Datasets for mabn_d2: the embedded demo (procedural shapes) and a user's own COCO JSON.

``import mabn_d2.data`` registers the demo's train and held-out val splits in detectron2's
catalogs (:data:`DEMO_TRAIN`, :data:`DEMO_VAL`); files are written on first use.
"""

from .demo import (
    DEMO_SPLITS,
    DEMO_TRAIN,
    DEMO_VAL,
    ensure_demo_dataset,
    register_demo_datasets,
)
from .shapes import CATEGORIES, ShapesSpec, write_split
from .user_coco import add_dataset_config, check_num_classes, register_coco_from_cfg

register_demo_datasets()

__all__ = [
    "CATEGORIES",
    "DEMO_SPLITS",
    "DEMO_TRAIN",
    "DEMO_VAL",
    "ShapesSpec",
    "add_dataset_config",
    "check_num_classes",
    "ensure_demo_dataset",
    "register_coco_from_cfg",
    "register_demo_datasets",
    "write_split",
]
