"""The test session's own set-up: its data paths, and what a missing COCO subset means in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from detectron2.data import MetadataCatalog

from mabn_d2.data import DEMO_VAL

import helpers
from helpers import COCO_MINI, REPO, subprocess_env


@pytest.mark.parametrize("ci", ["true", "TRUE", "1", "yes", "on", "gitlab"])
def test_missing_coco_mini_fails_under_any_true_ci(ci, monkeypatch, tmp_path):
    monkeypatch.setattr(helpers, "COCO_MINI", tmp_path / "absent")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=f"CI={ci}: the real COCO subset is not at"):
        helpers.require_coco_mini()


@pytest.mark.parametrize("ci", [None, "", "0", "false", "False", "no", "off"])
def test_missing_coco_mini_skips_outside_ci(ci, monkeypatch, tmp_path):
    monkeypatch.setattr(helpers, "COCO_MINI", tmp_path / "absent")
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="the real COCO subset is not at"):
        helpers.require_coco_mini()


def test_datasets_are_registered_at_the_session_paths():
    assert os.environ["DETECTRON2_DATASETS"] == str(COCO_MINI)
    coco_val = MetadataCatalog.get("coco_2017_val")
    assert coco_val.json_file.startswith(str(COCO_MINI / "coco"))
    demo = Path(MetadataCatalog.get(DEMO_VAL).json_file)
    session = Path(os.environ["MABN_D2_DATASETS"])
    assert demo.is_relative_to(session) and not demo.is_relative_to(Path.cwd() / "datasets")


def test_session_data_paths_do_not_come_from_the_callers_environment(tmp_path):
    env = subprocess_env(REPO / "tests", DETECTRON2_DATASETS="/caller/datasets",
                         MABN_D2_DATASETS="/caller/demo", TMPDIR=str(tmp_path))
    code = ("import json, os, conftest; print(json.dumps({k: os.environ[k] for k in "
            "('DETECTRON2_DATASETS', 'MABN_D2_DATASETS')}))")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout.strip().splitlines()[-1])
    assert paths["DETECTRON2_DATASETS"] == str(COCO_MINI)
    assert Path(paths["MABN_D2_DATASETS"]).parent == tmp_path
