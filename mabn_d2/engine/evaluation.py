"""COCO evaluation for MABN models, working with or without detectron2's compiled ops.

detectron2's :class:`~detectron2.evaluation.COCOEvaluator` defaults to a C++ re-implementation
of COCOeval in ``detectron2._C``; a pure-Python detectron2 lacks it, so the official
pycocotools COCOeval is used there (same metrics, slower). Results are also written as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from tabulate import tabulate

from ..data.annotation_checks import describe_invalid, find_invalid_annotations, without_annotations
from ..detectron2_compat import coco_evaluator_ground_truth, has_compiled_coco_eval
from ..file_io import atomic_write

__all__ = [
    "CheckedCOCOEvaluator",
    "EVAL_RESULTS_FILE",
    "has_compiled_coco_eval",
    "coco_evaluator",
    "build_coco_evaluator",
    "report_eval_results",
]

logger = logging.getLogger(__name__)
# Written to the output directory by every evaluation: {dataset: {"bbox"/"segm": {metric: value}}}.
EVAL_RESULTS_FILE = "eval_results.json"
_SUMMARY_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class CheckedCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` whose ground truth leaves out malformed annotations
    (:func:`mabn_d2.data.annotation_checks.find_invalid_annotations`), with a warning naming
    them: pycocotools' evaluation would crash on them after the whole inference."""

    def __init__(self, dataset_name: str, *args, **kwargs) -> None:
        super().__init__(dataset_name, *args, **kwargs)
        gt = coco_evaluator_ground_truth(self)
        invalid = find_invalid_annotations(gt.dataset) if gt is not None else []
        if invalid:
            logger.warning("COCO evaluation of %s leaves out %d malformed ground-truth "
                           "annotations:\n%s", dataset_name, len(invalid),
                           describe_invalid(invalid))
            gt.dataset = without_annotations(gt.dataset, invalid)
            gt.createIndex()


def coco_evaluator(
    dataset_name: str, output_dir: str | None = None, **kwargs: Any
) -> COCOEvaluator:
    """detectron2's ``COCOEvaluator(dataset_name, output_dir=output_dir, **kwargs)`` that also
    works without detectron2's compiled ops and with malformed ground truth
    (:class:`CheckedCOCOEvaluator`): ``use_fast_impl`` defaults to whether
    ``detectron2._C`` has the C++ COCOeval (pycocotools' official COCOeval otherwise: same
    metrics, slower). The tasks (bbox, segm, keypoints) follow the model's predictions."""
    if "use_fast_impl" not in kwargs:
        kwargs["use_fast_impl"] = has_compiled_coco_eval()
        if not kwargs["use_fast_impl"]:
            logger.info(
                "detectron2._C has no C++ COCOeval (detectron2 without compiled ops): "
                "evaluating %s with pycocotools' official COCOeval "
                "(COCOEvaluator(use_fast_impl=False))", dataset_name,
            )
    return CheckedCOCOEvaluator(dataset_name, output_dir=output_dir, **kwargs)


def build_coco_evaluator(
    cfg: CfgNode, dataset_name: str, output_folder: str | None = None
) -> COCOEvaluator:
    """:func:`coco_evaluator` for ``dataset_name`` of a YACS job (boxes, plus masks when the
    model predicts them).

    Raises:
        ValueError: the dataset is not in COCO format (its ``evaluator_type`` is not "coco").
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type != "coco":
        raise ValueError(
            f"Dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; mabn_d2 evaluates "
            "COCO-format instance datasets only (register yours with DATASETS.REGISTER_COCO)"
        )
    return coco_evaluator(dataset_name, output_folder)


def _finite_or_none(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_eval_results(results: Mapping[str, Mapping[str, Mapping[str, float]]], path: str) -> None:
    """Write ``{dataset: {task: {metric: value}}}`` as JSON; undefined metrics (COCOeval's NaN:
    no ground truth of that category or size) are written as ``null``."""
    clean = {
        dataset: {
            task: {metric: _finite_or_none(v) for metric, v in metrics.items()}
            for task, metrics in per_task.items()
        }
        for dataset, per_task in results.items()
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    content = json.dumps(clean, indent=2).encode()
    # Whole or not at all: studies/detection_comparison.py takes a present file as a finished run.
    atomic_write(path, lambda f: f.write(content))


def summary_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One row per (dataset, task) with the COCO summary metrics, e.g. box and mask AP."""
    rows = []
    for dataset, per_task in results.items():
        for task, metrics in per_task.items():
            rows.append([dataset, task] + [metrics.get(m, float("nan")) for m in _SUMMARY_METRICS])
    return tabulate(
        rows, headers=["dataset", "task", *_SUMMARY_METRICS], floatfmt=".2f", tablefmt="pipe"
    )


def report_eval_results(
    results: Mapping[str, Mapping[str, Mapping[str, float]]], output_dir: str
) -> str | None:
    """In the main process: log ``{dataset: {task: {metric: value}}}`` as one summary table
    and write it to ``output_dir/eval_results.json``; returns that path (None elsewhere, or
    when there are no results)."""
    if not comm.is_main_process() or not any(results.values()):
        return None
    path = os.path.join(output_dir, EVAL_RESULTS_FILE)
    save_eval_results(results, path)
    logger.info("COCO results (saved to %s):\n%s", path, summary_table(results))
    return path
