"""SIGKILL right after a checkpoint, then ``--resume``: the run continues exactly as the
uninterrupted one (same losses at every following step, same final weights and MABN state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, sigkill_when

WORKER = REPO / "tests" / "e2e" / "resume_worker.py"
TOTAL = 8
# Exact reproduction needs the data stream in this process and no aspect-ratio buckets.
OPTS = ("SEED", 7, "DATALOADER.NUM_WORKERS", 0, "DATALOADER.ASPECT_RATIO_GROUPING", False,
        "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", 4, "INPUT.RANDOM_FLIP", "horizontal")


def command(losses: Path, out: Path, *extra: object) -> list[str]:
    return [sys.executable, str(WORKER), str(losses), *map(str, extra),
            "OUTPUT_DIR", str(out), *map(str, OPTS)]


def env(coco_mini: Path) -> dict[str, str]:
    return {**os.environ, "DETECTRON2_DATASETS": str(coco_mini), "OMP_NUM_THREADS": "1"}


def read_losses(path: Path) -> dict[int, float]:
    return {e["iteration"]: e["total_loss"]
            for e in map(json.loads, path.read_text().splitlines())}


def run(cmd: list[str], coco_mini: Path) -> None:
    proc = subprocess.run(cmd, env=env(coco_mini), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]


def test_sigkill_after_checkpoint_then_resume_reproduces_the_uninterrupted_run(
    coco_mini, tmp_path
):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(command(tmp_path / "straight.jsonl", straight, "SOLVER.MAX_ITER", TOTAL), coco_mini)

    proc = subprocess.Popen(command(tmp_path / "killed.jsonl", killed, "SOLVER.MAX_ITER", 1000),
                            env=env(coco_mini), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sigkill_when(proc, (killed / "last_checkpoint").is_file, 300, "its first checkpoint")
    checkpoint = (killed / "last_checkpoint").read_text().strip()
    assert checkpoint == "model_0000003.pth"

    run(command(tmp_path / "resumed.jsonl", killed, "--resume", "SOLVER.MAX_ITER", TOTAL),
        coco_mini)

    expected = read_losses(tmp_path / "straight.jsonl")
    resumed = read_losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(4, TOTAL))
    for iteration, loss in resumed.items():
        assert loss == pytest.approx(expected[iteration], rel=1e-6, abs=1e-7), iteration
    # A resume that restarted the data stream or the random generators would differ here.
    assert len({round(v, 4) for v in expected.values()}) > 1
    a, b = final_state(straight), final_state(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
