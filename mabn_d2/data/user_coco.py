"""A user's own COCO-format datasets, registered from the config (no code edits).

``DATASETS.REGISTER_COCO`` lists ``[name, json_file, image_root]`` triples; each is registered
with detectron2's ``register_coco_instances`` and can then be named in ``DATASETS.TRAIN`` /
``DATASETS.TEST``::

    DATASETS.REGISTER_COCO "[['my_train', 'ann/train.json', 'images/'], \
                             ['my_val', 'ann/val.json', 'images/']]" \
    DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)" MODEL.ROI_HEADS.NUM_CLASSES 3

Each JSON is checked when it is registered (:mod:`mabn_d2.data.annotation_checks`): a
malformed annotation is an error naming it and its image, before anything trains; so is an
image missing on disk, of another size than its ``width``/``height`` in the JSON, or of a
16-bit/float mode (:func:`check_image_files`, reading image headers only). With
``DATASETS.DROP_INVALID_ANNOTATIONS True`` they are left out instead, with a warning: the
dataset is registered from a copy without them, ``OUTPUT_DIR/checked_annotations/<name>.json``,
which training and COCO evaluation both read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..cli import UserError
from ..file_io import atomic_write
from .annotation_checks import describe_invalid, find_invalid_annotations, without_annotations

__all__ = [
    "DatasetError",
    "DatasetFileError",
    "add_dataset_config",
    "register_coco_from_cfg",
    "check_num_classes",
    "check_dataset_classes",
    "drop_invalid_annotations",
]

logger = logging.getLogger(__name__)

class DatasetError(UserError, ValueError):
    """A dataset the config names that cannot be trained or evaluated on as it is."""


class DatasetFileError(UserError, FileNotFoundError):
    """A dataset file or folder the config names that does not exist."""


# Under OUTPUT_DIR: the copies of REGISTER_COCO JSONs without their invalid annotations.
CHECKED_ANNOTATIONS_DIR = "checked_annotations"


def add_dataset_config(cfg: CfgNode) -> CfgNode:
    """Add ``DATASETS.REGISTER_COCO`` (default ``[]``) and ``DATASETS.DROP_INVALID_ANNOTATIONS``
    (default False: a malformed annotation is an error) to ``cfg`` in place; returns
    ``cfg``."""
    if "REGISTER_COCO" not in cfg.DATASETS:
        cfg.DATASETS.REGISTER_COCO = []
    if "DROP_INVALID_ANNOTATIONS" not in cfg.DATASETS:
        cfg.DATASETS.DROP_INVALID_ANNOTATIONS = False
    return cfg


def drop_invalid_annotations(cfg: CfgNode) -> bool:
    """The validated ``DATASETS.DROP_INVALID_ANNOTATIONS`` (False where it is absent)."""
    value = cfg.DATASETS.get("DROP_INVALID_ANNOTATIONS", False)
    if not isinstance(value, bool):
        raise DatasetError(f"DATASETS.DROP_INVALID_ANNOTATIONS must be True or False, got "
                         f"{value!r}")
    return value


def _entry(entry: object) -> tuple[str, str, str]:
    if (
        not isinstance(entry, (list, tuple))
        or len(entry) != 3
        or not all(isinstance(v, str) and v for v in entry)
    ):
        raise DatasetError(
            "DATASETS.REGISTER_COCO entries must be [name, json_file, image_root] (three "
            f"non-empty strings), got {entry!r}"
        )
    name, json_file, image_root = entry
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if not os.path.isfile(json_file):
        raise DatasetFileError(f"DATASETS.REGISTER_COCO {name!r}: no JSON file {json_file}")
    if not os.path.isdir(image_root):
        raise DatasetFileError(
            f"DATASETS.REGISTER_COCO {name!r}: no image directory {image_root}"
        )
    return name, json_file, image_root


def _image_problem(path: str, image: dict) -> str | None:
    """Why the image file of a COCO ``images`` entry cannot be trained on, or None. Reads
    the header only (no decoding): size, mode and EXIF orientation."""
    from PIL import Image, UnidentifiedImageError

    from .image_io import GREY_SCALED_MODES

    if not os.path.isfile(path):
        return "missing on disk"
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            mode = opened.mode
            orientation = opened.getexif().get(_EXIF_ORIENTATION, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"not a readable image ({type(error).__name__}: {error})"
    if orientation in (5, 6, 7, 8):  # detectron2 applies the EXIF rotation
        width, height = height, width
    expected = (image.get("width"), image.get("height"))
    if None not in expected and expected != (width, height):
        return (f"the JSON says {expected[0]}x{expected[1]} (width x height), the file is "
                f"{width}x{height}")
    if mode in GREY_SCALED_MODES:
        return (f"mode {mode} (16-bit or float), which detectron2's loader clips to white or "
                "black: convert it to 8 bits")
    return None


def check_image_files(name: str, coco: dict, image_root: str) -> None:
    """Every image of a COCO dict exists under ``image_root``, has the size its entry says
    and a mode detectron2 reads correctly: checked at registration, not at the iteration
    that first draws it (a crash mid-training).

    Raises:
        ValueError: naming each image and the problem.
    """
    problems = []
    for image in coco.get("images", []):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            problems.append(f"images entry {image!r}: no file_name")
            continue
        problem = _image_problem(os.path.join(image_root, image["file_name"]), image)
        if problem:
            problems.append(f"image id {image.get('id')} '{image['file_name']}': {problem}")
    if problems:
        shown = "\n  ".join(problems[:10]) + (
            f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DatasetError(
            f"DATASETS.REGISTER_COCO {name!r}: {len(problems)} images of the JSON cannot be "
            f"trained on (image root {image_root}):\n  {shown}\nFix the files or their "
            "entries in the JSON (file_name, width, height).")


_EXIF_ORIENTATION = 0x0112


def _checked_json(name: str, json_file: str, image_root: str, drop: bool, output_dir: str
                  ) -> str:
    """``json_file`` if all its annotations are valid; with ``drop``, the path of a copy
    without the invalid ones (written under ``output_dir``); else ValueError naming them."""
    with open(json_file) as f:
        try:
            coco = json.load(f)
        except ValueError as error:
            raise DatasetError(f"DATASETS.REGISTER_COCO {name!r}: {json_file} is not valid JSON: "
                             f"{error}") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DatasetError(f"DATASETS.REGISTER_COCO {name!r}: {json_file} is not a COCO "
                         "instances file (a JSON object with 'images', 'annotations' and "
                         "'categories' lists)")
    check_image_files(name, coco, image_root)
    invalid = find_invalid_annotations(coco)
    if not invalid:
        return json_file
    if not drop:
        raise DatasetError(
            f"DATASETS.REGISTER_COCO {name!r}: {len(invalid)} malformed annotations in "
            f"{json_file}:\n{describe_invalid(invalid)}\nFix them in the file, or add "
            "'DATASETS.DROP_INVALID_ANNOTATIONS True' to leave them out of training and "
            "evaluation.")
    checked = os.path.join(os.path.abspath(output_dir or "."), CHECKED_ANNOTATIONS_DIR,
                           f"{name}.json")
    os.makedirs(os.path.dirname(checked), exist_ok=True)
    content = json.dumps(without_annotations(coco, invalid)).encode()
    atomic_write(checked, lambda f: f.write(content))
    logger.warning("DATASETS.REGISTER_COCO %r: left out %d malformed annotations of %s "
                   "(DATASETS.DROP_INVALID_ANNOTATIONS); registered from %s:\n%s", name,
                   len(invalid), json_file, checked, describe_invalid(invalid))
    return checked


def register_coco_from_cfg(cfg: CfgNode) -> list[str]:
    """Register every dataset of ``cfg.DATASETS.REGISTER_COCO``; return their names.

    Each JSON is checked first (see the module docstring). Registering the same name with the
    same files again is a no-op (set-up may run twice in one process); a name already used
    for anything else is an error.

    Raises:
        ValueError: a bad entry, or malformed annotations (naming each annotation id and image)
            without ``DATASETS.DROP_INVALID_ANNOTATIONS``.
        FileNotFoundError: a JSON file or image folder that does not exist.
    """
    drop = drop_invalid_annotations(cfg)
    names = []
    for entry in cfg.DATASETS.get("REGISTER_COCO", []):
        name, json_file, image_root = _entry(entry)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            registered = meta.get("source_json_file", meta.get("json_file"))
            if (registered, meta.get("image_root")) != (json_file, image_root):
                raise DatasetError(
                    f"DATASETS.REGISTER_COCO: the name {name!r} is already registered (to "
                    f"{registered!r}); choose another name"
                )
        else:
            checked = _checked_json(name, json_file, image_root, drop, cfg.OUTPUT_DIR)
            register_coco_instances(name, {}, checked, image_root)
            if checked != json_file:
                MetadataCatalog.get(name).set(source_json_file=json_file)
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
            raise DatasetError(
                f"Dataset {name!r} has {len(classes)} categories but {key} is {num_classes}; "
                f"set {fix.format(len(classes))}"
            )
