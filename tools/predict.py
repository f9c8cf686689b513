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

The predictors are :mod:`mabn_d2.engine.predictor`'s. ``--fuse`` folds the eval-mode MABN
layers into their convs first (:func:`mabn_d2.fuse_mabn`, the deployed form). The device is the
config's ``MODEL.DEVICE`` (``--opts MODEL.DEVICE cuda``; in a LazyConfig
``train.device=cuda``). Images are resized as the config's test data are.
Images are read one at a time (:func:`mabn_d2.data.image_io.read_image`: 16-bit and float
images scaled to 8 bits, unknown scales refused), and every input gets its own picture
(``x.png`` of two folders: ``x.png`` and ``x_2.png``). A missing or unreadable image, and
weights that are not a checkpoint or do not fit the config's model, stop the run with one
message naming them and exit code 2 (``--debug`` or ``MABN_D2_DEBUG=1``: the traceback).
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
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

import mabn_d2  # noqa: F401  (registers the norm "MABN" in detectron2)
from mabn_d2.cli import UserError, run_tool, strip_debug_flag
from mabn_d2.data.image_io import read_image
from mabn_d2.engine.predictor import load_predictor
from mabn_d2.validation import check_output_dir

logger = logging.getLogger("mabn_d2.predict")


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Image paths from paths and glob patterns, in order; a pattern matching nothing or a
    missing file is an error naming it."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise UserError(f"--input pattern {pattern!r} matches no file")
            paths += [Path(m) for m in matches]
        elif not os.path.isfile(pattern):
            raise UserError(f"--input {pattern!r} is not a file")
        else:
            paths.append(Path(pattern))
    return paths


def load_image(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 BGR, as ``DefaultPredictor`` takes it (:func:`mabn_d2.data.
    image_io.read_image`: 16-bit and float images scaled, unknown scales refused); errors
    name the file."""
    return read_image(path, format="BGR")


def output_names(paths: Sequence[Path]) -> list[str]:
    """One distinct picture name per input: its stem, and for a stem already taken (another
    folder's ``x.png``) ``stem_2``, ``stem_3``, ... skipping every name another input owns
    (``x_2.png`` keeps ``x_2``)."""
    owned = {path.stem for path in paths}
    used: set[str] = set()
    names = []
    for path in paths:
        name, k = path.stem, 2
        while name in used or (name != path.stem and name in owned):
            name = f"{path.stem}_{k}"
            k += 1
        used.add(name)
        names.append(name)
    return names


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
        raise UserError(f"--dataset {name!r} is not registered; registered: "
                         f"{', '.join(sorted(DatasetCatalog.list()))}")
    return DatasetCatalog.get(name)[:num_images]


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


def run(args: argparse.Namespace) -> dict[str, list[Detection]]:
    """Predict every input; returns ``{image path: detections}`` (what it prints)."""
    if bool(args.input) == bool(args.dataset):
        raise UserError("give either --input images or --dataset NAME")
    _log_to_stderr()
    if args.output:
        check_output_dir(args.output, "--output")  # before the model is built
    predictor, names = load_predictor(args.config_file, args.opts, fuse=args.fuse)
    if args.dataset:
        records = dataset_records(args.dataset, args.num_images)
        items = [(Path(r["file_name"]), r) for r in records]
    else:
        items = [(path, None) for path in expand_inputs(args.input)]
    names = [args.dataset] if args.dataset else names
    metadata = MetadataCatalog.get(names[0] if names else "__unused")
    class_names = metadata.get("thing_classes", [])
    output = Path(args.output) if args.output else None
    pictures = output_names([path for path, _ in items])
    results: dict[str, list[Detection]] = {}
    written = 0
    # One image at a time: memory does not grow with the number of inputs.
    for (path, record), picture_name in zip(items, pictures):
        image = load_image(path)
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
            save_rgb(picture, output / f"{picture_name}.png")
            written += 1
        del image, instances
    if output is not None:
        print(f"predict: {written} pictures in {output}")
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
    """The command line; a user error is one message and exit code 2 (``--debug`` or
    ``MABN_D2_DEBUG=1``: with the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_tool("predict.py", lambda: run(parse_args(strip_debug_flag(argv))), argv)


if __name__ == "__main__":
    sys.exit(main())
