"""Two machines: ``tools/train_net.py --num-machines 2 --machine-rank 0/1 --dist-url
tcp://127.0.0.1:PORT`` (detectron2's launch arguments), two processes standing in for two
machines (gloo, CPU, one process each), with ``MODEL.MABN.SYNC True``.

The run trains (learning rate 0.02, 3 iterations); only machine 0 (global rank 0) writes
checkpoints, metrics, events and the config (machine 1's OUTPUT_DIR, a disk of its own, holds
only detectron2's per-rank text log ``log.txt.rank1``); and the result equals that of one
process with the same total batch (2 images): every weight, and every MABN statistic of the
ResNet-18 and the FPN (forward ``running_second_moment``, ``chi2_buffer``; backward
``psi_buffer``; ``num_batches_tracked``), to rtol 1e-4, atol 1e-5 (``psi_buffer``: to 2% of
its largest value, see the test). (The layer-level 2x1 = 1x2
test, tests/layer/test_distributed.py, holds 1e-10 in float64; here convolutions of 1 image
instead of 2 and an all-reduce instead of one sum reorder float32 sums through 30 layers.)

Why the two runs can be equal: each image is resized to a 64-px long side and padded to
64x64, without flips or data workers, so each process sees exactly one of the images of the
one-process batch; the model starts from the same seed (rank 0's). The model is the region
proposal network on the MABN backbone (``ProposalNetwork``): its losses are sums over anchors
divided by ``images x RPN.BATCH_SIZE_PER_IMAGE``, a constant per image, so the mean of the two
processes' gradients (DDP) is the one-process gradient; and with ``BATCH_SIZE_PER_IMAGE`` above
the number of anchors the anchor sampler keeps every anchor, so its per-process random streams
(detectron2 seeds rank r with SEED + r) change nothing. The RoI heads of Mask R-CNN divide by
the number of RoIs sampled in the local batch, so no norm layer could make their two-process
gradient equal the one-process one. The backward statistic is E[g * x_hat] of the gradient
reaching the layer: each process's loss is its own image's sum over ``1 x BATCH_SIZE`` instead
of ``2 x BATCH_SIZE``, so that gradient, and with it ``psi_buffer``, is exactly twice the
one-process one (the parameter gradients come out equal after DDP's mean over 2 processes).
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
               "SOLVER.MAX_ITER", str(ITERS), "SOLVER.BASE_LR", "0.02",
               "SOLVER.CHECKPOINT_PERIOD", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)",
               "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.RANDOM_FLIP", "none",
               "DATALOADER.ASPECT_RATIO_GROUPING", "False", "DATALOADER.NUM_WORKERS", "0",
               "DATASETS.TEST", "()",
               # the RPN on the MABN ResNet + FPN; every anchor sampled (about 1,000 at 64 px)
               "MODEL.META_ARCHITECTURE", "ProposalNetwork", "MODEL.MASK_ON", "False",
               "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "4096")
WORLD_SIZE = 2


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


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]


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

    two, one = _state(machines[0] / "model_final.pth"), _state(single / "model_final.pth")
    assert two.keys() == one.keys()
    psi = [k for k in one if k.endswith("psi_buffer")]
    steps = [k for k in one if k.endswith("num_batches_tracked")]
    assert len(psi) > 20 and all(int(one[k]) == ITERS for k in steps)  # MABN in ResNet + FPN
    assert not torch.equal(one["proposal_generator.rpn_head.conv.weight"],
                           _state(single / "model_0000001.pth")[
                               "proposal_generator.rpn_head.conv.weight"])  # it learned
    for key in one:
        if key in psi:  # the gradient reaching the layer is WORLD_SIZE times the one-process one
            expected = one[key] * WORLD_SIZE
            # psi is a mean of g * x_hat over the batch (values of both signs cancel, to about
            # 1e-6 here): measured within 0.6% of the layer's largest |psi|, so 2% of it; a
            # factor other than WORLD_SIZE is off by 50% or more of it.
            torch.testing.assert_close(two[key], expected, rtol=0,
                                       atol=0.02 * float(expected.abs().max()), msg=key)
        else:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
