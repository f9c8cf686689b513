"""``MABNTrainer``: detectron2's ``DefaultTrainer`` for MABN models with COCO evaluation."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence

from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import DatasetEvaluator
from torch import nn

from ..data import check_num_classes
from ..data.annotation_checks import instances_without_masks
from ..data.user_coco import DatasetError, drop_invalid_annotations
from ..detectron2_compat import (
    inner_trainer,
    start_data_loader_iterator,
    train_loader_kwargs,
    trainer_hooks,
)
from ..integration.batch_stats import build_batch_stats_hook
from .atomic_checkpointer import AtomicCheckpointer
from .evaluation import EVAL_RESULTS_FILE, build_coco_evaluator, report_eval_results
from .hooks import build_mabn_hooks
from .resume import RNGStates, build_resumable_loader, continue_data_stream, rng_states_kept
from .setup import describe_mabn_model

__all__ = ["MABNTrainer", "EVAL_RESULTS_FILE"]

logger = logging.getLogger(__name__)
# upstream main's DefaultTrainer saves and restores its inner trainer's state; v0.6's does not.
_BASE_RESTORES_INNER_TRAINER = "load_state_dict" in vars(DefaultTrainer)


def _insert_before(
    hook_list: list[hooks.HookBase | None], new: Sequence[hooks.HookBase], anchors: tuple[type, ...]
) -> list[hooks.HookBase | None]:
    """``hook_list`` with ``new`` inserted before the first hook of one of ``anchors`` types
    (appended when there is none)."""
    for i, hook in enumerate(hook_list):
        if isinstance(hook, anchors):
            return hook_list[:i] + list(new) + hook_list[i:]
    return hook_list + list(new)


def _with_masks_checked(dataset_dicts: list[dict], drop: bool) -> list[dict]:
    """The training dicts, refused (or, with ``drop``, without the instances concerned) when
    some instances lack the mask that the others have: detectron2's mapper would stop with a
    KeyError at the first batch holding one (e.g. a ``"segmentation": []`` in the JSON)."""
    missing = instances_without_masks(dataset_dicts)
    if not missing:
        return dataset_dicts
    files = sorted({name for name, _ in missing})
    shown = ", ".join(files[:5]) + (f", ... ({len(files) - 5} more)" if len(files) > 5 else "")
    if not drop:
        raise DatasetError(
            f"MODEL.MASK_ON: {len(missing)} training instances have no segmentation while the "
            f"others have one (empty or malformed in the JSON), in {shown}. Fix the "
            "annotations, or add 'DATASETS.DROP_INVALID_ANNOTATIONS True' to leave them out.")
    logger.warning("Leaving out %d training instances without a segmentation "
                   "(DATASETS.DROP_INVALID_ANNOTATIONS), in %s", len(missing), shown)
    return [{**d, "annotations": [a for a in d.get("annotations", []) if "segmentation" in a]}
            for d in dataset_dicts]


class MABNTrainer(DefaultTrainer):
    """``DefaultTrainer`` with COCO box/mask evaluation, saved results and MABN hooks.

    The model comes from detectron2's ``build_model``; with ``import mabn_d2`` its ``"MABN"``
    norms are built with the cfg's ``MODEL.MABN`` settings and centralized convs.
    """

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        model = super().build_model(cfg)
        logger.info(describe_mabn_model(model))
        return model

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        # detectron2's checkpointer writes in place (a kill during a save destroys the last
        # checkpoint): the same one with atomic saves and a resume that skips damaged files,
        # also in the periodic-checkpoint hook that DefaultTrainer built with the old one.
        old = self.checkpointer
        self.checkpointer = AtomicCheckpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables)
        for hook in trainer_hooks(self):
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer
        # Saved with every checkpoint, restored by --resume (see engine/resume.py).
        self.checkpointer.add_checkpointable("rng_states", RNGStates())

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """detectron2's train loader, its sampler wrapped so that ``--resume`` continues the
        data stream where the interrupted run stopped (``loader.resumable_sampler``)."""
        kwargs = train_loader_kwargs(cfg)  # loads the datasets: thing_classes known
        if cfg.MODEL.MASK_ON:
            kwargs["dataset"] = _with_masks_checked(kwargs["dataset"],
                                                    drop_invalid_annotations(cfg))
        loader = build_resumable_loader(build_detection_train_loader, **kwargs)
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        return loader

    def state_dict(self) -> dict:
        # detectron2 v0.6's DefaultTrainer saves neither the optimizer (SGD momentum) nor the
        # AMP grad scaler: --resume restarted them from zero. As upstream main does, save the
        # inner SimpleTrainer/AMPTrainer state too.
        state = super().state_dict()
        state["_trainer"] = inner_trainer(self).state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if "_trainer" not in state_dict:
            logger.warning("The checkpoint has no optimizer state (saved by detectron2 v0.6's "
                           "own DefaultTrainer?): the optimizer starts afresh")
            # upstream main's DefaultTrainer would stop with a KeyError
            state_dict = {**state_dict, "_trainer": inner_trainer(self).state_dict()}
        super().load_state_dict(state_dict)
        if not _BASE_RESTORES_INNER_TRAINER:
            inner_trainer(self).load_state_dict(state_dict["_trainer"])

    def resume_or_load(self, resume: bool = True) -> None:
        # Before the generators are restored, as in the uninterrupted run (see the function).
        start_data_loader_iterator(inner_trainer(self))
        super().resume_or_load(resume=resume)
        if resume:
            continue_data_stream(inner_trainer(self).data_loader, self.start_iter,
                                 self.cfg.SOLVER.IMS_PER_BATCH)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        loader = super().build_test_loader(cfg, dataset_name)
        check_num_classes(cfg, [dataset_name])
        return loader

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_coco_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg: CfgNode, model: nn.Module, evaluators=None) -> OrderedDict:
        """detectron2's evaluation of every ``DATASETS.TEST`` set, then (main process) the
        results are logged as one summary table and written to ``OUTPUT_DIR/eval_results.json``.
        """
        results = super().test(cfg, model, evaluators)
        if len(cfg.DATASETS.TEST) == 1:  # DefaultTrainer.test unwraps a single dataset
            per_dataset = {cfg.DATASETS.TEST[0]: results}
        else:
            per_dataset = dict(results)
        report_eval_results(per_dataset, cfg.OUTPUT_DIR)
        return results

    def build_mabn_hooks(self) -> list[hooks.HookBase]:
        """The hooks mabn_d2 adds to detectron2's defaults, run before the checkpointer and
        the evaluation (so that what they change is saved and evaluated).

        MABN calibration before training (``MODEL.MABN.CALIBRATION``) and MABN PreciseBN
        (``TEST.PRECISE_BN``), see :mod:`mabn_d2.engine.hooks`; the batch-statistics recorder
        appends its own here.
        """
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as detectron2's PreciseBN loader
        # BATCH_STATS.PERIOD > 0: the recorder, first so that it collects a step's statistics
        # before the other hooks run forward passes of their own.
        recorder = build_batch_stats_hook(self.cfg)
        return ([recorder] if recorder is not None else []) + build_mabn_hooks(
            cfg, self.model, self.build_train_loader
        )

    def build_hooks(self) -> list[hooks.HookBase | None]:
        hook_list = super().build_hooks()
        for hook in hook_list:
            if isinstance(hook, hooks.EvalHook):  # evaluation leaves the training RNGs alone
                hook._func = rng_states_kept(hook._func)
        return _insert_before(
            hook_list,
            self.build_mabn_hooks(),
            anchors=(hooks.PeriodicCheckpointer, hooks.EvalHook),
        )
