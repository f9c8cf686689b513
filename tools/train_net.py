#!/usr/bin/env python
"""Train and evaluate Mask R-CNN (or any detectron2 model) with MABN.

detectron2's ``tools/train_net.py`` conventions, on :class:`mabn_d2.engine.MABNTrainer`::

    # the embedded demo: train + COCO evaluation on procedural shapes, CPU, a few minutes
    python tools/train_net.py --config-file configs/demo/mask_rcnn_R_18_FPN_demo_mabn.yaml

    # COCO 2017 (detectron2's builtin names; images and annotations under $DETECTRON2_DATASETS)
    python tools/train_net.py --num-gpus 8 \
        --config-file configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml

    # evaluate a checkpoint; resume an interrupted run from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --resume

    # your own COCO-format data: see docs/training.md (DATASETS.REGISTER_COCO)

    # several processes without CUDA (gloo; MODEL.DEVICE cpu), e.g. to try DDP on a laptop
    python tools/train_net.py --num-gpus 2 --config-file CFG MODEL.DEVICE cpu

``--num-gpus 0`` trains in this process, as 1 does (detectron2's ``launch``). A user error
(a bad value, an unusable OUTPUT_DIR or weights file) is one message and exit code 2; add
``--debug`` (or set ``MABN_D2_DEBUG=1``) for the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import mabn_d2  # noqa: F401  (registers the norm "MABN" in detectron2)
from mabn_d2.engine import MABNTrainer, setup_from_args
from mabn_d2.engine.atomic_checkpointer import AtomicCheckpointer, load_eval_weights
from mabn_d2.engine.launch import launch_from_command_line
from mabn_d2.validation import load_yacs_cfg, validate_yacs_cfg


def main(args: argparse.Namespace):
    """One process's job (what ``launch`` runs)."""
    cfg = setup_from_args(args)  # checks the config, then takes OUTPUT_DIR
    if args.eval_only:
        model = MABNTrainer.build_model(cfg)
        checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        load_eval_weights(checkpointer, cfg.MODEL.WEIGHTS, args.resume,
                          weights_example="MODEL.WEIGHTS path/to/model.pth",
                          output_key="OUTPUT_DIR")
        return MABNTrainer.test(cfg, model)

    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_config(args: argparse.Namespace) -> None:
    """The config of a multi-process run, checked before its processes start."""
    validate_yacs_cfg(load_yacs_cfg(args.config_file, args.opts), eval_only=args.eval_only,
                      resume=args.resume)


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line; a user error is one message and exit code 2 (``--debug``: traceback)."""
    return launch_from_command_line("train_net.py", main, check_config, argv)


if __name__ == "__main__":
    sys.exit(cli())
