"""BN -> MABN: the exact fold on modules (any PyTorch model) and on checkpoint files."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_backbone
from torch import nn

from mabn_d2 import MABN2d
from mabn_d2.finetune.convert import (
    SOURCE_AFFINE,
    SOURCE_BN,
    SOURCE_IDENTITY,
    SOURCE_NEW,
    convert_bn_to_mabn,
    fold_bn,
)

from helpers import import_script, relative_error, run_tool, small_backbone_cfg

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (random init has mean 0, var 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_fold_is_the_specified_formula():
    gen = torch.Generator().manual_seed(0)
    gamma, beta = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    mean, var = torch.randn(6, generator=gen), torch.rand(6, generator=gen) + 0.1
    folded = fold_bn(6, weight=gamma, bias=beta, running_mean=mean, running_var=var,
                     bn_eps=1e-5, mabn_eps=1e-3)
    s = var + mean**2
    torch.testing.assert_close(folded.running_second_moment, s)
    torch.testing.assert_close(folded.weight, gamma * torch.sqrt(s + 1e-3) / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(folded.bias, beta - gamma * mean / torch.sqrt(var + 1e-5))
    assert folded.has_statistics
    affine = fold_bn(6, weight=gamma, bias=beta, running_mean=torch.zeros(6),
                     running_var=torch.ones(6) - 1e-5)
    assert not affine.has_statistics
    with pytest.raises(ValueError, match=r"running_mean must have shape \(6,\)"):
        fold_bn(6, running_mean=torch.zeros(5), running_var=torch.ones(6))

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_torchvision_resnet18_converts_exactly_and_trains():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    converted = convert_bn_to_mabn(copy.deepcopy(model), buffer_size=8)
    norms = [m for m in converted.modules() if isinstance(m, MABN2d)]
    assert len(norms) == 20 and not any(isinstance(m, nn.BatchNorm2d)
                                        for m in converted.modules())
    assert all(m.buffer_size == 8 and m.eps == 1e-5 and m.converted_from == SOURCE_BN
               for m in norms)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5
    # Training mode: the first step normalises with batch statistics (r = 1), and every
    # layer's parameters get dbias = sum(dy) and dweight = sum(dy * z), z = x / sqrt(E[x^2] + eps)
    seen: dict[MABN2d, list[torch.Tensor]] = {}

    def keep_input_and_output_grad(m, inputs, output):
        seen[m] = [inputs[0].detach()]
        output.register_hook(lambda grad, m=m: seen[m].append(grad))  # before the in-place ReLU

    for m in norms:
        m.register_forward_hook(keep_input_and_output_grad)
    converted.train()
    converted(x).sum().backward()
    for m in norms:
        x_in, dy = seen[m]
        z = x_in / torch.sqrt(x_in.square().mean((0, 2, 3), keepdim=True) + m.eps)
        assert relative_error(m.bias.grad, dy.sum((0, 2, 3))) < 1e-5
        assert relative_error(m.weight.grad, (dy * z).sum((0, 2, 3))) < 1e-5


@pytest.mark.parametrize("kind", ["frozen_d2", "frozen_tv", "sync", "no_affine"])
def test_other_bn_types_convert_exactly(kind):
    torch.manual_seed(0)
    make = {
        "frozen_d2": lambda: FrozenBatchNorm2d(5),
        "frozen_tv": lambda: torchvision.ops.misc.FrozenBatchNorm2d(5),
        "sync": lambda: nn.SyncBatchNorm(5),
        "no_affine": lambda: nn.BatchNorm2d(5, affine=False),
    }[kind]
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 5, 3), make(), nn.ReLU())).eval()
    converted = convert_bn_to_mabn(copy.deepcopy(model))
    mabn = converted[1]
    assert isinstance(mabn, MABN2d) and not mabn.training
    # Trainable where the source's affine was (frozen BN and affine=False BN: not).
    assert mabn.weight.requires_grad is (kind == "sync")
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_a_bn_module_itself_is_replaced_and_untracked_bn_keeps_gamma_beta():
    bn = randomize_bn(nn.BatchNorm2d(4)).train()
    out = convert_bn_to_mabn(bn, momentum=0.1)
    assert isinstance(out, MABN2d) and out is not bn and out.training and out.momentum == 0.1
    untracked = nn.BatchNorm2d(4, track_running_stats=False)
    with torch.no_grad():
        untracked.weight.fill_(2.0)
    mabn = convert_bn_to_mabn(untracked)
    assert mabn.converted_from == SOURCE_NEW and torch.equal(mabn.weight, torch.full((4,), 2.0))


@pytest.mark.parametrize("mean,var,source", [
    (0.0, 1.0, SOURCE_AFFINE),          # a FrozenBN that loaded affine-only weights
    (0.0, 1.0 - 1e-5, SOURCE_AFFINE),   # detectron2's FrozenBatchNorm2d as initialised
    (0.0, 1.0 + 1e-3, SOURCE_BN),       # real statistics that happen to be near 1
    (1e-3, 1.0, SOURCE_BN),
])
def test_identity_statistics_count_as_no_statistics(mean, var, source):
    frozen = FrozenBatchNorm2d(4)
    frozen.running_mean.fill_(mean)
    frozen.running_var.fill_(var)
    mabn = convert_bn_to_mabn(nn.Sequential(frozen))[0]
    assert mabn.converted_from == source

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_norm_less_convs_load_as_identity_mabn(tmp_path):
    # A checkpoint of an FPN without norm (convs with bias) into an FPN with MABN: the conv
    # bias becomes the MABN bias and the layer is an identity: same function.
    torch.manual_seed(0)
    plain = build_backbone(_fpn_cfg(""))
    for name, param in plain.named_parameters():
        if name.startswith("fpn_") and name.endswith("bias"):
            param.data.normal_()
    DetectionCheckpointer(plain, str(tmp_path)).save("fpn_plain")
    mabn = build_backbone(_fpn_cfg("MABN", CENTRALIZE_WEIGHTS=False))
    checkpointer = DetectionCheckpointer(mabn)
    checkpointer.load(str(tmp_path / "fpn_plain.pth"))
    report = checkpointer.mabn_load_report
    assert len(report.names(SOURCE_IDENTITY)) == 8  # 4 lateral + 4 output convs
    x = torch.randn(1, 3, 64, 64)
    for key, ref in outputs(plain, x).items():
        assert relative_error(outputs(mabn, x)[key], ref) < 1e-5, key

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def torchvision_to_detectron2(state: dict) -> dict:
    """The renaming of detectron2's convert-torchvision-to-d2.py tool (numpy values)."""
    renamed = {}
    for key, value in state.items():
        new = key if "layer" in key else "stem." + key
        for t in (1, 2, 3, 4):
            new = new.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            new = new.replace(f"bn{t}", f"conv{t}.norm")
        new = new.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        renamed[new] = value.detach().numpy()
    return renamed

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_torchvision_checkpoint_converted_the_detectron2_way(tmp_path):
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18()).eval()
    with open(tmp_path / "r18_tv.pkl", "wb") as f:
        pickle.dump({"model": torchvision_to_detectron2(tv.state_dict()),
                     "__author__": "torchvision", "matching_heuristics": True}, f)
    mabn = build_backbone(small_backbone_cfg("MABN", CENTRALIZE_WEIGHTS=False))
    checkpointer = DetectionCheckpointer(mabn)
    checkpointer.load(str(tmp_path / "r18_tv.pkl"))
    assert len(checkpointer.mabn_load_report.names(SOURCE_BN)) == 20
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        expected = {}
        for i, stage in enumerate((tv.layer1, tv.layer2, tv.layer3, tv.layer4)):
            h = expected[f"res{i + 2}"] = stage(h)
    for key, value in outputs(mabn, x).items():
        assert relative_error(value, expected[key]) < 1e-5, key

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_conv_bias_before_bn_folds_into_mabn(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(Conv2d(3, 4, 3, bias=True, norm=nn.BatchNorm2d(4)))
    randomize_bn(source)
    with torch.no_grad():
        source[0].bias.normal_()
    DetectionCheckpointer(source, str(tmp_path)).save("conv_bias_bn")
    target = nn.Sequential(Conv2d(3, 4, 3, bias=False, norm=MABN2d(4, centralize_weights=False)))
    DetectionCheckpointer(target).load(str(tmp_path / "conv_bias_bn.pth"))
    x = torch.randn(2, 3, 8, 8)
    assert relative_error(outputs(target, x), outputs(source, x)) < 1e-5

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def _fpn_cfg(fpn_norm: str, **mabn):
    cfg = small_backbone_cfg("BN", **mabn)
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.FPN.NORM",
                         fpn_norm, "MODEL.FPN.OUT_CHANNELS", "32",
                         "MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']"])
    return cfg

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_tool_converts_a_plain_pytorch_state_dict(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    code, output = run_tool(str(tmp_path / "r18.pth"), str(tmp_path / "r18_mabn.pth"),
                            "--buffer-size", "4")
    assert code == 0, output
    assert "20 norm layers converted" in output
    target = convert_bn_to_mabn(torchvision.models.resnet18(num_classes=10), buffer_size=4)
    target.load_state_dict(torch.load(tmp_path / "r18_mabn.pth")["model"])  # strict
    x = torch.randn(2, 3, 48, 48)
    assert relative_error(outputs(target, x), outputs(model, x)) < 1e-5

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_tool_converts_a_caffe2_pkl_and_the_result_loads_into_mabn(tmp_path):
    torch.manual_seed(0)
    bn = randomize_bn(build_backbone(small_backbone_cfg("BN")))
    blobs = {c2_name(k): v.numpy() for k, v in bn.state_dict().items()
             if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    # As in R-50.pkl: the affine with the statistics folded in, no statistics.
    for key, value in bn.state_dict().items():
        if key.endswith("norm.weight"):
            module = key[: -len(".weight")]
            state = bn.state_dict()
            scale = value / torch.sqrt(state[f"{module}.running_var"] + 1e-5)
            blobs[c2_name(key)] = scale.numpy()
            blobs[c2_name(f"{module}.bias")] = (
                state[f"{module}.bias"] - scale * state[f"{module}.running_mean"]).numpy()
    with open(tmp_path / "R-18.pkl", "wb") as f:
        pickle.dump({"blobs": blobs, "__author__": "test"}, f)
    code, output = run_tool(str(tmp_path / "R-18.pkl"), str(tmp_path / "R-18-mabn.pth"))
    assert code == 0, output
    mabn = build_backbone(small_backbone_cfg("MABN", CENTRALIZE_WEIGHTS=False))
    checkpointer = DetectionCheckpointer(mabn)
    checkpointer.load(str(tmp_path / "R-18-mabn.pth"))
    # The converted file remembers that these layers have no statistics (to calibrate).
    assert len(checkpointer.mabn_load_report.names(SOURCE_AFFINE)) == 20
    x = torch.randn(1, 3, 64, 64)
    for key, ref in outputs(bn, x).items():
        # 1e-4, not 1e-5: like detectron2's FrozenBatchNorm2d loading Caffe2 weights, the
        # affine is divided by sqrt(1 + eps) (5e-6 per layer).
        assert relative_error(outputs(mabn, x)[key], ref) < 1e-4, key

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_tool_rejects_a_non_pth_output(tmp_path):
    torch.save({"a.weight": torch.ones(1)}, tmp_path / "x.pth")
    code, output = run_tool(str(tmp_path / "x.pth"), str(tmp_path / "y.pkl"))
    assert code == 2 and "must be a .pth" in output

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_tool_folds_affine_only_norms_on_request(tmp_path):
    state = {"conv.weight": torch.randn(3, 2, 1, 1), "bn.weight": torch.rand(3) + 0.5,
             "bn.bias": torch.randn(3)}
    torch.save(state, tmp_path / "affine.pth")
    code, output = run_tool(str(tmp_path / "affine.pth"), str(tmp_path / "kept.pth"))
    assert code == 0 and "0 norm layers converted" in output  # weight/bias alone: could be GN
    code, output = run_tool(str(tmp_path / "affine.pth"), str(tmp_path / "folded.pth"),
                            "--affine", "--eps", "1e-3")
    assert code == 0 and "1 norm layers converted to MABN {'affine': 1}" in output
    converted = torch.load(tmp_path / "folded.pth")
    assert converted["mabn_d2_sources"] == {"bn": SOURCE_AFFINE}
    model = converted["model"]
    torch.testing.assert_close(model["bn.running_second_moment"], torch.ones(3))
    # eps 1e-3 in MABN, 1e-5 in the source BN: weight = gamma * sqrt(1 + 1e-3) / sqrt(1 + 1e-5).
    torch.testing.assert_close(model["bn.weight"],
                               state["bn.weight"] * ((1 + 1e-3) / (1 + 1e-5)) ** 0.5)
    torch.testing.assert_close(model["bn.bias"], state["bn.bias"])
