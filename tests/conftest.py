"""Shared test fixtures (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import COCO_MINI, require_coco_mini

# detectron2's builtin datasets read this when detectron2.data is first imported (helpers
# imports neither detectron2 nor mabn_d2 at import time).
os.environ.setdefault("DETECTRON2_DATASETS", str(COCO_MINI))


@pytest.fixture
def coco_mini() -> Path:
    return require_coco_mini()
