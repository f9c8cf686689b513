"""SIGKILL right after a checkpoint, then ``--resume``: the run continues from the saved
iteration with the saved MABN state (iteration count, moving-average buffers, running second
moment) and exactly as the uninterrupted one (same losses at every following step, same final
weights and MABN state). Trained by tools/train_net.py's set-up (tests/e2e/resume_worker.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (
    REPO,
    TINY,
    mabn_state,
    read_losses,
    run_training,
    sigkill_when,
    training_env,
)

WORKER = REPO / "tests" / "e2e" / "resume_worker.py"
TOTAL = 8
MOMENTUM = 0.1
# Exact reproduction needs the data stream in this process and no aspect-ratio buckets. A
# buffer larger than the run: slot t holds step t's statistics (checked below).
OPTS = ("SEED", 7, "DATALOADER.NUM_WORKERS", 0, "DATALOADER.ASPECT_RATIO_GROUPING", False,
        "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", 4, "INPUT.RANDOM_FLIP", "horizontal",
        "MODEL.MABN.BUFFER_SIZE", 16, "MODEL.MABN.MOMENTUM", MOMENTUM)


def command(losses: Path, out: Path, *extra: object) -> list[str]:
    return [sys.executable, str(WORKER), str(losses), "--config-file", str(TINY),
            *map(str, extra), "OUTPUT_DIR", str(out), *map(str, OPTS)]


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]


def test_sigkill_after_checkpoint_then_resume_reproduces_the_uninterrupted_run(
    coco_mini, tmp_path
):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_training(command(tmp_path / "straight.jsonl", straight, "SOLVER.MAX_ITER", TOTAL),
                 coco_mini)

    proc = subprocess.Popen(command(tmp_path / "killed.jsonl", killed, "SOLVER.MAX_ITER", 1000),
                            env=training_env(coco_mini), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sigkill_when(proc, (killed / "last_checkpoint").is_file, 300, "its first checkpoint")
    checkpoint = (killed / "last_checkpoint").read_text().strip()
    assert checkpoint == "model_0000003.pth"
    saved_file = killed / checkpoint
    saved_iter = torch.load(saved_file, map_location="cpu", weights_only=False)["iteration"]
    saved = mabn_state(saved_file)
    t0 = saved_iter + 1  # training steps in the checkpoint
    assert saved and all(int(s["num_batches_tracked"]) == t0 for s in saved.values())

    log = run_training(command(tmp_path / "resumed.jsonl", killed, "--resume", "SOLVER.MAX_ITER",
                               TOTAL), coco_mini)
    assert f"Starting training from iteration {t0}" in log

    # The saved MABN state was continued.
    final = mabn_state(killed / "model_final.pth")
    assert final.keys() == saved.keys()
    for name, before in saved.items():
        after = final[name]
        assert int(after["num_batches_tracked"]) == TOTAL, name
        # Slots of the first run's steps 1..t0 are untouched by steps t0+1..TOTAL.
        old = slice(1, t0 + 1)
        torch.testing.assert_close(after["chi2_buffer"][old], before["chi2_buffer"][old],
                                   rtol=0, atol=0)
        torch.testing.assert_close(after["psi_buffer"][old], before["psi_buffer"][old],
                                   rtol=0, atol=0)
        # running <- (1 - momentum) running + momentum var, from the saved running; with
        # t <= buffer size, var at step t is that step's chi2_B, in slot t.
        expected = before["running_second_moment"].double()
        for t in range(t0 + 1, TOTAL + 1):
            expected = (1 - MOMENTUM) * expected + MOMENTUM * after["chi2_buffer"][t].double()
        torch.testing.assert_close(after["running_second_moment"].double(), expected,
                                   rtol=1e-5, atol=1e-7)

    # ... exactly as the uninterrupted run.
    expected_losses = read_losses(tmp_path / "straight.jsonl")
    resumed = read_losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(t0, TOTAL))
    for iteration, loss in resumed.items():
        assert loss == pytest.approx(expected_losses[iteration], rel=1e-6, abs=1e-7), iteration
    # A resume that restarted the data stream or the random generators would differ here.
    assert len({round(v, 4) for v in expected_losses.values()}) > 1
    a, b = final_state(straight), final_state(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
