"""MABN training steps against an independent reference, on every path, through every branch.

:class:`ReferenceMABN` shares no code with mabn_d2: it keeps its own state in float64 and
evaluates the specification's formulas with plain tensor operations (elementwise ``g``, ``z``,
explicit means). Each path that can compute a training step is driven through the same
:data:`SCENARIOS` and compared with it at every step (``y``, ``dx``, ``dweight``, ``dbias``
and the three statistics) and, every few steps, in eval mode:

* ``fused``: the C++ fused step (CPU, per-process statistics: the default on the CPU);
* ``separate``: the functional core's Python path on the four C++ kernels;
* ``plain``: the Python path on PyTorch ops (non-contiguous inputs; CUDA without Triton);
* ``sync``: the Python path with a process group, i.e. what ``MABN2d(sync=True)`` runs, here
  with a one-process gloo group (its all-reduces are identities, so the result must equal the
  per-process one; the cross-process sums are tested in tests/layer/test_distributed.py);
* ``triton``: the Python path on the Triton kernels, under Triton's CPU interpreter.

Together the scenarios take every branch of the step schedule (:data:`ALL_BRANCHES`); each
scenario states which it takes, and the run asserts it did.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mabn_d2 import MABN2d
from mabn_d2.kernels import cpp
from mabn_d2.layer import functional

from helpers import REPO, subprocess_env, triton_interpreter_problem
from mabn_reference import (
    ALL_BRANCHES,
    CHANNELS,
    SCENARIOS,
    TOLERANCE,
    ReferenceMABN,
    make_steps,
    one_process_group,
    run_path,
)


def needs_cpp(path: str) -> None:
    if path in ("fused", "separate") and not cpp.available():
        pytest.skip("the C++ kernels did not build (test_cpp_kernels_build_here says why)")


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    with one_process_group(str(tmp_path_factory.mktemp("gloo"))) as group:
        yield group


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", ["fused", "separate", "plain", "sync"])
def test_path_matches_reference_through_every_branch(path, dtype, request):
    needs_cpp(path)
    group = request.getfixturevalue("process_group") if path == "sync" else None
    for scenario in SCENARIOS:
        run_path(path, scenario, dtype, group)


def test_sync_path_with_a_second_rank_of_the_same_data_matches_reference(monkeypatch):
    """The synchronised step's arithmetic across processes, in one process: an all-reduce
    stand-in that doubles every sum is a second rank with the same batch, which must leave
    the statistics as they are (global sums over the global count). Two real processes:
    tests/layer/test_distributed.py."""
    monkeypatch.setattr(functional, "_all_reduce_sum", lambda t, group: t * 2)
    run_path("sync", SCENARIOS[0], torch.float64, group="a stand-in process group")


def test_scenarios_take_every_branch_of_the_schedule():
    found: set[str] = set()
    for scenario in SCENARIOS:
        ref = ReferenceMABN(CHANNELS, scenario.settings, scenario.start)
        for step in make_steps(scenario, torch.float64):
            ref.train_step(step.x, step.weight, step.bias, step.dy)
        assert scenario.covers <= ref.branches, scenario.name
        found |= ref.branches
    assert found == ALL_BRANCHES


TRITON_SCRIPT = """
import json, torch
from mabn_d2 import kernels
from mabn_d2.kernels import triton as triton_kernels
# The dispatch sends only CUDA tensors to Triton; under the interpreter its kernels run on
# CPU tensors, so this process routes every kernel call there.
kernels._select = lambda *tensors: ("triton", triton_kernels)
from mabn_reference import TRITON_SCENARIO, run_path
worst = {str(dtype): run_path("triton", TRITON_SCENARIO, dtype)
         for dtype in (torch.float64, torch.float32)}
print(json.dumps(worst))
"""
def test_triton_path_matches_reference_under_the_interpreter():
    pytest.importorskip("triton")
    if problem := triton_interpreter_problem():
        pytest.skip(problem)
    env = subprocess_env(REPO, REPO / "tests", REPO / "tests" / "layer", TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    worst = json.loads(result.stdout.strip().splitlines()[-1])
    for dtype in ("torch.float64", "torch.float32"):  # every quantity compared, in both
        assert set(worst[dtype]) == set(TOLERANCE[torch.float64]), worst


def test_eval_is_per_channel_affine():
    layer = MABN2d(4).eval()
    with torch.no_grad():
        layer.running_second_moment.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
        layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    x = torch.randn(3, 4, 5, 5)
    scale = layer.weight / torch.sqrt(layer.running_second_moment + layer.eps)
    expected = x * scale.view(1, 4, 1, 1) + layer.bias.view(1, 4, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    assert layer.iteration == 0  # eval never advances the schedule
