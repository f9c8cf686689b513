"""``tools/lazyconfig_train_net.py`` end to end on the real COCO subset, as a user runs it
(subprocesses), with the tiny LazyConfig (configs/lazy/tiny):

* train a few iterations, COCO-evaluate boxes and masks (without detectron2's compiled ops),
  write ``eval_results.json``;
* ``--resume`` from a mid-run checkpoint continues from its iteration with its optimizer
  state, random generators and data-stream position: the final weights, optimizer state and
  MABN statistics equal the uninterrupted run's;
* ``--eval-only`` on the final checkpoint gives the same results;
* a bad MABN value on the command line fails before anything is built, naming the key.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mabn_d2.cli import UserError
from mabn_d2.detectron2_compat import has_compiled_coco_eval

from helpers import REPO, TINY_LAZY, import_script

TOOL = REPO / "tools" / "lazyconfig_train_net.py"
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")
ITERATIONS = 6
# Exact continuation needs the data stream in this process (the tiny config has no workers)
# and no aspect-ratio buckets.
EXACT = ("dataloader.train.aspect_ratio_grouping=False",)


def run_tool(coco_mini: Path, *args: object, check: bool = True) -> str:
    """The tool's output (stdout + stderr); fails the test on a non-zero exit if ``check``."""
    # One thread: the 2-core machines these run on are shared; results do not depend on it.
    env = {**os.environ, "DETECTRON2_DATASETS": str(coco_mini), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--config-file", str(TINY_LAZY), *map(str, args)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == check, output[-5000:]
    return output


def load_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "eval_results.json").read_text())["coco_2017_val"]


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def flatten(tree: object, prefix: str = "") -> dict[str, object]:
    """``{path: leaf}`` of nested dicts/lists (an optimizer's state dict)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}/{key}"))
    return flat


def test_train_evaluate_resume_and_eval_only(coco_mini, tmp_path):
    train_dir, resumed_dir, eval_dir = tmp_path / "train", tmp_path / "resumed", tmp_path / "eval"
    log = run_tool(coco_mini, f"train.output_dir={train_dir}", f"train.max_iter={ITERATIONS}",
                   *EXACT)

    assert "mabn_d2: MABN settings node mabn: " in log
    assert "MABN2d layers (36 fed by centralized convs)" in log
    assert "(momentum, buffer_size, warmup_iters, renorm_start_iter) = (0.02, 4, 2, 4)" in log
    # detectron2's C++ COCOeval where it is compiled (upstream main), pycocotools' otherwise.
    assert ("unofficial COCO API" if has_compiled_coco_eval() else "use_fast_impl=False") in log
    assert (train_dir / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert "${mabn}" in (train_dir / "config.yaml").read_text()
    metrics = [json.loads(line) for line in (train_dir / "metrics.json").read_text().splitlines()]
    losses = [entry for entry in metrics if "total_loss" in entry]
    assert [e["iteration"] for e in losses] == list(range(ITERATIONS))
    assert all(math.isfinite(e["total_loss"]) for e in losses)
    results = load_results(train_dir)
    for task in ("bbox", "segm"):
        for metric in SUMMARY:
            assert math.isfinite(results[task][metric]), (task, metric, results[task])
    assert (train_dir / "inference" / "coco_2017_val" / "coco_instances_results.json").is_file()

    # Interrupted after iteration 3's checkpoint: resume from it in a fresh directory.
    resumed_dir.mkdir()
    shutil.copy(train_dir / "model_0000003.pth", resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_0000003.pth")
    log = run_tool(coco_mini, "--resume", f"train.output_dir={resumed_dir}",
                   f"train.max_iter={ITERATIONS}", "dataloader.evaluator=null", *EXACT)
    assert "Starting training from iteration 4" in log
    assert "continues after the 8 images per process already used" in log
    resumed_metrics = (resumed_dir / "metrics.json").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in resumed_metrics] == [4, 5]
    straight = load_checkpoint(train_dir / "model_final.pth")
    resumed = load_checkpoint(resumed_dir / "model_final.pth")
    assert straight["iteration"] == resumed["iteration"] == ITERATIONS - 1
    # weights, MABN statistics and step counts; SGD momentum buffers
    for part, a, b in (("model", straight["model"], resumed["model"]),
                       ("optimizer", flatten(straight["trainer"]["optimizer"]),
                        flatten(resumed["trainer"]["optimizer"]))):
        assert a.keys() == b.keys(), part
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6,
                                           msg=f"{part} {key}")
            else:
                assert b[key] == value, (part, key)
    assert any("momentum_buffer" in key for key in flatten(straight["trainer"]["optimizer"]))

    run_tool(coco_mini, "--eval-only", f"train.init_checkpoint={train_dir / 'model_final.pth'}",
             f"train.output_dir={eval_dir}")
    again = load_results(eval_dir)
    for task in ("bbox", "segm"):
        for metric in SUMMARY:
            assert again[task][metric] == pytest.approx(results[task][metric], abs=1e-6)


def test_bad_mabn_value_fails_before_the_set_up_naming_the_key(tmp_path):
    from detectron2.engine import default_argument_parser

    tool = import_script("tools/lazyconfig_train_net.py")

    args = default_argument_parser().parse_args(
        ["--config-file", str(TINY_LAZY), f"train.output_dir={tmp_path}", "mabn.buffer_size=0"])
    with pytest.raises(UserError,
                       match=r"^mabn\.buffer_size must be an integer in \[1, 1024\], got 0$"):
        tool.main(args)
    assert not (tmp_path / "config.yaml").exists()  # refused before detectron2's set-up


def test_eval_only_without_weights_is_a_clear_error(coco_mini, tmp_path):
    output = run_tool(coco_mini, "--eval-only", f"train.output_dir={tmp_path}", check=False)
    assert "--eval-only needs weights: train.init_checkpoint=" in output
