"""The independent float64 reference of MABN's training step, the scenarios that drive every
path through every branch of the schedule, and the runner that compares a path with the
reference at every step (the tests: tests/layer/test_mabn_reference.py).

:class:`ReferenceMABN` shares no code with mabn_d2: it keeps its own state in float64 and
evaluates the specification's formulas with plain tensor operations (elementwise ``g``, ``z``,
explicit means). Together the scenarios take every branch of the step schedule
(:data:`ALL_BRANCHES`); each scenario states which it takes, and :func:`run_path` asserts it
did.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from mabn_d2 import MABN2d, kernels
from mabn_d2.layer import MABNStep, mabn_eval, mabn_train

from helpers import relative_error

CHANNELS = 3
# Worst relative error allowed per compared quantity: float64 paths agree with the float64
# reference to rounding; float32 paths differ by float32 rounding. Each float32 bound is ~10x
# the worst error measured over all paths and scenarios (docs/testing.md has the numbers).
_QUANTITIES = ("y", "dx", "dweight", "dbias", "running_second_moment", "chi2_buffer",
               "psi_buffer", "eval")
TOLERANCE = {
    torch.float64: dict.fromkeys(_QUANTITIES, 1e-12),
    torch.float32: {"y": 2e-5, "dx": 2e-6, "dweight": 8e-6, "dbias": 6e-6,
                    "running_second_moment": 3e-6, "chi2_buffer": 2e-6, "psi_buffer": 8e-6,
                    "eval": 2e-6},
}
EVAL_EVERY = 4

# ---------------------------------------------------------------- the reference


def reference_schedule(settings: dict, t: int) -> tuple[bool, bool]:
    """``(batch statistics, renorm)`` at step ``t`` (1 at the first), from the specification:
    batch statistics while ``t <= m`` or ``t < warmup``; renorm once ``t > max(renorm start,
    warmup)``."""
    m, warmup = settings["buffer_size"], settings["warmup_iters"]
    return t <= m or t < warmup, t > max(settings["renorm_start_iter"], warmup)


class ReferenceMABN:
    """The specification, verbatim, in float64, with its own state."""

    def __init__(self, c: int, settings: dict, start: int = 0) -> None:
        self.settings = settings
        self.eps = settings["eps"]
        self.momentum = settings["momentum"]
        self.m = settings["buffer_size"]
        self.clip = settings["renorm_clip"]
        self.backward_moving_average = settings.get("backward_moving_average", True)
        self.t = start
        self.chi2_buffer = torch.zeros(self.m, c, dtype=torch.float64)
        self.psi_buffer = torch.zeros(self.m, c, dtype=torch.float64)
        self.running = torch.ones(c, dtype=torch.float64)
        self.branches: set[str] = set()

    def train_step(self, x, weight, bias, dy):
        x, weight, bias, dy = (v.double() for v in (x, weight, bias, dy))
        self.t += 1
        t, m, eps, c = self.t, self.m, self.eps, x.shape[1]
        early, renorm = reference_schedule(self.settings, t)
        slot = t % m
        # forward
        chi2_batch = (x * x).mean(dim=(0, 2, 3))
        finite = bool(torch.isfinite(chi2_batch).all())
        if finite:  # a non-finite step keeps every statistic as it was
            self.chi2_buffer[slot] = chi2_batch
        var = chi2_batch if early else self.chi2_buffer.mean(dim=0)
        v = var.view(1, c, 1, 1)
        z = x / torch.sqrt(v + eps)
        raw_r = torch.sqrt(var + eps) / torch.sqrt(self.running + eps)
        r = torch.clamp(raw_r, 1 / self.clip, self.clip) if renorm else torch.ones(c).double()
        w, rv = weight.view(1, c, 1, 1), r.view(1, c, 1, 1)
        y = w * rv * z + bias.view(1, c, 1, 1)
        momentum = self.momentum if self.momentum is not None else 1.0 / t
        if finite:
            self.running = (1 - momentum) * self.running + momentum * var
        # backward
        g = dy * w * rv
        psi_batch = (g * z).mean(dim=(0, 2, 3))
        if finite and bool(torch.isfinite(psi_batch).all()):
            self.psi_buffer[slot] = psi_batch
        batch_psi = early or not self.backward_moving_average
        psi = psi_batch if batch_psi else self.psi_buffer.mean(dim=0)
        dx = (g - z * psi.view(1, c, 1, 1)) / torch.sqrt(v + eps)
        dweight = (dy * rv * z).sum(dim=(0, 2, 3))
        dbias = dy.sum(dim=(0, 2, 3))
        self._record(t, early, renorm, raw_r if finite else None, finite,
                     bool(torch.isfinite(dy).all()), batch_psi)
        return y, dx, dweight, dbias

    def eval(self, x, weight, bias):
        x, c = x.double(), x.shape[1]
        return weight.double().view(1, c, 1, 1) * x / torch.sqrt(
            self.running.view(1, c, 1, 1) + self.eps
        ) + bias.double().view(1, c, 1, 1)

    def _record(self, t, early, renorm, raw_r, finite_x, finite_dy, batch_psi) -> None:
        m, warmup = self.m, self.settings["warmup_iters"]
        start = self.settings["renorm_start_iter"]
        phase = "batch statistics" if early else "moving averages"
        found = self.branches
        if early and t <= m and t >= warmup:
            found.add("batch statistics because t <= buffer_size")
        if early and t > m:
            found.add("batch statistics because t < warmup_iters")
        if t == m and t >= warmup:
            found.add("t == buffer_size >= warmup_iters: still batch statistics")
        if t == warmup > m:
            found.add("t == warmup_iters > buffer_size: first moving-average step")
        if not early:
            found.add("moving averages")
        if not early and t > 2 * m:
            found.add("moving averages after the buffer wrapped around")
        if start < t <= warmup:
            found.add("renorm held off by warmup_iters > renorm_start_iter")
        if renorm and t == max(start, warmup) + 1:
            found.add("first renorm step")
        if renorm and raw_r is not None and self.clip > 1:
            if bool((raw_r > self.clip).any()):
                found.add("renorm clip binds at clip")
            if bool((raw_r < 1 / self.clip).any()):
                found.add("renorm clip binds at 1/clip")
        if renorm and self.clip == 1:
            found.add("renorm_clip == 1: r == 1")
        if not finite_x:
            found.add(f"non-finite input during {phase}")
        if not finite_dy:
            found.add(f"non-finite gradient during {phase}")
        if self.momentum is None:
            found.add("momentum=None: cumulative average")
        if batch_psi and not early:
            found.add("backward_moving_average=False: batch psi after warm-up")


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """A layer's settings and a sequence of training steps chosen to take certain branches.

    Inputs are ``N(0, s^2) + 0.3`` with ``s`` drawn from ``[0.8, 1.5]``, times 30 at
    ``outliers`` and times 0.02 at ``quiet`` steps (so the renorm clip binds at both ends);
    one element of channel 1 of ``x`` (``bad_input``) or ``dy`` (``bad_grad``) is inf or NaN.
    Every ``chunked_every``-th step (0: none) has a batch of 12 instead of 2 (the C++ fused
    step's other loop order, for many small planes). The layer starts at step ``start`` (set through
    its ``iteration``, as calibration does) with fresh statistics, and takes ``steps`` steps.
    """

    name: str
    settings: dict
    steps: int
    covers: frozenset[str]
    outliers: tuple[int, ...] = ()
    quiet: tuple[int, ...] = ()
    bad_input: tuple[int, ...] = ()
    bad_grad: tuple[int, ...] = ()
    chunked_every: int = 3
    seed: int = 0
    start: int = 0


def _settings(**changes) -> dict:
    settings = dict(eps=1e-5, momentum=0.02, buffer_size=16, warmup_iters=100,
                    renorm_start_iter=1000, renorm_clip=5.0, backward_moving_average=True)
    settings.update(changes)
    return settings


SCENARIOS = (
    Scenario(
        "warmup shorter than the buffer",
        _settings(momentum=0.1, buffer_size=6, warmup_iters=3, renorm_start_iter=10,
                  renorm_clip=2.0),
        steps=36, outliers=(14, 15), quiet=tuple(range(24, 32)), bad_input=(4, 20),
        bad_grad=(5, 22),
        covers=frozenset({
            "batch statistics because t <= buffer_size",
            "t == buffer_size >= warmup_iters: still batch statistics",
            "moving averages", "moving averages after the buffer wrapped around",
            "first renorm step", "renorm clip binds at clip", "renorm clip binds at 1/clip",
            "non-finite input during batch statistics", "non-finite input during moving averages",
            "non-finite gradient during batch statistics",
            "non-finite gradient during moving averages",
        }),
    ),
    Scenario(
        "warmup longer than the buffer, cumulative momentum, batch psi",
        _settings(eps=1e-3, momentum=None, buffer_size=3, warmup_iters=8, renorm_start_iter=5,
                  renorm_clip=1.5, backward_moving_average=False),
        steps=24, outliers=(12,), quiet=tuple(range(16, 21)), bad_input=(15,), bad_grad=(7,),
        seed=1,
        covers=frozenset({
            "batch statistics because t < warmup_iters",
            "t == warmup_iters > buffer_size: first moving-average step",
            "renorm held off by warmup_iters > renorm_start_iter", "first renorm step",
            "renorm clip binds at clip", "renorm clip binds at 1/clip",
            "momentum=None: cumulative average",
            "backward_moving_average=False: batch psi after warm-up",
            "moving averages after the buffer wrapped around",
        }),
    ),
    Scenario(
        "the valid edge values",
        _settings(momentum=1.0, buffer_size=1, warmup_iters=0, renorm_start_iter=0,
                  renorm_clip=1.0),
        steps=8, outliers=(3,), bad_input=(5,), bad_grad=(6,), seed=2,
        covers=frozenset({"renorm_clip == 1: r == 1", "first renorm step",
                          "moving averages after the buffer wrapped around"}),
    ),
    Scenario(
        "the paper's defaults",
        _settings(),
        start=985, steps=55, outliers=(1005,), quiet=tuple(range(1012, 1041)),
        bad_input=(990, 1030), bad_grad=(1031,), seed=3,
        covers=frozenset({
            "first renorm step", "renorm clip binds at clip", "renorm clip binds at 1/clip",
            "non-finite input during moving averages",
        }),
    ),
)
ALL_BRANCHES = frozenset({
    "batch statistics because t <= buffer_size",
    "batch statistics because t < warmup_iters",
    "t == buffer_size >= warmup_iters: still batch statistics",
    "t == warmup_iters > buffer_size: first moving-average step",
    "moving averages",
    "moving averages after the buffer wrapped around",
    "renorm held off by warmup_iters > renorm_start_iter",
    "first renorm step",
    "renorm clip binds at clip",
    "renorm clip binds at 1/clip",
    "renorm_clip == 1: r == 1",
    "non-finite input during batch statistics",
    "non-finite input during moving averages",
    "non-finite gradient during batch statistics",
    "non-finite gradient during moving averages",
    "momentum=None: cumulative average",
    "backward_moving_average=False: batch psi after warm-up",
})


@dataclass
class Step:
    x: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    bad_channel: int | None  # channel whose input or gradient is not finite
    eval_x: torch.Tensor | None


def make_steps(scenario: Scenario, dtype: torch.dtype) -> list[Step]:
    gen = torch.Generator().manual_seed(scenario.seed)
    steps = []
    for t in range(scenario.start + 1, scenario.start + scenario.steps + 1):
        n = 12 if scenario.chunked_every and t % scenario.chunked_every == 0 else 2
        scale = 0.8 + 0.7 * torch.rand((), generator=gen, dtype=torch.float64).item()
        scale *= 30.0 if t in scenario.outliers else 0.02 if t in scenario.quiet else 1.0
        shape = (n, CHANNELS, 4, 5)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + 0.3
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        bad = float("nan") if t % 2 else float("inf")
        if t in scenario.bad_input:
            x[0, 1, 1, 2] = bad
        if t in scenario.bad_grad:
            dy[1, 1, 2, 3] = bad
        weight = torch.rand(CHANNELS, generator=gen, dtype=torch.float64) + 0.5
        bias = torch.randn(CHANNELS, generator=gen, dtype=torch.float64)
        eval_x = None
        if t % EVAL_EVERY == 0 or t == scenario.start + scenario.steps:
            eval_x = torch.randn(2, CHANNELS, 4, 5, generator=gen, dtype=torch.float64) * 2
        bad_channel = 1 if t in scenario.bad_input or t in scenario.bad_grad else None
        steps.append(Step(*(v.to(dtype) for v in (x, dy, weight, bias)), bad_channel,
                          None if eval_x is None else eval_x.to(dtype)))
    return steps


# ---------------------------------------------------------------- the paths


class FunctionalSyncLayer:
    """What ``MABN2d(sync=True)`` runs in a multi-process group: the functional core with a
    ``process_group``, on state of its own; the step schedule comes from the reference."""

    def __init__(self, c: int, settings: dict, dtype: torch.dtype, group: object) -> None:
        self.settings, self.group, self.t = settings, group, 0
        self.weight = torch.nn.Parameter(torch.ones(c, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(c, dtype=dtype))
        self.running_second_moment = torch.ones(c, dtype=dtype)
        self.chi2_buffer = torch.zeros(settings["buffer_size"], c, dtype=dtype)
        self.psi_buffer = torch.zeros(settings["buffer_size"], c, dtype=dtype)
        self.training = True

    def train(self, mode: bool = True) -> FunctionalSyncLayer:
        self.training = mode
        return self

    def eval(self) -> FunctionalSyncLayer:
        return self.train(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if not self.training:
            return mabn_eval(x, self.weight, self.bias, self.running_second_moment, s["eps"])
        self.t += 1
        early, renorm = reference_schedule(s, self.t)
        step = MABNStep(
            slot=self.t % s["buffer_size"], use_batch_stats=early,
            backward_batch_stats=early or not s["backward_moving_average"], renorm=renorm,
            renorm_clip=s["renorm_clip"], eps=s["eps"],
            momentum=s["momentum"] if s["momentum"] is not None else 1.0 / self.t,
        )
        y, _ = mabn_train(x, self.weight, self.bias, self.running_second_moment,
                          self.chi2_buffer, self.psi_buffer, step, process_group=self.group)
        return y


@contextlib.contextmanager
def one_process_group(tmp_dir: str) -> Iterator[object]:
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this test process")
    store = dist.FileStore(os.path.join(tmp_dir, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def path_context(path: str) -> contextlib.AbstractContextManager:
    if path == "fused":
        return kernels.use_backend("cpp")
    if path == "separate":
        stack = contextlib.ExitStack()
        stack.enter_context(kernels.use_backend("cpp"))
        stack.enter_context(kernels.use_fused_step(False))
        return stack
    if path == "plain":
        return kernels.use_backend("plain")
    return contextlib.nullcontext()  # sync: the default kernels; triton: routed by the caller


# ---------------------------------------------------------------- comparison


def keep_channels(t: torch.Tensor, bad_channel: int | None, dim: int) -> torch.Tensor:
    # A non-finite step's output in the affected channel is unspecified (NaN or inf).
    if bad_channel is None:
        return t
    keep = [c for c in range(t.shape[dim]) if c != bad_channel]
    return t.index_select(dim, torch.tensor(keep))


def run_path(path: str, scenario: Scenario, dtype: torch.dtype, group: object = None) -> dict:
    """Trains one layer on ``path`` through ``scenario`` beside the reference; returns the worst
    error of each compared quantity (and fails on the first one above the tolerance)."""
    if path == "sync":
        layer = FunctionalSyncLayer(CHANNELS, scenario.settings, dtype, group)
        layer.t = scenario.start
    else:
        layer = MABN2d(CHANNELS, **scenario.settings).to(dtype)
        layer.iteration = scenario.start
    ref = ReferenceMABN(CHANNELS, scenario.settings, scenario.start)
    worst: dict[str, float] = {}

    def check(key: str, got: torch.Tensor, want: torch.Tensor, t: int, dim=None) -> None:
        err, tol = relative_error(got, want, dim), TOLERANCE[dtype][key]
        worst[key] = max(worst.get(key, 0.0), err)
        assert err < tol, (f"{path} path, {dtype}, scenario '{scenario.name}', step {t}: "
                           f"{key} relative error {err:.3g} >= {tol}")

    with path_context(path):
        for t, step in enumerate(make_steps(scenario, dtype), start=scenario.start + 1):
            if t == scenario.start + 1 and path != "sync":
                state = (layer.weight, layer.bias, layer.running_second_moment,
                         layer.chi2_buffer, layer.psi_buffer)
                assert kernels.fused_step_applies(step.x, *state) == (path == "fused"), path
            with torch.no_grad():
                layer.weight.copy_(step.weight)
                layer.bias.copy_(step.bias)
            layer.weight.grad = layer.bias.grad = None
            x = step.x.clone().requires_grad_(True)
            y = layer(x)
            y.backward(step.dy)
            want = ref.train_step(step.x, step.weight, step.bias, step.dy)
            got = (y.detach(), x.grad, layer.weight.grad, layer.bias.grad)
            for key, mine, theirs in zip(("y", "dx", "dweight", "dbias"), got, want):
                assert mine.dtype == dtype and mine.shape == theirs.shape, key
                dim = 1 if mine.dim() == 4 else 0
                mine = keep_channels(mine, step.bad_channel, dim)
                theirs = keep_channels(theirs, step.bad_channel, dim)
                assert torch.isfinite(mine).all(), (path, scenario.name, t, key)
                check(key, mine, theirs, t, 1 if dim == 1 else None)
            check("running_second_moment", layer.running_second_moment, ref.running, t)
            check("chi2_buffer", layer.chi2_buffer, ref.chi2_buffer, t, 0)
            check("psi_buffer", layer.psi_buffer, ref.psi_buffer, t, 0)
            if step.eval_x is not None:
                layer.eval()
                with torch.no_grad():
                    check("eval", layer(step.eval_x), ref.eval(step.eval_x, step.weight,
                                                               step.bias), t, 1)
                layer.train()
    if path != "sync":
        end = scenario.start + scenario.steps
        assert layer.iteration == end == int(layer.num_batches_tracked)
    missing = scenario.covers - ref.branches
    assert not missing, f"scenario '{scenario.name}' did not take {sorted(missing)}"
    return worst


# The interpreter takes milliseconds per reduction program: the Triton path runs the first
# scenario (every phase, the clip at both ends, non-finite steps) with batches of 2 only.
TRITON_SCENARIO = replace(SCENARIOS[0], chunked_every=0)
