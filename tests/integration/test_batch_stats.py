"""The batch-statistics recorder against statistics computed by hand."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.engine import SimpleTrainer
from detectron2.engine.hooks import PeriodicWriter
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils.events import JSONWriter
from torch import nn

from mabn_d2 import MABN2d
from mabn_d2.integration.batch_stats import (
    BatchStatsHook,
    BatchStatsRecorder,
    add_batch_stats_config,
    build_batch_stats_hook,
    find_norm_layers,
    scalar_name,
    to_scalars,
)

DIMS = (0, 2, 3)


def channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def hand_stats(x, x_hat, dy, gamma):
    """The paper's definitions, elementwise, in float64."""
    x, x_hat, dy, gamma = (t.double() for t in (x, x_hat, dy, gamma))
    mu = x.mean(DIMS)
    var = ((x - channel(mu)) ** 2).mean(DIMS)
    g = dy * channel(gamma)
    return {"mu": mu, "var": var, "g": g.mean(DIMS), "psi": (g * x_hat).mean(DIMS)}


def assert_stats_close(recorded, expected, atol=1e-6):
    assert set(recorded) == set(expected)
    for key in expected:
        torch.testing.assert_close(recorded[key].double(), expected[key], atol=atol, rtol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")


def make_bn(c=3):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.5])[:c])
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3])[:c])
    return bn


def test_batchnorm_statistics_equal_hand_computed_with_inplace_relu_after():
    torch.manual_seed(0)
    bn = make_bn()
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    target = torch.randn(4, 3, 5, 5)
    recorder = BatchStatsRecorder({"bn": bn})
    recorder.arm()
    # F.relu_ modifies the recorded output in place, as detectron2's ResNet blocks do.
    (F.relu_(bn(x)) * target).sum().backward()
    recorded = recorder.collect()["bn"]

    reference = make_bn()
    y = reference(x)
    y.retain_grad()
    (F.relu(y) * target).sum().backward()
    mu, var = x.mean(DIMS), x.var(DIMS, unbiased=False)
    x_hat = (x - channel(mu)) / torch.sqrt(channel(var) + bn.eps)
    assert_stats_close(recorded, hand_stats(x, x_hat, y.grad, bn.weight.detach()))
    assert not recorder.armed


def test_mabn_psi_equals_the_layers_own_psi_and_hand_computed():
    torch.manual_seed(1)
    layer = MABN2d(3, buffer_size=4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.7, 0.3]))
        layer.bias.copy_(torch.tensor([0.2, 0.0, -0.4]))
    recorder = BatchStatsRecorder({"mabn": layer})
    x = torch.randn(2, 3, 4, 4) + 0.5
    dy = torch.randn(2, 3, 4, 4)
    recorder.arm()
    layer(x).backward(dy)
    recorded = recorder.collect()["mabn"]
    # Step 1 normalizes with this batch's second moment, r = 1.
    x_hat = x / torch.sqrt(channel((x * x).mean(DIMS)) + layer.eps)
    assert_stats_close(recorded, hand_stats(x, x_hat, dy, layer.weight.detach()))
    torch.testing.assert_close(recorded["psi"], layer.psi_buffer[1])


def test_layer_without_affine_and_first_call_only():
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(2, affine=False)
    recorder = BatchStatsRecorder({"bn": bn})
    x1, x2 = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3) + 5
    x1.requires_grad_(True)
    recorder.arm()
    y1 = bn(x1)
    y2 = bn(x2)  # second call of the same step: not recorded
    (y1.sum() * 0 + (y1 * y1).sum() + y2.sum()).backward()
    recorded = recorder.collect()["bn"]
    x_hat = (x1 - channel(x1.mean(DIMS))) / torch.sqrt(
        channel(x1.var(DIMS, unbiased=False)) + bn.eps)
    assert_stats_close(recorded, hand_stats(x1, x_hat.detach(), 2 * y1.detach(),
                                            torch.ones(2)))
    # Disarmed after collect: nothing recorded.
    bn(x1)
    assert recorder.collect() == {}


def test_without_grad_only_forward_statistics_and_remove():
    bn = make_bn()
    recorder = BatchStatsRecorder({"bn": bn})
    recorder.arm()
    with torch.no_grad():
        bn(torch.randn(2, 3, 2, 2))
    assert set(recorder.collect()["bn"]) == {"mu", "var"}
    recorder.remove()
    recorder.arm()
    bn(torch.randn(2, 3, 2, 2))
    assert recorder.collect() == {}


