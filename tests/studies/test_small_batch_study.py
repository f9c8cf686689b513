"""studies/small_batch_study.py: its norm layers against hand-computed formulas, and a short
end-to-end run of its code path (seconds)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mabn_d2 import MABN2d

from helpers import import_script

study = import_script("studies/small_batch_study.py")


DIMS = (0, 2, 3)


def channel(v):
    return v.view(1, -1, 1, 1)


def test_batch_renorm_is_batch_norm_before_relaxing_and_the_formula_after():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    dy = torch.randn_like(x)
    brn = study.BatchRenorm2d(3, warmup_iters=1, relax_iters=1, r_max=1.5, d_max=0.5)
    bn = nn.BatchNorm2d(3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    brn(xa).backward(dy)
    bn(xb).backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad)
    assert brn.clip_limits() == (1.5, 0.5)  # second call: fully relaxed

    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.0, 1.0, 5.0]))
        brn.running_std.copy_(torch.tensor([1.0, 0.5, 2.0]))
        brn.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
    running_mean, running_std = brn.running_mean.clone(), brn.running_std.clone()
    y = brn(x)
    mu, std = x.mean(DIMS), torch.sqrt(x.var(DIMS, unbiased=False) + brn.eps)
    r = (std / running_std).clamp(1 / 1.5, 1.5)
    d = ((mu - running_mean) / running_std).clamp(-0.5, 0.5)
    x_hat = (x - channel(mu)) / channel(std) * channel(r) + channel(d)
    expected = channel(brn.weight.detach()) * x_hat + channel(brn.bias.detach())
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(brn.running_mean, running_mean + 0.01 * (mu - running_mean))
    brn.eval()
    torch.testing.assert_close(
        brn(x), channel(brn.weight.detach()) * (x - channel(brn.running_mean))
        / channel(brn.running_std) + channel(brn.bias.detach()), atol=1e-5, rtol=1e-5)


def test_mabn_without_backward_moving_average_uses_this_batch_psi():
    """The study's ablation: ``MABN2d(backward_moving_average=False)``."""
    torch.manual_seed(1)
    kwargs = dict(buffer_size=2, warmup_iters=0, renorm_start_iter=100)
    ablation = MABN2d(3, backward_moving_average=False, **kwargs)
    full = MABN2d(3, **kwargs)
    for _ in range(4):  # steps 3 and 4 normalize with the moving average (t > m)
        x = torch.randn(2, 3, 3, 3) + 0.3
        dy = torch.randn_like(x)
        xa, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yf = ablation(xa), full(xf)
        torch.testing.assert_close(ya, yf)  # same forward
        ya.backward(dy)
        yf.backward(dy)
    var = full.chi2_buffer.mean(0)
    z = x / torch.sqrt(channel(var) + full.eps)
    g = dy * channel(full.weight.detach())
    psi_batch = (g * z).mean(DIMS)
    expected = (g - z * channel(psi_batch)) / torch.sqrt(channel(var) + full.eps)
    torch.testing.assert_close(xa.grad, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(xf.grad, expected, atol=1e-4)  # MABN proper averages psi
    # The same Psi_B of every step is recorded either way.
    torch.testing.assert_close(ablation.psi_buffer, full.psi_buffer)


def test_group_split_normalizes_each_group_with_its_own_statistics():
    torch.manual_seed(2)
    norm = study.GroupSplitNorm(nn.BatchNorm2d(3, momentum=0.5), group_size=2)
    x = torch.randn(6, 3, 2, 2)
    y = norm(x)
    for g in range(3):
        xg = x[2 * g:2 * g + 2]
        expected = (xg - channel(xg.mean(DIMS))) / torch.sqrt(
            channel(xg.var(DIMS, unbiased=False)) + 1e-5)
        torch.testing.assert_close(y[2 * g:2 * g + 2], expected, atol=1e-5, rtol=1e-5)
    assert int(norm.layer.num_batches_tracked) == 3  # one normalization batch per group
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        norm(torch.randn(5, 3, 2, 2))
    norm.eval()
    torch.testing.assert_close(norm(x), norm.layer(x))


def test_models_use_the_layers_of_their_method():
    cfg = study.StudyConfig()
    mabn = study.SmallResNet(study.METHODS["MABN/2"], cfg)
    layers = [m for m in mabn.modules() if isinstance(m, study.GroupSplitNorm)]
    assert layers and all(type(m.layer) is MABN2d and m.group_size == 2 for m in layers)
    assert layers[0].layer.warmup_iters == cfg.mabn_warmup_iters * 16
    assert all(m.centralize for m in mabn.modules() if isinstance(m, study.ConvNorm))
    plain = study.SmallResNet(study.METHODS["MABN/2 w/o centralization"], cfg)
    assert not any(m.centralize for m in plain.modules() if isinstance(m, study.ConvNorm))
    gn = study.SmallResNet(study.METHODS["GN"], cfg)
    assert any(isinstance(m, nn.GroupNorm) for m in gn.modules())
    shifted = study.random_shift(torch.arange(64.0).view(1, 1, 8, 8),
                                 torch.Generator().manual_seed(0))
    assert shifted.shape == (1, 1, 8, 8)
    # a shift by at most one pixel keeps the centre pixels' values in the image
    assert set(shifted.flatten().tolist()) <= set(range(64)) | {0.0}


@pytest.mark.e2e  # the study's command line, end to end
def test_study_runs_end_to_end_and_writes_table_json_and_plots(tmp_path, capsys):
    result = study.main(["--methods", "BN/2", "MABN/2", "--seeds", "2", "--epochs", "1",
                         "--record-every", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| BN/2 |" in out and "| MABN/2 |" in out
    saved = json.loads((tmp_path / "small_batch_study.json").read_text())
    assert [row["method"] for row in saved["summary"]] == ["BN/2", "MABN/2"]
    assert len(saved["runs"]) == 4 and saved["seeds"] == 2
    for run in saved["runs"]:
        assert 0 <= run["test_error"] <= 100 and run["iterations"] == 1437 // 32
    # seed 0 recorded every 5 iterations: all four statistics
    rows = saved["batch_stats"]["MABN/2"]
    assert [r["iteration"] for r in rows] == list(range(0, 44, 5))
    assert set(rows[0]) == {"iteration", "mu", "var", "g", "psi"}
    assert (tmp_path / "small_batch_study.png").stat().st_size > 1000
    assert (tmp_path / "batch_stats_study.png").stat().st_size > 1000
    assert result["summary"] == saved["summary"]


def test_cross_entropy_evaluation_is_eval_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.randn(5, 1, 8, 8), torch.arange(5)
    error, loss = study.evaluate(model, x, y)
    with torch.no_grad():
        logits = model(x)
    assert not model.training
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)))
    assert error == pytest.approx(100.0 * float((logits.argmax(1) != y).float().mean()))


