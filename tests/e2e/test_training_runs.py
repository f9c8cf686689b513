"""Training runs that must neither hang nor lose their checkpoints, nor share an OUTPUT_DIR
(subprocesses, as a user runs them), on a small dataset of square images written here.

* fine-tuning the MABN demo model from a BN checkpoint (FPN and heads without norm, as
  model-zoo checkpoints are) with the default calibration, on images that all share one
  orientation: it used to hang in the calibration, memory growing without end;
* a run killed inside a checkpoint save (``model_final.pth`` open for writing): ``--resume``
  still finds a loadable checkpoint and finishes the run;
* a second run into an OUTPUT_DIR in use stops at once, naming the folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from mabn_d2.data import ShapesSpec, write_split
from mabn_d2.engine import get_mabn_cfg
from mabn_d2.engine.output_lock import OutputDirLock

from helpers import CONFIGS, REPO, sigkill_when

TRAIN_NET = REPO / "tools" / "train_net.py"
WORKER = REPO / "tests" / "e2e" / "reliability_worker.py"
DEMO_MABN = CONFIGS / "demo" / "mask_rcnn_R_18_FPN_demo_mabn.yaml"
DEMO_BASE = CONFIGS / "demo" / "Base-Demo-RCNN-FPN.yaml"
TIMEOUT = 420  # seconds: far above a healthy run's time on a busy 2-core machine


@pytest.fixture
def square_data(tmp_path) -> list[str]:
    """Config options training on 12 square 64x64 images (one orientation), no evaluation."""
    root = tmp_path / "squares"
    write_split(ShapesSpec(num_images=12, seed=5, image_size=64, max_objects=3, min_radius=6,
                           max_radius=14), root / "images", root / "train.json")
    name = f"squares_{tmp_path.name}"
    entry = [name, str(root / "train.json"), str(root / "images")]
    return ["DATASETS.REGISTER_COCO", repr([entry]),
            "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "0"]


def run(cmd: list[object], timeout: float = TIMEOUT) -> tuple[int, str]:
    """Run ``cmd`` from the repository root with one thread: (exit code, stdout + stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([str(c) for c in cmd], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(
            expired.stdout, bytes) else (expired.stdout or "")
        pytest.fail(f"no result after {timeout} s (hung?); output ends:\n{output[-3000:]}")
    return proc.returncode, proc.stdout + proc.stderr


def bn_checkpoint(path: Path) -> Path:
    """A detectron2 checkpoint of the demo model with BN in the ResNet and no norm in the FPN
    and heads (as model-zoo checkpoints), BN statistics of a trained model's kind."""
    cfg = get_mabn_cfg()
    cfg.merge_from_file(str(DEMO_BASE))
    cfg.merge_from_list(["MODEL.RESNETS.NORM", "BN"])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    DetectionCheckpointer(model, save_dir=str(path.parent)).save(path.stem)
    return path


def test_finetune_from_bn_checkpoint_on_single_orientation_data_finishes(square_data, tmp_path):
    weights = bn_checkpoint(tmp_path / "bn" / "model_final.pth")
    out = tmp_path / "finetune"
    start = time.monotonic()
    code, log = run([sys.executable, TRAIN_NET, "--config-file", DEMO_MABN, *square_data,
                     "MODEL.WEIGHTS", weights, "SOLVER.MAX_ITER", 2, "OUTPUT_DIR", out])
    assert code == 0, log[-4000:]
    assert "calibrated 36 MABN layers on 20 batches" in log  # the default calibration ran
    assert "filled the backward moving average (psi_buffer) of 36 MABN layers" in log
    assert (out / "model_final.pth").is_file()
    print(f"fine-tune from a BN checkpoint, single orientation: {time.monotonic() - start:.0f} s")


def test_kill_inside_a_checkpoint_save_keeps_a_resumable_checkpoint(square_data, tmp_path):
    out = tmp_path / "run"
    common = ["--config-file", DEMO_MABN, *square_data, "OUTPUT_DIR", out,
              "SOLVER.CHECKPOINT_PERIOD", 1000]
    code, log = run([sys.executable, WORKER, *common, "SOLVER.MAX_ITER", 2])
    assert code == 0, log[-4000:]
    first = torch.load(out / "model_final.pth", map_location="cpu")
    assert first["iteration"] == 1

    # --resume with a longer schedule; kill -9 while model_final.pth is being written.
    marker = tmp_path / "inside_save"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(WORKER), "--block-save", str(marker), "--resume",
                             *map(str, common), "SOLVER.MAX_ITER", "4"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sigkill_when(proc, marker.exists, TIMEOUT, "its checkpoint save")

    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    kept = torch.load(out / "model_final.pth", map_location="cpu")  # intact, not truncated
    assert kept["iteration"] == 1
    torch.testing.assert_close(kept["model"], first["model"], rtol=0, atol=0)

    code, log = run([sys.executable, WORKER, "--resume", *common, "SOLVER.MAX_ITER", 4])
    assert code == 0, log[-4000:]
    assert "Starting training from iteration 2" in log
    assert torch.load(out / "model_final.pth", map_location="cpu")["iteration"] == 3
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # leftovers removed


def test_second_run_into_a_busy_output_dir_is_refused(square_data, tmp_path):
    out = tmp_path / "busy"
    with OutputDirLock(str(out)):  # a run in progress (this process)
        code, log = run([sys.executable, TRAIN_NET, "--config-file", DEMO_MABN, *square_data,
                         "SOLVER.MAX_ITER", 1, "OUTPUT_DIR", out])
    assert code != 0
    assert f"OUTPUT_DIR {out} is in use by another run (pid {os.getpid()}" in log
    assert not (out / "config.yaml").exists()  # refused before writing anything
