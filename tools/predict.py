#!/usr/bin/env python
"""Run a trained model on images: pictures of its predictions, or the detections as text.

detectron2's ``demo/demo.py`` conventions, for every config this project ships::

    # one picture per input (boxes, masks, class names, scores) into a folder
    python tools/predict.py --config-file configs/demo/mask_rcnn_R_18_FPN_demo_mabn.yaml \\
        --input photos/*.jpg --output predictions/ --opts MODEL.WEIGHTS output/demo/model_final.pth

    # a LazyConfig: overrides as key=value
    python tools/predict.py --config-file configs/lazy/demo/mask_rcnn_R_18_FPN_demo_mabn.py \
        --input photos/*.jpg --output predictions/ \
        --opts train.init_checkpoint=output/lazy_demo/model_final.pth

    # no --output: print the detections (no window is opened)
    python tools/predict.py --config-file CFG --input a.png b.png --confidence-threshold 0.3 \\
        --opts MODEL.WEIGHTS model_final.pth

    # images of a registered dataset, ground truth drawn beside each prediction
    python tools/predict.py --config-file CFG --dataset mabn_demo_shapes_val --num-images 6 \\
        --output predictions/ --opts MODEL.WEIGHTS model_final.pth

``--fuse`` folds the eval-mode MABN layers into their convs first (:func:`mabn_d2.fuse_mabn`,
the deployed form). The device is the config's ``MODEL.DEVICE`` (``--opts MODEL.DEVICE cuda``;
in a LazyConfig ``train.device=cuda``). Images are resized as the config's test data are.
A missing or unreadable image, and weights that do not fit the config's model, stop the run
with a message naming them.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer
from fvcore.common.checkpoint import _IncompatibleKeys

import mabn_d2
from mabn_d2.engine import get_mabn_cfg, mabn_setup
from mabn_d2.engine.lazy_training import build_lazy_model
from mabn_d2.integration.lazy_config import validate_lazy_config

logger = logging.getLogger("mabn_d2.predict")


class WeightsMismatchError(RuntimeError):
    """The weights file does not describe the config's model."""


class _StrictCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, but a model entry missing from the weights or of another
    shape is an error instead of a logged warning (an untrained part would predict noise)."""

    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        super()._log_incompatible_keys(incompatible)
        problems = [f"{key}: shape {tuple(saved)} in the weights, {tuple(wanted)} in the model"
                    for key, saved, wanted in incompatible.incorrect_shapes]
        problems += [f"{key}: not in the weights" for key in incompatible.missing_keys]
        if problems:
            shown = "\n  ".join(problems[:10])
            more = f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else ""
            raise WeightsMismatchError(
                f"the weights do not fit the model of the config ({len(problems)} entries):"
                f"\n  {shown}{more}\nUse the config the weights were trained with.")


def _check_weights(weights: str, key: str, example: str) -> None:
    if not weights:
        raise SystemExit(f"predict: no weights: add --opts {example}")
    if "://" not in weights and not os.path.isfile(weights):
        raise SystemExit(f"predict: {key} {weights!r} is not a file")


def build_predictor(cfg: CfgNode, fuse: bool = False) -> DefaultPredictor:
    """detectron2's ``DefaultPredictor`` for ``cfg``, its weights loaded strictly (see
    :class:`_StrictCheckpointer`), MABN folded into the convs if ``fuse``."""
    weights = cfg.MODEL.WEIGHTS
    _check_weights(weights, "MODEL.WEIGHTS", "MODEL.WEIGHTS path/to/model_final.pth")
    empty = cfg.clone()
    empty.defrost()
    empty.MODEL.WEIGHTS = ""  # the predictor starts from scratch; the strict load follows
    predictor = DefaultPredictor(empty)
    _StrictCheckpointer(predictor.model).load(weights)
    if fuse:
        mabn_d2.fuse_mabn(predictor.model, inplace=True)
    return predictor


class LazyPredictor:
    """``DefaultPredictor`` for a LazyConfig: ``cfg.model`` with the weights of
    ``train.init_checkpoint`` (loaded strictly), images resized by the test mapper's
    augmentations, in ``model.input_format``; ``predictor(bgr_image) -> {"instances": ...}``."""

    def __init__(self, cfg, fuse: bool = False) -> None:
        weights = cfg.train.init_checkpoint
        _check_weights(weights, "train.init_checkpoint",
                       "train.init_checkpoint=path/to/model_final.pth")
        self.model = build_lazy_model(cfg).eval()
        _StrictCheckpointer(self.model).load(weights)
        if fuse:
            mabn_d2.fuse_mabn(self.model, inplace=True)
        self.augmentations = T.AugmentationList(
            instantiate(cfg.dataloader.test.mapper.augmentations))
        self.input_format = cfg.model.get("input_format", "BGR")

    def __call__(self, image_bgr: np.ndarray) -> dict:
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        height, width = image.shape[:2]
        resized = T.AugInput(image)
        self.augmentations(resized)
        tensor = torch.as_tensor(resized.image.astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            return self.model([{"image": tensor, "height": height, "width": width}])[0]


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Image paths from paths and glob patterns, in order; a pattern matching nothing or a
    missing file is an error naming it."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise SystemExit(f"predict: --input pattern {pattern!r} matches no file")
            paths += [Path(m) for m in matches]
        elif not os.path.isfile(pattern):
            raise SystemExit(f"predict: --input {pattern!r} is not a file")
        else:
            paths.append(Path(pattern))
    return paths


def load_image(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 BGR, as ``DefaultPredictor`` takes it; errors name the file."""
    try:
        return read_image(str(path), format="BGR")
    except Exception as e:  # PIL.UnidentifiedImageError, OSError, ...
        raise SystemExit(f"predict: cannot read {path} as an image ({type(e).__name__}: {e})"
                         ) from None


