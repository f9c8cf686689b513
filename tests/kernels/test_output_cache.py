"""The C++ kernels' cache of large outputs (``cpp.set_output_cache_limit``)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mabn_d2 import MABN2d
from mabn_d2.kernels import cpp

from helpers import run_python

MIB = 1 << 20
SHAPE = (2, 16, 256, 256)  # 8 MiB of float32: above the cache's 4 MiB threshold


@pytest.fixture
def cache():
    if not cpp.available():
        pytest.skip("the C++ kernels did not build (test_cpp_kernels_build_here says why)")
    limit = cpp.output_cache_stats()["limit"]
    cpp.empty_output_cache()
    yield cpp
    cpp.set_output_cache_limit(None if limit < 0 else limit >> 20)


def affine(x: torch.Tensor) -> torch.Tensor:
    # The op itself (no kernels.use_backend: its process-wide switch is not for threads).
    c = x.shape[1]
    return torch.ops.mabn_d2.channel_affine(x, torch.full((c,), 2.0), torch.full((c,), -1.0))


def training_step(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    module = MABN2d(x.shape[1])
    x = x.clone().requires_grad_()
    outputs = []
    for _ in range(3):
        y = module(x)
        y.backward(dy)
        outputs += [y.detach().clone(), x.grad.clone(), module.weight.grad.clone()]
        x.grad = None
        module.zero_grad()
    return tuple(outputs)


def test_freed_outputs_are_reused_and_results_do_not_change(cache):
    x = torch.randn(SHAPE)
    dy = torch.randn(SHAPE)
    cache.set_output_cache_limit(0)
    uncached = training_step(x, dy)
    assert cache.output_cache_stats()["cached"] == 0

    cache.set_output_cache_limit(64)
    before = cache.output_cache_stats()
    cached = training_step(x, dy)
    after = cache.output_cache_stats()
    for a, b in zip(uncached, cached):
        assert torch.equal(a, b)
    # Three steps, each a forward output and an input gradient: the later ones reuse blocks.
    assert after["hits"] - before["hits"] >= 3
    assert after["misses"] - before["misses"] <= 3

    first = affine(x)
    address = first.data_ptr()
    expected = first.clone()
    del first
    second = affine(x)
    assert second.data_ptr() == address  # the block just freed
    assert torch.equal(second, expected)  # fully rewritten, nothing left over


def test_small_outputs_and_a_zero_limit_bypass_the_cache(cache):
    cache.set_output_cache_limit(64)
    before = cache.output_cache_stats()
    affine(torch.randn(2, 16, 32, 32))  # 128 KiB
    assert cache.output_cache_stats()["misses"] == before["misses"]
    cache.set_output_cache_limit(0)
    affine(torch.randn(SHAPE))
    stats = cache.output_cache_stats()
    assert stats["misses"] == before["misses"] and stats["cached"] == 0


def test_limit_evicts_the_least_recently_freed(cache):
    cache.set_output_cache_limit(20)  # room for two 8 MiB blocks
    x = torch.randn(SHAPE)
    in_use = cache.output_cache_stats()["in_use"]
    first, second, third = affine(x), affine(x), affine(x)
    assert cache.output_cache_stats()["in_use"] - in_use == 3 * x.nbytes
    kept = {second.data_ptr(), third.data_ptr()}
    del first, second, third  # freed in this order: the first block goes when the third comes
    stats = cache.output_cache_stats()
    assert stats["in_use"] == in_use and stats["cached"] == 16 * MIB
    a, b = affine(x), affine(x)
    assert {a.data_ptr(), b.data_ptr()} == kept
    del a, b
    cache.set_output_cache_limit(4)  # lowering the limit evicts at once
    assert cache.output_cache_stats()["cached"] == 0
    cache.set_output_cache_limit(64)
    y = affine(x)
    del y
    assert cache.output_cache_stats()["cached"] == 8 * MIB
    cache.empty_output_cache()
    assert cache.output_cache_stats()["cached"] == 0


def test_profiler_sees_cached_allocations(cache):
    # Peak-memory numbers (studies/benchmark.py) come from the profiler's allocation events.
    def peak(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        live = top = 0
        events = sorted((e for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]"), key=lambda e: e.start_ns())
        for event in events:
            live += event.nbytes()
            top = max(top, live)
        return top

    x = torch.randn(SHAPE)

    def two_outputs() -> None:
        a = affine(x)
        b = affine(x)
        del a, b

    peaks = {}
    for limit in (0, 64, 64):  # fresh blocks, then cached ones
        cache.set_output_cache_limit(limit)
        peaks[limit] = peak(two_outputs)
    assert peaks[0] == peaks[64] >= 2 * x.nbytes


def test_concurrent_outputs_from_threads(cache):
    cache.set_output_cache_limit(24)  # smaller than what the threads hold at once: evictions
    x = torch.randn(SHAPE)
    expected = affine(x)
    errors: list[str] = []

    def work() -> None:
        for _ in range(20):
            y = affine(x)
            if not torch.equal(y, expected):
                errors.append("wrong output")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.output_cache_stats()["cached"] <= 24 * MIB


@pytest.mark.e2e  # a child Python
def test_default_limit_follows_what_the_outputs_held_at_once():
    # A fresh process: the peak of blocks in use starts at 0. Freed blocks are kept only up to
    # that peak, the least recently freed going first.
    if not cpp.available():
        pytest.skip("the C++ kernels did not build (test_cpp_kernels_build_here says why)")
    result = run_python("""
import torch
from mabn_d2.kernels import cpp
assert cpp.output_cache_stats()["limit"] == -1  # the default: what the model needs
def affine(x):
    c = x.shape[1]
    return torch.ops.mabn_d2.channel_affine(x, torch.ones(c), torch.zeros(c))
small, large = torch.randn(2, 16, 256, 256), torch.randn(2, 32, 256, 256)  # 8 and 16 MiB
y = affine(small)
del y
assert cpp.output_cache_stats()["cached"] == 8 << 20  # within the peak so far (8 MiB)
y = affine(large)  # no cached block fits: a new one; peak 16 MiB
del y
stats = cpp.output_cache_stats()
assert stats["peak_in_use"] == 16 << 20 and stats["cached"] == 16 << 20, stats  # 8 MiB evicted
y = affine(large)
assert cpp.output_cache_stats()["hits"] == 1
print("ok")
""")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout + result.stderr)


@pytest.mark.parametrize("bad", [-1, 1.5, "64", True])
def test_bad_limits_are_refused(cache, bad):
    before = cache.output_cache_stats()["limit"]
    with pytest.raises(ValueError, match="output cache limit"):
        cache.set_output_cache_limit(bad)
    assert cache.output_cache_stats()["limit"] == before


def test_environment_variable_is_checked(monkeypatch):
    monkeypatch.setenv(cpp.CACHE_ENV, "256")
    assert cpp._env_cache_megabytes() == 256
    for bad in ("-5", "lots", "1.5"):
        monkeypatch.setenv(cpp.CACHE_ENV, bad)
        with pytest.raises(ValueError, match=cpp.CACHE_ENV):
            cpp._env_cache_megabytes()
    monkeypatch.delenv(cpp.CACHE_ENV)
    assert cpp._env_cache_megabytes() is None
