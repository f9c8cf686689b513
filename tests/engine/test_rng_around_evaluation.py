"""An evaluation inside training leaves the training RNG streams untouched
(mabn_d2.engine.resume.rng_states_kept, wrapped around detectron2's EvalHook)."""

from __future__ import annotations

import random

import numpy as np
import torch

# ---- evaluation and the training RNG ---------------------------------------------------------

def test_evaluation_leaves_the_training_rng_streams_untouched():
    from mabn_d2.engine.resume import rng_states_kept

    def evaluation():
        random.random(), np.random.rand(), torch.rand(3)

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    rng_states_kept(evaluation)()
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