def test_summary_pairs_each_seed_with_the_reference_and_keeps_nan():
    def run(method, seed, error, loss=0.1):
        return {"method": method, "seed": seed, "test_error": error, "test_loss": loss,
                "final_train_loss": loss, "train_loss_eval_mode": loss}

    runs = [run("BN/32", 0, 1.0), run("BN/32", 1, 3.0), run("BN/32", 2, 2.0),
            run("BN/2", 0, 2.0), run("BN/2", 1, 3.0), run("BN/2", 2, 5.0, float("nan"))]
    ref, small = study.summarize(runs, ["BN/32", "BN/2"])
    assert "paired_error_diff_mean" not in ref
    assert ref["test_error_mean"] == pytest.approx(2.0) and ref["test_error_std"] == 1.0
    # paired differences 1, 0, 3: mean 4/3, s.e. std/sqrt(3)
    assert small["paired_error_diff_mean"] == pytest.approx(4 / 3)
    assert small["paired_error_diff_se"] == pytest.approx(torch.tensor([1.0, 0, 3]).std().item()
                                                          / 3 ** 0.5)
    assert small["paired_seeds_worse"] == 2
    assert small["test_loss_mean"] != small["test_loss_mean"]  # a diverged run shows as NaN
    assert "+1.33 ± 0.88 (2/3)" in study.format_table([ref, small])
