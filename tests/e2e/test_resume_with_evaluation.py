"""Exact resume with evaluation during training: a checkpoint taken on an evaluation
iteration (saved before the evaluation) resumes to the same losses and weights as the
uninterrupted run, because the evaluation leaves the training RNG streams untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from helpers import REPO, TINY, read_losses, run_training, sigkill_when, training_env

WORKER = REPO / "tests" / "e2e" / "resume_worker.py"
TOTAL = 8
OPTS = ("SEED", 7, "DATALOADER.NUM_WORKERS", 0, "DATALOADER.ASPECT_RATIO_GROUPING", False,
        "SOLVER.CHECKPOINT_PERIOD", 4, "TEST.EVAL_PERIOD", 4, "INPUT.RANDOM_FLIP", "horizontal")


def small_val_set(coco_mini: Path, folder: Path) -> str:
    """A 3-image COCO val set (REGISTER_COCO entry): a short evaluation that still iterates a
    test loader, which draws from the torch RNG."""
    root = coco_mini / "coco"
    coco = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    images = coco["images"][:3]
    ids = {image["id"] for image in images}
    subset = {**coco, "images": images,
              "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    path = folder / "val3.json"
    path.write_text(json.dumps(subset))
    return repr([["val3", str(path), str(root / "val2017")]])


def command(losses: Path, out: Path, register: str, *extra: object) -> list[str]:
    return [sys.executable, str(WORKER), str(losses), "--config-file", str(TINY),
            *map(str, extra), "OUTPUT_DIR", str(out),
            "DATASETS.REGISTER_COCO", register, "DATASETS.TEST", "('val3',)", *map(str, OPTS)]


def test_resume_from_a_checkpoint_on_an_evaluation_iteration_is_exact(coco_mini, tmp_path):
    register = small_val_set(coco_mini, tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_training(command(tmp_path / "straight.jsonl", straight, register, "SOLVER.MAX_ITER",
                         TOTAL), coco_mini)
    assert (straight / "eval_results.json").is_file()  # evaluation ran during training

    proc = subprocess.Popen(command(tmp_path / "killed.jsonl", killed, register,
                                    "SOLVER.MAX_ITER", TOTAL),
                            env=training_env(coco_mini), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sigkill_when(proc, (killed / "last_checkpoint").is_file, 600, "its first checkpoint")
    assert (killed / "last_checkpoint").read_text().strip() == "model_0000003.pth"

    run_training(command(tmp_path / "resumed.jsonl", killed, register, "--resume",
                         "SOLVER.MAX_ITER", TOTAL), coco_mini)
    expected = read_losses(tmp_path / "straight.jsonl")
    resumed = read_losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(4, TOTAL))
    for iteration, loss in resumed.items():
        assert loss == expected[iteration], iteration
    a = torch.load(straight / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    b = torch.load(killed / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"
