"""The embedded demo dataset: procedural shapes (:mod:`mabn_d2.data.shapes`) in COCO format.

Registered in detectron2's catalogs under :data:`DEMO_TRAIN` and :data:`DEMO_VAL` (a
held-out split drawn from a different seed) like any COCO dataset (``evaluator_type``
"coco", ``json_file``, ``image_root``, ``thing_classes``). The files are written on first
use under ``$MABN_D2_DATASETS/mabn_demo_shapes`` (default ``./datasets``, git-ignored), and
regenerated, deterministically, when missing, made by another generator version, or damaged
(the manifest records each file's size and SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import CATEGORIES, GENERATOR_VERSION, ShapesSpec, write_split

__all__ = [
    "DEMO_SPLITS",
    "DEMO_TRAIN",
    "DEMO_VAL",
    "ensure_demo_dataset",
    "register_demo_datasets",
]

logger = logging.getLogger(__name__)

DEMO_TRAIN = "mabn_demo_shapes_train"
DEMO_VAL = "mabn_demo_shapes_val"
# dataset name -> (split directory, spec). Disjoint seeds: the val split is held out.
DEMO_SPLITS: dict[str, tuple[str, ShapesSpec]] = {
    DEMO_TRAIN: ("train", ShapesSpec(num_images=1000, seed=2020)),
    DEMO_VAL: ("val", ShapesSpec(num_images=200, seed=7)),
}
_MANIFEST = "manifest.json"


def demo_root() -> Path:
    """``$MABN_D2_DATASETS/mabn_demo_shapes`` (``MABN_D2_DATASETS`` defaults to ``datasets``)."""
    return (Path(os.environ.get("MABN_D2_DATASETS", "datasets")) / "mabn_demo_shapes").absolute()


Splits = dict[str, tuple[str, ShapesSpec]]


def _manifest(splits: Splits) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "splits": {
            name: {"dir": d, "spec": asdict(spec)} for name, (d, spec) in splits.items()
        },
    }


def _fingerprint(path: Path) -> list:
    """``[size, sha256]`` of a file: the manifest checks content, not only names."""
    data = path.read_bytes()
    return [len(data), hashlib.sha256(data).hexdigest()]


def _file_fingerprints(root: Path, splits: Splits) -> dict[str, list]:
    files = {}
    for split_dir, _ in splits.values():
        image_dir, json_file = _paths(root, split_dir)
        for path in [json_file, *sorted(image_dir.glob("*.png"))]:
            files[str(path.relative_to(root))] = _fingerprint(path)
    return files


def _paths(root: Path, split_dir: str) -> tuple[Path, Path]:
    """(image directory, instances JSON) of one split under ``root``."""
    return root / split_dir, root / "annotations" / f"instances_{split_dir}.json"


def _is_current(root: Path, splits: Splits) -> bool:
    """A complete, intact copy made by this generator version with these specs: every file
    has the size and SHA-256 the manifest recorded when it was written (a truncated or
    edited image makes the copy stale: it is regenerated)."""
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
        files = manifest.pop("files")
        if manifest != _manifest(splits):
            return False
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    for split_dir, spec in splits.values():
        image_dir, json_file = _paths(root, split_dir)
        if not json_file.is_file() or len(list(image_dir.glob("*.png"))) != spec.num_images:
            return False
    try:
        return all(_fingerprint(root / name) == list(expected)
                   for name, expected in files.items())
    except OSError:
        return False


def ensure_demo_dataset(root: Path | None = None, splits: Splits | None = None) -> Path:
    """Write the demo dataset under ``root`` (default :func:`demo_root`) unless a current copy
    is there; return ``root``.

    The copy is built in a temporary sibling directory and renamed into place, so concurrent
    processes (e.g. the ranks of a multi-process launch) never see a half-written dataset.
    """
    root = Path(root) if root is not None else demo_root()
    splits = DEMO_SPLITS if splits is None else splits
    if _is_current(root, splits):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Writing the mabn_d2 demo dataset (procedural shapes) to %s ...", root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split_dir, spec in splits.values():
            write_split(spec, *_paths(tmp, split_dir))
        manifest = {**_manifest(splits), "files": _file_fingerprints(tmp, splits)}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        if root.exists() and not _is_current(root, splits):  # stale, incomplete or damaged
            shutil.rmtree(root)
        try:
            tmp.rename(root)
        except OSError:
            if not _is_current(root, splits):  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _load(name: str, root: Path) -> list[dict]:
    split_dir, _ = DEMO_SPLITS[name]
    image_dir, json_file = _paths(ensure_demo_dataset(root), split_dir)
    return load_coco_json(str(json_file), str(image_dir), name)


def register_demo_datasets(root: Path | None = None) -> None:
    """Register :data:`DEMO_TRAIN` and :data:`DEMO_VAL` (idempotent). Nothing is written
    until a split is loaded (``DatasetCatalog.get``) or :func:`ensure_demo_dataset` runs."""
    root = Path(root) if root is not None else demo_root()
    for name, (split_dir, _) in DEMO_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        image_dir, json_file = _paths(root, split_dir)
        DatasetCatalog.register(name, lambda name=name: _load(name, root))
        MetadataCatalog.get(name).set(
            json_file=str(json_file),
            image_root=str(image_dir),
            evaluator_type="coco",
            thing_classes=list(CATEGORIES),
        )
