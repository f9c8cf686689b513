"""Training and evaluating MABN models from detectron2 LazyConfigs.

What ``tools/lazyconfig_train_net.py`` adds to detectron2's own LazyConfig tool, with the
machinery it shares with the YACS path (:class:`~mabn_d2.engine.MABNTrainer`):

* set-up: the config validated before anything is built (errors name the full key,
  :func:`mabn_d2.integration.lazy_config.validate_lazy_config`), the device checked, the ``mabn_d2``
  logger next to detectron2's (:func:`lazy_setup`);
* the model instantiated with its MABN layers named and described (:func:`build_lazy_model`);
* a training loader whose data stream resumes where an interrupted run stopped
  (:func:`build_lazy_train_loader`, :mod:`mabn_d2.engine.resume`);
* COCO evaluation that works without detectron2's compiled ops, results written to
  ``eval_results.json`` (:func:`lazy_test`, :mod:`mabn_d2.engine.evaluation`);
* MABN calibration before fine-tuning from BN checkpoints and PreciseBN
  (:func:`lazy_mabn_hooks`, :mod:`mabn_d2.engine.hooks`).

The keys read besides those of detectron2's model-zoo ``common/train.py``, all optional:
``train.seed``, ``train.mabn_calibration`` (``mode``, ``num_batches``, ``backward``: YAML's
``MODEL.MABN.CALIBRATION``) and ``train.precise_bn`` (``enabled``, ``num_iter``: YAML's
``TEST.PRECISE_BN``, run at ``train.eval_period``). ``dataloader.evaluator=null`` on the
command line turns evaluation off.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from detectron2.config import instantiate
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase, default_setup
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    inference_on_dataset,
    print_csv_format,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..cli import UserError
from ..data.user_coco import check_dataset_classes
from ..finetune.calibration import PRECISE_BN_NUM_ITER
from ..integration.lazy_config import calibration_from_lazy, target_of
from ..integration.norm import name_mabn_layers
from ..layer.settings import check_known_names
from ..validation import validate_lazy_cfg
from .evaluation import coco_evaluator, report_eval_results
from .hooks import mabn_hooks
from .output_lock import hold_output_dir
from .resume import build_resumable_loader
from .setup import check_device, check_mabn_registered, describe_mabn_model

__all__ = [
    "PreciseBNSettings",
    "precise_bn_from_lazy",
    "lazy_setup",
    "instantiate_with",
    "build_lazy_model",
    "build_lazy_train_loader",
    "build_lazy_evaluator",
    "lazy_test",
    "lazy_mabn_hooks",
]

logger = logging.getLogger(__name__)
_PRECISE_BN_NODE = "train.precise_bn"


@dataclass(frozen=True)
class PreciseBNSettings:
    """``train.precise_bn``: recompute BN and MABN running statistics at ``train.eval_period``
    and after the last iteration (YAML's ``TEST.PRECISE_BN``)."""

    enabled: bool = False
    num_iter: int = PRECISE_BN_NUM_ITER


def precise_bn_from_lazy(cfg: DictConfig) -> PreciseBNSettings:
    """The validated ``train.precise_bn`` (defaults where absent), errors naming the key."""
    node = OmegaConf.select(cfg, _PRECISE_BN_NODE)
    if node is None:
        return PreciseBNSettings()
    form = f"{_PRECISE_BN_NODE} must be dict(enabled=..., num_iter=...)"
    if not isinstance(node, DictConfig):
        raise ValueError(f"{form}, got {node!r}")
    check_known_names(node.keys(), [f.name for f in fields(PreciseBNSettings)],
                      lambda name: f"{_PRECISE_BN_NODE}.{name}", "keys", context=f"{form}: ")
    enabled = node.get("enabled", PreciseBNSettings.enabled)
    num_iter = node.get("num_iter", PreciseBNSettings.num_iter)
    if not isinstance(enabled, bool):
        raise ValueError(f"{_PRECISE_BN_NODE}.enabled must be True or False, got {enabled!r}")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"{_PRECISE_BN_NODE}.num_iter must be an integer >= 1, got "
                         f"{num_iter!r}")
    return PreciseBNSettings(enabled, num_iter)


def lazy_setup(cfg: DictConfig, args: argparse.Namespace) -> None:
    """mabn_d2's set-up of a LazyConfig job around detectron2's ``default_setup`` (logger,
    environment and config logged, config saved to ``train.output_dir``, seed ``train.seed``).

    Raises:
        UserError: a bad value (MABN, calibration, PreciseBN, iterations, ...) naming its full
            key; an unusable ``train.output_dir`` or ``train.init_checkpoint``.
        OutputDirBusyError: another live run writes into ``train.output_dir``.
        RuntimeError: ``train.device`` is CUDA on a machine without one.
    """
    nodes = validate_lazy_cfg(cfg, eval_only=getattr(args, "eval_only", False),
                              resume=getattr(args, "resume", False))
    try:
        precise_bn_from_lazy(cfg)
    except ValueError as error:
        raise UserError(str(error)) from None
    if comm.is_main_process() and cfg.train.output_dir:
        hold_output_dir(cfg.train.output_dir)  # before anything is written into it
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="mabn_d2")
    check_device(cfg.train.device, "train.device", "'train.device=cpu'")
    check_mabn_registered()
    for path, node in nodes.items():
        logger.info("mabn_d2: MABN settings node %s: %s", path,
                    OmegaConf.to_container(node, resolve=True))


