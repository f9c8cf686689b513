"""The layer under misuse: invalid numbers refused wherever they enter, NumPy and ``None``
arguments as ``BatchNorm2d`` takes them, float32 statistics under ``.half()`` /
``.to(bfloat16)``, double backward, repeated use within one training step, training-mode
calls without autograd."""

from __future__ import annotations

import logging
import math
import pickle

import numpy as np
import pytest
import torch
from detectron2.modeling import build_backbone

from mabn_d2 import MABN2d, MABNSettings, kernels

from helpers import small_backbone_cfg

BAD_FLOATS = [("eps", math.inf), ("eps", 0.0), ("eps", -1e-5), ("eps", math.nan),
              ("momentum", math.nan), ("renorm_clip", math.inf), ("renorm_clip", math.nan)]


@pytest.mark.parametrize("name, value", BAD_FLOATS)
def test_non_finite_or_out_of_range_floats_are_refused_by_the_layer_and_settings(name, value):
    with pytest.raises(ValueError, match=f"{name} must be"):
        MABN2d(4, **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be"):
        MABNSettings(**{name: value})


@pytest.mark.parametrize("key, value", [("EPS", math.inf), ("EPS", 0.0),
                                        ("RENORM_CLIP", math.nan)])
def test_non_finite_or_zero_config_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"MODEL.MABN.{key} must be"):
        build_backbone(small_backbone_cfg("MABN", **{key: value}))


def test_numpy_numbers_are_accepted_as_batchnorm_accepts_them():
    layer = MABN2d(np.int64(4), eps=np.float32(1e-3), buffer_size=np.int32(3),
                   warmup_iters=np.int64(2))
    assert layer.num_features == 4 and layer.buffer_size == 3 and layer.warmup_iters == 2
    assert type(layer.num_features) is int and type(layer.eps) is float
    assert layer.chi2_buffer.shape == (3, 4)
    assert torch.nn.BatchNorm2d(np.int64(4)).num_features == 4  # the convention followed


def test_momentum_none_is_the_cumulative_average_like_batchnorm():
    layer = MABN2d(3, momentum=None, buffer_size=8, warmup_iters=0).train()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=gen) * (i + 1) for i in range(5)]
    for x in batches:
        layer(x)
    # t <= buffer_size: each step normalizes with its own chi2_B, the running value is their
    # plain mean over all steps.
    expected = torch.stack([x.square().mean((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(layer.running_second_moment, expected)
    assert "momentum=None" in repr(layer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_keep_float32_statistics_that_update(dtype):
    layer = MABN2d(3, buffer_size=2, warmup_iters=0).to(dtype).train()
    assert layer.weight.dtype == dtype
    assert {b.dtype for n, b in layer.named_buffers() if n != "num_batches_tracked"} \
        == {torch.float32}
    before = layer.running_second_moment.clone()
    # Inputs around 300: their squares (~9e4) exceed float16's range (65504).
    x = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 300).to(dtype)
    x.requires_grad_()
    y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    chi2 = x.detach().float().square().mean((0, 2, 3))
    torch.testing.assert_close(layer.chi2_buffer[1], chi2, rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.running_second_moment, 0.98 * before + 0.02 * chi2)
    assert torch.isfinite(layer.psi_buffer[1]).all() and layer.psi_buffer[1].abs().sum() > 0
    layer.float()
    assert layer.running_second_moment.dtype == torch.float32
    layer.double()  # float64 activations: float64 statistics
    assert layer.running_second_moment.dtype == torch.float64

    # A whole model converted (Module.half() / .bfloat16()): the statistics stay float32.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), MABN2d(4))
    model = model.half() if dtype == torch.float16 else model.bfloat16()
    assert model[1].running_second_moment.dtype == torch.float32
    assert model[1].chi2_buffer.dtype == torch.float32

    # Low-precision input into a float32 layer, its square beyond float16's range.
    layer = MABN2d(2, buffer_size=2, warmup_iters=0).train()
    x = torch.full((2, 2, 4, 4), 300.0, dtype=dtype, requires_grad=True)  # 300^2 = 90000
    y = layer(x)
    y.sum().backward()
    assert y.dtype == dtype and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert layer.running_second_moment.dtype == torch.float32
    assert torch.allclose(layer.chi2_buffer[1], torch.full((2,), 90000.0))


@pytest.mark.parametrize("backend", ["auto", "plain"])  # C++ fused step, plain PyTorch ops
def test_double_backward_is_a_clear_error_and_first_order_is_unchanged(backend):
    def step(create_graph: bool):
        torch.manual_seed(0)
        layer = MABN2d(3, buffer_size=2, warmup_iters=0).train()
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        loss = layer(x).pow(3).sum()
        return x, layer, torch.autograd.grad(loss, (x, layer.weight), create_graph=create_graph)

    with kernels.use_backend(backend):
        _, _, plain = step(create_graph=False)
        x, layer, (gx, gw) = step(create_graph=True)
        for got, expected in zip((gx, gw), plain):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for wrt in (x, layer.weight):
            with pytest.raises(RuntimeError, match="MABN2d in training mode does not support "
                                                   "double backward"):
                torch.autograd.grad(gx.square().sum(), wrt, retain_graph=True)


def test_eval_mode_is_differentiable_twice():
    layer = MABN2d(3).eval()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    assert torch.isfinite(ggx).all() and ggx.abs().sum() > 0


def test_a_layer_used_several_times_per_step_warns_once(caplog):
    layer = MABN2d(3, buffer_size=2)
    layer.name = "head.cls_subnet.0.norm"
    layer.train()
    x = torch.randn(2, 3, 4, 4)
    with caplog.at_level(logging.WARNING, logger="mabn_d2"):
        for _ in range(2):  # forward, backward: one call per step
            layer(x).sum().backward()
        dropped = layer(x)  # a graph freed without backward is no pending call
        del dropped
        layer(x).sum().backward()
        assert "ran again" not in caplog.text
        with pytest.warns(RuntimeWarning, match="ran again before the backward"):
            outputs = [layer(x) for _ in range(3)]  # a shared head: 3 calls, then backward
        sum(y.sum() for y in outputs).backward()
        [layer(x) for _ in range(2)]
    assert caplog.text.count("ran again before the backward") == 1
    assert "'head.cls_subnet.0.norm'" in caplog.text and "count calls" in caplog.text
    assert layer.iteration == 4 + 3 + 2  # the schedule counts calls, as documented
    pickle.loads(pickle.dumps(layer))  # a pending call does not make it unpicklable


def test_training_call_without_autograd_is_a_step_without_psi():
    layer = MABN2d(3, buffer_size=4, warmup_iters=0).train()
    x = torch.randn(2, 3, 4, 4)
    for _ in range(4):
        layer(x.requires_grad_()).sum().backward()
    psi = layer.psi_buffer.clone()
    with torch.no_grad():
        layer(x * 2)
    assert layer.iteration == 5
    slot = 5 % 4
    torch.testing.assert_close(layer.chi2_buffer[slot], (x * 2).square().mean((0, 2, 3)))
    torch.testing.assert_close(layer.psi_buffer, psi, rtol=0, atol=0)  # slot 1: step 1's psi
