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
"""

from __future__ import annotations

import argparse

from detectron2.engine import default_argument_parser

import mabn_d2  # noqa: F401  (registers the norm "MABN" in detectron2)
from mabn_d2.engine import MABNTrainer, setup_from_args
from mabn_d2.engine.atomic_checkpointer import (
    AtomicCheckpointer,
    MissingWeightsError,
    load_eval_weights,
)
from mabn_d2.engine.launch import launch  # detectron2's launch; gloo processes without CUDA
from mabn_d2.engine.output_lock import OutputDirBusyError


def main(args: argparse.Namespace):
    try:
        cfg = setup_from_args(args)
    except OutputDirBusyError as error:
        raise SystemExit(f"train_net.py: {error}") from None
    if args.eval_only:
        model = MABNTrainer.build_model(cfg)
        checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        try:
            load_eval_weights(checkpointer, cfg.MODEL.WEIGHTS, args.resume,
                              weights_example="MODEL.WEIGHTS path/to/model.pth",
                              output_key="OUTPUT_DIR")
        except MissingWeightsError as error:
            raise SystemExit(str(error)) from None
        return MABNTrainer.test(cfg, model)

    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
