"""Resuming a run where it stopped: the data stream position and the random number generators.

detectron2's ``--resume`` restores the model, optimizer, scheduler and iteration, but its
training sampler starts its infinite index stream from the beginning again, and the random
number generators (augmentation, RPN/ROI sampling) start from the job's seed. A resumed run
therefore sees other batches than the uninterrupted run would have. With

* :class:`ResumableSampler` skipping the indices the interrupted run consumed, and
* :class:`RNGStates` saving and restoring the Python, NumPy and torch generators,

a resumed single-process run with ``DATALOADER.NUM_WORKERS 0`` and
``DATALOADER.ASPECT_RATIO_GROUPING False`` continues exactly as the uninterrupted one
(with data workers or aspect-ratio grouping it continues from the right position in the
stream, but augmentation randomness and partially filled aspect-ratio buckets differ).
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from detectron2.utils import comm
from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "RNGStates", "build_resumable_loader", "continue_data_stream"]

logger = logging.getLogger(__name__)


class ResumableSampler(Sampler):
    """An infinite per-process training sampler that can start ``n`` indices into its stream.

    Wraps detectron2's ``TrainingSampler`` (or any sampler of an infinite per-process index
    stream); :meth:`start_at` must be called before the data loader's first batch is drawn
    (detectron2 only starts iterating the sampler at the first training step).
    """

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self._start = 0

    def start_at(self, num_indices: int) -> None:
        """Skip the first ``num_indices`` indices of this process's stream."""
        if num_indices < 0:
            raise ValueError(f"ResumableSampler.start_at: expected >= 0, got {num_indices}")
        self._start = num_indices

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(iter(self._sampler), self._start, None)


class RNGStates:
    """Checkpointable Python/NumPy/torch(/CUDA) random generator states of this process.

    Only restored in single-process runs: the checkpoint is written by the main process,
    whose states the other processes must not take over (they use ``seed + rank``).
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "python": random.getstate(),
            # Plain Python values and tensors only: checkpoints load with weights_only=True.
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if comm.get_world_size() > 1:
            logger.info("RNGStates: not restored in a multi-process run (each rank keeps its "
                        "own seed); the resumed run is statistically, not exactly, the same")
            return
        self.restore(state)

    @staticmethod
    def restore(state: dict[str, Any]) -> None:
        """Set this process's generators to ``state`` (a :meth:`state_dict`)."""
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def rng_states_kept(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` run with this process's Python/NumPy/torch(/CUDA) random states restored
    afterwards, in every process: an evaluation inside training (detectron2's ``EvalHook``)
    must not draw from the training streams, or a run resumed from a checkpoint taken on an
    evaluation iteration (saved before the evaluation) would continue from other states than
    the uninterrupted run."""

    @functools.wraps(func)
    def kept(*args: Any, **kwargs: Any) -> Any:
        states = RNGStates()
        saved = states.state_dict()
        try:
            return func(*args, **kwargs)
        finally:
            states.restore(saved)

    return kept


def build_resumable_loader(
    build_loader: Callable[..., Iterable[Any]], sampler: Sampler, **kwargs: Any
) -> Iterable[Any]:
    """``build_loader(sampler=ResumableSampler(sampler), **kwargs)`` (e.g. detectron2's
    ``build_detection_train_loader``), the wrapper kept as ``loader.resumable_sampler`` for
    :func:`continue_data_stream`."""
    resumable = ResumableSampler(sampler)
    loader = build_loader(sampler=resumable, **kwargs)
    loader.resumable_sampler = resumable
    return loader


def continue_data_stream(loader: Iterable[Any], start_iter: int, images_per_batch: int) -> bool:
    """Before training resumes at ``start_iter``: make ``loader`` (built by
    :func:`build_resumable_loader`) skip the images the interrupted run used.

    Args:
        loader: the training loader, before its first batch is drawn.
        start_iter: the first iteration of the resumed run (0: nothing to skip).
        images_per_batch: images per iteration over all processes (``SOLVER.IMS_PER_BATCH``,
            ``dataloader.train.total_batch_size``).

    Returns:
        whether the stream was moved (False for a fresh start or a loader without a
        resumable sampler).
    """
    sampler = getattr(loader, "resumable_sampler", None)
    if start_iter <= 0 or sampler is None:
        return False
    per_process = images_per_batch // comm.get_world_size()
    sampler.start_at(start_iter * per_process)
    logger.info("Resuming at iteration %d: the training data stream continues after the %d "
                "images per process already used", start_iter, start_iter * per_process)
    return True
