"""Predictors of trained models, for YAML configs and LazyConfigs (what ``tools/predict.py``
runs): the config assembled as training assembles it, the weights loaded strictly (an entry
missing from the weights or of another shape is an error, not a logged warning), MABN folded
into the convs on request."""

from __future__ import annotations

import os

import numpy as np
import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor

from ..deploy.fuse import fuse_mabn
from ..detectron2_compat import IncompatibleKeys, IncompatibleKeysCheckpointer
from ..integration.lazy_config import validate_lazy_config
from .atomic_checkpointer import MissingWeightsError
from .lazy_training import build_lazy_model
from .setup import load_mabn_cfg, mabn_setup

__all__ = ["LazyPredictor", "WeightsMismatchError", "build_predictor", "load_predictor"]


class WeightsMismatchError(RuntimeError):
    """The weights file does not describe the config's model."""


class _StrictCheckpointer(IncompatibleKeysCheckpointer):
    """detectron2's checkpointer, but a model entry missing from the weights or of another
    shape is an error instead of a logged warning (an untrained part would predict noise)."""

    def on_incompatible_keys(self, incompatible: IncompatibleKeys) -> None:
        problems = [f"{key}: shape {tuple(saved)} in the weights, {tuple(wanted)} in the model"
                    for key, saved, wanted in incompatible.incorrect_shapes]
        problems += [f"{key}: not in the weights" for key in incompatible.missing_keys]
        if problems:
            shown = "\n  ".join(problems[:10])
            more = f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else ""
            raise WeightsMismatchError(
                f"the weights do not fit the model of the config ({len(problems)} entries):"
                f"\n  {shown}{more}\nUse the config the weights were trained with.")


def _check_weights(weights: str, key: str, example: str) -> None:
    if not weights:
        raise MissingWeightsError(f"no weights: add --opts {example}")
    if "://" not in weights and not os.path.isfile(weights):
        raise MissingWeightsError(f"{key} {weights!r} is not a file")


def build_predictor(cfg: CfgNode, fuse: bool = False) -> DefaultPredictor:
    """detectron2's ``DefaultPredictor`` for ``cfg``, its weights loaded strictly (see
    :class:`_StrictCheckpointer`), MABN folded into the convs if ``fuse``."""
    weights = cfg.MODEL.WEIGHTS
    _check_weights(weights, "MODEL.WEIGHTS", "MODEL.WEIGHTS path/to/model_final.pth")
    empty = cfg.clone()
    empty.defrost()
    empty.MODEL.WEIGHTS = ""  # the predictor starts from scratch; the strict load follows
    predictor = DefaultPredictor(empty)
    _StrictCheckpointer(predictor.model).load(weights)
    if fuse:
        fuse_mabn(predictor.model, inplace=True)
    return predictor


class LazyPredictor:
    """``DefaultPredictor`` for a LazyConfig: ``cfg.model`` with the weights of
    ``train.init_checkpoint`` (loaded strictly), images resized by the test mapper's
    augmentations, in ``model.input_format``; ``predictor(bgr_image) -> {"instances": ...}``."""

    def __init__(self, cfg, fuse: bool = False) -> None:
        weights = cfg.train.init_checkpoint
        _check_weights(weights, "train.init_checkpoint",
                       "train.init_checkpoint=path/to/model_final.pth")
        self.model = build_lazy_model(cfg).eval()
        _StrictCheckpointer(self.model).load(weights)
        if fuse:
            fuse_mabn(self.model, inplace=True)
        self.augmentations = T.AugmentationList(
            instantiate(cfg.dataloader.test.mapper.augmentations))
        self.input_format = cfg.model.get("input_format", "BGR")

    def __call__(self, image_bgr: np.ndarray) -> dict:
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        height, width = image.shape[:2]
        resized = T.AugInput(image)
        self.augmentations(resized)
        tensor = torch.as_tensor(resized.image.astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            return self.model([{"image": tensor, "height": height, "width": width}])[0]


def _names(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def load_predictor(config_file: str, opts: list[str], fuse: bool = False
                   ) -> tuple[DefaultPredictor | LazyPredictor, list[str]]:
    """``(predictor, dataset names of the config: test first)`` for a YAML or LazyConfig
    (``.py``) ``config_file`` with the overrides ``opts`` (``KEY VALUE`` pairs for YAML,
    ``key=value`` for a LazyConfig); the config's own datasets are registered.

    Raises:
        MissingWeightsError: the config names no weights, or a local weights file is missing.
        WeightsMismatchError: the weights do not describe the config's model.
        ValueError: an invalid MABN value (naming the key).
    """
    if config_file.endswith(".py"):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
        validate_lazy_config(cfg)
        names = [*_names(cfg.dataloader.test.dataset.get("names")),
                 *_names(cfg.dataloader.train.dataset.get("names"))]
        return LazyPredictor(cfg, fuse=fuse), names
    cfg = load_mabn_cfg(config_file, opts)
    mabn_setup(cfg, log_to_output_dir=False)  # a prediction writes nothing into a training run
    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    return build_predictor(cfg, fuse=fuse), names


