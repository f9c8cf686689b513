"""The one place where mabn_d2 reaches into detectron2's and fvcore's private API.

mabn_d2 supports two detectron2 stacks (docs/install.md): upstream main built with its compiled
ops, and the v0.6 Python sources (the installer's fallback). Both report
``detectron2.__version__ == "0.6"``, so they are told apart by what they have (the compiled
extension, the newer functions), never by the version string.

Everything here is a seam with a test on both stacks
(tests/integration/test_detectron2_compat.py): a private name that changes upstream breaks one
function here, and its test says which. The rest of the package and its tools use only
detectron2's and fvcore's public API and these functions (the same test file checks that too).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING, Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

if TYPE_CHECKING:  # not imported at run time: `import mabn_d2` stays light
    from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
    from detectron2.evaluation import COCOEvaluator

__all__ = [
    "IncompatibleKeys",
    "IncompatibleKeysCheckpointer",
    "MODEL_LOADING_ATTRIBUTE",
    "ReadAheadCheckpointer",
    "coco_evaluator_ground_truth",
    "create_local_process_group",
    "find_free_port",
    "has_compiled_coco_eval",
    "has_compiled_ops",
    "inner_trainer",
    "checkpointer_model_loading",
    "read_checkpoint",
    "start_data_loader_iterator",
    "trainer_hooks",
    "train_loader_kwargs",
    "wrap_checkpointer_model_loading",
]

# fvcore's (missing_keys, unexpected_keys, incorrect_shapes) of a model load (a NamedTuple).
IncompatibleKeys = _IncompatibleKeys


# --- which stack ------------------------------------------------------------------------


def has_compiled_ops() -> bool:
    """Whether detectron2's compiled extension is installed (upstream built from source), not
    the v0.6 fallback's stand-in ``detectron2/_C.py`` (whose ops are all missing)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return hasattr(_C, "deform_conv_forward")


