"""MABN calibration (before fine-tuning) and precise statistics (MABN's PreciseBN), against
statistics computed by hand on small models; the hooks in detectron2's SimpleTrainer; two
processes."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer
from detectron2.layers import Conv2d
from torch import nn

from mabn_d2 import MABN2d, add_mabn_config
from mabn_d2.engine.hooks import MABNCalibrationHook, MABNPreciseBN, build_mabn_hooks
from mabn_d2.engine.launch import launch
from mabn_d2.finetune.calibration import (
    calibrate_mabn,
    calibrate_mabn_backward,
    layers_to_calibrate,
    precise_mabn_stats,
)
from mabn_d2.finetune.convert import SOURCE_AFFINE, SOURCE_BN, SOURCE_MABN, SOURCE_NEW
from mabn_d2.integration.config import calibration_from_cfg
from mabn_d2.layer import centralize_weight
from mabn_d2.layer.functional import mabn_eval


class TinyNet(nn.Module):
    """conv -> MABN -> ReLU -> conv -> MABN, with non-trivial MABN parameters."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = Conv2d(3, 4, 3, padding=1, bias=False, norm=MABN2d(4, buffer_size=4),
                            activation=F.relu)
        self.conv2 = Conv2d(4, 5, 3, padding=1, bias=False, norm=MABN2d(5, buffer_size=4))
        with torch.no_grad():
            for norm in self.norms():
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.3)
                norm.running_second_moment.uniform_(0.5, 2.0)

    def norms(self) -> list[MABN2d]:
        return [self.conv1.norm, self.conv2.norm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


def make_data(seed: int = 1) -> list[torch.Tensor]:
    """Batches of different sizes: statistics must be weighted by N*H*W."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, 8, 8), (1, 3, 6, 10), (3, 3, 5, 5)]
    return [torch.randn(*shape, generator=gen) * 2 + 0.5 for shape in shapes]


def eval_outputs(model: nn.Module, data: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(x) for x in data]


def norm_inputs(model: TinyNet, data, batch_normalize: bool) -> list[torch.Tensor]:
    """By hand: each layer's input over all batches, as (C, total N*H*W) columns."""
    columns = [[], []]
    for x in data:
        h = x
        for i, conv in enumerate((model.conv1, model.conv2)):
            a = F.conv2d(h, centralize_weight(conv.weight), None, 1, 1)  # centralized conv
            columns[i].append(a.transpose(0, 1).reshape(a.shape[1], -1))
            norm = conv.norm
            stat = a.square().mean((0, 2, 3)) if batch_normalize else norm.running_second_moment
            h = mabn_eval(a, norm.weight, norm.bias, stat, norm.eps)
            h = F.relu(h) if i == 0 else h
    return [torch.cat(c, dim=1) for c in columns]


def test_calibration_measures_inputs_and_keeps_the_eval_function():
    model, data = TinyNet(), make_data()
    before = eval_outputs(model, data)
    old = [(n.weight.clone(), n.bias.clone(), n.running_second_moment.clone(), n.psi_buffer.clone())
           for n in model.norms()]
    with torch.no_grad():
        expected = [c.double().square().mean(1).float() for c in norm_inputs(model, data, False)]
    model.train()
    report = calibrate_mabn(model, data, num_batches=10)  # only 3 batches exist
    assert report.num_batches == 3 and sorted(report.updated) == ["conv1.norm", "conv2.norm"]
    assert model.training and all(n.training for n in model.norms())  # modes restored
    for norm, s, (weight, bias, s_old, psi) in zip(model.norms(), expected, old):
        torch.testing.assert_close(norm.running_second_moment, s)
        torch.testing.assert_close(norm.weight, weight * torch.sqrt((s + norm.eps) /
                                                                    (s_old + norm.eps)))
        assert torch.equal(norm.bias, bias) and torch.equal(norm.psi_buffer, psi)
        assert torch.equal(norm.chi2_buffer, s.expand(4, -1))
        # Past buffer filling (4), warm-up (100) and renorm start (1000): the last phase.
        assert norm.iteration == 1000 and int(norm.num_batches_tracked) == 1000
    for got, ref in zip(eval_outputs(model, data), before):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_calibrated_layers_start_training_from_the_eval_function():
    model, data = TinyNet(), make_data()
    model.train()
    calibrate_mabn(model, data[1:])  # the first training batch was not calibrated on
    x = data[0]
    eval_out = eval_outputs(copy.deepcopy(model), [x])[0]
    model.train()
    with torch.no_grad():
        train_out = model(x)
    # Step 1001: moving averages with renorm, r maps them onto the calibrated statistics.
    assert all(n.iteration == 1001 for n in model.norms())
    torch.testing.assert_close(train_out, eval_out, rtol=1e-5, atol=1e-5)
    # Without renorm (r clipped to 1) this batch's share of the moving average shows.
    model = TinyNet()
    for norm in model.norms():
        norm.renorm_clip = 1.0
    calibrate_mabn(model, data[1:])
    with torch.no_grad():
        moving_average_out = model(x)
    assert (moving_average_out - eval_out).norm() / eval_out.norm() > 1e-3


def square_loss(y: torch.Tensor) -> torch.Tensor:
    return y.square().mean()


def test_backward_calibration_fills_psi_and_restores_everything_else():
    model, data = TinyNet(), make_data()
    model.train()
    calibrate_mabn(model, data)
    assert all(not n.psi_buffer.any() for n in model.norms())
    # By hand, from a copy's training step per batch: Psi_B = mean(g * z) = weight * dweight /
    # (N * H * W), since dweight = sum(dy * r * z) and g = dy * weight * r.
    expected = [torch.zeros(n.num_features, dtype=torch.float64) for n in model.norms()]
    for x in data:
        step = copy.deepcopy(model)
        square_loss(step(x)).backward()
        count = x.shape[0] * x.shape[2] * x.shape[3]
        for e, n in zip(expected, step.norms()):
            e += (n.weight * n.weight.grad).double().detach() / count
    state = copy.deepcopy(model.state_dict())
    sentinel = torch.full_like(model.conv1.weight, 7.0)
    model.conv1.weight.grad = sentinel
    report = calibrate_mabn_backward(model, data, num_batches=10, loss_fn=square_loss)
    assert report.num_batches == 3 and sorted(report.updated) == ["conv1.norm", "conv2.norm"]
    for e, n in zip(expected, model.norms()):
        torch.testing.assert_close(n.psi_buffer, (e / 3).float().expand(4, -1))
        assert n.iteration == 1000
    for name, value in model.state_dict().items():
        if not name.endswith("psi_buffer"):
            assert torch.equal(value, state[name]), name
    assert model.conv1.weight.grad is sentinel
    assert all(p.grad is None for name, p in model.named_parameters() if name != "conv1.weight")


def test_backward_calibration_leaves_other_norms_alone():
    model = nn.Sequential(nn.BatchNorm2d(3), TinyNet()).train()
    state = copy.deepcopy(model.state_dict())
    calibrate_mabn_backward(model, make_data(), loss_fn=square_loss)
    for name, value in model.state_dict().items():  # BN running statistics included
        if not name.endswith("psi_buffer"):
            assert torch.equal(value, state[name]), name
    assert all(n.psi_buffer.any() for n in model[1].norms())


def test_backward_calibration_errors():
    model = TinyNet().eval()
    with pytest.raises(ValueError, match="training mode"):
        calibrate_mabn_backward(model, make_data(), loss_fn=square_loss)
    model.train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="pass loss_fn"):
        calibrate_mabn_backward(model, make_data())  # TinyNet's output is not a loss
    for name, value in model.state_dict().items():  # nothing lost on the way
        assert torch.equal(value, state[name]), name


