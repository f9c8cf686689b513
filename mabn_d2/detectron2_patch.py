"""The one place where mabn_d2 changes detectron2 at run time.

:func:`register_mabn` (called by ``import mabn_d2``; idempotent; logged) does four things:

1. **``get_norm("MABN", C)``.** detectron2's ``get_norm`` keeps its names in a local dict, so
   it is wrapped: ``"MABN"`` builds :class:`~mabn_d2.MABN2d`, every other name goes to the
   original function unchanged, and an unknown name raises an error listing the valid names.
   Modules bind ``get_norm`` at import (``from detectron2.layers import get_norm``), so
   every loaded module's binding of the original is replaced.
2. **cfg-scoped settings.** detectron2's model builders (``build_model``, ``build_backbone``,
   the ROI head and proposal builders, hence ``DefaultTrainer`` and ``DefaultPredictor``)
   look their classes up in registries. The lookup of each model registry is wrapped so that
   a build from a cfg runs with that cfg's ``MODEL.MABN`` settings active (validated first,
   errors name the key), and the finished module gets its MABN-fed convs centralized.
3. **DDP on the CPU.** ``DefaultTrainer`` wraps the model with ``create_ddp_model``, which
   passes ``device_ids=[local_rank]`` even for a CPU model, which DDP rejects; for CPU models
   the wrapper leaves ``device_ids`` as None so that multi-process CPU training (gloo) works.
4. **Checkpoints into MABN models.** ``DetectionCheckpointer._load_model`` (used by
   ``DefaultTrainer``, ``DefaultPredictor`` and every ``DetectionCheckpointer``) is wrapped:
   for a model with MABN layers the checkpoint's state dict is converted first (BN/FrozenBN/
   Caffe2 affine -> MABN by the exact fold, mismatches are errors; see
   :mod:`mabn_d2.checkpoint`), then detectron2's own loading runs; other models are untouched.

Only when asked for (:func:`import_tracing_adapter`, used by :mod:`mabn_d2.deploy`):

5. **``detectron2.export`` without caffe2.** v0.6's ``detectron2/export/__init__.py`` imports
   caffe2 unconditionally (PyTorch no longer ships it), which makes ``TracingAdapter``
   unimportable although it needs no caffe2. Then the package is registered bare and only its
   ``flatten`` module (which defines ``TracingAdapter``) is imported; logged.
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
from detectron2.config import CfgNode
from detectron2.engine import defaults as d2_defaults
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

from .centralization import centralize_convs_feeding_mabn
from .checkpoint import load_model_with_mabn_conversion
from .config import settings_from_cfg
from .mabn import MABN2d
from .settings import MABNSettings, active_settings, build_mabn, use_settings

__all__ = [
    "register_mabn",
    "finalize_mabn_model",
    "import_tracing_adapter",
    "UnknownNormError",
    "NORM_NAME",
]

logger = logging.getLogger(__name__)

NORM_NAME = "MABN"
_MARK = "_mabn_d2_wrapped"
# Names detectron2 releases have accepted; the valid ones are found by asking get_norm.
_CANDIDATE_D2_NORMS = (
    "BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN",
)
_MODEL_REGISTRIES: tuple[Registry, ...] = (
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


class UnknownNormError(KeyError):
    """An unknown ``NORM`` name (a KeyError, as detectron2's own get_norm raises)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _original_get_norm() -> Callable:
    current = d2_batch_norm.get_norm
    return getattr(current, "__wrapped__", current) if getattr(current, _MARK, False) else current


@functools.lru_cache(maxsize=1)
def valid_norm_names() -> tuple[str, ...]:
    """Every string ``get_norm`` accepts (besides ``""``), ``"MABN"`` included."""
    original = _original_get_norm()
    names = []
    for name in _CANDIDATE_D2_NORMS:
        try:
            original(name, 32)
        except KeyError:
            continue
        except Exception:  # exists but cannot be built here (e.g. needs a process group)
            pass
        names.append(name)
    return tuple(names) + (NORM_NAME,)


def _make_get_norm(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_norm(norm: Any, out_channels: int) -> nn.Module | None:
        """detectron2's ``get_norm`` plus ``"MABN"`` (see :mod:`mabn_d2.detectron2_patch`)."""
        if norm == NORM_NAME:
            return build_mabn(out_channels)
        try:
            return original(norm, out_channels)
        except KeyError:
            if not isinstance(norm, str):
                raise
            raise UnknownNormError(
                f"Unknown norm {norm!r}; valid names are: {', '.join(valid_norm_names())} "
                "(or '' for none)"
            ) from None

    setattr(get_norm, _MARK, True)
    return get_norm


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


def finalize_mabn_model(model: nn.Module, settings: MABNSettings) -> None:
    """Post-build steps for a module built with MABN: centralize the convs feeding MABN
    (if ``settings.centralize_weights``, except under ``settings.centralize_exclude``) and
    give each MABN layer its name for messages."""
    has_mabn = False
    for name, module in model.named_modules():
        if isinstance(module, MABN2d):
            module._mabn_name = name
            has_mabn = True
    if has_mabn and settings.centralize_weights:
        centralize_convs_feeding_mabn(model, include=settings.centralizes)
        names = [name for name, _ in model.named_modules()]
        for prefix in settings.centralize_exclude:
            if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                logger.warning(
                    "MODEL.MABN.CENTRALIZE_EXCLUDE entry %r names no module of the built %s "
                    "(names are those of the model built by build_model, e.g. "
                    "'backbone.bottom_up')", prefix, type(model).__name__,
                )


def _first_cfg(args: tuple, kwargs: dict) -> CfgNode | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, CfgNode):
            return value
    return None


def _with_cfg_settings(builder: Callable) -> Callable:
    @functools.wraps(builder, updated=())
    def build(*args: Any, **kwargs: Any) -> Any:
        cfg = _first_cfg(args, kwargs)
        if cfg is None:
            return builder(*args, **kwargs)
        outermost = active_settings() is None
        settings = settings_from_cfg(cfg)
        if settings is None:
            settings = MABNSettings()
            cfg_has_mabn = False
        else:
            cfg_has_mabn = True
        with use_settings(settings):
            built = builder(*args, **kwargs)
        if outermost and isinstance(built, nn.Module):
            if not cfg_has_mabn and any(isinstance(m, MABN2d) for m in built.modules()):
                logger.warning(
                    "The cfg has no MODEL.MABN node (call mabn_d2.add_mabn_config(cfg)); "
                    "MABN layers were built with the paper's defaults."
                )
            finalize_mabn_model(built, settings)
        return built

    return build


def _wrap_registry(registry: Registry) -> None:
    if getattr(registry, _MARK, False):
        return
    plain_get = registry.get

    def get(name: str) -> Any:
        return _with_cfg_settings(plain_get(name))

    registry.get = get  # instance attribute: this registry only
    setattr(registry, _MARK, True)


def _make_cpu_aware_create_ddp_model(original: Callable) -> Callable:
    @functools.wraps(original)
    def create_ddp_model(model: nn.Module, **kwargs: Any) -> nn.Module:
        """detectron2's ``create_ddp_model``; for a CPU model ``device_ids`` stays None, as
        ``DistributedDataParallel`` requires (detectron2 passes the local rank, for CUDA)."""
        first = next(model.parameters(), None)
        if first is not None and first.device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    setattr(create_ddp_model, _MARK, True)
    return create_ddp_model


def _patch_create_ddp_model() -> bool:
    """Let ``DefaultTrainer`` wrap CPU models in DDP (multi-process CPU training with gloo,
    see :mod:`mabn_d2.distributed`). Returns whether this call patched it."""
    if getattr(d2_defaults.create_ddp_model, _MARK, False):
        return False
    d2_defaults.create_ddp_model = _make_cpu_aware_create_ddp_model(d2_defaults.create_ddp_model)
    return True


def _patch_checkpointer() -> bool:
    """Convert checkpoints for MABN models in ``DetectionCheckpointer._load_model`` (before
    detectron2's name matching and fvcore's shape filter drop what does not fit). Returns
    whether this call patched it."""
    original = DetectionCheckpointer._load_model
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def _load_model(self: DetectionCheckpointer, checkpoint: dict[str, Any]) -> Any:
        return load_model_with_mabn_conversion(self, checkpoint, original)

    setattr(_load_model, _MARK, True)
    DetectionCheckpointer._load_model = _load_model
    return True


def register_mabn() -> None:
    """Register ``"MABN"`` into detectron2 (idempotent; logs what it changed)."""
    if _patch_create_ddp_model():
        logger.info("mabn_d2: detectron2.engine.defaults.create_ddp_model accepts CPU models")
    if _patch_checkpointer():
        logger.info("mabn_d2: DetectionCheckpointer converts BN checkpoints for MABN models")
    original = _original_get_norm()
    patched = d2_batch_norm.get_norm
    if not getattr(patched, _MARK, False):
        patched = _make_get_norm(original)
    rebound = _rebind_get_norm(original, patched)
    for registry in _MODEL_REGISTRIES:
        _wrap_registry(registry)
    if rebound:
        logger.info(
            "mabn_d2: registered norm %r in detectron2's get_norm (%d modules rebound) and "
            "cfg-scoped MABN settings in %d model registries",
            NORM_NAME,
            len(rebound),
            len(_MODEL_REGISTRIES),
        )


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