def instantiate_with(node: DictConfig, **overrides: Any) -> Any:
    """``instantiate(node)`` with some arguments (or ``_target_``) replaced by ready objects,
    without copying them into the config (a dataset's records would be converted node by node)
    or detaching ``node`` from its config (its ``${...}`` references keep resolving)."""
    arguments: dict[str, Any] = {key: node[key] for key in node.keys()}
    arguments.update(overrides)
    return instantiate(arguments)


def build_lazy_model(cfg: DictConfig) -> nn.Module:
    """``instantiate(cfg.model)`` on ``train.device``, its MABN layers named (their messages
    say which layer) and counted in the log."""
    model = instantiate(cfg.model)
    name_mabn_layers(model)
    logger.info(describe_mabn_model(model))
    return model.to(cfg.train.device)


def _dataset_names(node: Any) -> list[str]:
    names = node.get("names") if isinstance(node, DictConfig) else None
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def _check_num_classes(cfg: DictConfig, dataset_node: Any) -> None:
    num_classes = OmegaConf.select(cfg, "model.roi_heads.num_classes")
    if isinstance(num_classes, int):
        check_dataset_classes(num_classes, _dataset_names(dataset_node),
                              key="model.roi_heads.num_classes",
                              fix="model.roi_heads.num_classes={}")


def build_lazy_train_loader(cfg: DictConfig) -> Iterable[Any]:
    """``instantiate(cfg.dataloader.train)`` with its sampler wrapped so that ``--resume``
    continues the data stream (:func:`mabn_d2.engine.resume.continue_data_stream`).

    The dataset is instantiated first to give detectron2's default sampler
    (``TrainingSampler(len(dataset))``) its size, unless ``dataloader.train.sampler`` is set."""
    node = cfg.dataloader.train
    dataset = instantiate(node.dataset)
    _check_num_classes(cfg, node.dataset)  # the dataset is loaded: its classes are known
    sampler = node.get("sampler")
    sampler = instantiate(sampler) if sampler is not None else TrainingSampler(len(dataset))
    return build_resumable_loader(lambda **kw: instantiate_with(node, **kw), sampler,
                                  dataset=dataset)


def build_lazy_evaluator(cfg: DictConfig) -> DatasetEvaluator | None:
    """``instantiate(cfg.dataloader.evaluator)`` (None when absent or None); a detectron2
    ``COCOEvaluator`` becomes :func:`mabn_d2.engine.evaluation.coco_evaluator` (no compiled ops
    needed) writing its predictions under ``train.output_dir/inference/<dataset>`` unless
    ``output_dir`` is set."""
    node = cfg.dataloader.get("evaluator")
    if node is None:
        return None
    if not isinstance(node, DictConfig):
        raise ValueError(f"dataloader.evaluator must be a LazyCall of an evaluator, or null to "
                         f"turn evaluation off (dataloader.evaluator=null), got {node!r}")
    if target_of(node) is COCOEvaluator:
        output_dir = node.get("output_dir") or os.path.join(
            cfg.train.output_dir, "inference", str(node.dataset_name))
        return instantiate_with(node, _target_=coco_evaluator, output_dir=output_dir)
    return instantiate(node)


def lazy_test(cfg: DictConfig, model: nn.Module) -> dict[str, Any] | None:
    """Evaluate ``model`` on ``dataloader.test`` with ``dataloader.evaluator`` (detectron2's
    ``inference_on_dataset``); the main process logs the results as one table and writes
    ``{dataset: {task: {metric: value}}}`` to ``train.output_dir/eval_results.json``.
    None without an evaluator."""
    evaluator = build_lazy_evaluator(cfg)
    if evaluator is None:
        logger.info("mabn_d2: dataloader.evaluator is not set: no evaluation")
        return None
    test = cfg.dataloader.test
    loader = instantiate(test)
    _check_num_classes(cfg, test.get("dataset"))
    results = inference_on_dataset(model, loader, evaluator)
    print_csv_format(results)
    name = cfg.dataloader.evaluator.get("dataset_name") or "+".join(
        _dataset_names(test.get("dataset")))
    report_eval_results({str(name): results}, cfg.train.output_dir)
    return results


def lazy_mabn_hooks(cfg: DictConfig, model: nn.Module) -> list[HookBase]:
    """The hooks mabn_d2 adds to detectron2's LazyConfig training, to be run before the
    checkpointer and the evaluation (so that what they change is saved and evaluated):
    MABN calibration (``train.mabn_calibration``), and with ``train.precise_bn.enabled``
    detectron2's PreciseBN for BN layers and MABN PreciseBN, at ``train.eval_period``.
    Their extra loaders are ``dataloader.train`` with 0 workers."""
    precise = precise_bn_from_lazy(cfg)
    period = cfg.train.eval_period if precise.enabled else None

    def build_loader() -> Iterable[Any]:
        return instantiate_with(cfg.dataloader.train, num_workers=0)

    hooks = mabn_hooks(model, build_loader, calibration_from_lazy(cfg), period, precise.num_iter)
    if precise.enabled and get_bn_modules(model):
        hooks.insert(0, d2_hooks.PreciseBN(period, model, build_loader(), precise.num_iter))
    return hooks
