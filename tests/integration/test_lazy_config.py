"""MABN values in LazyConfigs are validated before anything is built, errors naming the full key
(:func:`mabn_d2.integration.lazy_config.validate_lazy_config`); the LazyConfig tool's helpers
(:mod:`mabn_d2.engine.lazy_training`) read their settings the same way."""

from __future__ import annotations

import logging

import pytest

from helpers import CONFIGS, TINY_LAZY

DEMO_LAZY = CONFIGS / "lazy" / "demo" / "mask_rcnn_R_18_FPN_demo_mabn.py"


def demo(*overrides: str):
    from detectron2.config import LazyConfig

    return LazyConfig.apply_overrides(LazyConfig.load(str(DEMO_LAZY)), list(overrides))


@pytest.mark.parametrize("path", sorted((CONFIGS / "lazy").rglob("*.py")), ids=lambda p: p.stem)
def test_the_lazy_configs_are_valid_and_have_detectron2s_top_level_keys(path, caplog):
    from detectron2.config import LazyConfig

    from mabn_d2.integration.lazy_config import validate_lazy_config

    cfg = LazyConfig.load(str(path))
    # what detectron2's lazyconfig_train_net.py reads, and the settings node; no aliases
    assert sorted(cfg) == ["dataloader", "lr_multiplier", "mabn", "model", "optimizer", "train"]
    with caplog.at_level(logging.WARNING, logger="mabn_d2"):
        nodes = validate_lazy_config(cfg)
    assert list(nodes) == ["mabn"]
    assert not caplog.records


@pytest.mark.parametrize("override, message", [
    ("mabn.buffer_size=0", "mabn.buffer_size must be an integer in [1, 1024], got 0"),
    ("mabn.momentum=1.5", "mabn.momentum must be a number in (0, 1], got 1.5"),
    ("mabn.renorm_clip=0.5", "mabn.renorm_clip must be a finite number >= 1, got 0.5"),
    ("mabn.centralize_weights=1", "mabn.centralize_weights must be True or False, got 1"),
    ("mabn.bufer_size=4", "unknown MABN settings ['mabn.bufer_size']; valid: ['mabn.eps'"),
    ("model.backbone.norm=MABM",
     "model.backbone.norm: Unknown norm 'MABM'; valid names are: BN, "),
    ("train.mabn_calibration.mode=sometimes",
     "train.mabn_calibration.mode must be one of ('auto', 'always', 'never'), got 'sometimes'"),
    ("train.mabn_calibration.num_batches=0",
     "train.mabn_calibration.num_batches must be an integer >= 1, got 0"),
])
def test_a_bad_value_names_its_full_key(override, message):
    from mabn_d2.integration.lazy_config import validate_lazy_config

    with pytest.raises(ValueError) as error:
        validate_lazy_config(demo(override))
    assert str(error.value).startswith(message)


def test_a_part_with_its_own_settings_node_is_checked_under_its_key():
    from detectron2.config import LazyCall as L

    from mabn_d2 import MABN2d, MABNSettings
    from mabn_d2.integration.lazy_config import validate_lazy_config

    cfg = demo()
    cfg.model.roi_heads.box_head.conv_norm = L(MABNSettings)(warmup_iters=-1)
    with pytest.raises(ValueError, match=r"^model\.roi_heads\.box_head\.conv_norm\.warmup_iters "
                                         r"must be an integer >= 0, got -1$"):
        validate_lazy_config(cfg)
    cfg = demo()
    cfg.extra = L(MABN2d)(num_features=8, eps=0.0)
    with pytest.raises(ValueError, match=r"^extra\.eps must be a finite number > 0, got 0\.0$"):
        validate_lazy_config(cfg)


def test_a_derived_settings_node_is_checked_under_its_key():
    from detectron2.config import LazyCall as L

    from mabn_d2.integration.lazy_config import derive_settings, validate_lazy_config

    cfg = demo()
    cfg.model.backbone.norm = L(derive_settings)(base="${mabn}", renorm_clip=0.0)
    with pytest.raises(ValueError, match=r"^model\.backbone\.norm\.renorm_clip must be a finite "
                                         r"number >= 1, got 0\.0$"):
        validate_lazy_config(cfg)
    with pytest.raises(TypeError, match=r"base must be MABNSettings \(e\.g\. base='\$\{mabn\}'\)"):
        derive_settings(base="MABN", centralize_weights=False)


