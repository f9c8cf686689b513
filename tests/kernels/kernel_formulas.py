"""The four kernels' formulas in float64, their inputs, and short training runs of one layer
with their comparison: shared by the kernel tests (tests/kernels/) and the child Pythons they
start (which find this module through ``helpers.TEST_PATHS``)."""

from __future__ import annotations

import torch

from mabn_d2 import MABN2d, kernels

from helpers import relative_error

# (dtype, relative tolerance of the outputs stored in that dtype, of float32/64 statistics)
DTYPES = [
    (torch.float64, 1e-12, 1e-12),
    (torch.float32, 2e-6, 1e-5),
    (torch.bfloat16, 1e-2, 1e-5),
    (torch.float16, 2e-3, 1e-5),
]

def make_inputs(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    a = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    sdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return x, dy, a.to(sdtype), b.to(sdtype)


def expected(x, dy, a, b):
    """The four kernels' formulas in float64 on the (already rounded) inputs."""
    x64, dy64, a64, b64 = x.double(), dy.double(), a.double(), b.double()
    av, bv = a64.view(1, -1, 1, 1), b64.view(1, -1, 1, 1)
    dims = (0, 2, 3)
    return {
        "second_moment": (x64 * x64).mean(dims),
        "channel_affine": av * x64 + bv,
        "sum_dy": dy64.sum(dims),
        "sum_dy_x": (dy64 * x64).sum(dims),
        "grad_input": av * dy64 + bv * x64,
    }


def check_against_formulas(got, want, x, dy, out_tol, stat_tol):
    for key in ("channel_affine", "grad_input"):
        assert got[key].dtype == x.dtype and got[key].shape == x.shape, key
        assert torch.isfinite(got[key]).all(), key
        error = relative_error(got[key], want[key])
        assert error < out_tol, (key, error)
    assert got["second_moment"].dtype == (torch.float64 if x.dtype == torch.float64
                                          else torch.float32)
    assert relative_error(got["second_moment"], want["second_moment"]) < stat_tol
    assert relative_error(got["sum_dy"], want["sum_dy"]) < stat_tol * 10
    # sum(dy * x) cancels (mean 0): compare against the scale of its terms.
    scale = (dy.double() * x.double()).abs().sum((0, 2, 3))
    assert ((got["sum_dy_x"].double() - want["sum_dy_x"]).abs() / scale).max() < stat_tol


def train_steps(backend, dtype, steps=40, fused=True, shape=(3, 4, 6, 5), bad_steps=()):
    """Outputs, gradients and final state of ``steps`` training steps of one layer; at the steps
    in ``bad_steps`` one channel of the input (odd steps) or of dy (even steps) is inf."""
    torch.manual_seed(0)
    layer = MABN2d(shape[1], buffer_size=4, warmup_iters=10, renorm_start_iter=20)
    if dtype == torch.float64:
        layer = layer.double()  # float32 state for float32 / half inputs, as under autocast
    outputs = []
    with kernels.use_backend(backend), kernels.use_fused_step(fused):
        for step in range(steps):
            x = (torch.randn(shape) * 2 + 0.3).to(dtype).requires_grad_()
            dy = torch.randn(shape).to(dtype)
            if step in bad_steps:
                with torch.no_grad():
                    (x if step % 2 else dy)[:, 1] = float("inf")
            y = layer(x)
            y.backward(dy)
            outputs += [y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]
            layer.weight.grad = layer.bias.grad = None
    return outputs, layer.state_dict()


def assert_same_training(got, want, tol):
    (out_a, state_a), (out_b, state_b) = got, want
    for i, (u, v) in enumerate(zip(out_a, out_b)):
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert torch.equal(torch.isfinite(u), torch.isfinite(v)), i  # same inf / nan places
        ok = torch.isfinite(v)
        assert relative_error(u[ok], v[ok]) < tol, (i, relative_error(u[ok], v[ok]))
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=tol, atol=tol * 1e-2)


def assert_identical_training(got, want) -> None:
    (outputs_a, state_a), (outputs_b, state_b) = got, want
    assert len(outputs_a) == len(outputs_b)
    for u, v in zip(outputs_a, outputs_b):
        assert torch.equal(u, v)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
