"""The one place where mabn_d2 changes detectron2 at run time.

:func:`register_mabn` (called by ``import mabn_d2``; idempotent; each change logged once)
makes exactly these changes, in detectron2 v0.6 and later releases alike (the README's table
lists them; ``tests/integration/test_patch.py`` checks that nothing else changes):

====  =========================================  ==================================================
 #    what                                       why
====  =========================================  ==================================================
 1    ``detectron2.layers.get_norm`` (and every  ``"MABN"`` builds :class:`~mabn_d2.MABN2d`
      module's binding of it) wrapped            (:func:`~mabn_d2.integration.norm.
                                                 build_mabn_norm`); other names go to the original;
                                                 an unknown name lists the valid ones.
 2    ``detectron2.layers.Conv2d.__init__``      a ``Conv2d`` whose norm is an MABN layer with
      wrapped                                    ``centralize_weights`` becomes a
                                                 :class:`~mabn_d2.CentralizedConv2d`, whichever
                                                 builder made it (YACS, LazyConfig, Python).
 3    ``.get`` of detectron2's model registries  a YACS build runs with its cfg's ``MODEL.MABN``
      (meta-arch, backbone, proposal generator,  settings (validated, errors name the key); the
      RPN head, ROI heads, box/mask/keypoint     built model's MABN layers are named and
      heads, sem-seg heads) wrapped              ``MODEL.MABN.CENTRALIZE_EXCLUDE`` applied.
 4    ``DetectionCheckpointer._load_model``      a checkpoint loaded into a model with MABN layers
      wrapped                                    is converted first (BN/FrozenBN/Caffe2 affine ->
                                                 MABN by the exact fold; mismatches are errors);
                                                 NaN/inf values, and MABN layers loaded into a
                                                 model without MABN, are refused; see
                                                 :mod:`mabn_d2.finetune.checkpoint`.
====  =========================================  ==================================================

Only when asked for (:func:`import_tracing_adapter`, used by :mod:`mabn_d2.deploy.trace`):

5. **``detectron2.export`` without caffe2.** v0.6's ``detectron2/export/__init__.py`` imports
   caffe2 unconditionally (PyTorch no longer ships it), which makes ``TracingAdapter``
   unimportable although it needs no caffe2. Then the package is registered bare and only its
   ``flatten`` module (which defines ``TracingAdapter``) is imported; logged.

Multi-process training without CUDA changes ``create_ddp_model`` in the worker processes that
:func:`mabn_d2.engine.launch.launch` starts, and nowhere else (see that module).
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import Conv2d
from detectron2.layers import batch_norm as d2_batch_norm
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_KEYPOINT_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    SEM_SEG_HEADS_REGISTRY,
)
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY
from fvcore.common.registry import Registry
from torch import nn

from ..detectron2_compat import (
    MODEL_LOADING_ATTRIBUTE,
    checkpointer_model_loading,
    wrap_checkpointer_model_loading,
)
from ..finetune.checkpoint import load_model_with_mabn_conversion
from .conv import CentralizedConv2d, centralizes
from .norm import (
    NORM_NAME,
    UnknownNormError,
    build_mabn_norm,
    build_with_cfg_settings,
    valid_norm_names,
)

__all__ = ["register_mabn", "import_tracing_adapter", "PATCHED", "MODEL_REGISTRIES"]

logger = logging.getLogger(__name__)

# Set on every function mabn_d2 wraps (and on wrapped registries): makes each change
# idempotent and lets tests list what was changed.
_MARK = "_mabn_d2_wrapped"
MODEL_REGISTRIES: tuple[Registry, ...] = (
    META_ARCH_REGISTRY,
    BACKBONE_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    RPN_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_BOX_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    ROI_KEYPOINT_HEAD_REGISTRY,
    SEM_SEG_HEADS_REGISTRY,
)
# What register_mabn changes (besides the registries and the modules' get_norm bindings),
# as (owner, attribute).
PATCHED: tuple[tuple[object, str], ...] = (
    (d2_batch_norm, "get_norm"),
    (Conv2d, "__init__"),
    MODEL_LOADING_ATTRIBUTE,  # DetectionCheckpointer's model-loading step
)


def _is_wrapped(function: object) -> bool:
    return bool(getattr(function, _MARK, False))


def _mark(function: Callable) -> Callable:
    setattr(function, _MARK, True)
    return function


def _original_get_norm() -> Callable:
    current = d2_batch_norm.get_norm
    return current.__wrapped__ if _is_wrapped(current) else current


def _make_get_norm(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_norm(norm: Any, out_channels: int) -> nn.Module | None:
        """detectron2's ``get_norm`` plus ``"MABN"`` (see :mod:`mabn_d2.integration.patch`)."""
        if norm == NORM_NAME:
            return build_mabn_norm(out_channels)
        try:
            return original(norm, out_channels)
        except KeyError:
            if not isinstance(norm, str):
                raise
            raise UnknownNormError(
                f"Unknown norm {norm!r}; valid names are: "
                f"{', '.join(valid_norm_names(original))} (or '' for none)"
            ) from None

    return _mark(get_norm)


