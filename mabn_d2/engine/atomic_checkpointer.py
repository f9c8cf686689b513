"""Checkpoints that a kill cannot destroy, and a ``--resume`` that survives a damaged one.

fvcore's ``Checkpointer.save`` (detectron2 v0.6) opens ``model_final.pth`` for writing in
place and then rewrites ``last_checkpoint`` in place: a process killed during the save leaves
a truncated file where the last good model was, tagged as the one to resume from.

:class:`AtomicCheckpointer` is a ``DetectionCheckpointer`` (same loading: detectron2's formats
and mabn_d2's conversions) that

* writes every file atomically (:func:`mabn_d2.file_io.atomic_write`: a temporary file in
  the same folder, flushed and fsync'ed, then renamed over the target, then the folder
  fsync'ed), so a file holds either its previous content or its complete new one;
  ``last_checkpoint`` is rewritten the same way, and only after the checkpoint it names is
  complete;
* on ``--resume``, reads the checkpoint ``last_checkpoint`` names and, if that cannot be read
  (damaged or missing: written by an older, non-atomic save, or by a full disk), warns and
  takes the newest readable ``model_*.pth`` of the folder instead.

``MABNTrainer`` uses it; another trainer (e.g. a LazyConfig training script) can construct it
where it constructs detectron2's ``DetectionCheckpointer``.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import torch

from ..cli import UserError
from ..detectron2_compat import ReadAheadCheckpointer
from ..file_io import atomic_write, is_temporary_file
from ..finetune.checkpoint import CheckpointReadError
from ..finetune.model_record import RECORD_KEY, model_record

__all__ = ["AtomicCheckpointer", "CheckpointReadError", "MissingWeightsError",
           "NoReadableCheckpointError", "load_eval_weights"]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"  # fvcore's tag file


class MissingWeightsError(UserError, ValueError):
    """An evaluation or prediction was asked for without weights to load."""


class NoReadableCheckpointError(UserError, RuntimeError):
    """``--resume`` found checkpoints in OUTPUT_DIR, but none of them can be read."""


def _is_local(folder: str) -> bool:
    return "://" not in folder


def _refused_not_damaged(error: Exception) -> bool:
    """torch.load's refusal of a complete file holding objects that ``weights_only`` loading
    does not allow: an error to show, not a damaged file to skip."""
    return isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)


class AtomicCheckpointer(ReadAheadCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and a resume that skips damaged files.

    Same constructor and loading as detectron2's; see the module docstring. Folders given as
    PathManager URLs (``s3://``, ``manifold://``, ...) are saved as fvcore does, in place.
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *,
                 save_to_disk: bool | None = None, **checkpointables: Any) -> None:
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        # The config key or option naming the weights, for error messages.
        self.weights_key = "MODEL.WEIGHTS"

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save`` (model, checkpointables, ``kwargs`` into ``<name>.pth``, then
        ``last_checkpoint``), each file written with :func:`atomic_write`."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):
            super().save(name, **kwargs)
            return
        # What loading must match beyond the state dict (centralized convs, norm kinds).
        data = {"model": self.model.state_dict(), RECORD_KEY: model_record(self.model)}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        self._remove_leftovers()
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not _is_local(self.save_dir):
            super().tag_last_checkpoint(last_filename_basename)
            return
        atomic_write(os.path.join(self.save_dir, LAST_CHECKPOINT),
                     lambda f: f.write(last_filename_basename.encode()))

    def _remove_leftovers(self) -> None:
        """Remove temporary files of saves that a kill interrupted (one run per folder: see
        :mod:`mabn_d2.engine.output_lock`)."""
        for name in os.listdir(self.save_dir):
            if is_temporary_file(name) and ".pth." in name:
                logger.info("Removing %s, left by a save that was interrupted", name)
                try:
                    os.unlink(os.path.join(self.save_dir, name))
                except OSError:
                    pass

    def _resume_candidates(self) -> list[str]:
        """The tagged checkpoint first, then the folder's other ``model_*.pth``, newest
        first."""
        tagged = self.get_checkpoint_file()
        if not os.path.basename(tagged):  # an empty last_checkpoint
            tagged = ""
        others = []
        if _is_local(self.save_dir) and os.path.isdir(self.save_dir):
            for name in os.listdir(self.save_dir):
                path = os.path.join(self.save_dir, name)
                if name.startswith("model_") and name.endswith(".pth") and path != tagged \
                        and os.path.isfile(path):
                    others.append(path)
        others.sort(key=os.path.getmtime, reverse=True)
        return ([tagged] if tagged else []) + others

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        """fvcore's ``resume_or_load``; on resume, a checkpoint that cannot be read is skipped
        with a warning for the newest readable one (see the module docstring).

        Raises:
            NoReadableCheckpointError: ``last_checkpoint`` exists but no checkpoint of the
                folder can be read.
        """
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        failures = []
        for candidate in self._resume_candidates():
            try:
                self.read_ahead(candidate)  # kept for load(): read once
            except Exception as error:  # any reader failure: truncated zip, EOF, pickle, ...
                if _refused_not_damaged(error):
                    raise
                failures.append(f"{candidate}: {type(error).__name__}: {error}")
                logger.warning("Cannot read checkpoint %s (%s: %s); it is damaged or "
                               "incomplete (e.g. a kill during its save). Trying the previous "
                               "checkpoint.", candidate, type(error).__name__, error)
                continue
            if failures:
                logger.warning("Resuming from %s, the newest readable checkpoint in %s",
                               candidate, self.save_dir)
            return self.load(candidate)
        raise NoReadableCheckpointError(
            f"--resume: {os.path.join(self.save_dir, LAST_CHECKPOINT)} exists but no checkpoint "
            f"in {self.save_dir} can be read:\n  " + "\n  ".join(failures or ["(none found)"])
            + "\nStart afresh without --resume (or with another OUTPUT_DIR), or load weights "
            "with MODEL.WEIGHTS."
        )

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        """fvcore's ``load``; a local file that is missing is a :class:`CheckpointReadError`
        naming :attr:`weights_key` (fvcore asserts)."""
        if path and _is_local(path) and not os.path.isfile(path):
            raise CheckpointReadError(f"{self.weights_key} {path}: no such file; give the path "
                                      "of a checkpoint (e.g. OUTPUT_DIR/model_final.pth)")
        return super().load(path, checkpointables)

    def on_read_error(self, filename: str, error: Exception) -> None:
        """``load`` could not read ``filename`` (torch/pickle: EOFError, UnpicklingError,
        RuntimeError, ...): a :class:`CheckpointReadError` naming :attr:`weights_key`."""
        raise CheckpointReadError.unreadable(self.weights_key, filename, error) from error


def load_eval_weights(checkpointer: AtomicCheckpointer, weights: str, resume: bool, *,
                      weights_example: str, output_key: str) -> None:
    """``--eval-only``'s load in both training tools: ``weights`` or, with ``resume``, the last
    checkpoint of the checkpointer's folder.

    Args:
        weights_example: how the user gives weights (``"MODEL.WEIGHTS path/to/model.pth"``).
        output_key: the config key of the checkpointer's folder (``"OUTPUT_DIR"``).

    Raises:
        MissingWeightsError: neither is there (an evaluation of random weights means nothing).
    """
    if not weights and not (resume and checkpointer.has_checkpoint()):
        raise MissingWeightsError(
            f"--eval-only needs weights: {weights_example}, or --resume with a last_checkpoint "
            f"in {output_key} ({checkpointer.save_dir})")
    checkpointer.resume_or_load(weights, resume=resume)