def test_precise_statistics_use_batch_normalized_inputs_and_change_nothing_else():
    model, data = TinyNet(), make_data()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for x in make_data(seed=2) * 3:  # 9 steps: past buffer_size, moving averages in use
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = [c.double().square().mean(1).float() for c in norm_inputs(model, data, True)]
    report = precise_mabn_stats(model, data, num_batches=3)
    assert report.num_batches == 3 and model.training
    for name, value in model.state_dict().items():
        if name.endswith("running_second_moment"):
            layer = 0 if name.startswith("conv1") else 1
            torch.testing.assert_close(value, expected[layer])
        else:
            assert torch.equal(value, state[name]), name
    assert all(n.iteration == 9 for n in model.norms())


def test_layers_to_calibrate_per_mode():
    model = nn.ModuleDict({name: MABN2d(2) for name in ("bn", "affine", "new", "mabn", "none")})
    for name, source in (("bn", SOURCE_BN), ("affine", SOURCE_AFFINE), ("new", SOURCE_NEW),
                         ("mabn", SOURCE_MABN)):
        model[name].converted_from = source
    assert sorted(layers_to_calibrate(model, "auto")) == ["affine", "bn"]
    assert sorted(layers_to_calibrate(model, "always")) == ["affine", "bn", "none"]
    assert layers_to_calibrate(model, "never") == {}
    model["affine"].converted_from = SOURCE_BN  # every converted layer has statistics
    assert layers_to_calibrate(model, "auto") == {}
    with pytest.raises(ValueError, match=r"one of \('auto', 'always', 'never'\)"):
        layers_to_calibrate(model, "sometimes")


