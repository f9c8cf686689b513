"""``--num-gpus 0`` (world size 0) runs the job in this process, as detectron2's ``launch``
does for a world size <= 1: it used to spawn no process at all and exit 0 having done
nothing. A negative count is a user error."""

from __future__ import annotations

import os

import pytest

from mabn_d2.cli import UserError
from mabn_d2.engine.launch import launch


@pytest.mark.parametrize("processes", [0, 1])
def test_zero_or_one_process_runs_the_job_here(processes):
    ran: list[int] = []
    launch(lambda marker: ran.append(marker), processes, backend="gloo", args=(os.getpid(),))
    assert ran == [os.getpid()]


def test_a_negative_process_count_is_refused():
    with pytest.raises(UserError, match="--num-gpus must be >= 0"):
        launch(lambda: None, -1, backend="gloo")
