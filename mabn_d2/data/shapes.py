"""Procedural instance-segmentation data: coloured shapes with exact polygon masks.

Each image is ``image_size x image_size`` RGB: a linear colour gradient with 1 to
``max_objects`` non-overlapping shapes of four categories (circle, square, triangle, star),
each of a random size, rotation and flat colour. A shape's annotation is its polygon, and
the image is painted through **pycocotools' rasterisation of that same polygon**, so the
mask that detectron2 and COCO evaluation decode from the annotation is exactly the set of
pixels of the shape's colour; its bbox and area are those of that mask.

Everything is drawn from ``numpy.random.RandomState(seed)``: a split is a pure function of
its :class:`ShapesSpec`, bit for bit (PNG bytes included).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

__all__ = ["CATEGORIES", "GENERATOR_VERSION", "ShapesSpec", "write_split"]

# Bump when the drawing changes, so stale copies on disk are regenerated.
GENERATOR_VERSION = 1
CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "star")


@dataclass(frozen=True)
class ShapesSpec:
    """What one split contains.

    Attributes:
        num_images: number of images.
        seed: seed of the split's random stream (different seeds: disjoint splits).
        image_size: side of the square images, in pixels.
        max_objects: at most this many shapes per image (at least 1).
        min_radius, max_radius: circumradius range of a shape, in pixels.
        min_contrast: least luma difference (0-255) between a shape and the background.
    """

    num_images: int
    seed: int
    image_size: int = 128
    max_objects: int = 5
    min_radius: float = 8.0
    max_radius: float = 24.0
    min_contrast: float = 60.0

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.max_objects < 1:
            raise ValueError(f"ShapesSpec needs num_images >= 1 and max_objects >= 1: {self}")
        if not 2 <= self.min_radius <= self.max_radius < self.image_size / 2:
            raise ValueError(
                f"ShapesSpec needs 2 <= min_radius <= max_radius < image_size / 2: {self}"
            )


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _polygon(category: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices ``(K, 2)`` (x, y) of a shape with circumradius ``r``, rotated by ``angle``."""
    if category == "circle":
        k, radii = 32, np.full(32, r)
    elif category == "square":
        k, radii = 4, np.full(4, r)
    elif category == "triangle":
        k, radii = 3, np.full(3, r)
    elif category == "star":
        k, radii = 10, np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    else:
        raise ValueError(f"unknown shape category {category!r}; known: {CATEGORIES}")
    theta = angle + 2 * math.pi * np.arange(k) / k
    return np.stack([cx + radii * np.cos(theta), cy + radii * np.sin(theta)], axis=1)


def _background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """A linear gradient between two random colours, ``(size, size, 3)`` float."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    direction = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (np.cos(direction) * xx + np.sin(direction) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    return c0 + t[..., None] * (c1 - c0)


def _shape_colour(rng: np.random.RandomState, bg_luma: float, min_contrast: float) -> np.ndarray:
    while True:
        colour = rng.randint(0, 256, size=3)
        if abs(_luma(colour) - bg_luma) >= min_contrast:
            return colour


def draw_image(spec: ShapesSpec, rng: np.random.RandomState) -> tuple[np.ndarray, list[dict]]:
    """One image ``(H, W, 3) uint8`` and its annotations (COCO fields, ``category_id`` 1-based).

    Shapes are placed by rejection sampling so that their circumscribed circles are at least
    2 px apart: no shape occludes another, so each polygon is exactly its visible region.
    """
    size = spec.image_size
    background = _background(rng, size)
    image = np.clip(np.rint(background), 0, 255).astype(np.uint8)
    bg_luma = float(_luma(background.reshape(-1, 3).mean(axis=0)))
    placed: list[tuple[float, float, float]] = []
    annotations = []
    wanted = rng.randint(1, spec.max_objects + 1)
    for _ in range(50 * wanted):
        if len(placed) == wanted:
            break
        r = rng.uniform(spec.min_radius, spec.max_radius)
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        if any(math.hypot(cx - x, cy - y) < r + q + 2 for x, y, q in placed):
            continue
        category_id = rng.randint(len(CATEGORIES)) + 1
        angle = rng.uniform(0, 2 * math.pi)
        polygon = np.round(_polygon(CATEGORIES[category_id - 1], cx, cy, r, angle), 2)
        flat = [float(v) for v in polygon.reshape(-1)]
        rle = mask_util.merge(mask_util.frPyObjects([flat], size, size))
        mask = mask_util.decode(rle).astype(bool)
        if not mask.any():
            continue
        image[mask] = _shape_colour(rng, bg_luma, spec.min_contrast)
        placed.append((cx, cy, r))
        annotations.append({
            "category_id": int(category_id),
            "segmentation": [flat],
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "area": float(mask_util.area(rle)),
            "iscrowd": 0,
        })
    return image, annotations


def write_split(spec: ShapesSpec, image_dir: Path, json_file: Path) -> dict[str, Any]:
    """Draw the split: PNGs into ``image_dir``, the COCO instances JSON into ``json_file``.

    Returns:
        the COCO dict written (``images``, ``annotations``, ``categories``, ``info``).
    """
    rng = np.random.RandomState(spec.seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    json_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, spec.num_images + 1):
        pixels, anns = draw_image(spec, rng)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": spec.image_size,
                       "width": spec.image_size})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    coco = {
        "info": {"description": "mabn_d2 procedural shapes (see mabn_d2/data/shapes.py)",
                 "generator_version": GENERATOR_VERSION, "spec": asdict(spec)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                       for i, name in enumerate(CATEGORIES)],
    }
    json_file.write_text(json.dumps(coco))
    return coco
