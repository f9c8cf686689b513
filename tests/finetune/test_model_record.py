"""What a checkpoint records beyond its state dict (mabn_d2.finetune.model_record): a model
centralized otherwise is refused naming MODEL.MABN.CENTRALIZE_WEIGHTS; an older MABN
checkpoint without the record loads with a warning; MABN2d with another buffer size gives one
clear error."""

from __future__ import annotations

import pytest
import torch

from mabn_d2.cli import UserError

# ---- what a checkpoint records ---------------------------------------------------------------

def _backbone(**mabn):
    from detectron2.modeling import build_backbone

    from helpers import small_backbone_cfg

    return build_backbone(small_backbone_cfg("MABN", **mabn))


def test_an_mabn_checkpoint_refuses_a_model_centralized_otherwise(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    from mabn_d2.engine.atomic_checkpointer import AtomicCheckpointer

    AtomicCheckpointer(_backbone(), str(tmp_path)).save("centralized")
    with pytest.raises(UserError, match="MODEL.MABN.CENTRALIZE_WEIGHTS") as info:
        DetectionCheckpointer(_backbone(CENTRALIZE_WEIGHTS=False)).load(
            str(tmp_path / "centralized.pth"))
    assert "trained with centralized weights but run plain" in str(info.value)
    DetectionCheckpointer(_backbone()).load(str(tmp_path / "centralized.pth"))  # same: loads


def test_an_old_mabn_checkpoint_without_the_record_loads_with_a_warning(tmp_path, caplog):
    from detectron2.checkpoint import DetectionCheckpointer

    torch.save({"model": _backbone().state_dict()}, tmp_path / "old.pth")
    with caplog.at_level("WARNING", logger="mabn_d2"):
        DetectionCheckpointer(_backbone(CENTRALIZE_WEIGHTS=False)).load(str(tmp_path / "old.pth"))
    assert "does not record which convs" in caplog.text


def test_mabn_load_state_dict_with_another_buffer_size_has_one_clear_error():
    from mabn_d2 import MABN2d

    state = MABN2d(4, buffer_size=8).state_dict()
    with pytest.raises(RuntimeError) as info:
        MABN2d(4, buffer_size=16).load_state_dict(state)
    assert "buffer_size 8" in str(info.value) and "Missing key" not in str(info.value)


def test_a_bn_checkpoint_with_its_record_still_converts_into_a_centralized_mabn_model(
        tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_backbone

    from mabn_d2.engine.atomic_checkpointer import AtomicCheckpointer

    from helpers import small_backbone_cfg

    AtomicCheckpointer(build_backbone(small_backbone_cfg("BN")), str(tmp_path)).save("bn")
    model = _backbone()
    DetectionCheckpointer(model).load(str(tmp_path / "bn.pth"))  # the BN -> MABN fold


def test_another_centralize_exclude_is_refused_too(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    from mabn_d2.engine.atomic_checkpointer import AtomicCheckpointer

    AtomicCheckpointer(_backbone(), str(tmp_path)).save("centralized")
    with pytest.raises(UserError, match="CENTRALIZE_EXCLUDE") as info:
        DetectionCheckpointer(_backbone(CENTRALIZE_EXCLUDE=["stem"])).load(
            str(tmp_path / "centralized.pth"))
    assert "stem.conv1" in str(info.value)