@dataclass(frozen=True)
class Detection:
    """One predicted instance: class name, score and box ``(x0, y0, x1, y1)`` in pixels."""

    label: str
    score: float
    box: tuple[float, float, float, float]

    def line(self) -> str:
        x0, y0, x1, y1 = self.box
        return f"  {self.label} {self.score:.4f} [{x0:.2f}, {y0:.2f}, {x1:.2f}, {y1:.2f}]"


def detections(instances: Instances, class_names: Sequence[str], threshold: float
               ) -> list[Detection]:
    """The instances scoring at least ``threshold``, best first."""
    keep = instances[instances.scores >= threshold].to("cpu")
    order = torch.argsort(keep.scores, descending=True)
    boxes = keep.pred_boxes.tensor[order].tolist()
    return [Detection(class_names[c] if c < len(class_names) else str(c), s, tuple(b))
            for c, s, b in zip(keep.pred_classes[order].tolist(), keep.scores[order].tolist(),
                               boxes)]


def draw_predictions(image_bgr: np.ndarray, instances: Instances, metadata, threshold: float
                     ) -> np.ndarray:
    """The image with the instances above ``threshold`` drawn by detectron2's Visualizer
    (RGB, the input's size)."""
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
    kept = instances[instances.scores >= threshold].to("cpu")
    return visualizer.draw_instance_predictions(kept).get_image()


def draw_ground_truth(image_bgr: np.ndarray, record: dict, metadata) -> np.ndarray:
    """The image with its dataset annotations drawn (RGB, the input's size)."""
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_dataset_dict(record).get_image()


def save_rgb(picture: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)


def dataset_records(name: str, num_images: int) -> list[dict]:
    """The first ``num_images`` records of a registered dataset (its order)."""
    if name not in DatasetCatalog.list():
        raise SystemExit(f"predict: --dataset {name!r} is not registered; registered: "
                         f"{', '.join(sorted(DatasetCatalog.list()))}")
    return DatasetCatalog.get(name)[:num_images]


def _names(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a line is logged (not when it was made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it
        pass


def _log_to_stderr() -> None:
    """mabn_d2's and detectron2's log lines on stderr (once): stdout holds only detections."""
    for name in ("mabn_d2", "detectron2"):
        log = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) for h in log.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s",
                                                   datefmt="%m/%d %H:%M:%S"))
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def load_predictor(args: argparse.Namespace):
    """``(predictor, dataset names of the config: test first)`` for a YAML or LazyConfig
    (``.py``) ``--config-file`` with ``--opts`` applied."""
    _log_to_stderr()
    if args.config_file.endswith(".py"):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
        validate_lazy_config(cfg)
        names = [*_names(cfg.dataloader.test.dataset.get("names")),
                 *_names(cfg.dataloader.train.dataset.get("names"))]
        return LazyPredictor(cfg, fuse=args.fuse), names
    cfg = get_mabn_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    mabn_setup(cfg, log_to_output_dir=False)  # a prediction writes nothing into a training run
    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    return build_predictor(cfg, fuse=args.fuse), names


def run(args: argparse.Namespace) -> dict[str, list[Detection]]:
    """Predict every input; returns ``{image path: detections}`` (what it prints)."""
    if bool(args.input) == bool(args.dataset):
        raise SystemExit("predict: give either --input images or --dataset NAME")
    predictor, names = load_predictor(args)  # registers the config's own datasets too
    if args.dataset:
        records = dataset_records(args.dataset, args.num_images)
        items = [(Path(r["file_name"]), r) for r in records]
    else:
        items = [(path, None) for path in expand_inputs(args.input)]
    images = [(path, load_image(path), record) for path, record in items]
    names = [args.dataset] if args.dataset else names
    metadata = MetadataCatalog.get(names[0] if names else "__unused")
    class_names = metadata.get("thing_classes", [])
    output = Path(args.output) if args.output else None
    results: dict[str, list[Detection]] = {}
    used: set[str] = set()
    for path, image, record in images:
        instances = predictor(image)["instances"]
        found = detections(instances, class_names, args.confidence_threshold)
        results[str(path)] = found
        height, width = image.shape[:2]
        print(f"{path} ({width}x{height}): {len(found)} detections with score >= "
              f"{args.confidence_threshold:g}")
        for detection in found:
            print(detection.line())
        if output is not None:
            picture = draw_predictions(image, instances, metadata, args.confidence_threshold)
            if record is not None:  # ground truth on the left, predictions on the right
                picture = np.concatenate([draw_ground_truth(image, record, metadata), picture],
                                         axis=1)
            name = path.stem if path.stem not in used else f"{path.stem}_{len(used)}"
            used.add(name)
            save_rgb(picture, output / f"{name}.png")
    if output is not None:
        print(f"predict: {len(images)} pictures in {output}")
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", default=[],
                        help="image files or glob patterns (quote them: 'dir/*.jpg')")
    parser.add_argument("--dataset", help="a registered dataset's images instead of --input; "
                        "its ground truth is drawn beside each prediction")
    parser.add_argument("--num-images", type=int, default=6, help="with --dataset (default 6)")
    parser.add_argument("--output", help="folder for one picture per input (PNG, named after "
                        "the input); without it the detections are printed only")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--fuse", action="store_true",
                        help="fold MABN into the convs first (the deployed model)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides: KEY VALUE pairs for YAML (MODEL.WEIGHTS m.pth), "
                        "key=value for a LazyConfig (train.init_checkpoint=m.pth)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        parser.error(f"--confidence-threshold must be in [0, 1], got "
                     f"{args.confidence_threshold}")
    if args.num_images < 1:
        parser.error(f"--num-images must be >= 1, got {args.num_images}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except WeightsMismatchError as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
