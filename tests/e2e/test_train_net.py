"""``tools/train_net.py`` end to end on the real COCO subset, as a user runs it (subprocesses).

* train a tiny MABN Mask R-CNN for a few iterations, evaluate, then ``--eval-only`` on the
  checkpoint (through a user-registered copy of the same COCO JSON): same predictions;
* ``--eval-only`` without weights, and a CUDA device without CUDA, are clear errors.

A run killed after a checkpoint and resumed: tests/e2e/test_resume.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mabn_d2.detectron2_compat import has_compiled_coco_eval

from helpers import REPO, TINY, mabn_state

TRAIN_NET = REPO / "tools" / "train_net.py"
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def train_net_cmd(*args: object) -> list[str]:
    return [sys.executable, str(TRAIN_NET), "--config-file", str(TINY), *map(str, args)]


def train_net_env(coco_mini: Path) -> dict[str, str]:
    # One thread: the 2-core machines these run on are shared; results do not depend on it.
    return {**os.environ, "DETECTRON2_DATASETS": str(coco_mini), "OMP_NUM_THREADS": "1"}


def run_train_net(coco_mini: Path, *args: object) -> str:
    proc = subprocess.run(
        train_net_cmd(*args), env=train_net_env(coco_mini), cwd=REPO, capture_output=True,
        text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


def load_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "eval_results.json").read_text())


def load_predictions(output_dir: Path, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    preds = json.loads(
        (output_dir / "inference" / dataset / "coco_instances_results.json").read_text()
    )
    key = [(p["image_id"], p["category_id"], p["score"], *p["bbox"]) for p in preds]
    key.sort()
    array = np.array(key, dtype=np.float64)
    return array[:, :2], array[:, 2:]


def test_train_then_eval_only_on_coco_mini(coco_mini, tmp_path):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    log = run_train_net(coco_mini, "OUTPUT_DIR", train_dir, "SOLVER.MAX_ITER", 4)

    assert "norm 'MABN' registered in detectron2's get_norm" in log
    assert "MABN2d layers (36 fed by centralized convs)" in log
    # detectron2's C++ COCOeval where it is compiled (upstream main), pycocotools' otherwise.
    assert ("unofficial COCO API" if has_compiled_coco_eval() else "use_fast_impl=False") in log
    assert (train_dir / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert list(train_dir.glob("events.out.tfevents.*")), "no TensorBoard events"
    metrics = [json.loads(line) for line in (train_dir / "metrics.json").read_text().splitlines()]
    losses = [entry for entry in metrics if "total_loss" in entry]
    assert losses[-1]["iteration"] == 3 and math.isfinite(losses[-1]["total_loss"])
    assert any("bbox/AP" in entry and "segm/AP" in entry for entry in metrics)
    state = mabn_state(train_dir / "model_final.pth")
    assert state and all(int(s["num_batches_tracked"]) == 4 for s in state.values())

    results = load_results(train_dir)["coco_2017_val"]
    for task in ("bbox", "segm"):
        for metric in SUMMARY:
            assert math.isfinite(results[task][metric]), (task, metric, results[task])

    # Evaluate the checkpoint on the same images, registered as the user's own COCO dataset.
    root = coco_mini / "coco"
    json_file, image_root = root / "annotations" / "instances_val2017.json", root / "val2017"
    user_dataset = f"[['my_coco_val', '{json_file}', '{image_root}']]"
    run_train_net(
        coco_mini, "--eval-only", "MODEL.WEIGHTS", train_dir / "model_final.pth",
        "OUTPUT_DIR", eval_dir, "DATASETS.REGISTER_COCO", user_dataset,
        "DATASETS.TEST", "('my_coco_val',)",
    )
    again = load_results(eval_dir)["my_coco_val"]
    ids, values = load_predictions(train_dir, "coco_2017_val")
    ids_again, values_again = load_predictions(eval_dir, "my_coco_val")
    assert len(ids) > 0
    np.testing.assert_array_equal(ids, ids_again)
    np.testing.assert_allclose(values, values_again, atol=1e-3)
    for task in ("bbox", "segm"):
        for metric in SUMMARY:
            assert again[task][metric] == pytest.approx(results[task][metric], abs=1e-6)


def test_eval_only_without_weights_is_a_clear_error(coco_mini, tmp_path):
    proc = subprocess.run(
        train_net_cmd("--eval-only", "OUTPUT_DIR", tmp_path), env=train_net_env(coco_mini),
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "--eval-only needs weights" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    from mabn_d2.engine import get_mabn_cfg, mabn_setup

    cfg = get_mabn_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.MODEL.DEVICE = "cuda"
    cfg.OUTPUT_DIR = str(tmp_path)
    with pytest.raises(RuntimeError, match="MODEL.DEVICE cpu"):
        mabn_setup(cfg)