def _rebind_get_norm(original: Callable, patched: Callable) -> list[str]:
    """Point every loaded module's ``get_norm`` that is detectron2's original at ``patched``:
    detectron2's own modules and any user module that did ``from detectron2.layers import
    get_norm`` before ``import mabn_d2``. Modules loaded later import the patched one."""
    rebound = []
    for name, module in list(sys.modules.items()):
        # vars(), not getattr(): no module-level __getattr__ (detectron2._C's) is triggered.
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("get_norm") is original:
            module.get_norm = patched
            rebound.append(name)
    return rebound


def _patch_get_norm() -> bool:
    original = _original_get_norm()
    patched = d2_batch_norm.get_norm
    if not _is_wrapped(patched):
        patched = _make_get_norm(original)
    return bool(_rebind_get_norm(original, patched))


def _patch_conv2d() -> bool:
    """Item 2: centralization decided when a detectron2 ``Conv2d`` is built with its norm."""
    original = Conv2d.__init__
    if _is_wrapped(original):
        return False

    @functools.wraps(original)
    def __init__(self: Conv2d, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if centralizes(self):
            self.__class__ = CentralizedConv2d

    Conv2d.__init__ = _mark(__init__)
    return True


def _wrap_registry(registry: Registry) -> bool:
    if _is_wrapped(registry):
        return False
    plain_get = registry.get

    def get(name: str) -> Any:
        return build_with_cfg_settings(plain_get(name))

    registry.get = get  # instance attribute: this registry only
    _mark(registry)
    return True


def _patch_checkpointer() -> bool:
    """Item 4: convert checkpoints for MABN models in ``DetectionCheckpointer._load_model``
    (before detectron2's name matching and fvcore's shape filter drop what does not fit)."""
    original = checkpointer_model_loading()
    if _is_wrapped(original):
        return False

    @functools.wraps(original)
    def load_model(self: DetectionCheckpointer, checkpoint: dict[str, Any]) -> Any:
        return load_model_with_mabn_conversion(self, checkpoint, original)

    wrap_checkpointer_model_loading(_mark(load_model))
    return True


def register_mabn() -> None:
    """Register ``"MABN"`` into detectron2 (idempotent; logs what it changed)."""
    if _patch_get_norm():
        logger.info("mabn_d2: registered norm %r in detectron2's get_norm", NORM_NAME)
    if _patch_conv2d():
        logger.info("mabn_d2: detectron2 Conv2d layers whose norm is MABN use centralized "
                    "weights (MABN2d.centralize_weights)")
    wrapped = sum(_wrap_registry(registry) for registry in MODEL_REGISTRIES)
    if wrapped:
        logger.info("mabn_d2: %d detectron2 model registries build with their cfg's "
                    "MODEL.MABN settings", wrapped)
    if _patch_checkpointer():
        logger.info("mabn_d2: DetectionCheckpointer converts BN checkpoints for MABN models")


def import_tracing_adapter() -> type:
    """``detectron2.export.TracingAdapter``, also where caffe2 is missing (item 5 above)."""
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ModuleNotFoundError as e:
        if "caffe2" not in str(e):
            raise
    import detectron2

    for name in [m for m in sys.modules if m.startswith("detectron2.export")]:
        del sys.modules[name]
    package = types.ModuleType("detectron2.export")
    package.__path__ = [f"{detectron2.__path__[0]}/export"]
    sys.modules["detectron2.export"] = package
    logger.info("mabn_d2: detectron2.export needs caffe2, which is missing: registered the "
                "package without its __init__ and imported detectron2.export.flatten only")
    adapter = importlib.import_module("detectron2.export.flatten").TracingAdapter
    package.TracingAdapter = adapter  # later imports find it: idempotent
    return adapter
