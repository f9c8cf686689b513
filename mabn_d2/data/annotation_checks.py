"""Checks of COCO-format annotations, so that a malformed one fails early and by name.

detectron2 and pycocotools meet a malformed annotation late and cryptically: detectron2's
``load_coco_json`` leaves ``"segmentation": []`` out, and mask training stops with a
``KeyError`` at the first batch holding it; it drops a ``[[]]`` or 2-point polygon, so
training runs to the end, and then pycocotools' COCO evaluation, which reads the JSON itself,
crashes on it. :func:`find_invalid_annotations` lists every such annotation of a COCO dict
with its id and its image, :func:`without_annotations` removes them.

Each annotation must have

* an ``id`` (unique), an ``image_id`` of an image of the file, a ``category_id`` of a
  category of the file;
* a ``bbox`` of 4 finite numbers ``[x, y, w, h]`` with ``w, h >= 0`` (detectron2 needs it);
* an ``area``, a finite number >= 0, and ``iscrowd`` 0 or 1 (COCO evaluation reads both);
* a ``segmentation`` that is a non-empty list of polygons, each of at least 3 points (an even
  number >= 6 of finite coordinates), or an RLE ``{"counts", "size"}`` whose size is the
  image's ``[height, width]``; or no ``segmentation`` at all, unless other annotations of the
  file have one (mask training needs every instance's mask).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["InvalidAnnotation", "find_invalid_annotations", "describe_invalid",
           "without_annotations", "instances_without_masks"]


@dataclass(frozen=True)
class InvalidAnnotation:
    """One malformed annotation: its id (None if it has none), position in the file's
    ``annotations`` list, its image (id and file name, if known) and what is wrong."""

    annotation_id: Any
    index: int
    image_id: Any
    file_name: str | None
    reason: str

    def __str__(self) -> str:
        image = f"image {self.file_name!r} (id {self.image_id!r})" if self.file_name is not None \
            else f"image_id {self.image_id!r}"
        return f"annotation id {self.annotation_id!r} of {image}: {self.reason}"


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) \
        and math.isfinite(value)


def _bbox_problem(bbox: Any) -> str | None:
    if bbox is None:
        return "no bbox"
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(_finite, bbox)):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox has a negative width or height: {bbox!r}"
    return None


def _segmentation_problem(segm: Any, image: Mapping[str, Any] | None) -> str | None:
    if isinstance(segm, Mapping):
        if "counts" not in segm or "size" not in segm:
            return f"an RLE segmentation needs 'counts' and 'size', got keys {sorted(segm)}"
        if image is not None and list(segm["size"]) != [image.get("height"), image.get("width")]:
            return (f"RLE size {list(segm['size'])} is not the image's [height, width] "
                    f"{[image.get('height'), image.get('width')]}")
        return None
    if not isinstance(segm, list) or not segm:
        return f"segmentation must be a non-empty list of polygons or an RLE, got {segm!r}"
    for polygon in segm:
        if not isinstance(polygon, list) or not all(map(_finite, polygon)):
            return f"a polygon must be a list of finite coordinates, got {polygon!r}"
        if len(polygon) < 6 or len(polygon) % 2:
            return (f"a polygon needs at least 3 points (x, y pairs: an even number >= 6 of "
                    f"coordinates), got {len(polygon)} coordinates")
    return None


def find_invalid_annotations(coco: Mapping[str, Any]) -> list[InvalidAnnotation]:
    """Every annotation of a COCO-format dict (a loaded instances JSON) that breaks a rule of
    the module docstring, in file order."""
    images = {image.get("id"): image for image in coco.get("images", [])
              if isinstance(image, Mapping)}
    categories = {c.get("id") for c in coco.get("categories", []) if isinstance(c, Mapping)}
    annotations = coco.get("annotations", [])
    entries = [a if isinstance(a, Mapping) else {} for a in annotations]
    id_counts = Counter(a.get("id") for a in entries if "id" in a)
    has_masks = any("segmentation" in a for a in entries)
    found = []
    for index, (raw, ann) in enumerate(zip(annotations, entries)):
        image = images.get(ann.get("image_id"))
        problems = []
        if not isinstance(raw, Mapping):
            problems.append(f"not a JSON object: {raw!r}")
        else:
            if "id" not in ann:
                problems.append("no id")
            elif id_counts[ann["id"]] > 1:
                problems.append(f"its id is used by {id_counts[ann['id']]} annotations")
            if image is None:
                problems.append(f"image_id {ann.get('image_id')!r} is not in 'images'")
            if ann.get("category_id") not in categories:
                problems.append(f"category_id {ann.get('category_id')!r} is not in 'categories'")
            if ann.get("iscrowd") not in (0, 1):
                problems.append(f"iscrowd must be 0 or 1, got {ann.get('iscrowd')!r}")
            problems.append(_bbox_problem(ann.get("bbox")))
            if not _finite(ann.get("area")) or ann["area"] < 0:
                problems.append(f"area must be a finite number >= 0, got {ann.get('area')!r}")
            if "segmentation" in ann:
                problems.append(_segmentation_problem(ann["segmentation"], image))
            elif has_masks:
                problems.append("no segmentation, while other annotations have one (mask "
                                "training needs a mask for every instance)")
        problems = [p for p in problems if p]
        if problems:
            found.append(InvalidAnnotation(
                annotation_id=ann.get("id"), index=index, image_id=ann.get("image_id"),
                file_name=image.get("file_name") if image is not None else None,
                reason="; ".join(problems)))
    return found


def describe_invalid(invalid: list[InvalidAnnotation], limit: int = 10) -> str:
    """One line per invalid annotation (the first ``limit``), for messages."""
    lines = [f"  {problem}" for problem in invalid[:limit]]
    if len(invalid) > limit:
        lines.append(f"  ... and {len(invalid) - limit} more")
    return "\n".join(lines)


def without_annotations(coco: Mapping[str, Any], invalid: list[InvalidAnnotation]
                        ) -> dict[str, Any]:
    """A shallow copy of ``coco`` whose ``annotations`` list lacks the ``invalid`` ones."""
    drop = {problem.index for problem in invalid}
    return {**coco, "annotations": [a for i, a in enumerate(coco.get("annotations", []))
                                    if i not in drop]}


def instances_without_masks(dataset_dicts: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """``(file_name, annotation index)`` of every instance without a ``segmentation`` in
    detectron2's dataset dicts, if any instance has one; ``[]`` if none has (a box-only
    dataset). detectron2's mask training stops with a KeyError on such an instance."""
    if not any("segmentation" in a for d in dataset_dicts for a in d.get("annotations", [])):
        return []
    return [(d.get("file_name", "?"), i) for d in dataset_dicts
            for i, a in enumerate(d.get("annotations", [])) if "segmentation" not in a]
