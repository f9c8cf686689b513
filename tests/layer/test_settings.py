"""Every MABN setting at the edges of its valid range, through every way of setting it: the
``MABN2d`` constructor, ``MABNSettings``, the YAML node ``MODEL.MABN`` (read back and at model
build), and the YAML-only keys ``CENTRALIZE_EXCLUDE`` and ``CALIBRATION.*``."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import fields

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from mabn_d2 import MABN2d, MABNSettings, add_mabn_config, settings_from_cfg
from mabn_d2.integration.config import calibration_from_cfg, centralize_exclude_from_cfg
from mabn_d2.layer.settings import DEFAULTS, SETTINGS

from helpers import REPO, small_backbone_cfg

INF, NAN = math.inf, math.nan
NOT_BOOLS = (1, 0, "True", None)
YAML_TYPES = (int, float, bool, str, type(None))  # what a YACS node holds (not NumPy scalars)

# name -> (valid values with the value they are stored as, invalid values). The first
# invalid value of each is the boundary one, just outside the valid range.
EDGES: dict[str, tuple[list[tuple[object, object]], list[object]]] = {
    "eps": ([(1e-300, 1e-300), (1e-5, 1e-5), (2, 2.0), (1e6, 1e6)],
            [0.0, 0, -1e-5, INF, NAN, True, "1e-5", None]),
    "momentum": ([(1e-9, 1e-9), (0.02, 0.02), (1.0, 1.0), (1, 1.0), (None, None)],
                 [1.0 + 1e-9, 0.0, 0, -0.1, 1.5, INF, NAN, True, "0.1"]),
    "buffer_size": ([(1, 1), (2.0, 2), (np.int64(3), 3), (16, 16)],
                    [0, -1, 1.5, INF, NAN, True, "4", None]),
    "warmup_iters": ([(0, 0), (1, 1), (5.0, 5), (100, 100)],
                     [-1, 0.5, -0.0001, INF, True, "1", None]),
    "renorm_start_iter": ([(0, 0), (1, 1), (np.int32(7), 7), (1000, 1000)],
                          [-1, 2.5, INF, NAN, True, "1000", None]),
    "renorm_clip": ([(1, 1.0), (1.0, 1.0), (1.0 + 1e-9, 1.0 + 1e-9), (5.0, 5.0), (1e6, 1e6)],
                    [1.0 - 1e-9, 0.5, 0, -5.0, INF, NAN, True, "5", None]),
    "backward_moving_average": ([(True, True), (False, False)], list(NOT_BOOLS)),
    "centralize_weights": ([(True, True), (False, False)], list(NOT_BOOLS)),
    "sync": ([(True, True), (False, False)], list(NOT_BOOLS)),
}
KEYS = {s.name: s.key for s in SETTINGS}
EXPECTED = {s.name: s.expected for s in SETTINGS}
VALID = [(name, value, stored) for name, (valid, _) in EDGES.items() for value, stored in valid]
INVALID = [(name, value) for name, (_, invalid) in EDGES.items() for value in invalid]
BOUNDARY_INVALID = [(name, invalid[0]) for name, (_, invalid) in EDGES.items()]


def value_id(value) -> str:
    return repr(value)


def same(a, b) -> bool:
    return a == b and type(a) is type(b)


def mabn_cfg(**keys):
    cfg = add_mabn_config(get_cfg())
    for key, value in keys.items():
        setattr(cfg.MODEL.MABN, key, value)
    return cfg


def test_every_setting_has_edge_cases():
    assert set(EDGES) == {s.name for s in SETTINGS}
    for setting in SETTINGS:
        valid, invalid = EDGES[setting.name]
        assert any(same(stored, setting.default) for _, stored in valid), setting.name
        assert invalid, setting.name


@pytest.mark.parametrize("name,value,stored", VALID, ids=value_id)
def test_valid_edge_values_are_accepted_and_kept(name, value, stored):
    layer = MABN2d(4, **{name: value})
    assert same(getattr(layer, name), stored)
    settings = MABNSettings(**{name: value})
    assert same(getattr(settings, name), stored)
    assert same(getattr(settings(4), name), stored)
    if isinstance(value, YAML_TYPES):
        from_yaml = settings_from_cfg(mabn_cfg(**{KEYS[name]: value}))
        assert same(getattr(from_yaml, name), stored)


@pytest.mark.parametrize("name,value", INVALID, ids=value_id)
def test_invalid_values_are_refused_naming_the_setting_and_range(name, value):
    def message(key: str) -> str:
        return "^" + re.escape(f"{key} must be {EXPECTED[name]}, got {value!r}") + "$"

    with pytest.raises(ValueError, match=message(name)):
        MABN2d(4, **{name: value})
    with pytest.raises(ValueError, match=message(name)):
        MABNSettings(**{name: value})
    with pytest.raises(ValueError, match=message(f"MODEL.MABN.{KEYS[name]}")):
        settings_from_cfg(mabn_cfg(**{KEYS[name]: value}))


@pytest.mark.parametrize("name,value", BOUNDARY_INVALID, ids=value_id)
def test_invalid_value_fails_the_model_build_naming_the_key(name, value):
    cfg = small_backbone_cfg("MABN", **{KEYS[name]: value})
    with pytest.raises(ValueError, match=rf"MODEL.MABN.{KEYS[name]} must be"):
        build_backbone(cfg)


def test_edge_values_reach_every_built_layer():
    edges = dict(EPS=1e-300, MOMENTUM=1.0, BUFFER_SIZE=1, WARMUP_ITERS=0, RENORM_START_ITER=0,
                 RENORM_CLIP=1.0, BACKWARD_MOVING_AVERAGE=False, CENTRALIZE_WEIGHTS=False,
                 SYNC=True)
    layers = [m for m in build_backbone(small_backbone_cfg("MABN", **edges)).modules()
              if isinstance(m, MABN2d)]
    assert layers
    for layer in layers:
        for setting in SETTINGS:
            assert getattr(layer, setting.name) == edges[setting.key], setting.key


def test_unknown_setting_names_are_listed():
    with pytest.raises(ValueError, match=r"unknown MABN settings \['MODEL.MABN.BUFER_SIZE'\]"):
        MABNSettings.from_mapping({"bufer_size": 4}, key=lambda n: f"MODEL.MABN.{n.upper()}")


@pytest.mark.parametrize("value", [[], ["backbone.bottom_up"], ("backbone", "roi_heads.box_head")],
                         ids=value_id)
def test_centralize_exclude_valid(value):
    cfg = mabn_cfg(CENTRALIZE_EXCLUDE=value)
    assert centralize_exclude_from_cfg(cfg) == tuple(value)


@pytest.mark.parametrize("value", ["backbone", [""], [".backbone"], ["backbone."], [3], None],
                         ids=value_id)
def test_centralize_exclude_invalid(value):
    with pytest.raises(ValueError, match=r"^MODEL.MABN.CENTRALIZE_EXCLUDE must be a list of"):
        centralize_exclude_from_cfg(mabn_cfg(CENTRALIZE_EXCLUDE=value))


@pytest.mark.parametrize("key,value", [
    ("MODE", "auto"), ("MODE", "always"), ("MODE", "never"), ("NUM_BATCHES", 1),
    ("NUM_BATCHES", 1000), ("BACKWARD", True), ("BACKWARD", False),
], ids=value_id)
def test_calibration_valid_edges(key, value):
    cfg = add_mabn_config(get_cfg())
    setattr(cfg.MODEL.MABN.CALIBRATION, key, value)
    settings = calibration_from_cfg(cfg)
    assert same(getattr(settings, key.lower()), value)


@pytest.mark.parametrize("key,value,expected", [
    ("MODE", "Auto", "one of"), ("MODE", None, "one of"), ("MODE", "", "one of"),
    ("NUM_BATCHES", 0, "an integer >= 1"), ("NUM_BATCHES", -1, "an integer >= 1"),
    ("NUM_BATCHES", 1.5, "an integer >= 1"), ("NUM_BATCHES", True, "an integer >= 1"),
    ("NUM_BATCHES", "20", "an integer >= 1"), ("BACKWARD", 1, "True or False"),
    ("BACKWARD", "True", "True or False"), ("BACKWARD", None, "True or False"),
], ids=value_id)
def test_calibration_invalid_edges_name_the_key(key, value, expected):
    cfg = add_mabn_config(get_cfg())
    setattr(cfg.MODEL.MABN.CALIBRATION, key, value)
    with pytest.raises(ValueError, match=rf"^MODEL.MABN.CALIBRATION.{key} must be {expected}"):
        calibration_from_cfg(cfg)


def test_the_table_drives_the_layer_signature_the_dataclass_and_the_yaml_node():
    # MABN2d's signature keeps readable literal defaults (as torch.nn.BatchNorm2d's); they
    # must be the table's, in the table's order.
    parameters = inspect.signature(MABN2d.__init__).parameters
    assert list(parameters)[2:2 + len(SETTINGS)] == [s.name for s in SETTINGS]
    assert {name: parameters[name].default for name in DEFAULTS} == DEFAULTS
    assert [f.name for f in fields(MABNSettings)] == [s.name for s in SETTINGS]
    assert MABNSettings().layer_kwargs() == DEFAULTS
    node = add_mabn_config(get_cfg()).MODEL.MABN
    assert {s.key: node[s.key] for s in SETTINGS} == {s.key: s.default for s in SETTINGS}
    doc = add_mabn_config.__doc__
    assert all(f"``{s.key}`` ({s.default!r}): {s.doc}" in doc for s in SETTINGS), doc
    readme = (REPO / "README.md").read_text()  # its config-keys table
    assert all(f"| `{s.key}` | {s.default!r} |" in readme for s in SETTINGS)

