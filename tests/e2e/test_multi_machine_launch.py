"""Two machines: ``tools/train_net.py --num-machines 2 --machine-rank 0/1 --dist-url
tcp://127.0.0.1:PORT`` (detectron2's launch arguments), two processes standing in for two
machines (gloo, CPU, one process each), with ``MODEL.MABN.SYNC True``.

The run trains; only machine 0 (global rank 0) writes checkpoints, metrics, events and the
config (machine 1's OUTPUT_DIR, a disk of its own, holds only detectron2's per-rank text log
``log.txt.rank1``); and the synchronised MABN statistics equal those of one process with the
same total batch (2 images): the forward statistics (``running_second_moment``,
``chi2_buffer``, ``num_batches_tracked``), to rtol 1e-4, atol 1e-5. The layer-level test
(tests/layer/test_distributed.py, float64) holds 1e-10; through this float32 network,
convolutions of 1 image instead of 2 and an all-reduce instead of one sum reorder the float32
sums, and the difference grows with depth: measured up to 1.6e-5 relative in the deepest
layers (upstream main; within 1e-5 on the v0.6 run). The backward statistics (``psi_buffer``)
follow the loss gradients, which the RPN/ROI samplers make differ (below);
tests/layer/test_distributed.py checks their synchronisation on a layer with equal gradients.

Why both runs compute the same statistics: every image is resized to a 64-px long side and
padded to the same 64x64 (coco_mini's aspect ratios are below 2), without flips or data
workers, so each process sees exactly the images that the one-process batch holds, padded
alike; the model starts from the same seed (rank 0's). ``SOLVER.BASE_LR 0`` keeps the weights
at that start: with a learning rate, the RPN/ROI samplers' per-process random streams
(detectron2 seeds rank r with SEED + r) make the gradients of the two runs differ, and with
them later statistics.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from mabn_d2.detectron2_compat import find_free_port

from helpers import REPO, TINY

TRAIN_NET = REPO / "tools" / "train_net.py"
ITERS = 3
SAME_IMAGES = ("MODEL.MABN.SYNC", "True", "SEED", "7", "SOLVER.IMS_PER_BATCH", "2",
               "SOLVER.MAX_ITER", str(ITERS), "SOLVER.BASE_LR", "0.0",
               "SOLVER.CHECKPOINT_PERIOD", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)",
               "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.RANDOM_FLIP", "none",
               "DATALOADER.ASPECT_RATIO_GROUPING", "False", "DATALOADER.NUM_WORKERS", "0",
               "DATASETS.TEST", "()")
BUFFERS = ("running_second_moment", "chi2_buffer", "num_batches_tracked")


def _command(output_dir: Path, *launch_args: str) -> list[str]:
    return [sys.executable, str(TRAIN_NET), "--config-file", str(TINY), *launch_args,
            "OUTPUT_DIR", str(output_dir), *SAME_IMAGES]


def _env(coco_mini: Path) -> dict[str, str]:
    return {**os.environ, "DETECTRON2_DATASETS": str(coco_mini), "OMP_NUM_THREADS": "1"}


def _finish(proc: subprocess.Popen, what: str) -> None:
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 0, f"{what} failed:\n{out[-5000:]}"


def _backbone_mabn(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The MABN buffers of the backbone (bottom-up and FPN: they see every image; the RoI
    heads' norms see sampled proposals)."""
    model = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    return {k: v for k, v in model.items()
            if k.startswith("backbone.") and k.rpartition(".")[2] in BUFFERS}


def test_two_machines_with_synced_mabn_equal_one_process_with_the_same_total_batch(
        coco_mini, tmp_path):
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    url = f"tcp://127.0.0.1:{find_free_port()}"
    single = tmp_path / "single"
    commands = {f"machine {rank}": _command(out, "--num-gpus", "1", "--num-machines", "2",
                                            "--machine-rank", str(rank), "--dist-url", url)
                for rank, out in enumerate(machines)}
    commands["the one-process run"] = _command(single)
    procs = {what: subprocess.Popen(command, cwd=REPO, env=_env(coco_mini),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for what, command in commands.items()}  # all three at once
    for what, proc in procs.items():
        _finish(proc, what)

    # It trained (2 processes, 1 image each), and machine 0 wrote everything.
    log = (machines[0] / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    metrics = [json.loads(line) for line in (machines[0] / "metrics.json").read_text().splitlines()]
    losses = [m for m in metrics if "total_loss" in m]
    assert losses[-1]["iteration"] == ITERS - 1
    assert all(math.isfinite(m["total_loss"]) for m in losses)
    assert (machines[0] / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert {"model_0000001.pth", "model_final.pth", "config.yaml"} <= \
        {p.name for p in machines[0].iterdir()}  # CHECKPOINT_PERIOD 2: after iteration 1
    assert list(machines[0].glob("events.out.tfevents.*"))
    # Machine 1: no checkpoint, metrics, events, config or lock; only its per-rank text log.
    assert sorted(p.name for p in machines[1].rglob("*")) == ["log.txt.rank1"]

    two, one = _backbone_mabn(machines[0] / "model_final.pth"), \
        _backbone_mabn(single / "model_final.pth")
    assert two.keys() == one.keys() and len(two) > 60
    assert all(int(v) == ITERS for k, v in one.items() if k.endswith("num_batches_tracked"))
    for key in two:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
