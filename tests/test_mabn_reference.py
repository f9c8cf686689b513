"""MABN2d against an independent reference written straight from the specification.

The reference below shares no code with mabn_d2: it keeps its own state and evaluates the
formulas of the issue with plain tensor operations (elementwise ``g``, ``z``, explicit sums).
"""

from __future__ import annotations

import torch

from mabn_d2 import MABN2d


class ReferenceMABN:
    """The specification, verbatim, in float64."""

    def __init__(self, c, eps, momentum, m, warmup, renorm_start, clip):
        self.eps, self.momentum, self.m = eps, momentum, m
        self.warmup, self.renorm_start, self.clip = warmup, renorm_start, clip
        self.t = 0
        self.chi2_buf = torch.zeros(m, c, dtype=torch.float64)
        self.psi_buf = torch.zeros(m, c, dtype=torch.float64)
        self.running = torch.ones(c, dtype=torch.float64)

    def train_step(self, x, weight, bias, dy):
        x, weight, bias, dy = (v.double() for v in (x, weight, bias, dy))
        self.t += 1
        t, m = self.t, self.m
        c = x.shape[1]
        # forward
        chi2_b = (x * x).mean(dim=(0, 2, 3))
        self.chi2_buf[t % m] = chi2_b
        early = t <= m or t < self.warmup
        var = chi2_b if early else self.chi2_buf.mean(dim=0)
        v = var.view(1, c, 1, 1)
        z = x / torch.sqrt(v + self.eps)
        if t <= max(self.renorm_start, self.warmup):
            r = torch.ones(c, dtype=torch.float64)
        else:
            r = torch.sqrt(var + self.eps) / torch.sqrt(self.running + self.eps)
            r = torch.clamp(r, 1 / self.clip, self.clip)
        rv = r.view(1, c, 1, 1)
        w = weight.view(1, c, 1, 1)
        y = w * rv * z + bias.view(1, c, 1, 1)
        self.running = (1 - self.momentum) * self.running + self.momentum * var
        # backward
        g = dy * w * rv
        psi_b = (g * z).mean(dim=(0, 2, 3))
        self.psi_buf[t % m] = psi_b
        psi = psi_b if early else self.psi_buf.mean(dim=0)
        dx = (g - z * psi.view(1, c, 1, 1)) / torch.sqrt(v + self.eps)
        dweight = (dy * rv * z).sum(dim=(0, 2, 3))
        dbias = dy.sum(dim=(0, 2, 3))
        clipped = bool(((r == 1 / self.clip) | (r == self.clip)).any())
        return y, dx, dweight, dbias, clipped

    def eval(self, x, weight, bias):
        x = x.double()
        c = x.shape[1]
        return weight.double().view(1, c, 1, 1) * x / torch.sqrt(
            self.running.view(1, c, 1, 1) + self.eps
        ) + bias.double().view(1, c, 1, 1)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_against_reference(dtype, iterations=1200, tol=1e-6):
    torch.manual_seed(0)
    c = 3
    kwargs = dict(eps=1e-5, momentum=0.02, buffer_size=16, warmup_iters=100,
                  renorm_start_iter=1000, renorm_clip=5.0)
    layer = MABN2d(c, **kwargs).to(dtype).train()
    ref = ReferenceMABN(c, kwargs["eps"], kwargs["momentum"], kwargs["buffer_size"],
                        kwargs["warmup_iters"], kwargs["renorm_start_iter"],
                        kwargs["renorm_clip"])
    worst = {"y": 0.0, "dx": 0.0, "dweight": 0.0, "dbias": 0.0, "eval": 0.0}
    clipped_steps = 0
    phases = set()
    for it in range(1, iterations + 1):
        # Input scale drifts and jumps so the moving averages lag and the renorm clip binds.
        scale = 1.0 + 0.5 * torch.rand(()).item()
        if it > 1050 and it % 40 < 5:
            scale *= 30.0
        x = (torch.randn(2, c, 4, 5, dtype=torch.float64) * scale + 0.3).to(dtype)
        x.requires_grad_(True)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(c) + 0.5)
            layer.bias.copy_(torch.randn(c))
        dy = torch.randn(2, c, 4, 5, dtype=torch.float64).to(dtype)
        y = layer(x)
        y.backward(dy)
        ry, rdx, rdw, rdb, clipped = ref.train_step(
            x.detach(), layer.weight.detach(), layer.bias.detach(), dy
        )
        clipped_steps += clipped
        t = ref.t
        phases.add("batch" if (t <= 16 or t < 100) else "moving")
        if t > 1000:
            phases.add("renorm")
        for key, mine, theirs in (("y", y, ry), ("dx", x.grad, rdx),
                                  ("dweight", layer.weight.grad, rdw),
                                  ("dbias", layer.bias.grad, rdb)):
            worst[key] = max(worst[key], rel_err(mine, theirs))
        layer.weight.grad = None
        layer.bias.grad = None
        if it % 100 == 0:
            layer.eval()
            xe = torch.randn(2, c, 4, 5, dtype=torch.float64).to(dtype)
            with torch.no_grad():
                worst["eval"] = max(worst["eval"], rel_err(
                    layer(xe), ref.eval(xe, layer.weight.detach(), layer.bias.detach())))
            layer.train()
    assert phases == {"batch", "moving", "renorm"}
    assert clipped_steps > 0, "the renorm clip was never exercised"
    assert layer.iteration == iterations
    assert int(layer.num_batches_tracked) == iterations
    for key, err in worst.items():
        assert err < tol, f"{dtype} {key}: worst relative error {err:.3g} >= {tol}"
    return worst


def test_matches_reference_float64_over_1200_iterations():
    run_against_reference(torch.float64, tol=1e-6)


def test_matches_reference_float32_over_1200_iterations():
    # float32 activations against the float64 reference: float32 rounding only.
    run_against_reference(torch.float32, tol=2e-4)


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