def has_compiled_coco_eval() -> bool:
    """Whether ``detectron2._C`` provides the C++ COCOeval (``use_fast_impl=True``)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return all(hasattr(_C, op) for op in ("COCOevalAccumulate", "COCOevalEvaluateImages"))


# --- data and trainer -------------------------------------------------------------------


def train_loader_kwargs(cfg: Any) -> dict[str, Any]:
    """The keyword arguments ``build_detection_train_loader(cfg)`` would be called with
    (dataset dicts loaded, so ``thing_classes`` is known): its ``from_config``, the public
    attribute of a ``@configurable`` function."""
    from detectron2.data import build_detection_train_loader

    return build_detection_train_loader.from_config(cfg)


def inner_trainer(trainer: DefaultTrainer) -> TrainerBase:
    """The ``SimpleTrainer``/``AMPTrainer`` that runs a ``DefaultTrainer``'s steps (its
    optimizer, data loader and grad scaler)."""
    return trainer._trainer


def start_data_loader_iterator(trainer: SimpleTrainer) -> None:
    """Create the data-loader iterator of ``trainer`` (a ``SimpleTrainer``/``AMPTrainer``, e.g.
    :func:`inner_trainer` of a ``DefaultTrainer``) now, if it does not exist yet.

    v0.6 creates it at construction, upstream main lazily at the first step. Creating it draws
    a number from torch's generator (the loader's base seed): drawn after ``--resume`` restored
    the generators, it shifts the resumed run's random stream away from the uninterrupted run's.
    """
    trainer._data_loader_iter  # noqa: B018  (upstream main: a creating property)


def trainer_hooks(trainer: TrainerBase) -> list[HookBase]:
    """The hooks registered in ``trainer``, in their order (detectron2 keeps no public list)."""
    return trainer._hooks


# --- distributed ------------------------------------------------------------------------


def find_free_port() -> int:
    """A TCP port on this machine that is free now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def create_local_process_group(num_processes_per_machine: int) -> None:
    """Create detectron2's per-machine process group, read by ``comm.get_local_rank()`` and
    ``comm.get_local_size()``, after ``torch.distributed.init_process_group`` in every process.
    Upstream main has ``comm.create_local_process_group``; v0.6 sets the module global inside
    its own ``launch``."""
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_processes_per_machine)
        return
    world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world_size % num_processes_per_machine:
        raise ValueError(f"world size {world_size} is not a multiple of "
                         f"{num_processes_per_machine} processes per machine")
    for machine in range(world_size // num_processes_per_machine):
        first = machine * num_processes_per_machine
        group = torch.distributed.new_group(list(range(first, first + num_processes_per_machine)))
        if rank // num_processes_per_machine == machine:
            comm._LOCAL_PROCESS_GROUP = group


# --- evaluation -------------------------------------------------------------------------


def coco_evaluator_ground_truth(evaluator: COCOEvaluator) -> Any:
    """The pycocotools ``COCO`` object an evaluator scores against, or None where it has no
    ground truth to evaluate (a dataset without annotations: inference only)."""
    return evaluator._coco_api if evaluator._do_evaluation else None


# --- checkpoints ------------------------------------------------------------------------


class _FileReader(DetectionCheckpointer):
    """``DetectionCheckpointer.load`` that returns what it read without loading a model."""

    def _load_model(self, checkpoint: dict[str, Any]) -> None:
        return None  # load() then returns the whole checkpoint, untouched


def read_checkpoint(path: str) -> dict[str, Any]:
    """What ``DetectionCheckpointer.load(path)`` reads: ``{"model": state, ...}`` of a
    detectron2 ``.pth``/``.pkl``, a Caffe2/Detectron ``.pkl`` (``"__author__": "Caffe2"``,
    ``"matching_heuristics"``), a pycls ``.pyth`` or a plain state dict, from a path or a
    PathManager URL (``?matching_heuristics=True`` understood), with no model to load into.

    Goes through the public ``load``: upstream's ``_load_file`` may only run inside it.

    Raises:
        FileNotFoundError: ``path`` is a local path and no file is there.
    """
    local = path.partition("?")[0]
    if "://" not in path and not os.path.isfile(local):
        raise FileNotFoundError(errno.ENOENT, "No such checkpoint file", local)
    reader = _FileReader(nn.Module(), save_to_disk=False)
    return reader.load(path, checkpointables=[])


class ReadAheadCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that can read a checkpoint before deciding to load it
    (:meth:`read_ahead`), without ``load`` reading the file a second time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_ahead: dict[str, dict[str, Any]] = {}

    def read_ahead(self, path: str) -> dict[str, Any]:
        """:func:`read_checkpoint` of ``path``, kept for the next ``load(path)``; raises what
        reading raises (a damaged file: EOF, a bad zip, an unpickling error, ...)."""
        self._read_ahead[path] = read_checkpoint(path)
        return self._read_ahead[path]

    def _load_file(self, filename: str) -> dict[str, Any]:  # called by load() only
        read = self._read_ahead.pop(filename, None)
        if read is not None:
            return read
        try:
            return super()._load_file(filename)
        except Exception as error:
            self.on_read_error(filename, error)
            raise

    def on_read_error(self, filename: str, error: Exception) -> None:
        """Called when ``load`` cannot read ``filename``; override to raise a clearer error
        (the default lets ``error`` through)."""


class IncompatibleKeysCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` calling :meth:`on_incompatible_keys` after it logged the keys
    of a model load that did not fit (missing, unexpected, other shapes)."""

    def on_incompatible_keys(self, incompatible: IncompatibleKeys) -> None:
        """Override to act on them (e.g. refuse); the default does nothing more."""

    def _log_incompatible_keys(self, incompatible: IncompatibleKeys) -> None:
        super()._log_incompatible_keys(incompatible)
        self.on_incompatible_keys(incompatible)


def checkpointer_model_loading() -> Any:
    """``DetectionCheckpointer``'s step that loads ``checkpoint["model"]`` into the model
    (``_load_model(self, checkpoint) -> IncompatibleKeys``), as installed now."""
    return DetectionCheckpointer._load_model


def wrap_checkpointer_model_loading(wrapper: Any) -> None:
    """Install ``wrapper`` as that step (:mod:`mabn_d2.integration.patch` only)."""
    DetectionCheckpointer._load_model = wrapper


# The attribute :func:`wrap_checkpointer_model_loading` replaces, for patch.py's report.
MODEL_LOADING_ATTRIBUTE = (DetectionCheckpointer, "_load_model")
