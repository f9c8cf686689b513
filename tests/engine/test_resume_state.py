"""The pieces of an exact ``--resume``, without a training run: the data stream continues after
the images the interrupted run used, and the random generators continue where they were (the
whole run killed and resumed: tests/e2e/test_resume.py)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler

from mabn_d2.engine.resume import RNGStates, build_resumable_loader, continue_data_stream


def first_indices(loader, n: int) -> list[int]:
    stream = iter(loader.resumable_sampler)
    return [next(stream) for _ in range(n)]


def test_a_resumed_stream_continues_after_the_used_images():
    def build(sampler):  # a data loader's stand-in: the tested code only needs its sampler
        return SimpleNamespace(sampler=sampler)

    uninterrupted = build_resumable_loader(build, TrainingSampler(10, shuffle=True, seed=3))
    resumed = build_resumable_loader(build, TrainingSampler(10, shuffle=True, seed=3))
    assert continue_data_stream(resumed, start_iter=4, images_per_batch=3)
    assert first_indices(resumed, 9) == first_indices(uninterrupted, 21)[12:]
    fresh = build_resumable_loader(build, TrainingSampler(10, shuffle=True, seed=3))
    assert not continue_data_stream(fresh, start_iter=0, images_per_batch=3)


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_random_generators_continue_where_the_checkpoint_left_them():
    states = RNGStates()
    saved = states.state_dict()
    expected = draws()
    draws()  # the generators move on (the rest of the interrupted run)
    states.load_state_dict(saved)
    assert draws() == expected
