"""Checkpoints that do not fit an MABN model: a clear error (or a documented, logged
conversion), never a silent partial load; detectron2 unchanged for models without MABN."""

from __future__ import annotations

import logging
import pickle
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_backbone

import mabn_d2
from mabn_d2 import MABN2d, MABNCheckpointError
from mabn_d2.detectron2_compat import checkpointer_model_loading
from mabn_d2.finetune.convert import SOURCE_MABN

from helpers import import_script, run_tool, small_backbone_cfg

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def backbone(norm: str = "MABN", **mabn):
    """A ResNet-18 backbone (detectron2), 4 stages, with ``norm``."""
    torch.manual_seed(0)
    return build_backbone(small_backbone_cfg(norm, **mabn))

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def trained(model, steps: int = 2):
    model.train()
    for _ in range(steps):
        sum(f.mean() for f in model(torch.randn(2, 3, 32, 32)).values()).backward()
    return model

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def save(model_or_state, path) -> str:
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") \
        else model_or_state
    torch.save({"model": state}, path)
    return str(path)

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def load(model, path):
    checkpointer = DetectionCheckpointer(model)
    checkpointer.load(str(path))
    return checkpointer

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_other_buffer_size_is_an_actionable_error(tmp_path):
    path = save(trained(backbone(BUFFER_SIZE=8)), tmp_path / "m8.pth")
    with pytest.raises(MABNCheckpointError) as info:
        load(backbone(BUFFER_SIZE=16), path)
    message = str(info.value)
    assert "stem.conv1.norm.chi2_buffer: shape (8, 64) in the checkpoint, (16, 64)" in message
    assert "MODEL.MABN.BUFFER_SIZE 8" in message and "--reset-moving-averages" in message

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_reset_moving_averages_makes_it_load_and_says_so(tmp_path, caplog):
    source = trained(backbone(BUFFER_SIZE=8))
    save(source, tmp_path / "m8.pth")
    code, output = run_tool(str(tmp_path / "m8.pth"), str(tmp_path / "restart.pth"),
                            "--reset-moving-averages")
    assert code == 0, output
    model = backbone(BUFFER_SIZE=16)
    with caplog.at_level(logging.INFO, logger="mabn_d2"):
        report = load(model, tmp_path / "restart.pth").mabn_load_report
    assert {layer.source for layer in report.layers} == {SOURCE_MABN}
    assert {layer.note for layer in report.layers} == {"moving averages restarted"}
    assert "MABN entries" in caplog.text  # the logged load report
    for name, layer in model.named_modules():
        if isinstance(layer, MABN2d):
            src = source.get_submodule(name)
            assert torch.equal(layer.running_second_moment, src.running_second_moment)
            assert torch.equal(layer.weight, src.weight)
            assert layer.iteration == 0 and not layer.chi2_buffer.any()

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_resume_loads_every_mabn_entry(tmp_path):
    source = trained(backbone(BUFFER_SIZE=4), steps=3)
    model = backbone(BUFFER_SIZE=4)
    report = load(model, save(source, tmp_path / "m.pth")).mabn_load_report
    assert {layer.source for layer in report.layers} == {SOURCE_MABN}
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(m.iteration == 3 for m in model.modules() if isinstance(m, MABN2d))

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case, expected", [
    ("partial_moving_averages", "keep all three (resume) or remove all three"),
    ("norm_channels", "res3.0.conv1.norm.running_second_moment: shape (64,) in the checkpoint"),
    ("conv_shape", "res2.0.conv1.weight: shape (64, 64, 1, 1) in the checkpoint"),
    ("other_layout", "saved with a different layout"),
    ("both_bn_and_mabn", "has both BN (running_mean/var) and MABN"),
    ("conv_bias", "res2.0.conv1.bias: res2.0.conv1 (feeding res2.0.conv1.norm) has no such"),
])
def test_mabn_checkpoint_mismatches_are_errors(tmp_path, case, expected):
    state = state_of(backbone())
    if case == "partial_moving_averages":
        del state["res2.0.conv1.norm.chi2_buffer"]
    elif case == "norm_channels":
        state["res3.0.conv1.norm.running_second_moment"] = torch.ones(64)
    elif case == "conv_shape":
        state["res2.0.conv1.weight"] = torch.ones(64, 64, 1, 1)
    elif case == "other_layout":  # e.g. the original MABN code's buffer names
        state["res2.0.conv1.norm.buffer_x2"] = state.pop("res2.0.conv1.norm.chi2_buffer")
    elif case == "both_bn_and_mabn":
        state["res2.0.conv1.norm.running_mean"] = torch.zeros(64)
    elif case == "conv_bias":  # not foldable into MABN entries: they are MABN already
        state["res2.0.conv1.bias"] = torch.zeros(64)
    with pytest.raises(MABNCheckpointError, match=re.escape(expected)):
        load(backbone(), save(state, tmp_path / "bad.pth"))

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_group_norm_weights_cannot_become_mabn(tmp_path):
    path = save(backbone("GN"), tmp_path / "gn.pth")
    with pytest.raises(MABNCheckpointError, match="GroupNorm/LayerNorm"):
        load(backbone(), path)

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_statistics_that_match_no_layer_are_an_error(tmp_path):
    # A BN checkpoint under other names (here a "body." prefix, no name matching for .pth).
    state = {f"body.{k}": v for k, v in backbone("BN").state_dict().items()}
    with pytest.raises(MABNCheckpointError, match="match no normalization layer"):
        load(backbone(), save(state, tmp_path / "renamed.pth"))

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_caffe2_blob_of_the_wrong_shape_is_an_error(tmp_path):
    # detectron2's name matching drops it with a warning; for an MABN layer it is an error.
    blobs = {c2_name(k): v.numpy() for k, v in backbone("FrozenBN").state_dict().items()
             if not k.endswith(("running_mean", "running_var"))}
    blobs["res3_0_branch2a_bn_s"] = blobs["res3_0_branch2a_bn_s"][:100]
    with open(tmp_path / "R-18.pkl", "wb") as f:
        pickle.dump({"blobs": blobs, "__author__": "test"}, f)
    with pytest.raises(MABNCheckpointError,
                       match=re.escape("res3.0.conv1.norm.weight: shape (100,) in the checkpoint")):
        load(backbone(), tmp_path / "R-18.pkl")

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_models_without_mabn_load_as_detectron2_does(tmp_path, caplog):
    state = state_of(backbone("BN"))
    state["res2.0.conv1.norm.running_mean"] = torch.zeros(3)
    model = backbone("BN")
    with caplog.at_level(logging.WARNING):
        checkpointer = load(model, save(state, tmp_path / "bn.pth"))
    assert "Skip loading parameter 'res2.0.conv1.norm.running_mean'" in caplog.text
    assert not hasattr(checkpointer, "mabn_load_report")

c2_name = import_script("studies/finetune_start_study.py").c2_name  # shared with the study


def test_checkpointer_patch_is_idempotent():
    load_model = checkpointer_model_loading()
    mabn_d2.register_mabn()
    mabn_d2.register_mabn()
    assert checkpointer_model_loading() is load_model
    assert not getattr(load_model.__wrapped__, "_mabn_d2_wrapped", False)  # wrapped once
