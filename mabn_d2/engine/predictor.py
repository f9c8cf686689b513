"""Predictors of trained models, for YAML configs and LazyConfigs (what ``tools/predict.py``
runs): the config assembled as training assembles it, the weights loaded strictly (an entry
missing from the weights or of another shape is an error, not a logged warning), MABN folded
into the convs on request."""

from __future__ import annotations

import numpy as np
import torch
from detectron2.config import CfgNode, instantiate
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor

from ..cli import UserError
from ..deploy.fuse import fuse_mabn
from ..detectron2_compat import IncompatibleKeys, IncompatibleKeysCheckpointer
from ..integration.lazy_config import validate_lazy_config
from ..validation import check_weights_file, load_lazy_cfg
from .atomic_checkpointer import AtomicCheckpointer, MissingWeightsError
from .lazy_training import build_lazy_model
from .setup import load_mabn_cfg, mabn_setup

__all__ = ["LazyPredictor", "WeightsMismatchError", "build_predictor", "load_predictor"]


class WeightsMismatchError(UserError, RuntimeError):
    """The weights file does not describe the config's model."""


class _StrictCheckpointer(IncompatibleKeysCheckpointer, AtomicCheckpointer):
    """detectron2's checkpointer (a file that cannot be read is a clear error, as in
    :class:`AtomicCheckpointer`), but a model entry missing from the weights or of another
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
    check_weights_file(weights, key)


def _load_weights(model: torch.nn.Module, weights: str, key: str) -> None:
    checkpointer = _StrictCheckpointer(model)
    checkpointer.weights_key = key
    checkpointer.load(weights)


def build_predictor(cfg: CfgNode, fuse: bool = False) -> DefaultPredictor:
    """detectron2's ``DefaultPredictor`` for ``cfg``, its weights loaded strictly (see
    :class:`_StrictCheckpointer`), MABN folded into the convs if ``fuse``."""
    weights = cfg.MODEL.WEIGHTS
    _check_weights(weights, "MODEL.WEIGHTS", "MODEL.WEIGHTS path/to/model_final.pth")
    empty = cfg.clone()
    empty.defrost()
    empty.MODEL.WEIGHTS = ""  # the predictor starts from scratch; the strict load follows
    predictor = DefaultPredictor(empty)
    _load_weights(predictor.model, weights, "MODEL.WEIGHTS")
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
        _load_weights(self.model, weights, "train.init_checkpoint")
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
        MissingWeightsError: the config names no weights.
        UserError: a weights file that is missing, empty, text or truncated; a bad override
            or value (naming the key).
        WeightsMismatchError: the weights do not describe the config's model.
    """
    if config_file.endswith(".py"):
        cfg = load_lazy_cfg(config_file, opts)  # overrides checked key by key
        try:
            validate_lazy_config(cfg)
        except ValueError as error:
            raise UserError(str(error)) from None
        names = [*_names(cfg.dataloader.test.dataset.get("names")),
                 *_names(cfg.dataloader.train.dataset.get("names"))]
        return LazyPredictor(cfg, fuse=fuse), names
    cfg = load_mabn_cfg(config_file, opts)
    try:  # a prediction writes nothing into a training run
        mabn_setup(cfg, log_to_output_dir=False)
    except ValueError as error:  # a MODEL.MABN value
        raise UserError(str(error)) from None
    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    return build_predictor(cfg, fuse=fuse), names


