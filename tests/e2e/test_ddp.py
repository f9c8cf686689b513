"""Two CPU processes of DDP training with MABN (gloo), as ``tools/train_net.py --num-gpus 2``
runs it without CUDA: per-rank statistics (the paper's per-GPU setting) or synchronised ones
(``MODEL.MABN.SYNC``), the rank-0 checkpoint loads, and the evaluation gathers both ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import REPO, TINY

WORKER = REPO / "tests" / "e2e" / "ddp_worker.py"
ITERS = 3


def run(coco_mini: Path, *args: object) -> str:
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
        timeout=900, env={**os.environ, "DETECTRON2_DATASETS": str(coco_mini),
                          "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


def train_two_ranks(coco_mini: Path, out: Path, sync: bool) -> list[dict[str, torch.Tensor]]:
    run(coco_mini, WORKER, "--num-gpus", 2, "--config-file", TINY, "OUTPUT_DIR", out,
        "SOLVER.MAX_ITER", ITERS, "MODEL.MABN.SYNC", sync)
    return [torch.load(out / f"rank{r}_mabn.pt") for r in range(2)]


def backbone(state: dict[str, torch.Tensor], buffer: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("backbone.") and k.endswith(buffer)}


def test_ddp_per_rank_statistics_checkpoint_and_gathered_evaluation(coco_mini, tmp_path):
    out = tmp_path / "ddp"
    ranks = train_two_ranks(coco_mini, out, sync=False)
    for rank in ranks:
        counts = backbone(rank, "num_batches_tracked")
        assert counts and all(int(v) == ITERS for v in counts.values())
    # Each rank normalised with its own images' statistics (different images per rank).
    running = [backbone(r, "running_second_moment") for r in ranks]
    assert all(not torch.allclose(running[0][k], running[1][k]) for k in running[0])

    # The evaluation at the end of training gathered the predictions of both ranks.
    val = json.loads((coco_mini / "coco/annotations/instances_val2017.json").read_text())
    predictions = json.loads(
        (out / "inference/coco_2017_val/coco_instances_results.json").read_text())
    assert {p["image_id"] for p in predictions} == {im["id"] for im in val["images"]}
    results = json.loads((out / "eval_results.json").read_text())["coco_2017_val"]
    assert all(math.isfinite(results[t]["AP"]) for t in ("bbox", "segm"))

    # The checkpoint written by rank 0 loads into a single process (rank 0's statistics).
    checkpoint = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    for key, value in running[0].items():
        torch.testing.assert_close(checkpoint["model"][key], value, rtol=0, atol=0)
    run(coco_mini, REPO / "tools/train_net.py", "--config-file", TINY, "--eval-only",
        "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", tmp_path / "eval")
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["coco_2017_val"]
    assert all(math.isfinite(again[t]["AP"]) for t in ("bbox", "segm"))


def test_ddp_sync_mode_gives_every_rank_the_same_statistics(coco_mini, tmp_path):
    ranks = train_two_ranks(coco_mini, tmp_path / "sync", sync=True)
    for buffer in ("running_second_moment", "chi2_buffer"):
        a, b = backbone(ranks[0], buffer), backbone(ranks[1], buffer)
        assert a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