@pytest.mark.parametrize("key, value, message", [
    ("MODE", "sometimes", "MODEL.MABN.CALIBRATION.MODE must be one of"),
    ("NUM_BATCHES", 0, "MODEL.MABN.CALIBRATION.NUM_BATCHES must be an integer >= 1"),
    ("NUM_BATCHES", 2.5, "MODEL.MABN.CALIBRATION.NUM_BATCHES must be an integer >= 1"),
    ("BACKWARD", "yes", "MODEL.MABN.CALIBRATION.BACKWARD must be True or False"),
])
def test_calibration_config_errors_name_the_key(key, value, message):
    cfg = add_mabn_config(get_cfg())
    setattr(cfg.MODEL.MABN.CALIBRATION, key, value)
    with pytest.raises(ValueError, match=message):
        calibration_from_cfg(cfg)


def test_calibration_hook_builds_its_loader_only_when_it_runs():
    def no_loader():
        raise AssertionError("the loader must not be built when nothing is calibrated")

    model = TinyNet()  # no converted layers: "auto" calibrates nothing
    MABNCalibrationHook(model, no_loader, num_batches=2, mode="auto").before_train()
    hook = MABNCalibrationHook(model, lambda: make_data(), num_batches=2, mode="always",
                               backward=False)  # TinyNet returns no loss
    hook.before_train()
    assert hook.report.num_batches == 2 and hook.backward_report is None


class _LossModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.net(x).square().mean()}


def test_calibration_hook_fills_both_moving_averages_of_a_loss_model():
    model = _LossModel()
    hook = MABNCalibrationHook(model, lambda: make_data(), num_batches=2, mode="always")
    hook.before_train()
    assert hook.report.num_batches == 2 and hook.backward_report.num_batches == 2
    for norm in model.net.norms():
        assert norm.iteration == 1000 and norm.psi_buffer.any()
        assert torch.equal(norm.psi_buffer, norm.psi_buffer[0].expand_as(norm.psi_buffer))


def test_precise_bn_hook_in_a_detectron2_trainer():
    model = _LossModel()
    batch = make_data()[0]
    trainer = SimpleTrainer(model, itertools.repeat(batch),
                            torch.optim.SGD(model.parameters(), lr=0.01))
    hook = MABNPreciseBN(period=3, model=model, data_loader=itertools.repeat(batch), num_iter=2)
    trainer.register_hooks([hook])
    trainer.train(0, 4)  # runs after iteration 3 and after the last (4)
    assert hook.report.num_batches == 2
    expected = copy.deepcopy(model.net)
    precise_mabn_stats(expected, [batch])
    for got, ref in zip(model.net.norms(), expected.norms()):
        torch.testing.assert_close(got.running_second_moment, ref.running_second_moment)


def test_build_mabn_hooks_follows_the_config():
    cfg = add_mabn_config(get_cfg())
    assert build_mabn_hooks(cfg, nn.Conv2d(1, 1, 1), lambda c: []) == []  # no MABN
    hooks = build_mabn_hooks(cfg, TinyNet(), lambda c: [])
    assert [type(h) for h in hooks] == [MABNCalibrationHook]
    cfg.TEST.PRECISE_BN.ENABLED = True
    hooks = build_mabn_hooks(cfg, TinyNet(), lambda c: [])
    assert [type(h) for h in hooks] == [MABNCalibrationHook, MABNPreciseBN]


def _calibrate_rank(out_dir: str) -> None:
    rank = dist.get_rank()
    model = TinyNet()
    for norm in model.norms():
        norm.converted_from = SOURCE_AFFINE
    model.train()
    calibrate_mabn(model, make_data()[rank::2])  # different data on each rank
    torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.e2e  # two processes (gloo)
def test_two_processes_calibrate_to_the_same_weights(tmp_path):
    # DDP keeps parameters identical only through identical updates: the statistics are
    # all-reduced, so both ranks set the values one process gets from all the data.
    launch(_calibrate_rank, 2, dist_url="auto", args=(str(tmp_path),), backend="gloo")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = TinyNet().train()
    calibrate_mabn(single, make_data())
    for key, value in single.state_dict().items():
        for rank in ranks:
            torch.testing.assert_close(rank[key], value, rtol=1e-5, atol=1e-6)
