#!/usr/bin/env python
"""Train and evaluate MABN models (or any detectron2 model) from detectron2 LazyConfigs.

detectron2's ``tools/lazyconfig_train_net.py`` (``--config-file x.py``, ``key=value``
overrides, ``--eval-only``, ``--resume``, ``--num-gpus``), with what ``tools/train_net.py``
does for YAML configs (:mod:`mabn_d2.engine.lazy_training`): MABN values validated before the
model is built (errors name the key), COCO evaluation without detectron2's compiled ops and
``eval_results.json``, an exact ``--resume`` (optimizer, random generators and the position
in the data stream restored), MABN calibration for BN checkpoints and PreciseBN::

    # the embedded demo: train + COCO evaluation on procedural shapes, CPU
    python tools/lazyconfig_train_net.py \
        --config-file configs/lazy/demo/mask_rcnn_R_18_FPN_demo_mabn.py

    # the paper's R50-FPN on COCO 2017, other MABN settings for every layer
    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file configs/lazy/mask_rcnn_R_50_FPN_2x_mabn_scratch.py mabn.buffer_size=8

    # evaluate a checkpoint; resume an interrupted run from train.output_dir/last_checkpoint
    python tools/lazyconfig_train_net.py --config-file CFG --eval-only \
        train.init_checkpoint=output/lazy_demo/model_final.pth
    python tools/lazyconfig_train_net.py --config-file CFG --resume
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from detectron2.config import instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_writers,
    hooks,
)
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm

import mabn_d2  # noqa: F401  (registers the norm "MABN" in detectron2)
from mabn_d2.detectron2_compat import start_data_loader_iterator
from mabn_d2.engine.atomic_checkpointer import AtomicCheckpointer, load_eval_weights
from mabn_d2.engine.launch import launch_from_command_line
from mabn_d2.engine.lazy_training import (
    build_lazy_model,
    build_lazy_train_loader,
    lazy_mabn_hooks,
    lazy_setup,
    lazy_test,
)
from mabn_d2.engine.resume import RNGStates, continue_data_stream, rng_states_kept
from mabn_d2.validation import load_lazy_cfg, validate_lazy_cfg

logger = logging.getLogger("detectron2")


def do_train(args: argparse.Namespace, cfg) -> None:
    model = build_lazy_model(cfg)
    logger.info("Model:\n%s", model)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)

    train_loader = build_lazy_train_loader(cfg)

    # Looked up at call time: mabn_d2's launch lets it wrap CPU models in its gloo workers.
    model = d2_defaults.create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    # The trainer's state holds the optimizer's (and AMP's grad scaler's); the random
    # generators are saved with it so that --resume continues exactly.
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    checkpointer.weights_key = "train.init_checkpoint"
    checkpointer.add_checkpointable("rng_states", RNGStates())
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            # calibration, PreciseBN: before the checkpointer and the evaluation
            *lazy_mabn_hooks(cfg, model),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            # the evaluation leaves the training RNG streams alone (exact --resume)
            hooks.EvalHook(cfg.train.eval_period, rng_states_kept(lambda: lazy_test(cfg, model))),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )

    start_data_loader_iterator(trainer)  # before --resume restores the random generators
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        # The checkpoint stores the training iteration that just finished, thus we start
        # at the next iteration
        start_iter = trainer.iter + 1
        continue_data_stream(train_loader, start_iter, cfg.dataloader.train.total_batch_size)
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args: argparse.Namespace):
    """One process's job (what ``launch`` runs)."""
    cfg = load_lazy_cfg(args.config_file, args.opts)  # overrides checked key by key
    lazy_setup(cfg, args)  # checks the values, then takes train.output_dir

    if args.eval_only:
        model = d2_defaults.create_ddp_model(build_lazy_model(cfg))
        checkpointer = AtomicCheckpointer(model, save_dir=cfg.train.output_dir)
        checkpointer.weights_key = "train.init_checkpoint"
        load_eval_weights(checkpointer, cfg.train.init_checkpoint, args.resume,
                          weights_example="train.init_checkpoint=path/to/model.pth",
                          output_key="train.output_dir")
        return lazy_test(cfg, model)
    do_train(args, cfg)


def check_config(args: argparse.Namespace) -> None:
    """The config of a multi-process run, checked before its processes start."""
    validate_lazy_cfg(load_lazy_cfg(args.config_file, args.opts), eval_only=args.eval_only,
                      resume=args.resume)


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line; a user error is one message and exit code 2 (``--debug``: traceback)."""
    return launch_from_command_line("lazyconfig_train_net.py", main, check_config, argv)


if __name__ == "__main__":
    sys.exit(cli())
