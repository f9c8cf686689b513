"""Shared test fixtures (helpers live in tests/helpers.py), and the test session's data paths.

The session sets its data paths itself, whatever the caller's environment holds, before any
test module imports detectron2 or mabn_d2 (both read them at import): detectron2's builtin
datasets (``DETECTRON2_DATASETS``) are the real COCO subset, and the demo dataset
(``MABN_D2_DATASETS``, default ``./datasets``) goes to a directory of this session, removed at
its end. Subprocesses started by the tests inherit both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import COCO_MINI, require_coco_mini

SESSION_DATASETS = Path(tempfile.mkdtemp(prefix="mabn_d2_test_datasets_"))
os.environ["DETECTRON2_DATASETS"] = str(COCO_MINI)
os.environ["MABN_D2_DATASETS"] = str(SESSION_DATASETS)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_DATASETS, ignore_errors=True)


@pytest.fixture
def coco_mini() -> Path:
    return require_coco_mini()