def test_a_reference_to_a_missing_settings_node_says_what_to_define():
    from mabn_d2.integration.lazy_config import validate_lazy_config

    cfg = demo()
    del cfg["mabn"]
    with pytest.raises(ValueError, match=r"^model\.backbone\.bottom_up\.stem\.norm does not "
                                         r"resolve .*define the MABN settings node it points at, "
                                         r"e\.g\. mabn = L\(MABNSettings\)"):
        validate_lazy_config(cfg)


def test_the_string_mabn_beside_a_settings_node_is_a_warning(caplog):
    from mabn_d2.integration.lazy_config import validate_lazy_config

    with caplog.at_level(logging.WARNING, logger="mabn_d2"):
        validate_lazy_config(demo("model.roi_heads.mask_head.conv_norm=MABN"))
    assert "model.roi_heads.mask_head.conv_norm: the norm is the string 'MABN'" in caplog.text
    assert 'write "${mabn}"' in caplog.text


def test_instantiate_alone_names_the_argument():
    from detectron2.config import instantiate

    with pytest.raises(ValueError, match=r"^buffer_size must be an integer in \[1, 1024\], got 0$"):
        instantiate(demo("mabn.buffer_size=0").model)


@pytest.mark.parametrize("override, message", [
    ("train.precise_bn.enabled=1", "train.precise_bn.enabled must be True or False, got 1"),
    ("train.precise_bn.num_iter=0", "train.precise_bn.num_iter must be an integer >= 1, got 0"),
    ("train.precise_bn.period=5", "train.precise_bn must be dict(enabled=..., num_iter=...)"),
])
def test_precise_bn_settings_name_their_key(override, message):
    from mabn_d2.engine.lazy_training import precise_bn_from_lazy

    with pytest.raises(ValueError) as error:
        precise_bn_from_lazy(demo(override))
    assert str(error.value).startswith(message)


def test_calibration_and_precise_bn_default_where_the_config_has_none():
    from mabn_d2.engine.lazy_training import PreciseBNSettings, precise_bn_from_lazy
    from mabn_d2.integration.config import CalibrationSettings
    from mabn_d2.integration.lazy_config import calibration_from_lazy

    cfg = demo()
    del cfg.train["mabn_calibration"]
    del cfg.train["precise_bn"]
    assert calibration_from_lazy(cfg) == CalibrationSettings()
    assert precise_bn_from_lazy(cfg) == PreciseBNSettings()
    cfg = demo("train.mabn_calibration.num_batches=3", "train.precise_bn.enabled=True")
    assert calibration_from_lazy(cfg) == CalibrationSettings(num_batches=3)
    assert precise_bn_from_lazy(cfg) == PreciseBNSettings(enabled=True)


def test_instantiate_with_keeps_references_into_the_config():
    from mabn_d2.engine.lazy_training import instantiate_with

    cfg = demo("dataloader.train.mapper.image_format=RGB")
    # the test mapper's image_format is "${...train.mapper.image_format}"
    mapper = instantiate_with(cfg.dataloader.test.mapper, augmentations=[])
    assert mapper.image_format == "RGB" and mapper.augmentations.augs == []


def test_coco_evaluator_needs_no_compiled_ops_and_writes_under_the_output_dir(coco_mini, tmp_path):
    from detectron2.config import LazyConfig

    from mabn_d2.engine.evaluation import has_compiled_coco_eval
    from mabn_d2.engine.lazy_training import build_lazy_evaluator

    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(TINY_LAZY)),
                                     [f"train.output_dir={tmp_path}"])
    evaluator = build_lazy_evaluator(cfg)
    assert evaluator._use_fast_impl == has_compiled_coco_eval()
    assert evaluator._output_dir == str(tmp_path / "inference" / "coco_2017_val")
    assert build_lazy_evaluator(LazyConfig.apply_overrides(cfg, ["dataloader.evaluator=null"])) \
        is None
    with pytest.raises(ValueError, match="dataloader.evaluator=null"):
        build_lazy_evaluator(LazyConfig.apply_overrides(cfg, ["dataloader.evaluator=None"]))
