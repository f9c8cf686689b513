"""Shared test fixtures: where the real COCO subset lies, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
COCO_MINI = Path(os.environ.get("MABN_D2_COCO_MINI", REPO.parent / "shared" / "data" / "coco_mini"))
# detectron2's builtin datasets read this when detectron2.data is first imported.
os.environ.setdefault("DETECTRON2_DATASETS", str(COCO_MINI))


def require_coco_mini() -> Path:
    """The coco_mini root; skip (fresh clone without ../shared) or fail (CI=true) if absent."""
    if (COCO_MINI / "coco" / "annotations" / "instances_train2017.json").is_file():
        return COCO_MINI
    reason = (
        f"the real COCO subset is not at {COCO_MINI} (expected ../shared/data/coco_mini beside "
        "the repository, or MABN_D2_COCO_MINI)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture
def coco_mini() -> Path:
    return require_coco_mini()