def test_find_norm_layers_selection_and_errors():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), FrozenBatchNorm2d(2),
                          nn.GroupNorm(1, 2), MABN2d(2))
    assert list(find_norm_layers(model)) == ["1", "3", "4"]
    assert list(find_norm_layers(model, ["^4$"])) == ["4"]
    with pytest.raises(ValueError, match="matches no normalization layer"):
        find_norm_layers(model, ["backbone"])
    with pytest.raises(ValueError, match="no layers"):
        BatchStatsRecorder({})
    stats = {"bn": {"mu": torch.zeros(2)}}
    assert to_scalars(stats, [1]) == {"batch_stats/bn/mu/c1": 0.0}
    with pytest.raises(ValueError, match="channel 2 out of range"):
        to_scalars(stats, [2])


class TinyDetector(nn.Module):
    """A model with detectron2's training interface: batch in, dict of losses out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = make_bn()

    def forward(self, batch):
        x, target = batch
        return {"loss": ((F.relu(self.norm(self.conv(x))) - target) ** 2).mean()}


def test_detectron2_hook_writes_hand_computed_values_to_metrics_json(tmp_path):
    torch.manual_seed(4)
    batches = [(torch.randn(2, 1, 4, 4), torch.randn(2, 3, 4, 4)) for _ in range(4)]
    model = TinyDetector()
    # lr 0: the weights stay as built, so the statistics can be recomputed afterwards.
    trainer = SimpleTrainer(model, iter(batches), torch.optim.SGD(model.parameters(), lr=0.0))
    json_file = tmp_path / "metrics.json"
    trainer.register_hooks([
        BatchStatsHook(period=2, layers=["norm"], channels=[0, 2]),
        PeriodicWriter([JSONWriter(str(json_file))], period=2),
    ])
    trainer.train(0, 4)

    lines = [json.loads(line) for line in json_file.read_text().splitlines()]
    written = {line["iteration"]: line for line in lines}
    assert sorted(written) == [1, 3]
    for iteration in (1, 3):
        x, target = batches[iteration]
        reference = TinyDetector()
        h = reference.conv(x)
        y = reference.norm(h)
        y.retain_grad()
        ((F.relu(y) - target) ** 2).mean().backward()
        h = h.detach()
        mu, var = h.mean(DIMS), h.var(DIMS, unbiased=False)
        x_hat = (h - channel(mu)) / torch.sqrt(channel(var) + 1e-5)
        expected = hand_stats(h, x_hat, y.grad, reference.norm.weight.detach())
        for stat, values in expected.items():
            for c in (0, 2):
                assert written[iteration][scalar_name("norm", stat, c)] == pytest.approx(
                    float(values[c]), rel=1e-5, abs=1e-7)
        assert scalar_name("norm", "mu", 1) not in written[iteration]
    history = trainer.storage.history(scalar_name("norm", "psi", 0)).values()
    assert [it for _, it in history] == [1, 3]


def test_config_node_and_hook_builder():
    cfg = add_batch_stats_config(CN())
    assert cfg.BATCH_STATS.PERIOD == 0 and build_batch_stats_hook(cfg) is None
    assert build_batch_stats_hook(CN()) is None
    cfg.BATCH_STATS.PERIOD = 20
    cfg.BATCH_STATS.LAYERS = ["res2"]
    hook = build_batch_stats_hook(cfg)
    assert isinstance(hook, BatchStatsHook)
    cfg.BATCH_STATS.PERIOD = 5
    add_batch_stats_config(cfg)  # keeps existing keys
    assert cfg.BATCH_STATS.PERIOD == 5
    for key, value, match in (
        ("PERIOD", -1, "PERIOD must be an int >= 0"),
        ("PERIOD", 2.5, "PERIOD must be an int >= 0"),
        ("CHANNELS", [], "CHANNELS must be a non-empty list"),
        ("LAYERS", [3], "LAYERS must be a list of regular expressions"),
    ):
        bad = add_batch_stats_config(CN())
        bad.BATCH_STATS.PERIOD = 1
        setattr(bad.BATCH_STATS, key, value)
        with pytest.raises(ValueError, match=match):
            build_batch_stats_hook(bad)
