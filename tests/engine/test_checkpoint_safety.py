"""Checkpoints: atomic saves, a resume that skips a damaged newest checkpoint, NaN/inf refused
at load, MABN checkpoints refused by models without MABN, numeric arguments of the converter
validated."""

from __future__ import annotations

import logging
import math
import os
import pickle

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_backbone
from torch import nn

from mabn_d2 import MABNCheckpointError
from mabn_d2.engine.atomic_checkpointer import AtomicCheckpointer, NoReadableCheckpointError
from mabn_d2.file_io import atomic_write
from mabn_d2.finetune.convert import fold_bn

from helpers import import_script, run_tool, small_backbone_cfg

convert_checkpoint = import_script("tools/convert_checkpoint.py")


class Unpicklable:
    """Fails while ``torch.save`` writes it: a save interrupted half-way."""

    def __reduce__(self):
        raise RuntimeError("interrupted")


class Extra:
    """A checkpointable whose state can be made to fail during the save."""

    def __init__(self) -> None:
        self.fail = False

    def state_dict(self) -> dict:
        return {"x": Unpicklable()} if self.fail else {"x": 1}

    def load_state_dict(self, state: dict) -> None:
        pass


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint(tmp_path):
    extra = Extra()
    checkpointer = AtomicCheckpointer(net(0), str(tmp_path), extra=extra)
    checkpointer.save("model_final")
    saved = (tmp_path / "model_final.pth").read_bytes()
    checkpointer.model.load_state_dict(net(1).state_dict())
    extra.fail = True
    with pytest.raises(RuntimeError, match="interrupted"):
        checkpointer.save("model_final")
    assert (tmp_path / "model_final.pth").read_bytes() == saved
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]  # no leftovers


def test_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write(str(tmp_path / "f"), lambda f: f.write(b"x"))
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("damage", ["empty", "truncated", "missing"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, caplog, damage):
    writer = AtomicCheckpointer(net(0), str(tmp_path))
    writer.save("model_0000009", iteration=9)
    good = {k: v.clone() for k, v in writer.model.state_dict().items()}
    # As detectron2's own (non-atomic) save leaves it when killed: a broken file, tagged.
    final = tmp_path / "model_final.pth"
    if damage == "truncated":
        writer.model.load_state_dict(net(1).state_dict())
        writer.save("model_final", iteration=19)
        final.write_bytes(final.read_bytes()[:1000])
    elif damage == "empty":
        final.write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")

    model = net(2)
    with caplog.at_level(logging.WARNING, logger="mabn_d2"):
        extra = AtomicCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, good[key], rtol=0, atol=0)
    assert f"Cannot read checkpoint {final}" in caplog.text
    assert f"Resuming from {tmp_path / 'model_0000009.pth'}" in caplog.text


class Custom:
    """Not loadable with ``torch.load(weights_only=True)``."""


def test_resume_does_not_skip_a_complete_checkpoint_that_torch_refuses(tmp_path):
    writer = AtomicCheckpointer(net(0), str(tmp_path))
    writer.save("model_0000009", iteration=9)
    writer.save("model_final", iteration=19, extra=Custom())
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AtomicCheckpointer(net(1), str(tmp_path)).resume_or_load("", resume=True)


def test_resume_without_any_readable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "model_final.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(NoReadableCheckpointError, match="no checkpoint in .* can be read"):
        AtomicCheckpointer(net(0), str(tmp_path)).resume_or_load("", resume=True)


def test_without_resume_the_given_weights_load(tmp_path):
    torch.save({"model": net(3).state_dict()}, tmp_path / "w.pth")
    model = net(0)
    AtomicCheckpointer(model, str(tmp_path / "out")).resume_or_load(str(tmp_path / "w.pth"),
                                                                    resume=True)
    torch.testing.assert_close(model[0].weight, net(3)[0].weight)


@pytest.mark.parametrize("norm", ["MABN", "BN"])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, norm):
    torch.manual_seed(0)
    state = build_backbone(small_backbone_cfg(norm)).state_dict()
    state["res3.0.conv1.weight"][0, 0, 0, 0] = math.nan
    state["stem.conv1.norm.bias"][1] = math.inf
    torch.save({"model": state}, tmp_path / "nan.pth")
    model = build_backbone(small_backbone_cfg(norm))
    before = model.state_dict()["res3.0.conv1.weight"].clone()
    with pytest.raises(MABNCheckpointError, match=r"NaN or infinite values in 2 tensors: "
                       r"stem.conv1.norm.bias, res3.0.conv1.weight"):
        DetectionCheckpointer(model).load(str(tmp_path / "nan.pth"))
    assert torch.equal(model.state_dict()["res3.0.conv1.weight"], before)  # nothing loaded


@pytest.mark.parametrize("norm", ["BN", "GN", "FrozenBN"])
def test_an_mabn_checkpoint_is_refused_by_a_model_without_mabn(tmp_path, norm):
    torch.manual_seed(0)
    torch.save({"model": build_backbone(small_backbone_cfg("MABN")).state_dict()},
               tmp_path / "mabn.pth")
    with pytest.raises(MABNCheckpointError, match=r"has 20 MABN layers \(res2.0.conv1.norm, "
                       r".*but the model has none.*NORM \"MABN\".*fuse_mabn"):
        DetectionCheckpointer(build_backbone(small_backbone_cfg(norm))).load(
            str(tmp_path / "mabn.pth"))


@pytest.mark.parametrize("args, message", [
    (("--eps", "nan"), "--eps must be a finite number > 0, got nan"),
    (("--eps", "-1"), "--eps must be a finite number > 0, got -1.0"),
    (("--eps", "0"), "--eps must be a finite number > 0, got 0.0"),
    (("--bn-eps", "-0.5"), "--bn-eps must be a finite number >= 0, got -0.5"),
    (("--bn-eps", "inf"), "--bn-eps must be a finite number >= 0, got inf"),
    (("--buffer-size", "0"), "--buffer-size must be an integer in [1, 1024], got 0"),
])
def test_converter_refuses_invalid_numbers_and_writes_nothing(tmp_path, capsys, args, message):
    torch.save(net(0).state_dict(), tmp_path / "bn.pth")
    with pytest.raises(SystemExit) as exit_info:  # argparse's error: usage, message, exit 2
        convert_checkpoint.main([str(tmp_path / "bn.pth"), str(tmp_path / "out.pth"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_converter_refuses_a_result_with_non_finite_values(tmp_path):
    state = net(0).state_dict()
    state["1.running_var"][2] = 0.0  # with --bn-eps 0: division by zero
    torch.save(state, tmp_path / "bn.pth")
    code, output = run_tool(str(tmp_path / "bn.pth"), str(tmp_path / "out.pth"), "--bn-eps", "0")
    assert code == 2 and "NaN or infinite values in 2 tensors: 1.weight, 1.bias" in output
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"bn_eps": -0.5}, "bn_eps must be a finite number >= 0"),
    ({"bn_eps": math.nan}, "bn_eps must be a finite number >= 0"),
    ({"mabn_eps": 0.0}, "mabn_eps must be a finite number > 0"),
    ({"mabn_eps": math.inf}, "mabn_eps must be a finite number > 0"),
])
def test_fold_bn_refuses_invalid_eps(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fold_bn(3, **kwargs)
